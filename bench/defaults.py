"""Do the trainers' defaults learn? Every trainer with only data, policy and output given,
beside the best of a small grid of tuned settings, on two verifiable toy tasks.

    python bench/defaults.py [--quick] [--tasks copy,flawed] [--out bench/results/defaults.json]

Tasks (``offline_rlhf/toy.py``), each from a mediocre start, exact-match reward:

- ``copy``: copy 4 digits; the demo's start (a tiny model trained until 30% of the training
  prompts get some right and some wrong answers among 16 samples at temperature 0.7).
- ``flawed``: sums up to 20+20 from a flawed demonstrator; the start is SFT'd on
  demonstrations that drop the carry 60% of the time (in rounds of 250 steps until it
  answers half the training sums right greedily), so its greedy answer to a carrying
  sum is systematically wrong while its samples are sometimes right.

For each task, once: K=8 samples per training prompt at temperature 0.7 from the start,
scored, reference log-probs of the start, best-worst pairs, and a rejection-sampled SFT
file (each prompt's first right sample). Then per trainer:
``sft`` (that file), ``dpo`` (the pairs), ``kto`` (the scored samples), ``ilql``, ``grpo``
(the scored samples) and ``rest`` (one grow, three improve steps, its own sampling),
each with its defaults and with the settings of a small search: lr 3e-4, 1e-3 and 3e-3
(one epoch, set explicitly; the rest default), then three epochs at the best of those rates (rest: its
first lr, halved each improve step, and epochs per improve step). ``rm`` is left out: it trains
a reward model, not a policy, so it has no greedy or sampled accuracy.

Each setting trains with ``--train-seeds`` seeds (3; the task, start and evaluation stay
those of ``--seed``). Reported: the means over those seeds of held-out greedy exact match
and sampled exact match (4 samples per prompt at temperature 0.7) of the defaults and of
the best grid setting (by greedy + sampled), and the gap. Then the defaults and that best
setting train again on ``--confirm-seeds`` fresh seeds (5): the best of a grid measured on
the seeds that chose it is biased upwards, the same two settings on new seeds are not. The
defaults pass when both gaps on the fresh seeds (greedy and sampled) are at most 3 points.

``--quick`` (a check that it runs, not a measurement): fewer prompts, a shorter start,
one tuned setting (lr 1e-3). Prints a table and saves JSON. Figures are deterministic on one
machine (seeded everything) and may differ between CPU models.
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

TRAINERS = ("sft", "dpo", "kto", "ilql", "grpo", "rest")
GRID = {"lr": (3e-4, 1e-3, 3e-3), "epochs": (3,)}
QUICK_GRID = {"lr": (1e-3,), "epochs": ()}
TEMPERATURE, K, EVAL_SAMPLES = 0.7, 8, 4
PASS_POINTS = 3.0


def prepare(root: Path, task: str, quick: bool, seed: int) -> Path:
    """The task's prompts, its start model and, from the start, the data every trainer reads."""
    from offline_rlhf.toy import mediocre_start
    start, _ = mediocre_start(root, task, seed, quick, 16, TEMPERATURE)
    _data(root, start, seed)
    return start


def _data(root: Path, start: Path, seed: int) -> None:
    from offline_rlhf.generation import GenerateConfig, generate
    from offline_rlhf.logprobs import LogprobsConfig, compute_logprobs
    from offline_rlhf.pairs import PairsConfig, build_pairs
    from offline_rlhf.rewards.score import ScoreConfig, score
    from offline_rlhf.shards import open_dataset
    generate(GenerateConfig(prompts=str(root / "train_prompts"), output=str(root / "gen"), policy=str(start),
                            num_samples=K, temperature=TEMPERATURE, max_new_tokens=10, seed=seed))
    score(ScoreConfig(generations=str(root / "gen"), output=str(root / "scored"), weights={"exact_match": 1.0}))
    compute_logprobs(LogprobsConfig(generations=str(root / "scored"), output=str(root / "ref"),
                                    reference=str(start)))
    build_pairs(PairsConfig(generations=str(root / "ref"), output=str(root / "pairs"), strategy="best_worst"))
    rows = open_dataset(str(root / "scored")).read(columns=["prompt_id", "prompt", "response", "reward"])
    best: dict[str, dict] = {}
    for r in rows.to_pylist():
        if r["reward"] >= 1 and r["prompt_id"] not in best:
            best[r["prompt_id"]] = {"prompt": r["prompt"], "completion": r["response"]}
    (root / "best.jsonl").write_text("".join(json.dumps(r) + "\n" for r in best.values()))


