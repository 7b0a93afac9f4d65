"""RLAIF: DPO on pairs labelled by a tiny LLM judge trained here, against DPO on pairs
labelled by the exact-match rule, from a mediocre start.

    python bench/rlaif.py [--task flawed|copy] [--quick] [--seed 0] [--out bench/results/rlaif-TASK.json]

Tasks (``offline_rlhf/toy.py``); training and held-out prompts share no prompt:

- ``flawed`` (the default): sums up to 20+20 (``What is 17+8? Answer:`` -> ``25``); the start
  is SFT'd on demonstrations that drop the carry 60% of the time (in rounds of 250 steps
  until it answers half the training sums right greedily), so its greedy answer to a
  carrying sum is wrong while its samples are sometimes right. The judge grades against the
  reference answer (reference-guided grading: the templates show ``{reference_answer}``):
  checking an answer against a reference is a comparison, easier than doing the sum.
- ``copy``: copy a 4-digit string (``Copy: 3 8 1 9 =>`` -> ``3 8 1 9``); the demo's start.
  The answer is in the prompt, so checking is a comparison of two digit strings; no judge
  tried here learned it (docs/rlaif.md).

The judge: the start model fine-tuned (SFT, ``train sft``, 6,000 steps of 32 rows, then
4,000 more from a restarted cosine schedule: ``--judge-steps``) on judge
prompts rendered exactly as the engine renders them (the short templates below, the judge's
chat template), for questions the policy is never evaluated on (copy: digit strings of a
third split; flawed: sums of the same kind, none of them held out): pointwise "is this
response correct? 0/1" and pairwise "A or B?", both orders, correct answers against wrong
ones. By default (``--judge-negatives mistakes``, flawed task) half of the wrong answers
are the flawed demonstrator's own mistake (the sum with its carry dropped) and the rest
edits, half of those near misses (``--judge-near-miss``: the sum one up or down; copy: one
digit one up or down), so
the judge knows the policy's failure as a rubric would name it. No policy sample and no
rule label of the DPO data is seen.

From K samples per training prompt, once:
- rule: ``score`` exact_match -> ``logprobs`` -> ``pairs best_worst`` -> ``train dpo``;
- judge: ``score --judge`` (pointwise, scale 0-1: the score is P(correct)) ->
  ``logprobs`` -> ``pairs --strategy judge --judge-candidates best_worst --min-margin 0.5``
  (the best and worst by the judge's score, labelled in both orders, inconsistent and
  low-confidence pairs dropped) -> ``train dpo --pair-weight judge``.
Same DPO settings for both (per task, printed), each trained with ``--dpo-seeds`` seeds.
Reported: held-out greedy exact match of start, rule-DPO and judge-DPO (means over the DPO
seeds, and each seed's gain); the judge's agreement with the rule (pairs where the rule
separates the two responses; pointwise correlation) and its position consistency and
first-position preference; whether the target is met.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEMPLATES = {      # (pointwise, pairwise) per task
    "copy": ("Copy check.\n{prompt}\nResponse:{response}\nCorrect (0 or 1)?\n",
             "Copy check.\n{prompt}\nA:{response_a}\nB:{response_b}\nWhich is correct, A or B?\n"),
    "flawed": ("Grade against the reference.\n{prompt}\nReference: {reference_answer}\n"
               "Response:{response}\nCorrect (0 or 1)?\n",
               "Grade against the reference.\n{prompt}\nReference: {reference_answer}\n"
               "A:{response_a}\nB:{response_b}\nWhich is correct, A or B?\n"),
}
# per task: samples per prompt and temperature, and the DPO settings both runs share
SAMPLING = {"copy": (16, 0.7), "flawed": (16, 1.0)}
DPO = {"copy": dict(lr=1e-3, max_steps=30), "flawed": dict(lr=3e-4, epochs=3)}


def corrupt(digits: list[str], rng: random.Random, near_miss: float = 0.0, number: bool = False) -> list[str]:
    """A wrong answer: with probability ``near_miss`` a near miss (one digit one up or down;
    ``number``: the number the digits write one up or down, an off-by-one, the commonest slip
    of a model that half knows a sum), else one digit changed (to any digit, or one up or
    down), dropped, added, or two neighbours swapped."""
    def off_by_one(digit: str) -> str:
        return str((int(digit) + rng.choice((-1, 1))) % 10)

    d = list(digits)
    if rng.random() < near_miss:
        if number:
            value = int("".join(digits))
            return list(str(value + rng.choice((-1, 1)) if value else 1))
        while d == digits:
            i = rng.randrange(len(d))
            d[i] = off_by_one(d[i])
        return d
    while d == digits:
        i, kind = rng.randrange(len(d)), rng.randrange(5)
        if kind == 0:
            d[i] = str(rng.randrange(10))
        elif kind == 4:
            d[i] = off_by_one(d[i])
        elif kind == 1 and len(d) > 1:
            del d[i]
        elif kind == 2:
            d.insert(i, str(rng.randrange(10)))
        elif kind == 3 and i + 1 < len(d):
            d[i], d[i + 1] = d[i + 1], d[i]
    return d


def judge_questions(tmp: Path, task: str, rng: random.Random):
    """Endless (prompt, reference answer as a list of digits, joiner) for the judge's
    training: copy, digit strings of neither the policy's training nor its held-out split;
    flawed, sums of the policy's kind (operands up to 20, answers 0-40, the range the judge
    grades), never a held-out one."""
    from offline_rlhf.shards import open_dataset
    seen = set(open_dataset(str(tmp / "test_prompts")).read(columns=["prompt"]).column(0).to_pylist())
    if task == "copy":
        seen |= set(open_dataset(str(tmp / "train_prompts")).read(columns=["prompt"]).column(0).to_pylist())
    while True:
        if task == "copy":
            digits = [str(rng.randrange(10)) for _ in range(4)]
            prompt, answer, joiner = f"Copy: {' '.join(digits)} =>", digits, " "
        else:
            a, b = rng.randrange(21), rng.randrange(21)
            prompt, answer, joiner = f"What is {a}+{b}? Answer:", list(str(a + b)), ""
        if prompt not in seen:
            yield prompt, answer, joiner


def judge_sft_file(tmp: Path, start: Path, task: str, n: int, seed: int, negatives: str = "edits",
                   near_miss: float = 0.0) -> Path:
    """SFT examples for the judge: prompts rendered as the engine renders them (the task's
    templates, the chat template), completions the verdict label. Wrong answers are
    :func:`corrupt` edits (``near_miss`` of them near misses), or (``negatives="mistakes"``,
    flawed task) half of them the flawed demonstrator's own mistake, the sum with its carry
    dropped, where it differs."""
    from offline_rlhf.models import load_tokenizer
    from offline_rlhf.rewards.judge import render
    from offline_rlhf.toy import carry_dropped
    tok = load_tokenizer(start)
    pointwise, pairwise = TEMPLATES[task]
    rng = random.Random(f"judge:{seed}")

    def chat(text):
        return tok.apply_chat_template([{"role": "user", "content": text[:-1]}], tokenize=False,
                                       add_generation_prompt=True)
    rows = []
    for prompt, answer, joiner in judge_questions(tmp, task, rng):
        if len(rows) >= n:
            break
        ref = joiner.join(answer)
        good, bad = " " + ref, " " + joiner.join(corrupt(answer, rng, near_miss, number=task == "flawed"))
        if negatives == "mistakes" and task == "flawed" and rng.random() < 0.5:
            dropped = carry_dropped(*(int(x) for x in re.findall(r"\d+", prompt)))
            bad = " " + dropped if dropped != ref else bad
        for resp, label in ((good, "1"), (bad, "0")):
            rows.append({"prompt": chat(render(pointwise, {"prompt": prompt, "response": resp,
                                                           "reference_answer": ref})),
                         "completion": label})
        for a, b, label in ((good, bad, "A"), (bad, good, "B")):
            rows.append({"prompt": chat(render(pairwise, {"prompt": prompt, "response_a": a, "response_b": b,
                                                          "reference_answer": ref})),
                         "completion": label})
    f = tmp / "judge_sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def train_judge(tmp: Path, start: Path, task: str, quick: bool, seed: int, steps: list[int], lr: float,
                rows: int, size: tuple[int, int] | None = None, negatives: str = "edits",
                near_miss: float = 0.0) -> Path:
    """The judge: SFT of ``start`` (or of a model of ``size`` from scratch) on
    :func:`judge_sft_file`, in rounds of ``steps``, each a cosine schedule
    from ``lr`` restarted from the round before (warm restarts)."""
    from offline_rlhf.train.sft import SFTTrainConfig, train_sft
    data = judge_sft_file(tmp, start, task, 400 if quick else rows, seed, negatives, near_miss)
    if size:     # a judge of its own size, from scratch (the policy's tokenizer)
        from offline_rlhf.models import load_tokenizer
        from offline_rlhf.tiny import build_tiny_model
        hidden, layers = size
        start = build_tiny_model(tmp / "judge-init", hidden=hidden, layers=layers, heads=4, seed=seed,
                                 tokenizer=load_tokenizer(start))
    for i, n in enumerate([4] if quick else steps):
        out = tmp / ("judge" if i == 0 else f"judge{i + 1}")
        train_sft(SFTTrainConfig(data=str(data), output=str(out), policy=str(start), lr=lr, max_steps=n,
                                 batch_size=32, micro_batch_size=32, schedule="cosine", warmup_ratio=0.05,
                                 report_to="none", seed=seed + 100 * i))
        start = out / "final"
    return start


def label_pairs(tmp: Path, start: Path, judge: Path, task: str, k: int, temperature: float, seed: int,
                quick: bool, min_margin: float = 0.0) -> dict:
    """Generations once; rule pairs and judge pairs from them."""
    from offline_rlhf.generation import GenerateConfig, generate
    from offline_rlhf.logprobs import LogprobsConfig, compute_logprobs
    from offline_rlhf.pairs import PairsConfig, build_pairs
    from offline_rlhf.rewards.score import ScoreConfig, score
    (tmp / "templates").mkdir(exist_ok=True)
    for kind, text in zip(("pointwise", "pairwise"), TEMPLATES[task]):
        (tmp / "templates" / f"{kind}.txt").write_text(text)
    generate(GenerateConfig(prompts=str(tmp / "train_prompts"), output=str(tmp / "gen"),
                            policy=str(start), num_samples=k, temperature=temperature, max_new_tokens=10,
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
                                judge_inconsistent="keep" if quick else "drop",
                                min_margin=0.0 if quick else min_margin))
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


def train_and_eval(tmp: Path, start: Path, name: str, data: str, shared: dict, seeds, **extra) -> dict:
    """DPO from ``start`` on ``data``, once per seed of ``seeds``; held-out exact match of
    each, and their mean."""
    from offline_rlhf.shards import open_dataset
    from offline_rlhf.toy import exact_match
    from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo
    if open_dataset(str(tmp / data)).read(columns=["prompt_id"]).num_rows == 0:
        print(f"{name}: no pairs (every judged pair inconsistent and dropped): nothing trained")
        em = exact_match(start, tmp / "test_prompts", tmp / "eval" / name)
        return {"run": name, "exact_match": em, "per_seed": [em], "pairs": 0, "train_seconds": 0.0}
    t0, per_seed, pairs = time.perf_counter(), [], None
    for seed in seeds:
        out = tmp / "runs" / f"{name}-s{seed}"
        s = train_dpo(DPOTrainConfig(data=str(tmp / data), output=str(out), policy=str(start),
                                     **{**shared, "seed": seed}, **extra))
        pairs = s["data"].get("pairs")
        per_seed.append(exact_match(out / "final", tmp / "test_prompts", tmp / "eval" / f"{name}-s{seed}"))
    return {"run": name, "exact_match": sum(per_seed) / len(per_seed), "per_seed": per_seed, "pairs": pairs,
            "train_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("flawed", "copy"), default="flawed",
                    help="flawed: sums, judged against the reference answer (default); copy: copy 4 digits")
    ap.add_argument("--quick", action="store_true", help="a short check that everything runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON results (default: bench/results/rlaif-TASK.json)")
    ap.add_argument("--judge-steps", type=int, nargs="+", default=[6000, 4000], metavar="N",
                    help="SFT steps of 32 rows for the judge, in rounds: each a cosine schedule restarted "
                    "from the round before (default 6000 4000: 6,000 alone leave some judges accepting "
                    "answers one off in the last digit, docs/rlaif.md)")
    ap.add_argument("--judge-rows", type=int, default=24000,
                    help="judge SFT rows (4 per question: two pointwise, two pairwise)")
    ap.add_argument("--judge-size", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"),
                    help="a judge of this size trained from scratch (default: the start model, "
                         "fine-tuned)")
    ap.add_argument("--judge-lr", type=float, default=1e-3, help="the judge's SFT learning rate (peak of "
                    "a cosine schedule after 5%% warm-up)")
    ap.add_argument("--judge-negatives", choices=("edits", "mistakes"), default="mistakes",
                    help="the judge's wrong answers: edits (a digit changed, dropped, added or swapped) "
                         "or mistakes (the default; flawed task: half of them the demonstrator's own "
                         "mistake, the carry dropped, the rest edits: a judge that knows the policy's "
                         "failure)")
    ap.add_argument("--judge-near-miss", type=float, default=0.5,
                    help="share of the edits that are near misses, one digit one up or down (default "
                         "0.5; 0: a fifth of the digit changes are)")
    ap.add_argument("--judge-min-margin", type=float, default=0.5,
                    help="drop judge pairs whose margin (2 P(chosen better) - 1) is below this (pairs "
                         "--min-margin; default 0.5; 0: every consistent pair, weighted by its margin)")
    ap.add_argument("--dpo-seeds", type=int, default=3, help="both DPO runs train with this many seeds "
                    "(SEED, SEED+1, ...); reported are the mean and each seed's exact match (--quick: 1)")
    ap.add_argument("--dpo-steps", type=int, help="both DPO runs this many optimizer steps (default: the "
                    "task's epochs: copy 30 steps, flawed 3 epochs, so fewer pairs make fewer steps)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job shares the cores)")
    args = ap.parse_args()
    if args.dpo_seeds < 1 or not 0 <= args.judge_near_miss <= 1 or min(args.judge_steps) < 1:
        ap.error("--dpo-seeds: at least 1; --judge-near-miss: between 0 and 1; --judge-steps: each at least 1")
    seeds = range(args.seed, args.seed + (1 if args.quick else args.dpo_seeds))
    out = args.out or str(Path(__file__).parent / "results" / f"rlaif-{args.task}.json")
    import torch
    torch.set_num_threads(args.threads)
    from offline_rlhf.toy import exact_match, mediocre_start
    k, temperature = SAMPLING[args.task]
    k = 8 if args.quick else k
    dpo = DPO[args.task]
    if args.quick or args.dpo_steps:
        dpo = {"lr": dpo["lr"], "max_steps": 2 if args.quick else args.dpo_steps}
    shared = dict(dpo, batch_size=16, micro_batch_size=16, schedule="constant", report_to="none",
                  seed=args.seed, beta=0.1, nll_alpha=1.0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rlaif-"))
    t0, times = time.perf_counter(), {}
    try:
        start, pre_steps = mediocre_start(tmp, args.task, args.seed, args.quick, k, temperature)
        start_em = exact_match(start, tmp / "test_prompts", tmp / "start-eval")
        times["start_model"] = time.perf_counter() - t0
        judge = train_judge(tmp, start, args.task, args.quick, args.seed, args.judge_steps, args.judge_lr,
                            args.judge_rows, tuple(args.judge_size) if args.judge_size else None,
                            args.judge_negatives, args.judge_near_miss)
        times["judge_training"] = time.perf_counter() - t0 - times["start_model"]
        labelled = label_pairs(tmp, start, judge, args.task, k, temperature, args.seed, args.quick,
                               args.judge_min_margin)
        print(f"start model, judge and labels ready after {time.perf_counter() - t0:.0f} s", flush=True)
        figures = judge_figures(tmp)
        rows = [train_and_eval(tmp, start, "rule", "pairs-rule", shared, seeds),
                train_and_eval(tmp, start, "judge", "pairs-judge", shared, seeds, pair_weight="judge")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    steps = f"{dpo['max_steps']} steps" if "max_steps" in dpo else f"{dpo['epochs']} epochs"
    print(f"\nRLAIF on the {args.task} task (seed {args.seed}): start {start_em:.1%} held-out greedy exact "
          f"match ({pre_steps} SFT steps); {k} samples per prompt at temperature {temperature}; DPO {steps}, "
          f"batch 16, lr {dpo['lr']:g}, beta 0.1, NLL 1; DPO seeds {', '.join(map(str, seeds))}\n")
    print(f"{'pairs labelled by':<20}{'pairs':>7}{'held-out EM (mean)':>20}{'gain (points)':>15}"
          f"  gain per DPO seed")
    for r in rows:
        print(f"{r['run']:<20}{r['pairs']:>7}{r['exact_match']:>20.1%}"
              f"{100 * (r['exact_match'] - start_em):>15.1f}  "
              + ", ".join(f"{100 * (e - start_em):+.0f}" for e in r["per_seed"]))
    gap = 100 * (rows[0]["exact_match"] - rows[1]["exact_match"])
    gain = 100 * (rows[1]["exact_match"] - start_em)
    print(f"\ntarget (judge-labelled DPO >= +20 points and within 5 of rule-labelled): judge {gain:+.1f}, "
          f"{gap:.1f} below the rule: {'met' if gain >= 20 and gap <= 5 else 'NOT met'}")
    print("\njudge: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in figures.items()))
    print(f"judging: pointwise {labelled['pointwise_seconds']:.1f} s, pairwise (both orders) "
          f"{labelled['pairwise_seconds']:.1f} s")
    res = {"task": args.task, "quick": args.quick, "seed": args.seed, "start_exact_match": start_em,
           "pretrain_steps": pre_steps, "settings": shared, "samples_per_prompt": k,
           "temperature": temperature, "judge_training": {"steps": args.judge_steps, "rows": args.judge_rows,
                                                         "lr": args.judge_lr, "size": args.judge_size,
                                                         "negatives": args.judge_negatives,
                                                         "near_miss": args.judge_near_miss,
                                                         "min_margin": args.judge_min_margin},
           "dpo_seeds": list(seeds),
           "rows": rows, "judge": figures, "labelling": labelled, "times": times, "seconds": total}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1, default=str))
    print(f"\n{total:.0f} s in all; saved {out}")


if __name__ == "__main__":
    main()
