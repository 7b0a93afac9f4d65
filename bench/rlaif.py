"""RLAIF on the copy task: DPO on pairs labelled by a tiny LLM judge trained here,
against DPO on pairs labelled by the exact-match rule, from the demo's start.

    python bench/rlaif.py [--quick] [--seed 0] [--out bench/results/rlaif.json]

Task: copy a 4-digit string (``Copy: 3 8 1 9 =>`` -> ``3 8 1 9``), training and
held-out prompts that share no string (``offline_rlhf/toy.py``). The start is the
demo's (``toy.pretrain_until_learnable``, for ``--seed``).

The judge: the start model fine-tuned (SFT, ``train sft``) on judge prompts rendered
exactly as the engine renders them (short templates below, the judge's chat template),
for digit strings of a third split that neither the policy's training nor its held-out
prompts contain: pointwise "is this response correct? 0/1" and pairwise "A or B?",
correct answers against synthetic corruptions (a digit changed, dropped, added, or two
swapped), both orders. No policy sample and no rule label of the DPO data is seen.

From K samples per training prompt at temperature 0.7, once:
- rule: ``score`` exact_match -> ``logprobs`` -> ``pairs best_worst`` -> ``train dpo``;
- judge: ``score --judge`` (pointwise, scale 0-1: the score is P(correct)) ->
  ``logprobs`` -> ``pairs --strategy judge --judge-candidates best_worst`` (the best and
  worst by the judge's score, labelled in both orders, inconsistent pairs dropped) ->
  ``train dpo --pair-weight judge``.
Same DPO settings (the demo's: 30 steps, batch 16, lr 1e-3, beta 0.1, NLL 1). Reported:
held-out greedy exact match of start, rule-DPO and judge-DPO; the judge's agreement with
the rule (pairs where the rule separates the two responses; pointwise correlation) and
its position consistency and first-position preference.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POINTWISE = "Copy check.\n{prompt}\nResponse:{response}\nCorrect (0 or 1)?\n"
PAIRWISE = "Copy check.\n{prompt}\nA:{response_a}\nB:{response_b}\nWhich is correct, A or B?\n"


def corrupt(digits: list[str], rng: random.Random) -> list[str]:
    """A wrong copy: one digit changed, dropped, added, or two neighbours swapped."""
    d = list(digits)
    while d == digits:
        i, kind = rng.randrange(len(d)), rng.randrange(4)
        if kind == 0:
            d[i] = str(rng.randrange(10))
        elif kind == 1 and len(d) > 1:
            del d[i]
        elif kind == 2:
            d.insert(i, str(rng.randrange(10)))
        elif kind == 3 and i + 1 < len(d):
            d[i], d[i + 1] = d[i + 1], d[i]
    return d


def judge_sft_file(tmp: Path, start: Path, n: int, seed: int) -> Path:
    """SFT examples for the judge: prompts rendered as the engine renders them (templates
    above, the chat template), completions the verdict label."""
    from offline_rlhf.models import load_tokenizer
    from offline_rlhf.rewards.judge import render
    from offline_rlhf.shards import open_dataset
    tok = load_tokenizer(start)
    seen = set()
    for split in ("train_prompts", "test_prompts"):
        seen |= set(open_dataset(str(tmp / split)).read(columns=["reference_answer"]).column(0).to_pylist())
    rng = random.Random(f"judge:{seed}")

    def chat(text):
        return tok.apply_chat_template([{"role": "user", "content": text[:-1]}], tokenize=False,
                                       add_generation_prompt=True)
    rows = []
    while len(rows) < n:
        digits = [str(rng.randrange(10)) for _ in range(4)]
        if " ".join(digits) in seen:
            continue
        prompt, good, bad = f"Copy: {' '.join(digits)} =>", " " + " ".join(digits), \
            " " + " ".join(corrupt(digits, rng))
        for resp, label in ((good, "1"), (bad, "0")):
            rows.append({"prompt": chat(render(POINTWISE, {"prompt": prompt, "response": resp})),
                         "completion": label})
        for a, b, label in ((good, bad, "A"), (bad, good, "B")):
            rows.append({"prompt": chat(render(PAIRWISE, {"prompt": prompt, "response_a": a,
                                                          "response_b": b})), "completion": label})
    f = tmp / "judge_sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def train_judge(tmp: Path, start: Path, quick: bool, seed: int, steps: int, lr: float,
                rows: int, size: tuple[int, int] | None = None) -> Path:
    from offline_rlhf.train.sft import SFTTrainConfig, train_sft
    data = judge_sft_file(tmp, start, 400 if quick else rows, seed)
    if size:     # a judge of its own size, from scratch (the policy's tokenizer)
        from offline_rlhf.models import load_tokenizer
        from offline_rlhf.tiny import build_tiny_model
        hidden, layers = size
        start = build_tiny_model(tmp / "judge-init", hidden=hidden, layers=layers, heads=4, seed=seed,
                                 tokenizer=load_tokenizer(start))
    train_sft(SFTTrainConfig(data=str(data), output=str(tmp / "judge"), policy=str(start), lr=lr,
                             max_steps=4 if quick else steps, batch_size=32, micro_batch_size=32,
                             schedule="constant", report_to="none", seed=seed))
    return tmp / "judge" / "final"


def label_pairs(tmp: Path, start: Path, judge: Path, k: int, seed: int, quick: bool) -> dict:
    """Generations once; rule pairs and judge pairs from them."""
    from offline_rlhf.generation import GenerateConfig, generate
    from offline_rlhf.logprobs import LogprobsConfig, compute_logprobs
    from offline_rlhf.pairs import PairsConfig, build_pairs
    from offline_rlhf.rewards.score import ScoreConfig, score
    (tmp / "templates").mkdir(exist_ok=True)
    (tmp / "templates" / "pointwise.txt").write_text(POINTWISE)
    (tmp / "templates" / "pairwise.txt").write_text(PAIRWISE)
    generate(GenerateConfig(prompts=str(tmp / "train_prompts"), output=str(tmp / "gen"),
                            policy=str(start), num_samples=k, temperature=0.7, max_new_tokens=10,
                            seed=seed))
    score(ScoreConfig(generations=str(tmp / "gen"), output=str(tmp / "rule"), weights={"exact_match": 1.0}))
    t0 = time.perf_counter()
    score(ScoreConfig(generations=str(tmp / "gen"), output=str(tmp / "judged"), judge=str(judge),
                      judge_scale="0-1", judge_template=str(tmp / "templates" / "pointwise.txt"),
                      weights={"judge": 1.0, "exact_match": 0.0}))
    pointwise_s = time.perf_counter() - t0
    for name in ("rule", "judged"):
        compute_logprobs(LogprobsConfig(generations=str(tmp / name), output=str(tmp / f"{name}-ref"),
                                        reference=str(start)))
    build_pairs(PairsConfig(generations=str(tmp / "rule-ref"), output=str(tmp / "pairs-rule"),
                            strategy="best_worst"))
    t0 = time.perf_counter()
    m = build_pairs(PairsConfig(generations=str(tmp / "judged-ref"), output=str(tmp / "pairs-judge"),
                                strategy="judge", judge=str(judge), judge_candidates="best_worst",
                                judge_template=str(tmp / "templates" / "pairwise.txt"),
                                judge_inconsistent="keep" if quick else "drop"))
    return {"pointwise_seconds": pointwise_s, "pairwise_seconds": time.perf_counter() - t0,
            "pairs_stats": m["stats"]}


def judge_figures(tmp: Path) -> dict:
    """The judge against the rule, and its position figures (as `inspect` shows them)."""
    import numpy as np

    from offline_rlhf.shards import open_dataset
    from offline_rlhf.summary import summarize
    rows = open_dataset(str(tmp / "judged")).read(columns=["prompt_id", "response", "reward_components"]).to_pylist()
    correct = {(r["prompt_id"], r["response"]): dict((c["name"], c["value"]) for c in r["reward_components"])
               for r in rows}
    pairs = open_dataset(str(tmp / "pairs-judge")).read(columns=["prompt_id", "chosen", "rejected"]).to_pylist()
    decided = [(correct[(p["prompt_id"], p["chosen"])]["exact_match"],
                correct[(p["prompt_id"], p["rejected"])]["exact_match"]) for p in pairs]
    decided = [(c, r) for c, r in decided if c != r]
    judged = summarize(open_dataset(str(tmp / "judged")))["judge"]
    pos = summarize(open_dataset(str(tmp / "pairs-judge")))["judge"]
    return {"pairs": len(pairs), "pairs_the_rule_separates": len(decided),
            "pair_agreement_with_rule": float(np.mean([c > r for c, r in decided])) if decided else None,
            "pointwise_corr_with_exact_match": judged.get("corr_with_exact_match"),
            "pointwise_length_bias": judged.get("length_bias"),
            "position_consistency": pos["position_consistency"],
            "first_position_preference": pos["first_position_preference"]}


def train_and_eval(tmp: Path, start: Path, name: str, data: str, shared: dict, **extra) -> dict:
    from offline_rlhf.shards import open_dataset
    from offline_rlhf.toy import exact_match
    from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo
    if open_dataset(str(tmp / data)).read(columns=["prompt_id"]).num_rows == 0:
        print(f"{name}: no pairs (every judged pair inconsistent and dropped): nothing trained")
        em = exact_match(start, tmp / "test_prompts", tmp / "eval" / name)
        return {"run": name, "exact_match": em, "pairs": 0, "train_seconds": 0.0}
    t0 = time.perf_counter()
    s = train_dpo(DPOTrainConfig(data=str(tmp / data), output=str(tmp / "runs" / name),
                                 policy=str(start), **shared, **extra))
    secs = time.perf_counter() - t0
    em = exact_match(tmp / "runs" / name / "final", tmp / "test_prompts", tmp / "eval" / name)
    return {"run": name, "exact_match": em, "pairs": s["data"].get("pairs"), "train_seconds": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short check that everything runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rlaif.json"))
    ap.add_argument("--judge-steps", type=int, default=150, help="SFT steps of 32 rows for the judge")
    ap.add_argument("--judge-rows", type=int, default=4000,
                    help="judge SFT rows (4 per digit string: two pointwise, two pairwise)")
    ap.add_argument("--judge-size", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"),
                    help="a judge of this size trained from scratch (default: the start model, "
                         "fine-tuned)")
    ap.add_argument("--judge-lr", type=float, default=1e-3, help="the judge's SFT learning rate")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job shares the cores)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from offline_rlhf.demo import MIN_INFORMATIVE
    from offline_rlhf.toy import exact_match, pretrain_until_learnable, setup_copy_task
    k = 8 if args.quick else 16
    shared = dict(lr=1e-3, max_steps=2 if args.quick else 30, batch_size=16, micro_batch_size=16,
                  schedule="constant", report_to="none", seed=args.seed, beta=0.1, nll_alpha=1.0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rlaif-"))
    t0, times = time.perf_counter(), {}
    try:
        setup_copy_task(tmp, n_train=60 if args.quick else 300, n_test=20 if args.quick else 100,
                        seed=args.seed)
        start, pre_steps, _ = pretrain_until_learnable(tmp, MIN_INFORMATIVE, k, 0.7, args.seed)
        start_em = exact_match(start, tmp / "test_prompts", tmp / "start-eval")
        times["start_model"] = time.perf_counter() - t0
        judge = train_judge(tmp, start, args.quick, args.seed, args.judge_steps, args.judge_lr,
                            args.judge_rows, tuple(args.judge_size) if args.judge_size else None)
        times["judge_training"] = time.perf_counter() - t0 - times["start_model"]
        labelled = label_pairs(tmp, start, judge, k, args.seed, args.quick)
        print(f"start model, judge and labels ready after {time.perf_counter() - t0:.0f} s", flush=True)
        figures = judge_figures(tmp)
        rows = [train_and_eval(tmp, start, "rule", "pairs-rule", shared),
                train_and_eval(tmp, start, "judge", "pairs-judge", shared, pair_weight="judge")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    print(f"\nRLAIF on the copy task (seed {args.seed}): start {start_em:.1%} held-out greedy exact "
          f"match ({pre_steps} SFT steps); DPO {shared['max_steps']} steps, batch 16, lr 1e-3, "
          "beta 0.1, NLL 1\n")
    print(f"{'pairs labelled by':<20}{'pairs':>7}{'held-out EM':>13}{'gain (points)':>15}")
    for r in rows:
        print(f"{r['run']:<20}{r['pairs']:>7}{r['exact_match']:>13.1%}"
              f"{100 * (r['exact_match'] - start_em):>15.1f}")
    print("\njudge: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in figures.items()))
    print(f"judging: pointwise {labelled['pointwise_seconds']:.1f} s, pairwise (both orders) "
          f"{labelled['pairwise_seconds']:.1f} s")
    res = {"task": "copy 4 digits", "quick": args.quick, "seed": args.seed, "start_exact_match": start_em,
           "pretrain_steps": pre_steps, "settings": shared, "samples_per_prompt": k, "rows": rows,
           "judge": figures, "labelling": labelled, "times": times, "seconds": total}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"\n{total:.0f} s in all; saved {args.out}")


if __name__ == "__main__":
    main()