def train(root: Path, start: Path, trainer: str, out: Path, setting: dict, seed: int = 0) -> Path:
    """One run of ``trainer`` with only data, policy, output and its seed given, plus ``setting``."""
    from offline_rlhf.train import ALGORITHMS
    if trainer == "rest":
        from offline_rlhf.rest import RestConfig, run_rest
        kw = {}
        if "lr" in setting:
            kw["lrs"] = [setting["lr"] / 2 ** i for i in range(3)]
        if "epochs" in setting:
            kw["epochs_per_improve"] = setting["epochs"]
        report = run_rest(RestConfig(policy=str(start), prompts=str(root / "train_prompts"), output=str(out),
                                     weights={"exact_match": 1.0}, max_new_tokens=10, seed=seed, **kw))
        return Path(report["final_model"])
    data = {"sft": root / "best.jsonl", "dpo": root / "pairs", "kto": root / "ref",
            "ilql": root / "scored", "grpo": root / "scored"}[trainer]
    cls, run, _ = ALGORITHMS[trainer]
    run(cls(data=str(data), policy=str(start), output=str(out), report_to="none", seed=seed, **setting))
    return out / "final"


def evaluate(root: Path, model: Path, work: Path, seed: int) -> dict:
    from offline_rlhf.toy import exact_match, sampled_yield
    return {"greedy": exact_match(model, root / "test_prompts", work / "greedy"),
            "sampled": sampled_yield(model, root / "test_prompts", work / "sampled", EVAL_SAMPLES,
                                     TEMPERATURE, seed)["sampled_exact_match"]}


def run_task(tmp: Path, task: str, trainers, grid: dict, quick: bool, seed: int,
             tuned: dict | None = None, train_seeds: int = 1, confirm_seeds: int = 0) -> dict:
    root = tmp / task
    t0 = time.perf_counter()
    start = prepare(root, task, quick, seed)
    res = {"start": evaluate(root, start, root / "eval-start", seed),
           "prepare_seconds": time.perf_counter() - t0, "trainers": {}}
    print(f"{task}: start greedy {res['start']['greedy']:.1%} sampled {res['start']['sampled']:.1%}", flush=True)
    for trainer in trainers:
        seeds = range(seed, seed + train_seeds)
        runs = [one(root, start, trainer, {}, seed, seeds)]
        if tuned is not None:                 # the grid of an earlier run: only the defaults run
            res["trainers"][trainer] = {"runs": runs}
            continue
        for lr in grid["lr"]:                 # a coordinate search: the rate at one epoch,
            runs.append(one(root, start, trainer, {"lr": lr, "epochs": 1}, seed, seeds))
        best_lr = max(runs[1:], key=_score)["setting"]["lr"]
        for e in grid["epochs"]:              # then more epochs at the best rate
            runs.append(one(root, start, trainer, {"lr": best_lr, "epochs": e}, seed, seeds))
        confirm = None
        if confirm_seeds:                     # the defaults and the best setting again, on fresh seeds
            fresh = range(seed + train_seeds, seed + train_seeds + confirm_seeds)
            confirm = [one(root, start, trainer, s, seed, fresh) for s in ({}, max(runs[1:], key=_score)["setting"])]
        res["trainers"][trainer] = summarise(runs, confirm)
    res["seconds"] = time.perf_counter() - t0
    return res


def one(root: Path, start: Path, trainer: str, setting: dict, seed: int, train_seeds=(0,)) -> dict:
    """``setting`` trained once per seed of ``train_seeds`` (the task, its start and the
    evaluation stay those of ``seed``); its figures are their means, each seed's kept."""
    name = f"{trainer}-" + "-".join(f"{k}{v:g}" for k, v in setting.items()) if setting else trainer
    t1 = time.perf_counter()
    per_seed = []
    for s in train_seeds:
        model = train(root, start, trainer, root / "runs" / f"{name}-s{s}", setting, s)
        per_seed.append({"train_seed": s, **evaluate(root, model, root / "eval" / f"{name}-s{s}", seed)})
    figures = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in ("greedy", "sampled")}
    chose = chosen(root / "runs" / f"{name}-s{train_seeds[0]}") if not setting else {}
    print(f"  {trainer:<5} {str(setting or 'defaults'):<32} greedy {figures['greedy']:.1%} "
          f"sampled {figures['sampled']:.1%}" + (f" (mean of {len(per_seed)} seeds: "
          + ", ".join(f"{r['greedy']:.0%}/{r['sampled']:.1%}" for r in per_seed) + ")" if len(per_seed) > 1 else "")
          + (f"  ({describe(chose)})" if chose else ""), flush=True)
    return {"setting": setting or "defaults", **figures, "per_seed": per_seed,
            "seconds": time.perf_counter() - t1, **({"chosen": chose} if chose else {})}


