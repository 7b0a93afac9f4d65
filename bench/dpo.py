"""DPO step time and peak memory: `offline-rlhf train dpo` vs TRL's DPOTrainer.

    python bench/dpo.py [--pairs 512] [--steps 24] [--hidden 256] [--layers 4] [--out ...]

Same tiny model (4 layers, hidden 256), same 512 pairs (prompts 20-200 tokens,
completions 10-120 tokens), 8 pairs per optimizer step, no gradient accumulation,
gradient checkpointing off on both sides (TRL turns it on by default), CPU. TRL runs
with and without `precompute_ref_log_probs`. Ours reads the reference log-probs from
the pairs dataset (computed before training, like TRL's precompute; neither is timed).
Step time is the median wall time between consecutive optimizer steps, the first
steps skipped; peak memory is each run's peak RSS in its own process. Targets
(issue 4): <= 0.6x TRL's default step time, <= 0.9x TRL with precompute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARMUP = 3


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_data(tmp: Path, n: int, hidden: int, layers: int) -> None:
    from offline_rlhf.models import load_tokenizer
    from offline_rlhf.pairs import import_pairs
    from offline_rlhf.tiny import build_tiny_model, random_texts
    model = build_tiny_model(tmp / "model", hidden=hidden, layers=layers, heads=max(1, hidden // 64))
    tok = load_tokenizer(model)
    prompts, chosen, rejected = (random_texts(tok, n, lo, hi, seed) for lo, hi, seed in
                                 ((20, 200, 6), (10, 120, 7), (10, 120, 8)))
    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r}
            for p, c, r in zip(prompts, chosen, rejected)]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_pairs(str(tmp / "pairs.jsonl"), str(tmp / "pairs_text"))


def child_ours(tmp: Path, steps: int, out_name: str) -> dict:
    from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo
    cfg = DPOTrainConfig(data=str(tmp / "pairs_text"), output=str(tmp / out_name),
                         policy=str(tmp / "model"), reference=str(tmp / "model"), lr=1e-5,
                         max_steps=steps, batch_size=8, micro_batch_size=8,
                         max_tokens_per_micro_batch=2400, nll_alpha=0.0, tensorboard=False,
                         max_grad_norm=1.0, schedule="linear", resume="never")
    train_dpo(cfg)
    hist = [json.loads(x) for x in (tmp / out_name / "metrics.jsonl").read_text().splitlines()]
    times = [b["seconds"] - a["seconds"] for a, b in zip(hist, hist[1:])][WARMUP:]
    return {"step_seconds": statistics.median(times), "peak_rss_mib": _hwm_mib(),
            "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"]}


def child_trl(tmp: Path, steps: int, precompute: bool) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from offline_rlhf.models import load_tokenizer
    tok = load_tokenizer(tmp / "model", padding_side="right")
    rows = [json.loads(x) for x in (tmp / "pairs.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(tmp / "model"))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp / "model"))
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = DPOConfig(output_dir=str(tmp / f"trl-{precompute}"), per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-5,
                     gradient_checkpointing=False, precompute_ref_log_probs=precompute,
                     use_cpu=True, report_to=[], save_strategy="no", logging_steps=10_000,
                     max_length=None, beta=0.1, lr_scheduler_type="linear", seed=0)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()])
    trainer.train()
    times = [b - a for a, b in zip(stamps, stamps[1:])][WARMUP:]
    return {"step_seconds": statistics.median(times), "peak_rss_mib": _hwm_mib()}


def run_child(kind: str, tmp: Path, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--tmp", str(tmp),
                          "--steps", str(steps)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dpo.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    if args.child:
        tmp = Path(args.tmp)
        res = {"ours": lambda: child_ours(tmp, args.steps, "ours"),
               "trl_default": lambda: child_trl(tmp, args.steps, False),
               "trl_precompute": lambda: child_trl(tmp, args.steps, True)}[args.child]()
        print(json.dumps(res))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    try:
        make_data(tmp, args.pairs, args.hidden, args.layers)
        # ours: reference log-probs computed once (like the logprobs stage), then trained
        res = {k: run_child(k, tmp, args.steps) for k in ("ours", "trl_default", "trl_precompute")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["ratio_vs_trl_default"] = res["ours"]["step_seconds"] / res["trl_default"]["step_seconds"]
    res["ratio_vs_trl_precompute"] = res["ours"]["step_seconds"] / res["trl_precompute"]["step_seconds"]
    res["setup"] = {"pairs": args.pairs, "steps": args.steps, "batch_pairs": 8,
                    "model": {"hidden": args.hidden, "layers": args.layers},
                    "gradient_checkpointing": False}
    print(f"\nDPO: {args.pairs} pairs, 8 pairs/step, model hidden {args.hidden} x {args.layers} "
          f"layers, CPU, gradient checkpointing off on both sides\n")
    print(f"{'':<34}{'s/step':>10}{'peak RSS MiB':>15}")
    for name, key in (("offline-rlhf train dpo", "ours"), ("TRL DPOTrainer (default)", "trl_default"),
                      ("TRL DPOTrainer (precompute ref)", "trl_precompute")):
        print(f"{name:<34}{res[key]['step_seconds']:>10.3f}{res[key]['peak_rss_mib']:>15.0f}")
    print(f"\nstep time vs TRL default     {res['ratio_vs_trl_default']:.2f}x  (target <= 0.6)")
    print(f"step time vs TRL precompute  {res['ratio_vs_trl_precompute']:.2f}x  (target <= 0.9)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
