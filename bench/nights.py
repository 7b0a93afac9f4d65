"""Nights that keep improving: curation from stored history, and the guard, on a flawed start.

    python bench/nights.py [--nights 6] [--per-night 40] [--out bench/results/nights.json]

Task (offline_rlhf/toy.py, ``setup_flawed_task``): sums up to 20+20 (``What is 17+8?
Answer:``), a pool of 120 training prompts and 60 held-out ones that share no sum. The
start is a tiny model (hidden 64, 2 layers) trained from scratch on a flawed
demonstrator's answers, which drop the carry 60% of the time (``pretrain_flawed``): its
greedy answer to a carrying sum is wrong, its samples are sometimes right, and the sums
without a carry it already gets right every time.

Two runs of the same nights job (``pipeline run JOB --nights N``; each night draws
``--per-night`` prompts of the pool, K=8 samples at temperature 1, exact-match reward,
``train grpo`` for ``--steps`` steps of 64 responses, lr 1e-3; held-out greedy exact
match; a sampled held-out eval for the drift metrics; ``[nights.guard] reward_margin =
0.01``):

- ``curate = "none"``: the plain draw (disjoint prompts until the pool is used up);
- ``curate = "informative"``: unseen or last-informative prompts first, prompts whose
  last ``skip_after = 1`` group was all right or all wrong skipped.

Printed: per night, the informative fraction of the night's groups, prompts skipped and
replayed, held-out EM and whether the night was promoted; the samples generated until
held-out EM first reaches ``--target`` with and without curation (target of the issue:
curated <= 0.6x plain), and the final policy's held-out EM against the best night's
(target: never more than 1 point below). Timings are wall-clock on whatever machine
runs it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

JOB = """
name = "nights_bench"
workdir = "{work}"
[nights]
count = {nights}
prompts_per_night = {per_night}
seed = 1
curate = "{curate}"
skip_after = 1
[nights.guard]
reward_margin = 0.01
[inputs]
policy = "{policy}"
prompts = "{prompts}"
heldout = "{heldout}"
[stages.generate]
kind = "generate"
prompts = "inputs.prompts"
policy = "inputs.policy"
num_samples = 8
temperature = 1.0
max_new_tokens = 6
[stages.score]
kind = "score"
generations = "stages.generate"
weights = {{ exact_match = 1.0 }}
[stages.train]
kind = "train"
algorithm = "grpo"
data = "stages.score"
policy = "inputs.policy"
lr = 1e-3
max_steps = {steps}
batch_size = 64
micro_batch_size = 64
schedule = "constant"
report_to = "none"
[stages.eval_sampled]
kind = "eval"
policy = "stages.train"
baseline = "inputs.policy"
prompts = "inputs.heldout"
weights = {{ exact_match = 1.0 }}
max_new_tokens = 6
greedy = false
temperature = 1.0
[stages.eval]
kind = "eval"
policy = "stages.train"
baseline = "inputs.policy"
prompts = "inputs.heldout"
weights = {{ exact_match = 1.0 }}
max_new_tokens = 6
"""


def run(tmp: Path, curate: str, start: Path, args) -> list[dict]:
    from offline_rlhf.nights import run_nights
    job = tmp / f"{curate}.toml"
    job.write_text(JOB.format(work=tmp / curate, nights=args.nights, per_night=args.per_night,
                              curate=curate, steps=args.steps, policy=start,
                              prompts=tmp / "train_prompts", heldout=tmp / "test_prompts"))
    return run_nights(str(job))


def summarise(records: list[dict], target: float, k: int) -> dict:
    nights = [{"night": r["night"], "informative_fraction": r["history"]["informative_fraction"],
               "skipped": r["draw"]["skipped"], "replayed": r["draw"]["replayed"],
               "samples": r["draw"]["count"] * k, "exact_match": r["evals"]["eval"]["policy_reward"],
               "start_em": r["evals"]["eval"]["baseline_reward"], "promoted": r["guard"]["promoted"]}
              for r in records]
    total, to_target = 0, None
    for n in nights:
        total += n["samples"]
        if to_target is None and n["exact_match"] >= target:
            to_target = total
    best = max((n["exact_match"] for n in nights if n["promoted"]), default=nights[0]["start_em"])
    last = records[-1]["guard"]
    final = next((n["exact_match"] for n in nights if records[n["night"]]["policy_out"] == last["next_policy"]),
                 nights[0]["start_em"])
    return {"nights": nights, "samples_to_target": to_target, "best_em": best, "final_em": final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nights", type=int, default=6)
    ap.add_argument("--pool", type=int, default=300, help="training prompts: the start's SFT data and the nights' pool")
    ap.add_argument("--heldout", type=int, default=100, help="held-out prompts (no sum shared with the pool)")
    ap.add_argument("--per-night", type=int, default=60, help="prompts drawn a night")
    ap.add_argument("--steps", type=int, default=20, help="grpo steps a night")
    ap.add_argument("--target", type=float, default=0.8, help="held-out greedy exact match to reach")
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nights.json"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job shares the cores)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from offline_rlhf.toy import pretrain_flawed, setup_flawed_task
    tmp = Path(tempfile.mkdtemp(prefix="bench-nights-"))
    res: dict = {"args": vars(args)}
    try:
        t0 = time.perf_counter()
        setup_flawed_task(tmp, n_train=args.pool, n_test=args.heldout)
        start = pretrain_flawed(tmp, steps=args.pretrain_steps)
        res["pretrain_seconds"] = time.perf_counter() - t0
        for curate in ("none", "informative"):
            t0 = time.perf_counter()
            res[curate] = summarise(run(tmp, curate, start, args), args.target, 8)
            res[curate]["seconds"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(res, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


def _print(res: dict, args) -> None:
    start = res["none"]["nights"][0]["start_em"]
    print(f"\nNights on the flawed-demonstrator addition task (start: {start:.0%} held-out greedy EM; "
          f"{args.per_night} prompts x K=8 a night, {args.steps} grpo steps)\n")
    print(f"{'curate':<13}{'night':>6}{'informative':>13}{'skipped':>9}{'replayed':>10}{'held-out EM':>13}"
          f"{'promoted':>10}")
    for c in ("none", "informative"):
        for n in res[c]["nights"]:
            print(f"{c:<13}{n['night']:>6}{n['informative_fraction']:>13.0%}{n['skipped']:>9}"
                  f"{n['replayed']:>10}{n['exact_match']:>13.0%}{'yes' if n['promoted'] else 'no':>10}")
    a, b = res["none"]["samples_to_target"], res["informative"]["samples_to_target"]
    ratio = f"{b / a:.2f}x" if a and b else "n/a"
    print(f"\nsamples to {args.target:.0%} held-out EM: plain {a or 'not reached'}, curated "
          f"{b or 'not reached'} ({ratio}; target <= 0.6x)")
    for c in ("none", "informative"):
        r = res[c]
        print(f"{c}: final {r['final_em']:.1%} vs best night {r['best_em']:.1%} (gap "
              f"{100 * (r['best_em'] - r['final_em']):.1f} points; target <= 1); {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