def chosen(run: Path) -> dict:
    """What a ``train`` run's unset options resolved to, from its ``config.json`` (rest: none)."""
    f = run / "config.json"
    if not f.exists():
        return {}
    recorded = json.loads(f.read_text())
    cfg = recorded.get("config")
    if not isinstance(cfg, dict):     # rest writes a config.json of its own kind
        return {}
    keys = ("lr", "epochs") + (("beta",) if recorded.get("algorithm") in ("dpo", "kto") else ())   # beta rule
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def describe(chose: dict) -> str:
    return ", ".join(f"{k} {v:.2g}" if k == "lr" else f"{k} {v:g}" for k, v in chose.items())


def _score(run: dict) -> float:
    return run["greedy"] + run["sampled"]


def summarise(runs: list[dict], confirm: list[dict] | None = None) -> dict:
    """The defaults beside the best tuned setting (by greedy + sampled), and the gaps in points.

    The best of several settings measured on the same seeds is biased upwards (the maximum
    of noisy means: on the copy task one seed's greedy accuracy moves by 20 points between
    seeds of one setting). ``confirm`` (the defaults and that best setting trained again on
    fresh seeds) measures both without that bias; when given, its gaps decide the pass."""
    default, tuned = runs[0], runs[1:]
    best = max(tuned, key=_score)
    out = {"defaults": default, "best": best, "gap_points": _gaps(best, default), "runs": runs}
    if confirm:
        out["confirm"] = {"defaults": confirm[0], "best": confirm[1], "gap_points": _gaps(confirm[1], confirm[0])}
    decisive = out.get("confirm", out)["gap_points"]
    out["passes"] = all(g <= PASS_POINTS for g in decisive.values())
    return out


def _gaps(best: dict, default: dict) -> dict:
    # rounded: accuracies are whole counts out of 100 or 400, and 100 * (0.84 - 0.81) is 3.0000000000000027
    return {k: round(100 * (best[k] - default[k]), 6) for k in ("greedy", "sampled")}


def merge(saved: list[dict]) -> dict:
    """Several saved results as one: their tasks, and each task's trainers (a trainer in a
    later file replaces the same trainer of an earlier one)."""
    out = {**saved[0], "tasks": {}}
    for s in saved:
        for task, res in s["tasks"].items():
            mine = out["tasks"].setdefault(task, {**res, "trainers": {}})
            mine["trainers"].update(res["trainers"])
    return out


def load(files: list[str]) -> dict:
    """Saved results files, merged (:func:`merge`)."""
    return merge([json.loads(Path(f).read_text()) for f in files])


def with_tuned(results: dict, earlier: dict) -> dict:
    """``results``' defaults beside the tuned settings' figures of an ``earlier`` run
    (trainers it did not search keep their defaults alone)."""
    for task, res in results["tasks"].items():
        for trainer, t in res["trainers"].items():
            searched = earlier["tasks"].get(task, {}).get("trainers", {}).get(trainer)
            if searched is None or len(searched["runs"]) < 2:
                continue
            res["trainers"][trainer] = summarise(t["runs"][:1] + searched["runs"][1:])
    results["tuned_from"] = "an earlier run (--reuse-tuned)"
    return results


