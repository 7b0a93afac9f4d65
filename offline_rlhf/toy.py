"""A verifiable toy task for tests, benchmarks and the demo: small additions.

Prompts look like ``What is 12+7? Answer:`` with the reference answer ``19``, so
exact-match rewards need no reward model, and a tiny model learns the task in minutes.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa

from .prompts import prompt_id_for


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


def setup_copy_task(root, n_train: int = 300, n_test: int = 100) -> None:
    """Train / held-out prompts datasets (``train_prompts``, ``test_prompts``) and an SFT
    file of correct answers (``sft.jsonl``) under ``root``, for the copy task."""
    from pathlib import Path

    from .shards import ShardWriter
    root = Path(root)
    train, test = copy_prompts(n_train, split="train"), copy_prompts(n_train, split="test").slice(0, n_test)
    for name, t in (("train_prompts", train), ("test_prompts", test)):
        with ShardWriter(str(root / name), "prompts", lineage={"source": f"toy:copy:{name}"}) as w:
            w.write(0, t)
            w.finish(total_chunks=1)
    rows = [{"prompt": p, "completion": " " + a} for p, a in
            zip(train.column("prompt").to_pylist(), train.column("reference_answer").to_pylist())]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def exact_match(model, prompts, work, **generate_kw) -> float:
    """Greedy exact match of ``model`` on a prompts dataset (extra generate options allowed)."""
    import numpy as np

    from .generation import GenerateConfig, generate
    from .rewards.score import ScoreConfig, score
    from .shards import open_dataset
    generate(GenerateConfig(prompts=str(prompts), output=str(work) + "/g", policy=str(model),
                            num_samples=1, greedy=True, max_new_tokens=10, **generate_kw))
    score(ScoreConfig(generations=str(work) + "/g", output=str(work) + "/s", weights={"exact_match": 1.0}))
    return float(np.mean(open_dataset(str(work) + "/s").read(columns=["reward"]).column("reward").to_pylist()))


def pretrain_to(root, below: float, max_rounds: int = 40):
    """A tiny model trained from scratch on ``root``'s copy task, 10 SFT steps at a time,
    until its held-out greedy exact match first reaches ``below``: (model dir, steps, EM)."""
    from pathlib import Path

    from .tiny import build_tiny_model
    from .train.sft import SFTTrainConfig, train_sft
    root = Path(root)
    model = build_tiny_model(root / "scratch", hidden=64, layers=2, heads=4, seed=0)
    em, steps, k = 0.0, 0, 0
    while em < below and k < max_rounds:
        train_sft(SFTTrainConfig(data=str(root / "sft.jsonl"), output=str(root / f"pre{k}"),
                                 policy=str(model), lr=3e-3, max_steps=10, batch_size=32,
                                 micro_batch_size=32, report_to="none", schedule="constant", seed=k))
        model, steps, k = root / f"pre{k}" / "final", steps + 10, k + 1
        em = exact_match(model, root / "test_prompts", root / f"pre-eval{k}")
    return model, steps, em
