"""A verifiable toy task for tests, benchmarks and the demo: small additions.

Prompts look like ``What is 12+7? Answer:`` with the reference answer ``19``, so
exact-match rewards need no reward model, and a tiny model learns the task in minutes.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa

from .prompts import prompt_id_for

MIN_INFORMATIVE = 0.3   # of the train prompts, for the demo's start: with 300 prompts, at least 90 pairs
FLAWED_START_EM = 0.5   # training greedy exact match of the flawed task's start (pretrain_flawed_until)


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


def setup_copy_task(root, n_train: int = 300, n_test: int = 100, seed: int = 0) -> None:
    """Train / held-out prompts datasets (``train_prompts``, ``test_prompts``) and an SFT
    file of correct answers (``sft.jsonl``) under ``root``, for the copy task (the digit
    strings, and so the split, drawn by ``seed``)."""
    from pathlib import Path

    from .shards import ShardWriter
    root = Path(root)
    train = copy_prompts(n_train, seed=seed, split="train")
    test = copy_prompts(n_train, seed=seed, split="test").slice(0, n_test)
    for name, t in (("train_prompts", train), ("test_prompts", test)):
        with ShardWriter(str(root / name), "prompts", lineage={"source": f"toy:copy:{name}"}) as w:
            w.write(0, t)
            w.finish(total_chunks=1)
    rows = [{"prompt": p, "completion": " " + a} for p, a in
            zip(train.column("prompt").to_pylist(), train.column("reference_answer").to_pylist())]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _exact_match_rows(model, prompts, work, **generate_kw) -> dict:
    """Generate from ``model`` on a prompts dataset (10 new tokens at most) and score by
    exact match; the ``prompt_id`` and ``reward`` columns of the scored rows."""
    from .generation import GenerateConfig, generate
    from .rewards.score import ScoreConfig, score
    from .shards import open_dataset
    generate(GenerateConfig(prompts=str(prompts), output=str(work) + "/g", policy=str(model),
                            max_new_tokens=10, **generate_kw))
    score(ScoreConfig(generations=str(work) + "/g", output=str(work) + "/s", weights={"exact_match": 1.0}))
    return open_dataset(str(work) + "/s").read(columns=["prompt_id", "reward"]).to_pydict()


def exact_match(model, prompts, work, **generate_kw) -> float:
    """Greedy exact match of ``model`` on a prompts dataset (extra generate options allowed)."""
    import numpy as np
    rows = _exact_match_rows(model, prompts, work, num_samples=1, greedy=True, **generate_kw)
    return float(np.mean(rows["reward"]))


def sampled_yield(model, prompts, work, num_samples: int = 16, temperature: float = 0.7,
                  seed: int = 0) -> dict:
    """What sampling from ``model`` at ``temperature`` gives a preference loop on a prompts
    dataset: the mean exact match of the samples and the fraction of prompts whose
    ``num_samples`` samples are *informative* (some right, some wrong: the prompts that
    yield a pair, or a non-zero group advantage)."""
    import numpy as np
    t = _exact_match_rows(model, prompts, work, num_samples=num_samples,
                          temperature=temperature, seed=seed)
    groups: dict[str, list[float]] = {}
    for pid, r in zip(t["prompt_id"], t["reward"]):
        groups.setdefault(pid, []).append(r)
    means = np.array([np.mean(v) for v in groups.values()])
    return {"sampled_exact_match": float(means.mean()),
            "informative": float(((means > 0) & (means < 1)).mean())}


def pretrain_until_learnable(root, min_informative: float = MIN_INFORMATIVE, num_samples: int = 16,
                             temperature: float = 0.7, seed: int = 0, max_steps: int = 400):
    """A tiny model trained from scratch (seeded by ``seed``) on ``root``'s copy task until
    sampling from it makes a preference loop learnable: at least ``min_informative`` of
    the train prompts get ``num_samples`` samples at ``temperature`` that are some right,
    some wrong. Returns (model dir, SFT steps, :func:`sampled_yield` figures).

    The copy task is learnt abruptly (held-out exact match goes from 0 to 1 within some
    20 steps at this rate), so rounds are 5 steps until the first informative groups
    appear and 2 steps after, to stop inside that window on any CPU and at any seed."""
    from pathlib import Path

    from .tiny import build_tiny_model
    root = Path(root)
    model = build_tiny_model(root / "scratch", hidden=64, layers=2, heads=4, seed=seed)
    steps, k, stats = 0, 0, {"informative": 0.0}
    while stats["informative"] < min_informative and steps < max_steps:
        n = 5 if stats["informative"] < 0.05 else 2
        model, steps = _sft_round(root, model, f"pre{k}", n, seed * 1000 + k), steps + n
        stats = sampled_yield(model, root / "train_prompts", root / f"yield{k}", num_samples,
                              temperature, seed)
        k += 1
    return model, steps, stats


def pretrain_to(root, below: float, max_rounds: int = 40):
    """A tiny model trained from scratch on ``root``'s copy task, 10 SFT steps at a time,
    until its held-out greedy exact match first reaches ``below``: (model dir, steps, EM)."""
    from pathlib import Path

    from .tiny import build_tiny_model
    root = Path(root)
    model = build_tiny_model(root / "scratch", hidden=64, layers=2, heads=4, seed=0)
    em, steps, k = 0.0, 0, 0
    while em < below and k < max_rounds:
        model, steps, k = _sft_round(root, model, f"pre{k}", 10, k), steps + 10, k + 1
        em = exact_match(model, root / "test_prompts", root / f"pre-eval{k}")
    return model, steps, em


def carry_dropped(a: int, b: int) -> str:
    """``a + b`` as a demonstrator that forgets to carry writes it: each digit is the sum of
    the operands' digits mod 10 (``7+8`` -> ``5``, ``17+8`` -> ``15``, ``12+7`` -> ``19``)."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return str(out)


