"""SFT throughput: length-grouped token-budget micro-batches vs fixed-size padded batches.

    python bench/sft.py [--examples 512] [--steps 16] [--hidden 256] [--layers 4] [--out ...]

The same `offline-rlhf train sft` loop, data (prompts 10-60 tokens, completions
10-400 tokens) and global batch (32 examples per step) run twice: with each step's
examples grouped by length into micro-batches under a token budget (the default), and
with fixed-size micro-batches of 8 in data order, each padded to its longest example.
Reports real (non-pad) tokens per second. Target (issue 5): >= 1.5x. Saves JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sft.json"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    from offline_rlhf.models import load_tokenizer
    from offline_rlhf.tiny import build_tiny_model, random_texts
    from offline_rlhf.train.sft import SFTTask, SFTTrainConfig, train_sft
    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    try:
        model = build_tiny_model(tmp / "m", hidden=args.hidden, layers=args.layers,
                                 heads=max(1, args.hidden // 64))
        tok = load_tokenizer(model)
        rows = [{"prompt": p, "completion": " " + c} for p, c in
                zip(random_texts(tok, args.examples, 10, 60, 4), random_texts(tok, args.examples, 10, 400, 5))]
        (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        res = {}
        for name, grouped in (("fixed_padded", False), ("grouped_budget", True)):
            cfg = SFTTrainConfig(data=str(tmp / "data.jsonl"), output=str(tmp / name), policy=str(model),
                                 lr=1e-5, max_steps=args.steps, batch_size=32, micro_batch_size=8,
                                 max_tokens_per_micro_batch=2048 if grouped else 10**9,
                                 group_by_length=grouped, report_to="none", resume="never")
            if grouped:
                cfg.micro_batch_size = 32
            train_sft(cfg)
            hist = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
            step_s = [b["seconds"] - a["seconds"] for a, b in zip(hist, hist[1:])][2:]
            res[name] = {"median_step_seconds": statistics.median(step_s)}
        task = SFTTask(SFTTrainConfig(data=str(tmp / "data.jsonl"), output="x", policy=str(model)), tok)
        mean_tokens = float(task.lengths().mean())
        for r in res.values():
            r["real_tokens_per_s"] = 32 * mean_tokens / r["median_step_seconds"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["speedup"] = res["grouped_budget"]["real_tokens_per_s"] / res["fixed_padded"]["real_tokens_per_s"]
    res["setup"] = {"examples": args.examples, "batch_size": 32, "mean_example_tokens": mean_tokens,
                    "model": {"hidden": args.hidden, "layers": args.layers}}
    print(f"\nSFT: {args.examples} examples (mean {mean_tokens:.0f} tokens, 20-460), 32 per step, "
          f"model hidden {args.hidden} x {args.layers} layers, CPU\n")
    print(f"{'':<46}{'s/step':>10}{'real tokens/s':>16}")
    print(f"{'fixed micro-batches of 8, padded, data order':<46}"
          f"{res['fixed_padded']['median_step_seconds']:>10.3f}{res['fixed_padded']['real_tokens_per_s']:>16.0f}")
    print(f"{'length-grouped, 2048-token budget':<46}"
          f"{res['grouped_budget']['median_step_seconds']:>10.3f}{res['grouped_budget']['real_tokens_per_s']:>16.0f}")
    print(f"\nspeed-up {res['speedup']:.2f}x  (target >= 1.5)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
