"""Peak memory of `train dpo --reference POLICY` with QLoRA on CPU (issue 12).

    python bench/dpo_memory.py [--hidden 1024] [--layers 8] [--pairs 128] [--out ...]

Three runs of `offline-rlhf train dpo --lora-r 8 --bits 4 --gradient-checkpointing` (8 pairs
per step, 2 per micro-batch, as QLoRA users run it, so that activations do not hide the
models' memory), each in its own process
(the command's arguments parsed by its parser, run in-process by a child), on the same
pairs (bench/dpo.py's: prompts 20-200 tokens, completions 10-120):

- ``reference_policy``: imported pairs without reference log-probs, ``--reference POLICY``:
  the reference is the policy's 4-bit base with the adapter off (no second model);
- ``stored``: the same pairs carrying those reference log-probs (exported from the first
  run's cache), no ``--reference``: the floor, training only;
- ``separate_fp32``: ``--reference POLICY --reference-bits 0``, a second, unquantized
  model (what `--reference` did before issue 12), loaded, used and freed.

Peak RSS is each process's VmHWM. Target: reference_policy <= 1.15x stored.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# bench/dpo.py's model, pairs and RSS probe
from dpo import _hwm_mib as peak_rss_mib  # noqa: E402
from dpo import make_data  # noqa: E402

RUNS = ("reference_policy", "stored", "separate_fp32")


def child(kind: str, tmp: Path, steps: int) -> dict:
    import time

    from offline_rlhf.cli import build_parser
    from offline_rlhf.config import from_namespace
    from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo
    data = tmp / ("pairs_ref" if kind == "stored" else "pairs_text")
    args = ["train", "dpo", "--data", str(data), "--output", str(tmp / kind), "--policy",
            str(tmp / "model"), "--lora-r", "8", "--bits", "4", "--max-steps", str(steps),
            "--batch-size", "8", "--micro-batch-size", "2", "--gradient-checkpointing", "--nll-alpha", "0",
            "--report-to", "none", "--no-save-merged", "--resume", "never", "--device", "cpu"]
    if kind != "stored":
        args += ["--reference", str(tmp / "model")]
    if kind == "separate_fp32":
        args += ["--reference-bits", "0"]
    t0 = time.perf_counter()    # the command's own parsing, then the run it starts
    summary = train_dpo(from_namespace(DPOTrainConfig, build_parser().parse_args(args)))
    return {"peak_rss_mib": peak_rss_mib(), "seconds": time.perf_counter() - t0,
            "reference": summary["data"].get("reference"),
            "ref_logps_computed": summary["data"]["ref_logps_computed"]}


def run_child(kind: str, tmp: Path, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--tmp", str(tmp),
                          "--steps", str(steps)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dpo_memory.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    if args.child:
        print(json.dumps(child(args.child, Path(args.tmp), args.steps)))
        return
    import shutil

    from offline_rlhf.train.reference import pairs_with_reference
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-mem-"))
    try:
        make_data(tmp, args.pairs, args.hidden, args.layers)
        res = {"reference_policy": run_child("reference_policy", tmp, args.steps)}
        pairs_with_reference(str(tmp / "pairs_text"), str(tmp / "reference_policy"), str(tmp / "pairs_ref"))
        res.update({k: run_child(k, tmp, args.steps) for k in RUNS[1:]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["ratio_reference_policy_vs_stored"] = \
        res["reference_policy"]["peak_rss_mib"] / res["stored"]["peak_rss_mib"]
    res["setup"] = {"pairs": args.pairs, "steps": args.steps, "hidden": args.hidden,
                    "layers": args.layers, "lora_r": 8, "bits": 4}
    print(f"\ntrain dpo --lora-r 8 --bits 4 --gradient-checkpointing on CPU: model hidden {args.hidden} x {args.layers} layers, "
          f"{args.pairs} pairs, {args.steps} steps\n")
    print(f"{'run':<20}{'peak RSS MiB':>14}{'seconds':>9}  reference")
    for k in RUNS:
        r = res[k]
        print(f"{k:<20}{r['peak_rss_mib']:>14.0f}{r['seconds']:>9.1f}  {r['reference'] or 'stored in the pairs'}")
    print(f"\npeak RSS, --reference POLICY vs stored: {res['ratio_reference_policy_vs_stored']:.3f}x "
          "(target <= 1.15)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
