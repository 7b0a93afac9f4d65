"""Off-policy GRPO on the copy toy task: nightly learning, and what stale data does.

    python bench/grpo_learning.py [--out bench/results/grpo_learning.json]

The start model is the one of bench/rest_learning.py: a tiny model (hidden 64, 2
layers) pre-trained here to a mediocre held-out greedy exact match (~20%) on copying
4 digits (300 training prompts, 100 held-out ones that share no string with them).

1. Nights (`offline-rlhf pipeline run JOB --nights 3`, the nights driver): each night
   samples K=8 responses per training prompt at temperature 1 with the latest policy,
   scores them by exact match and trains `train grpo` (GRPO advantages, token ratio
   against the stored behaviour log-probs, PPO clip 0.2, token-mean loss, no KL; 30
   steps of 64 responses, lr 1e-3) on that night's informative groups; then evaluates
   greedy exact match on the held-out prompts. Target (issue 15): >= 90% within 3 nights.
2. Off-policy study. A slower chain (the same nights with 8 steps each) gives policies
   pi_0..pi_4 whose held-out accuracy stays near the start's. Night 0's data D_0 (sampled
   by pi_0: the data the first night above trained on) is then trained on for one night
   (30 steps, as above) from pi_0 (fresh), pi_1, pi_2 and pi_4 (data 1, 2 and 4 nights
   stale): the data are the same, only their staleness differs. With importance
   correction (clip: the ratio pi/mu against the stored behaviour log-probs, clipped;
   truncate: weights min(pi/mu, 1)) and without (importance none: ratio held at 1, as
   if the data were the policy's own). Reported: the staleness KL(mu || pi) at the first
   and last step, the first step's clip fraction and effective sample size, and held-out
   greedy exact match after training, for two training seeds (data order).

Prints two tables and saves JSON (timings are wall-clock on whatever machine runs it).
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
name = "grpo_toy"
workdir = "{work}"
[nights]
count = {nights}
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
max_new_tokens = 10
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
[stages.eval]
kind = "eval"
policy = "stages.train"
baseline = "inputs.policy"
prompts = "inputs.heldout"
weights = {{ exact_match = 1.0 }}
max_new_tokens = 10
"""

VARIANTS = {"clip": {}, "truncate": {"objective": "truncate"}, "none": {"importance": "none"}}
STALENESS = (0, 1, 2, 4)


def run_job(tmp: Path, name: str, start: Path, nights: int, steps: int) -> list[dict]:
    from offline_rlhf.nights import run_nights
    job = tmp / f"{name}.toml"
    job.write_text(JOB.format(work=tmp / name, nights=nights, steps=steps, policy=start,
                              prompts=tmp / "train_prompts", heldout=tmp / "test_prompts"))
    return run_nights(str(job))