def print_table(results: dict) -> None:
    confirmed = any("confirm" in t for res in results["tasks"].values() for t in res["trainers"].values())
    print(f"\n{'task':<8}{'trainer':<8}{'defaults greedy/sampled':>25}{'best tuned greedy/sampled':>28}"
          f"  {'best setting':<28}{'gap (points)':>14}"
          + (f"  {'fresh seeds: defaults':>23}{'best':>16}{'gap':>15}" if confirmed else "") + "  pass")
    for task, res in results["tasks"].items():
        s = res["start"]
        print(f"{task:<8}{'start':<8}{s['greedy']:>14.1%} / {s['sampled']:<8.1%}")
        for trainer, t in res["trainers"].items():
            if "best" not in t:               # a defaults-only run not merged with a search
                d = t["runs"][0]
                print(f"{'':<8}{trainer:<8}{d['greedy']:>14.1%} / {d['sampled']:<8.1%}")
                continue
            d, b, g = t["defaults"], t["best"], t["gap_points"]
            setting = ", ".join(f"{k} {v:g}" for k, v in b["setting"].items())
            c = t.get("confirm")
            fresh = (f"{c['defaults']['greedy']:>14.1%} / {c['defaults']['sampled']:<6.1%}"
                     f"{c['best']['greedy']:>7.1%} / {c['best']['sampled']:<6.1%}"
                     f"{c['gap_points']['greedy']:>6.1f} / {c['gap_points']['sampled']:<5.1f}") if c else ""
            print(f"{'':<8}{trainer:<8}{d['greedy']:>14.1%} / {d['sampled']:<8.1%}"
                  f"{b['greedy']:>17.1%} / {b['sampled']:<8.1%}  {setting:<28}"
                  f"{g['greedy']:>6.1f} / {g['sampled']:<5.1f}"
                  + (f"  {fresh:<54}" if confirmed else "") + f"  {'yes' if t['passes'] else 'NO'}"
                  + (f"  defaults chose: {describe(d['chosen'])}" if d.get("chosen") else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short check that everything runs")
    ap.add_argument("--tasks", default="copy,flawed", help="comma-separated: copy, flawed")
    ap.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of "
                    + ", ".join(TRAINERS))
    ap.add_argument("--seed", type=int, default=0, help="seed of the tasks, start models, sampling and "
                    "evaluation, and the first training seed")
    ap.add_argument("--train-seeds", type=int, help="each setting trains this many times (seeds "
                    "SEED, SEED+1, ...) and reports the means: one run's greedy accuracy can swing by "
                    "tens of points between neighbouring settings (default 3; with --quick 1)")
    ap.add_argument("--confirm-seeds", type=int, help="after the search, the defaults and the best "
                    "setting train again on this many fresh seeds (SEED+TRAIN_SEEDS, ...) and the gap "
                    "between those decides the pass: the best of a grid on the seeds that chose it is "
                    "biased upwards (default 5; with --quick 0: no confirmation)")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the table of saved results "
                    "(several: their tasks and trainers merged, a later file's trainer replacing an "
                    "earlier one's) and run nothing")
    ap.add_argument("--reuse-tuned", nargs="+", metavar="JSON", help="run only the defaults; take the "
                    "tuned settings' figures from earlier runs' JSON (merged as --table merges; same "
                    "seed, same machine: after a change of the defaults, the grid's explicit settings "
                    "give the same figures; no fresh-seed confirmation: the search's own gap decides); "
                    "with --table: merge them into the saved defaults-only results")
    ap.add_argument("--defaults-only", action="store_true", help="run only the defaults (merge "
                    "the saved JSON with an earlier run's tuned settings: --table it --reuse-tuned JSON)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "defaults.json"))
    args = ap.parse_args()
    if args.train_seeds is None:
        args.train_seeds = 1 if args.quick else 3
    if args.confirm_seeds is None:
        args.confirm_seeds = 0 if args.quick else 5
    if args.train_seeds < 1 or args.confirm_seeds < 0:
        ap.error(f"--train-seeds: at least 1, got {args.train_seeds}; --confirm-seeds: at least 0, "
                 f"got {args.confirm_seeds}")
    if args.table:
        results = load(args.table)
        if args.reuse_tuned:
            results = with_tuned(results, load(args.reuse_tuned))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        print_table(results)
        return
    import torch
    torch.set_num_threads(args.threads)
    grid = QUICK_GRID if args.quick else GRID
    tmp = Path(tempfile.mkdtemp(prefix="bench-defaults-"))
    t0 = time.perf_counter()
    results = {"quick": args.quick, "seed": args.seed, "train_seeds": args.train_seeds,
               "confirm_seeds": args.confirm_seeds,
               "grid": grid, "temperature": TEMPERATURE,
               "samples_per_prompt": K, "eval_samples": EVAL_SAMPLES, "pass_points": PASS_POINTS, "tasks": {}}
    try:
        for task in args.tasks.split(","):
            results["tasks"][task] = run_task(tmp, task, args.trainers.split(","), grid, args.quick,
                                              args.seed, {} if args.defaults_only or args.reuse_tuned else None,
                                              args.train_seeds, args.confirm_seeds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    if args.reuse_tuned:
        results = with_tuned(results, load(args.reuse_tuned))
    if not args.defaults_only:
        print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{results['seconds']:.0f} s in all; saved {args.out}")


if __name__ == "__main__":
    main()
