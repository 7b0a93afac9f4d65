"""Nights that keep improving: curation from stored history, and the guard, on a flawed start.

    python bench/nights.py [--seeds 0 1 2] [--nights 10] [--lr 3e-5] [--out bench/results/nights.json]

Task (offline_rlhf/toy.py, ``setup_flawed_task``): sums up to 20+20 (``What is 17+8?
Answer:``), 300 training prompts and 100 held-out ones that share no sum. The start
(one for every seed, ``--start-seed``) is a tiny model (hidden 64, 2 layers) trained
from scratch on a flawed demonstrator's answers to the 300, which drop the carry 60% of
the time (``pretrain_flawed``): its greedy answer to a carrying sum is mostly wrong,
its samples are sometimes right, and the sums without a carry it mostly gets right.

The nights' pool is the first ``--pool`` (120) of the training prompts. For each seed,
two runs of the same nights job (``pipeline run JOB --nights N``; the seed sets the
draw, the samples and training; each night ``--per-night`` prompts of the pool, K=8
samples at temperature 1, exact-match reward, ``train grpo`` for ``--steps`` steps of
64 responses at ``--lr``, clip 0.2/0.28; held-out greedy exact match; a sampled held-out
eval for the drift metrics; ``[nights.guard] reward_margin = 0.01``):

- plain (``curate = "none"``): every night draws ``--per-night`` prompts (by default
  the whole pool, every night);
- curated (``curate = "informative"``, ``skip_after = 1``, ``fill = false``): prompts
  whose last group was all right or all wrong are skipped and not replaced, so a night
  generates only the groups expected to be informative.

Printed: per night, the informative fraction of the night's groups, prompts skipped and
replayed, held-out EM and whether the night was promoted; per seed and in all, the
samples generated until held-out EM first reaches ``--target`` with and without
curation (target of the issue: curated <= 0.6x plain), and the largest gap between a
run's final policy and its best night (target: at most 1 point). Timings are
wall-clock on whatever machine runs it.
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
seed = {seed}
curate = "{curate}"
skip_after = 1
fill = {fill}
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
seed = {seed}
[stages.score]
kind = "score"
generations = "stages.generate"
weights = {{ exact_match = 1.0 }}
[stages.train]
kind = "train"
algorithm = "grpo"
data = "stages.score"
policy = "inputs.policy"
lr = {lr}
max_steps = {steps}
batch_size = 64
micro_batch_size = 64
clip_high = 0.28
schedule = "constant"
seed = {seed}
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


def run(tmp: Path, curate: str, start: Path, seed: int, args) -> list[dict]:
    from offline_rlhf.nights import run_nights
    work = tmp / curate
    tmp.mkdir(parents=True, exist_ok=True)
    job = tmp / f"{curate}.toml"
    job.write_text(JOB.format(work=work, nights=args.nights, per_night=args.per_night,
                              curate=curate, fill="false" if curate == "informative" else "true",
                              steps=args.steps, lr=args.lr, seed=seed, policy=start,
                              prompts=tmp.parent / "pool", heldout=tmp.parent / "test_prompts"))
    return run_nights(str(job))


def write_pool(tmp: Path, n: int) -> None:
    """The nights' pool: the first ``n`` of the start's SFT prompts."""
    from offline_rlhf.shards import ShardWriter, open_dataset
    table = open_dataset(str(tmp / "train_prompts")).read()
    with ShardWriter(str(tmp / "pool"), "prompts", lineage={"source": "bench:nights:pool"}) as w:
        w.write(0, table.slice(0, n))
        w.finish(total_chunks=1)


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
    ap.add_argument("--nights", type=int, default=10)
    ap.add_argument("--sft-prompts", type=int, default=300, help="prompts of the start's flawed SFT data")
    ap.add_argument("--pool", type=int, default=120, help="the nights' pool: the first N of those prompts")
    ap.add_argument("--heldout", type=int, default=100, help="held-out prompts (no sum shared with the pool)")
    ap.add_argument("--per-night", type=int, default=120, help="prompts drawn a night")
    ap.add_argument("--steps", type=int, default=20, help="grpo steps of 64 responses a night")
    ap.add_argument("--lr", type=float, default=3e-5, help="grpo learning rate")
    ap.add_argument("--target", type=float, default=0.8, help="held-out greedy exact match to reach")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="one pair of runs per seed (the draw, sampling, training)")
    ap.add_argument("--start-seed", type=int, default=0,
                    help="seed of the task split and the start model (one start for every seed)")
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nights.json"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job shares the cores)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from offline_rlhf.toy import pretrain_flawed, setup_flawed_task
    res: dict = {"args": vars(args), "seeds": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-nights-"))
    try:
        t0 = time.perf_counter()
        setup_flawed_task(tmp, n_train=args.sft_prompts, n_test=args.heldout, seed=args.start_seed)
        write_pool(tmp, args.pool)
        start = pretrain_flawed(tmp, seed=args.start_seed, steps=args.pretrain_steps)
        res["pretrain_seconds"] = time.perf_counter() - t0
        for seed in args.seeds:
            r: dict = {}
            for curate in ("none", "informative"):
                t0 = time.perf_counter()
                r[curate] = summarise(run(tmp / f"seed-{seed}", curate, start, seed, args),
                                      args.target, 8)
                r[curate]["seconds"] = time.perf_counter() - t0
            res["seeds"][seed] = r
            _print(r, seed, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _overall(res, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


def _print(res: dict, seed: int, args) -> None:
    start = res["none"]["nights"][0]["start_em"]
    print(f"\nSeed {seed}: nights on the flawed-demonstrator addition task (start: {start:.0%} held-out "
          f"greedy EM; {args.per_night} of {args.pool} prompts x K=8 a night, {args.steps} grpo steps, "
          f"lr {args.lr:g})\n")
    print(f"{'curate':<13}{'night':>6}{'informative':>13}{'skipped':>9}{'replayed':>10}{'held-out EM':>13}"
          f"{'promoted':>10}")
    for c in ("none", "informative"):
        for n in res[c]["nights"]:
            print(f"{c:<13}{n['night']:>6}{n['informative_fraction']:>13.0%}{n['skipped']:>9}"
                  f"{n['replayed']:>10}{n['exact_match']:>13.0%}{'yes' if n['promoted'] else 'no':>10}")
    for c in ("none", "informative"):
        r = res[c]
        print(f"{c}: samples to {args.target:.0%} {r['samples_to_target'] or 'not reached'}; final "
              f"{r['final_em']:.1%} vs best night {r['best_em']:.1%} (gap "
              f"{100 * (r['best_em'] - r['final_em']):.1f} points); {r['seconds']:.0f} s")


def _overall(res: dict, args) -> None:
    """Across seeds: samples to the target (a run that never reaches it counts as the
    samples of all its nights plus one more night: a lower bound), and the largest gap."""
    per_night = args.per_night * 8
    cap = per_night * (args.nights + 1)
    rows = []
    for seed, r in res["seeds"].items():
        a = r["none"]["samples_to_target"] or cap
        b = r["informative"]["samples_to_target"] or cap
        rows.append((seed, a, b, b / a))
    total_a, total_b = sum(a for _, a, _, _ in rows), sum(b for _, _, b, _ in rows)
    gap = max(100 * (r[c]["best_em"] - r[c]["final_em"]) for r in res["seeds"].values()
              for c in ("none", "informative"))
    res["summary"] = {"samples_to_target": {str(s): {"plain": a, "curated": b, "ratio": q} for s, a, b, q in rows},
                      "ratio_of_totals": total_b / total_a, "largest_gap_points": gap,
                      "not_reached_counts_as": cap}
    print(f"\nSamples to {args.target:.0%} held-out greedy EM (not reached: counted as {cap}, a lower bound)")
    print(f"{'seed':>5}{'plain':>8}{'curated':>9}{'ratio':>7}")
    for s, a, b, q in rows:
        print(f"{s:>5}{a:>8}{b:>9}{q:>7.2f}")
    print(f"{'all':>5}{total_a:>8}{total_b:>9}{total_b / total_a:>7.2f}   (target: curated <= 0.6x plain)")
    print(f"largest gap between a run's final policy and its best night: {gap:.1f} points (target <= 1)")


if __name__ == "__main__":
    main()