def study(tmp: Path, chain: list[dict], steps: int, seeds: tuple[int, ...]) -> list[dict]:
    """Night 0's data D_0 trained on from pi_s, s = 0, 1, 2, 4 nights ahead of it, with
    each variant and training seed: the data are the same, only their staleness differs."""
    from offline_rlhf.toy import exact_match
    from offline_rlhf.train.grpo import GRPOTrainConfig, train_grpo
    data = chain[0]["data"]
    rows = []
    for s in STALENESS:
        policy = chain[s]["policy_in"] if s < len(chain) else chain[-1]["policy_out"]
        for name, kw in VARIANTS.items():
            for seed in seeds:
                out = tmp / f"study-{s}-{name}-{seed}"
                t0 = time.perf_counter()
                summary = train_grpo(GRPOTrainConfig(
                    data=data, output=str(out), policy=policy, lr=1e-3, max_steps=steps, batch_size=64,
                    micro_batch_size=64, schedule="constant", report_to="none", seed=seed, **kw))
                first, last = summary["first"], summary["last"]
                rows.append({"stale_nights": s, "variant": name, "seed": seed,
                             "examples": summary["data"]["examples"],
                             "staleness_kl_first": first["staleness_kl"],
                             "staleness_kl_last": last["staleness_kl"],
                             "clip_fraction_first": first["clip_fraction"], "ess_first": first["is_weight/ess"],
                             "train_seconds": time.perf_counter() - t0,
                             "exact_match": exact_match(out / "final", tmp / "test_prompts",
                                                        tmp / f"e-{s}-{name}-{seed}")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nights", type=int, default=3, help="nights of the main loop")
    ap.add_argument("--steps", type=int, default=30, help="grpo steps per night (and per study run)")
    ap.add_argument("--chain-steps", type=int, default=8, help="grpo steps per night of the study's chain")
    ap.add_argument("--seeds", type=int, default=2, help="training seeds per study cell")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_learning.json"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    from offline_rlhf.toy import pretrain_to, setup_copy_task
    tmp = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    res: dict = {}
    try:
        setup_copy_task(tmp)
        t0 = time.perf_counter()
        start, pre_steps, start_em = pretrain_to(tmp, 0.15)
        res["start"] = {"exact_match": start_em, "pretrain_steps": pre_steps,
                        "pretrain_seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        nights = run_job(tmp, "nights", start, args.nights, args.steps)
        res["nights_seconds"] = time.perf_counter() - t0
        res["nights"] = [_night(r) for r in nights]
        t0 = time.perf_counter()
        chain = run_job(tmp, "chain", start, max(STALENESS), args.chain_steps)
        res["chain"] = [_night(r) for r in chain]
        res["study"] = study(tmp, chain, args.steps, tuple(range(args.seeds)))
        res["study_seconds"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(res, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


def _night(r: dict) -> dict:
    tr, ev = r["train"], r["evals"]["eval"]
    return {"night": r["night"], "before": ev["baseline_reward"], "exact_match": ev["policy_reward"],
            "examples": tr["data"]["examples"], "groups_dropped": tr["data"]["groups_dropped"],
            "informative_groups": tr["data"]["groups_informative"],
            "staleness_kl_last": tr["last"]["staleness_kl"], "clip_fraction_last": tr["last"]["clip_fraction"]}


def _print(res: dict, args) -> None:
    print(f"\nGRPO nights on the copy task (K=8 at T=1, {args.steps} steps a night; start "
          f"{res['start']['exact_match']:.0%} held-out greedy EM after {res['start']['pretrain_steps']} SFT steps)\n")
    print(f"{'night':<7}{'informative groups':>20}{'examples':>10}{'staleness KL (last step)':>26}"
          f"{'held-out EM':>13}")
    for n in res["nights"]:
        print(f"{n['night']:<7}{n['informative_groups']:>20}{n['examples']:>10}"
              f"{n['staleness_kl_last']:>26.4f}{n['exact_match']:>13.0%}")
    hit = next((n["night"] + 1 for n in res["nights"] if n["exact_match"] >= 0.9), None)
    print(f"\n>= 90% after {hit} night(s) ({res['nights_seconds']:.0f} s)  (target: within 3)" if hit
          else f"\nbelow 90% after {len(res['nights'])} nights  (target: within 3)")
    chain = res["chain"]
    ems = [c["before"] for c in chain] + [chain[-1]["exact_match"]]
    print(f"\nOff-policy study: night 0's data ({res['study'][0]['examples']} responses in informative "
          f"groups, sampled by pi_0) trained on for {args.steps} steps from pi_s, s nights later\n"
          f"(a chain of {args.chain_steps}-step nights; held-out EM of pi_0..pi_4: "
          + ", ".join(f"{x:.0%}" for x in ems) + ")\n")
    print(f"{'stale':<7}{'variant':<10}{'KL(mu||pi) first':>18}{'clip frac':>11}{'ESS':>7}"
          f"{'KL last':>9}{'held-out EM (per seed)':>24}{'mean':>7}")
    for s in STALENESS:
        for v in VARIANTS:
            cell = [r for r in res["study"] if r["stale_nights"] == s and r["variant"] == v]
            m = {k: sum(r[k] for r in cell) / len(cell) for k in
                 ("staleness_kl_first", "clip_fraction_first", "ess_first", "staleness_kl_last", "exact_match")}
            per_seed = " ".join(f"{r['exact_match']:.0%}" for r in cell)
            print(f"{s:<7}{v:<10}{m['staleness_kl_first']:>18.4f}{m['clip_fraction_first']:>11.3f}"
                  f"{m['ess_first']:>7.2f}{m['staleness_kl_last']:>9.3f}{per_seed:>24}{m['exact_match']:>7.0%}")
    print(f"\nstudy: {res['study_seconds']:.0f} s")


if __name__ == "__main__":
    main()