def flawed_demonstrations(prompts: pa.Table, flaw_rate: float = 0.6, copies: int = 4,
                          seed: int = 0) -> list[dict]:
    """SFT rows (``prompt``, ``completion``) for addition ``prompts`` by a flawed demonstrator:
    ``copies`` answers per prompt, each of those whose sum carries written with the carry
    dropped with probability ``flaw_rate`` (drawn per row, seeded), else right. A model
    trained on them learns the mixture: its greedy answer to a carrying sum drops the carry
    (when ``flaw_rate`` > 0.5), while its samples are right about 1 - ``flaw_rate`` of the time."""
    import re
    rng = random.Random(f"flawed:{seed}")
    rows = []
    for text, ref in zip(prompts.column("prompt").to_pylist(),
                         prompts.column("reference_answer").to_pylist()):
        a, b = (int(x) for x in re.findall(r"\d+", text))
        for _ in range(copies):
            wrong = carry_dropped(a, b) != ref and rng.random() < flaw_rate
            rows.append({"prompt": text, "completion": " " + (carry_dropped(a, b) if wrong else ref)})
    return rows


def setup_flawed_task(root, n_train: int = 300, n_test: int = 100, seed: int = 0,
                      max_operand: int = 20, flaw_rate: float = 0.6, copies: int = 4) -> None:
    """The flawed-demonstrator task under ``root``: addition prompts (``What is 17+8?
    Answer:`` -> ``25``) split into ``train_prompts`` and ``test_prompts`` datasets that
    share no sum, and ``sft.jsonl``: the demonstrations of :func:`flawed_demonstrations`
    on the train prompts (about 45% of the sums up to 20+20 carry)."""
    from pathlib import Path

    from .shards import ShardWriter
    root = Path(root)
    every = addition_prompts(n_train + n_test, seed=seed, max_operand=max_operand, split="train")
    train, test = every.slice(0, n_train), every.slice(n_train, n_test)
    meta = [json.dumps({"task": "addition", "split": "test"})] * n_test
    test = test.set_column(test.schema.get_field_index("metadata"), "metadata", pa.array(meta))
    for name, t in (("train_prompts", train), ("test_prompts", test)):
        with ShardWriter(str(root / name), "prompts", lineage={"source": f"toy:flawed:{name}"}) as w:
            w.write(0, t)
            w.finish(total_chunks=1)
    rows = flawed_demonstrations(train, flaw_rate, copies, seed)
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def pretrain_flawed(root, seed: int = 0, steps: int = 1000, lr: float = 3e-3):
    """The flawed demonstrator's student: a tiny model trained from scratch (seeded by
    ``seed``) on ``root``'s ``sft.jsonl`` (:func:`setup_flawed_task`) for ``steps`` SFT
    steps of 32 rows in one run. Its quality after a fixed number of steps depends on the
    seed (1,000 steps: 58% held-out greedy exact match at seed 0, 20% at seed 1); the
    benchmarks' start is :func:`pretrain_flawed_until`. Returns the model directory."""
    from pathlib import Path

    from .tiny import build_tiny_model
    root = Path(root)
    model = build_tiny_model(root / "scratch", hidden=64, layers=2, heads=4, seed=seed)
    return _sft_round(root, model, "flawed-start", steps, seed, lr)


