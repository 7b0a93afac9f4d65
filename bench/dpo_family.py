"""Every DPO-family loss, and KTO from unpaired singles, on the copy task from one start.

    python bench/dpo_family.py [--quick] [--out bench/results/dpo_family.json]

Task: copy a 4-digit string (``Copy: 3 8 1 9 =>`` -> ``3 8 1 9``), exact-match reward,
training prompts and held-out prompts that share no string (``offline_rlhf/toy.py``).
The start is the demo's (``offline_rlhf/demo.py``): a tiny model (hidden 64, 2 layers)
trained here with SFT until at least 30% of the training prompts get some right and some
wrong answers among 16 samples at temperature 0.7 (``toy.pretrain_until_learnable``),
for ``--seed``. From it, once:
K samples per training prompt at temperature 0.7, scored, reference log-probs of the
start model (the `logprobs` stage), and best-worst pairs. Then, each from the same
start and on the same data, for the same budget (steps, batch, learning rate, beta 0.1,
no NLL term unless the loss has one): `train dpo --loss NAME` for every loss, the MPO
combination, and `train kto` on the scored singles (labels: top / bottom half of each
prompt's group). Reported: held-out greedy exact match after the budget.

``--quick`` (a check that the script runs, not a measurement): fewer prompts, samples
and steps (the start model is made the same way).
Prints a table and saves JSON.
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

# per-loss settings other than the shared ones: the papers' (EXO: eps 1e-3; SimPO: beta 2)
EXTRA = {"exo_pair": {"label_smoothing": 1e-3}, "simpo": {"beta": 2.0}}
MPO = ("sigmoid,bco_pair,sft", "0.8,0.2,1")


def prepare(tmp: Path, quick: bool, seed: int) -> tuple[Path, float, int]:
    """The start model and its scored generations with reference log-probs, and pairs."""
    from offline_rlhf.generation import GenerateConfig, generate
    from offline_rlhf.logprobs import LogprobsConfig, compute_logprobs
    from offline_rlhf.pairs import PairsConfig, build_pairs
    from offline_rlhf.rewards.score import ScoreConfig, score
    from offline_rlhf.toy import (
        MIN_INFORMATIVE,
        exact_match,
        pretrain_until_learnable,
        setup_copy_task,
    )
    setup_copy_task(tmp, n_train=60 if quick else 300, n_test=20 if quick else 100, seed=seed)
    k = 8 if quick else 16
    start, steps, _ = pretrain_until_learnable(tmp, MIN_INFORMATIVE, k, 0.7, seed)
    em = exact_match(start, tmp / "test_prompts", tmp / "start-eval")
    generate(GenerateConfig(prompts=str(tmp / "train_prompts"), output=str(tmp / "gen"), policy=str(start),
                            num_samples=k, temperature=0.7, max_new_tokens=10, seed=seed))
    score(ScoreConfig(generations=str(tmp / "gen"), output=str(tmp / "scored"), weights={"exact_match": 1.0}))
    compute_logprobs(LogprobsConfig(generations=str(tmp / "scored"), output=str(tmp / "ref"),
                                    reference=str(start)))
    build_pairs(PairsConfig(generations=str(tmp / "ref"), output=str(tmp / "pairs"), strategy="best_worst"))
    return start, em, steps


def run_one(tmp: Path, start: Path, name: str, shared: dict) -> dict:
    from offline_rlhf.toy import exact_match
    from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo
    from offline_rlhf.train.kto import KTOTrainConfig, train_kto
    out = tmp / "runs" / name.replace(",", "+")
    t0 = time.perf_counter()
    if name == "kto":
        s = train_kto(KTOTrainConfig(data=str(tmp / "ref"), output=str(out), policy=str(start), **shared))
    else:
        extra = dict(EXTRA.get(name, {}))
        if name == MPO[0]:
            extra["loss_weights"] = MPO[1]
        s = train_dpo(DPOTrainConfig(data=str(tmp / "pairs"), output=str(out), policy=str(start),
                                     loss=name, nll_alpha=0.0, **{**shared, **extra}))
    seconds = time.perf_counter() - t0
    em = exact_match(out / "final", tmp / "test_prompts", tmp / "eval" / out.name)
    last = s.get("last") or {}
    return {"loss": name, "exact_match": em, "train_seconds": seconds, "final_loss": last.get("loss"),
            "examples": s["data"].get("pairs") or s["data"].get("examples")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short check that everything runs")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; quick 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the start model, prompts, sampling "
                    "and training (as `offline-rlhf demo --seed`)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dpo_family.json"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    from offline_rlhf.losses.dpo import LOSS_TYPES
    steps = args.steps or (2 if args.quick else 30)
    shared = dict(lr=1e-3, max_steps=steps, batch_size=16, micro_batch_size=16, schedule="constant",
                  report_to="none", seed=args.seed, beta=0.1)    # set: unset, train dpo/kto choose by passes
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-family-"))
    rows = []
    t0 = time.perf_counter()
    try:
        start, start_em, pre_steps = prepare(tmp, args.quick, args.seed)
        for name in (*LOSS_TYPES, MPO[0], "kto"):
            rows.append(run_one(tmp, start, name, shared))
            print(f"  {name:<22} exact match {rows[-1]['exact_match']:.1%}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    print(f"\nDPO family on the copy task: start {start_em:.1%} held-out greedy exact match "
          f"({pre_steps} SFT steps); {steps} steps each, batch 16, lr 1e-3, beta 0.1, no NLL term\n")
    print(f"{'loss':<24}{'held-out EM':>12}{'final loss':>12}{'train s':>9}")
    for r in sorted(rows, key=lambda r: -r["exact_match"]):
        fl = "" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        print(f"{r['loss']:<24}{r['exact_match']:>12.1%}{fl:>12}{r['train_seconds']:>9.1f}")
    res = {"task": "copy 4 digits", "quick": args.quick, "seed": args.seed, "start_exact_match": start_em,
           "pretrain_steps": pre_steps, "steps": steps, "settings": shared, "extra": EXTRA,
           "mpo_weights": MPO[1], "rows": rows, "seconds": total}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"\n{total:.0f} s in all; saved {args.out}")


if __name__ == "__main__":
    main()
