"""``offline-rlhf demo``: the nightly loop on the embedded default, end to end on CPU.

Prepares (once, cached under WORKDIR) a tiny model trained here to a mediocre start on
the copy task, and its train / held-out prompt sets; runs ``pipelines/demo.toml``
(generate -> score -> logprobs -> pairs -> DPO -> eval); prints held-out figures
before and after, and the path of the report.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path


def _prepare(root: Path) -> None:
    from .toy import pretrain_to, setup_copy_task
    t0 = time.perf_counter()
    print("preparing the demo model: a tiny model trained here on a copy task "
          "(4 digits) until it is mediocre (~20% held-out exact match)...", flush=True)
    setup_copy_task(root / "prep")
    model, steps, em = pretrain_to(root / "prep", 0.15)
    shutil.copytree(model, root / "models" / "start")
    (root / "data").mkdir(parents=True, exist_ok=True)
    for src, dst in (("train_prompts", "train_prompts"), ("test_prompts", "heldout_prompts")):
        if not (root / "data" / dst).exists():
            shutil.copytree(root / "prep" / src, root / "data" / dst)
    shutil.rmtree(root / "prep")
    print(f"  {steps} SFT steps, held-out exact match {em:.0%} ({time.perf_counter() - t0:.0f} s)")


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


def run_demo(workdir: str, pipeline: str, overrides: list[str]) -> int:
    from .pipeline import load_pipeline, render_plan, run_pipeline
    root = Path(workdir)
    start = root / "models" / "start"
    t0 = time.perf_counter()
    if not (start / "model.safetensors").exists():
        _prepare(root)
    p = load_pipeline(pipeline, [f"workdir={root / 'pipeline'}", f"inputs.policy={start}",
                                 f"inputs.prompts={root / 'data' / 'train_prompts'}",
                                 f"inputs.heldout={root / 'data' / 'heldout_prompts'}"] + list(overrides))
    print("\n" + render_plan(run_pipeline(p, dry_run=True)) + "\n", flush=True)
    run_pipeline(p)
    ev = next(s for s in p.stages if s.kind == "eval").output
    print("\n" + results_table(json.loads((ev / "results.json").read_text())))
    print(f"\nreport: {ev / 'report.md'}   ({time.perf_counter() - t0:.0f} s in all)")
    return 0