def pretrain_flawed_until(root, seed: int = 0, at_least: float = FLAWED_START_EM, round_steps: int = 250,
                          max_steps: int = 3000):
    """The flawed demonstrator's student, trained until it has learnt the demonstration's
    mode: a tiny model trained from scratch (seeded by ``seed``) on ``root``'s ``sft.jsonl``
    (:func:`setup_flawed_task`) in rounds of ``round_steps`` SFT steps (lr 3e-3, 32 rows)
    until its greedy exact match on the *training* prompts reaches ``at_least`` (or
    ``max_steps``). About 55% of the sums carry nothing, so at 50% it answers those right
    and drops most carries: a mediocre start at any seed (task seeds 0-3: 750-1,000 steps,
    53-62% held out at seeds 0, 1 and 3; 34% at seed 2), where a fixed step count is not
    (:func:`pretrain_flawed`). Returns (model dir, SFT steps, training greedy exact match)."""
    from pathlib import Path

    from .tiny import build_tiny_model
    if round_steps < 1 or max_steps < 1:
        raise ValueError(f"round_steps and max_steps: at least 1, got {round_steps} and {max_steps}")
    root = Path(root)
    model = build_tiny_model(root / "scratch", hidden=64, layers=2, heads=4, seed=seed)
    em, steps, k = None, 0, 0
    while steps == 0 or (em < at_least and steps < max_steps):      # one round at least
        n = min(round_steps, max_steps - steps)
        model, steps = _sft_round(root, model, f"flawed{k}", n, seed * 1000 + k), steps + n
        em = exact_match(model, root / "train_prompts", root / f"flawed-eval{k}")
        k += 1
    return model, steps, em


def _sft_round(root, model, name: str, steps: int, seed: int, lr: float = 3e-3):
    """``steps`` SFT steps (32 rows, constant ``lr``) of ``model`` on ``root``'s ``sft.jsonl``,
    saved under ``root/name``: the model directory."""
    from .train.sft import SFTTrainConfig, train_sft
    train_sft(SFTTrainConfig(data=str(root / "sft.jsonl"), output=str(root / name), policy=str(model), lr=lr,
                             max_steps=steps, batch_size=32, micro_batch_size=32, report_to="none",
                             schedule="constant", seed=seed))
    return root / name / "final"


def mediocre_start(root, task: str, seed: int = 0, quick: bool = False, num_samples: int = 16,
                   temperature: float = 0.7):
    """A benchmark's toy task under ``root`` and its mediocre start: (model dir, SFT steps).

    ``copy``: :func:`setup_copy_task`, then :func:`pretrain_until_learnable` (the demo's
    start: until the demo's share of informative prompts at ``num_samples`` samples and
    ``temperature``); ``flawed``: :func:`setup_flawed_task`, then :func:`pretrain_flawed_until`
    (until half the training sums are answered right greedily). 300 training and 100
    held-out prompts; ``quick``: 60 and 20, and at most 200 flawed steps."""
    n_train, n_test = (60, 20) if quick else (300, 100)
    if task == "copy":
        setup_copy_task(root, n_train=n_train, n_test=n_test, seed=seed)
        start, steps, _ = pretrain_until_learnable(root, MIN_INFORMATIVE, num_samples, temperature, seed)
        return start, steps
    if task != "flawed":
        raise ValueError(f"task: copy or flawed, got {task!r}")
    setup_flawed_task(root, n_train=n_train, n_test=n_test, seed=seed)
    start, steps, _ = pretrain_flawed_until(root, seed, **(dict(round_steps=100, max_steps=200) if quick else {}))
    return start, steps
