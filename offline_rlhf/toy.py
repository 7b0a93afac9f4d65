"""A verifiable toy task for tests, benchmarks and the demo: small additions.

Prompts look like ``What is 12+7? Answer:`` with the reference answer ``19``, so
exact-match rewards need no reward model, and a tiny model learns the task in minutes.
"""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa


def prompt_id_for(text: str) -> str:
    """Content-derived prompt id: sha256 of the canonical prompt, first 16 hex digits."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def addition_prompts(n: int, seed: int = 0, max_operand: int = 20, split: str = "train",
                     chat_fraction: float = 0.0) -> pa.Table:
    """``n`` distinct addition prompts as a table in the prompts schema.

    ``chat_fraction`` of them are given as chat messages instead of plain text.
    """
    rng = random.Random(f"{seed}:{split}")
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if n > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct prompts with max_operand={max_operand}")
    rows = []
    for a, b in rng.sample(pairs, n):
        text = f"What is {a}+{b}? Answer:"
        chat = rng.random() < chat_fraction
        rows.append({
            "prompt_id": prompt_id_for(text),
            "prompt": None if chat else text,
            "messages": [{"role": "user", "content": text}] if chat else None,
            "reference_answer": str(a + b),
            "metadata": json.dumps({"task": "addition", "split": split}),
        })
    return pa.Table.from_pylist(rows)


def copy_prompts(n: int, seed: int = 0, split: str = "train", length: int = 4) -> pa.Table:
    """``n`` distinct copy prompts (``Copy: 3 8 1 9 =>`` -> ``3 8 1 9``); the train and
    test splits never share a digit string."""
    rng = random.Random(f"copy:{seed}")
    seen: set[str] = set()
    every = []
    while len(every) < 2 * n + 50:
        digits = " ".join(str(rng.randrange(10)) for _ in range(length))
        if digits not in seen:
            seen.add(digits)
            every.append(digits)
    mine = every[:n] if split == "train" else every[n:2 * n]
    rows = [{"prompt_id": prompt_id_for(f"Copy: {d} =>"), "prompt": f"Copy: {d} =>",
             "messages": None, "reference_answer": d,
             "metadata": json.dumps({"task": "copy", "split": split})} for d in mine]
    return pa.Table.from_pylist(rows)
