"""``offline-rlhf demo``: the nightly loop on the embedded default, end to end on CPU.

Prepares (once per seed, cached under WORKDIR) a tiny model trained here to a mediocre
start on the copy task, and its train / held-out prompt sets; runs ``pipelines/demo.toml``
(generate -> score -> logprobs -> pairs -> DPO -> eval); prints held-out figures
before and after, how many pairs DPO trained on, and the path of the report.

The start model is chosen by what makes the loop learnable, not by greedy accuracy: its
samples at the demo's temperature must be right on some and wrong on other samples of
at least ``MIN_INFORMATIVE`` of the train prompts (each such prompt yields a pair). The
copy task is learnt abruptly, so a start chosen by a greedy threshold could give a
handful of pairs on one CPU and hundreds on another.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .toy import MIN_INFORMATIVE


def _prepare(root: Path, seed: int, num_samples: int, temperature: float) -> None:
    from .toy import exact_match, pretrain_until_learnable, setup_copy_task
    t0 = time.perf_counter()
    print(f"preparing the demo model (seed {seed}): a tiny model trained here on a copy task "
          f"(4 digits) until {MIN_INFORMATIVE:.0%} of the train prompts get some right and "
          f"some wrong answers among {num_samples} samples at temperature {temperature:g}...",
          flush=True)
    prep = root / "prep"
    shutil.rmtree(prep, ignore_errors=True)
    setup_copy_task(prep, seed=seed)
    model, steps, stats = pretrain_until_learnable(prep, MIN_INFORMATIVE, num_samples,
                                                   temperature, seed)
    em = exact_match(model, prep / "test_prompts", prep / "greedy-eval")
    shutil.rmtree(root / "models", ignore_errors=True)
    shutil.copytree(model, root / "models" / "start")
    shutil.rmtree(root / "data", ignore_errors=True)
    (root / "data").mkdir(parents=True)
    for src, dst in (("train_prompts", "train_prompts"), ("test_prompts", "heldout_prompts")):
        shutil.copytree(prep / src, root / "data" / dst)
    info = {"seed": seed, "sft_steps": steps, "heldout_greedy_exact_match": em, **stats,
            "num_samples": num_samples, "temperature": temperature}
    (root / "models" / "start" / "demo_start.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(prep)
    print(f"  {steps} SFT steps: informative prompts {stats['informative']:.0%}, sampled exact "
          f"match {stats['sampled_exact_match']:.1%}, held-out greedy exact match {em:.0%} "
          f"({time.perf_counter() - t0:.0f} s)")


def _kl_cell(m: dict) -> str:
    if m.get("kl_to_reference") is None:
        return "n/a"
    return f"{m['kl_to_reference']:.3f} ± {m['kl_stderr']:.3f}"


def results_table(results: dict) -> str:
    """The before / after table the demo prints."""
    b, p = results["baseline"], results["policy"]
    rows = [(f"held-out ({p['samples']} prompts, greedy)", "before (start)", "after (DPO)"),
            ("mean reward (exact match)", f"{b['reward_mean']:.3f}", f"{p['reward_mean']:.3f}"),
            ("KL to the start model (nats)", _kl_cell(b), _kl_cell(p)),
            ("response tokens", f"{b['response_tokens_mean']:.2f}", f"{p['response_tokens_mean']:.2f}"),
            ("win rate of after over before", "", f"{results['win_rate']:.1%}")]
    lines = [f"{a:<34} {x:>15}   {y:>15}" for a, x, y in rows]
    lines.append(f"KL: {p['kl_note']}")
    return "\n".join(lines)


def _seed_overrides(pipeline: str, seed: int, overrides: list[str]) -> list[str]:
    """``stages.NAME.seed=SEED`` for every stage of the job whose command has a seed,
    unless the overrides set it already."""
    import dataclasses

    from .config import load_file
    from .pipeline import _kind_class
    out = []
    for name, spec in (load_file(pipeline).get("stages") or {}).items():
        if not isinstance(spec, dict) or any(o.startswith(f"stages.{name}.seed=") for o in overrides):
            continue
        cls = _kind_class(spec.get("kind"), spec.get("algorithm"), f"{pipeline}: stages.{name}")
        if "seed" in {f.name for f in dataclasses.fields(cls)}:
            out.append(f"stages.{name}.seed={seed}")
    return out


def _trained_on(p) -> str:
    from .shards import open_dataset
    pairs = next((s for s in p.stages if s.kind == "pairs"), None)
    train = next((s for s in p.stages if s.kind == "train"), None)
    if pairs is None or train is None:
        return ""
    ds = open_dataset(str(pairs.output))
    summary = json.loads((train.output / "train_summary.json").read_text())
    return (f"DPO trained on {ds.num_rows} pairs (one per train prompt whose samples were some "
            f"right, some wrong; {ds.stats.get('prompts_all_tied', 0)} of "
            f"{ds.stats.get('prompts', '?')} prompts were all tied), {summary.get('steps')} steps")


def run_demo(workdir: str, pipeline: str, overrides: list[str], seed: int = 0) -> int:
    from .pipeline import load_pipeline, render_plan, run_pipeline
    root = Path(workdir) / f"seed-{seed}"
    start = root / "models" / "start"
    t0 = time.perf_counter()
    paths = [f"workdir={root / 'pipeline'}", f"inputs.policy={start}",
             f"inputs.prompts={root / 'data' / 'train_prompts'}",
             f"inputs.heldout={root / 'data' / 'heldout_prompts'}"]
    every = paths + _seed_overrides(pipeline, seed, list(overrides)) + list(overrides)
    if not (start / "demo_start.json").exists():
        from .config import apply_overrides, load_file
        job = apply_overrides(load_file(pipeline), list(overrides))
        gen = next((s for s in (job.get("stages") or {}).values()
                    if isinstance(s, dict) and s.get("kind") == "generate"), {})
        _prepare(root, seed, int(gen.get("num_samples", 16)), float(gen.get("temperature", 0.7)))
    p = load_pipeline(pipeline, every)
    print("\n" + render_plan(run_pipeline(p, dry_run=True)) + "\n", flush=True)
    run_pipeline(p)
    ev = next(s for s in p.stages if s.kind == "eval").output
    print("\n" + results_table(json.loads((ev / "results.json").read_text())))
    trained = _trained_on(p)
    if trained:
        print(trained)
    print(f"\nreport: {ev / 'report.md'}   ({time.perf_counter() - t0:.0f} s in all)")
    return 0
