"""QLoRA DPO on one CUDA GPU: `offline-rlhf train dpo` vs TRL's DPOTrainer (issue 12).

    python bench/gpu_dpo.py [--workdir DIR] [--runs ours,trl_default,...] [--out ...]
    python bench/gpu_dpo.py --small      # the same logic with tiny shapes (CPU or GPU)

The set-up: a random Llama-7B-shaped model (6.74B: hidden 4096, 32 layers, vocab 32000,
bf16 safetensors) and a word-level tokenizer of 32000 tokens, both built here (no hub);
96 pairs (prompt 256 tokens, completions 128-256), 8 pairs per step, 2 per micro-batch,
NF4 base + LoRA r16 on all linear layers, activation checkpointing, bf16 compute, 10
steps; the pairs carry no reference log-probs, so each trainer gets its reference from
the policy's 4-bit base with the adapter off. Runs, each in its own process:

- ``ours``: `train dpo --reference POLICY` (reference computed once, no second model;
  prefix sharing in its default layout for the device: FlexAttention on a GPU);
- ``ours_rows`` / ``ours_mask``: the same with two rows per pair / the dense 4D mask;
- ``trl_default``: TRL DPOTrainer + peft, reference = adapter disabled at every step;
- ``trl_precompute``: the same with ``precompute_ref_log_probs``.

Printed per run: median seconds per optimizer step (the first 3 steps skipped: they pay
compilation), total wall time (load + reference + training), peak CUDA memory allocated
and reserved (whole process), peak RSS. Targets (issue 12): ours <= 0.6x TRL default and
<= 0.85x TRL precompute in step time, peak memory <= 1.1x TRL's.

Without CUDA it prints why and exits 0 (``--small`` runs the tiny version on CPU, which
checks the script's logic only; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpo import _hwm_mib as peak_rss_mib  # noqa: E402  bench/dpo.py's RSS probe

WARMUP = 3
RUNS = ("ours", "ours_rows", "ours_mask", "trl_default", "trl_precompute")
SHAPES = {  # model and data shapes per size
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, pairs=96, prompt=256,
               completion=(128, 256), steps=10, lora_r=16),
    "small": dict(hidden=64, intermediate=128, layers=2, heads=4, pairs=24, prompt=32,
                  completion=(16, 32), steps=5, lora_r=8),
}
VOCAB = 32000
BATCH, MICRO = 8, 2


def word_tokenizer():
    """A word-level tokenizer of 32000 tokens (w4 ... w31999 and 4 specials), in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special)}
    vocab.update({f"w{i}": i for i in range(len(special), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_model(path: Path, shape: dict, device: str) -> None:
    """A random Llama of ``shape`` in bf16, saved as safetensors (kept for later runs)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    if (path / "config.json").exists() and list(path.glob("*.safetensors")):
        return
    tok = word_tokenizer()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                      max_position_embeddings=4096, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def make_pairs(work: Path, shape: dict) -> None:
    """``pairs.jsonl`` (text, one word per token) and the same as a pairs dataset."""
    from offline_rlhf.pairs import import_pairs
    if (work / "pairs").exists():
        return
    rng = random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(4, VOCAB)}" for _ in range(n))
    rows = [{"prompt": words(shape["prompt"]), "chosen": " " + words(rng.randint(*shape["completion"])),
             "rejected": " " + words(rng.randint(*shape["completion"]))} for _ in range(shape["pairs"])]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_pairs(str(work / "pairs.jsonl"), str(work / "pairs"))


def _memory(t0: float) -> dict:
    import torch

    from offline_rlhf.models import free_memory
    out = {"total_seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}
    if torch.cuda.is_available():
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    free_memory()
    return out


def child_ours(work: Path, shape: dict, variant: str) -> dict:
    import torch

    from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo
    t0 = time.perf_counter()
    gpu = torch.cuda.is_available()
    layout = {"ours": {}, "ours_rows": {"share_prompt": False},
              "ours_mask": {"prefix_attention": "mask"}}[variant]
    out = work / f"out-{variant}"
    cfg = DPOTrainConfig(data=str(work / "pairs"), output=str(out), policy=str(work / "model"),
                         reference=str(work / "model"), lora_r=shape["lora_r"], lora_alpha=32,
                         bits=4, dtype="bfloat16" if gpu else "float32", gradient_checkpointing=True,
                         batch_size=BATCH, micro_batch_size=MICRO, max_steps=shape["steps"], lr=5e-5,
                         nll_alpha=0.0, beta=0.1, schedule="linear", report_to="none",
                         save_merged=False, resume="never", **layout)
    summary = train_dpo(cfg)
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [b["seconds"] - a["seconds"] for a, b in zip(hist, hist[1:])][WARMUP:]
    return {"step_seconds": statistics.median(times), "layout": summary["data"]["layout"],
            "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"], **_memory(t0)}


def child_trl(work: Path, shape: dict, precompute: bool) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from offline_rlhf.models import load_tokenizer, quantization_config
    t0 = time.perf_counter()
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(work / "model"), dtype=dtype, quantization_config=quantization_config(4, dtype),
        device_map={"": "cuda" if gpu else "cpu"})
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = DPOConfig(output_dir=str(work / f"trl-{precompute}"), per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=BATCH // MICRO, max_steps=shape["steps"],
                     learning_rate=5e-5, gradient_checkpointing=True, bf16=gpu, use_cpu=not gpu,
                     precompute_ref_log_probs=precompute, report_to=[], save_strategy="no",
                     logging_steps=1, max_length=None, beta=0.1, lr_scheduler_type="linear", seed=0)
    rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=load_tokenizer(work / "model", padding_side="right"),
                         callbacks=[Clock()],
                         peft_config=LoraConfig(r=shape["lora_r"], lora_alpha=32, lora_dropout=0.0,
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    times = [b - a for a, b in zip(stamps, stamps[1:])][WARMUP:]
    return {"step_seconds": statistics.median(times), **_memory(t0)}


def run_child(kind: str, work: Path, size: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--workdir", str(work),
                          "--size", size], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed",
                "stderr_tail": out.stderr[-3000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(res: dict, size: str, device: str) -> None:
    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"
    print(f"\nQLoRA DPO ({size}), {device}: {BATCH} pairs/step, {MICRO} per micro-batch\n")
    print(f"{'run':<16}{'s/step':>9}{'total s':>9}{'alloc GiB':>11}{'reserved GiB':>14}{'RSS MiB':>9}")
    for name, r in res["runs"].items():
        if "error" in r:
            print(f"{name:<16}  failed: {r['error']}")
            continue
        print(f"{name:<16}{f(r['step_seconds'], '.3f'):>9}{f(r['total_seconds'], '.0f'):>9}"
              f"{f(r.get('peak_allocated_gib'), '.2f'):>11}{f(r.get('peak_reserved_gib'), '.2f'):>14}"
              f"{f(r['peak_rss_mib'], '.0f'):>9}")
    for k, v in res.get("ratios", {}).items():
        print(f"{k:<50} {v:.2f}x")


def ratios(runs: dict) -> dict:
    ours, out = runs.get("ours", {}), {}
    for trl, target in (("trl_default", 0.6), ("trl_precompute", 0.85)):
        if "step_seconds" in ours and "step_seconds" in runs.get(trl, {}):
            out[f"step time ours / {trl} (target <= {target})"] = \
                ours["step_seconds"] / runs[trl]["step_seconds"]
        if ours.get("peak_reserved_gib") and runs.get(trl, {}).get("peak_reserved_gib"):
            out[f"peak reserved ours / {trl} (target <= 1.1)"] = \
                ours["peak_reserved_gib"] / runs[trl]["peak_reserved_gib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes: checks the script's logic")
    ap.add_argument("--size", choices=list(SHAPES), help=argparse.SUPPRESS)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    ap.add_argument("--workdir", help="keep the model and data here between runs (default: a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_dpo.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = args.size or ("small" if args.small else "7b")
    shape = SHAPES[size]
    if args.child:
        work = Path(args.workdir)
        res = child_trl(work, shape, args.child == "trl_precompute") if args.child.startswith("trl") \
            else child_ours(work, shape, args.child)
        print(json.dumps(res))
        return
    import torch
    if not torch.cuda.is_available() and size != "small":
        print("bench/gpu_dpo.py: skipped: no CUDA GPU visible (this benchmark measures one; "
              "--small runs the tiny version on CPU to check the script)")
        return
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-gpu-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    build_model(work / "model", shape, "cuda" if torch.cuda.is_available() else "cpu")
    make_pairs(work, shape)
    runs = {k: run_child(k, work, size) for k in args.runs.split(",")}
    res = {"size": size, "device": device, "shape": shape, "batch_pairs": BATCH,
           "micro_batch_pairs": MICRO, "runs": runs, "ratios": ratios(runs)}
    report(res, size, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}" + ("" if args.workdir else f"; model and data in {work} (delete when done)"))


if __name__ == "__main__":
    main()
