"""Generation throughput: `offline-rlhf generate` (each backend) vs transformers `generate`.

    python bench/generate.py [--backend hf|vllm|both] [--prompts 64] [--hidden 512] [--layers 8]
    python bench/generate.py --gpu [--backend both]      # the 1.1B Llama-shaped model on CUDA

CPU mode (default): a tiny-but-not-trivial random model (hidden 512, 8 layers, 8 heads:
head dim 64, which vLLM's CPU attention needs), prompts of 10-200 tokens, K=4 samples,
temperature 1. The baseline is transformers ``model.generate`` over the prompts in
arrival order with ``num_return_sequences=K``, swept over 8, 16, 32 and 64 prompts per
call; ours is compared with the best of the sweep. Ours is printed twice per backend:
the whole stage (model or engine load, tokenizing, rows, shard writing) and the
backend's generate calls alone, on the same prompt tokens and seeds.

GPU mode (``--gpu``; skips without CUDA): the random 1.1B Llama-shaped model of issue 11
(hidden 2048, 16 layers, 32/8 heads, vocab 32000, bf16) with a word-level tokenizer of
32000 tokens built in memory; 128 prompts of 64-512 tokens, K=4, 128 new tokens, T=1.
Rows: ours with each backend at its defaults, transformers generate at 64 prompts x 4,
and the bandwidth-bound estimate (every decode step reads the weights and the KV cache
once, at the device bandwidth measured here). Targets: vllm >= 5x transformers 64 x 4,
the built-in backend >= 1.3x.

Prints a table and saves JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offline_rlhf.backends import backend_module  # noqa: E402
from offline_rlhf.generation import GenerateConfig, generate, sample_seed  # noqa: E402
from offline_rlhf.models import load_policy, load_tokenizer  # noqa: E402
from offline_rlhf.shards import ShardWriter  # noqa: E402
from offline_rlhf.stage import NullProgress  # noqa: E402
from offline_rlhf.tiny import build_tiny_model, random_texts  # noqa: E402
from offline_rlhf.toy import prompt_id_for  # noqa: E402

K = 4
SWEEP = (8, 16, 32, 64)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- baseline

def hf_generate(model_dir: Path, prompts: list[str], batch: int, max_new: int) -> dict:
    """transformers ``generate`` over ``prompts`` in arrival order, ``batch`` per call."""
    model, tok = load_policy(model_dir), load_tokenizer(model_dir)
    device = next(model.parameters()).device
    torch.manual_seed(0)
    tokens = 0
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new, num_return_sequences=K,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():   # up to the first EOS
            tokens += next((j + 1 for j, x in enumerate(row) if x == tok.eos_token_id), len(row))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del model
    free_memory()
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


# --------------------------------------------------------------------------- ours

def ours_stage(model_dir: Path, prompts_ds: str, out: Path, max_new: int, backend: str,
               budget: int | None) -> dict:
    """The whole stage: load, tokenize, generate, rows, shards."""
    t = time.perf_counter()
    m = generate(GenerateConfig(prompts=prompts_ds, output=str(out), policy=str(model_dir),
                                num_samples=K, max_new_tokens=max_new, token_budget=budget,
                                max_prompt_tokens=1024, chunk_prompts=10_000, backend=backend))
    seconds = time.perf_counter() - t
    free_memory()
    return {"seconds": seconds, "tokens": m["run"]["tokens"],
            "tokens_per_s": m["run"]["tokens"] / seconds}


def ours_generate_only(model_dir: Path, prompts: list[str], ids: list[str], max_new: int,
                       backend: str, budget: int | None) -> dict:
    """The backend's generate call alone: same prompt tokens and seeds, no load, no shards."""
    tok = load_tokenizer(model_dir)
    cfg = GenerateConfig(prompts="-", output="-", policy=str(model_dir), num_samples=K,
                         max_new_tokens=max_new, token_budget=budget, backend=backend)
    gen = backend_module(backend).Generator(cfg, tok)
    prompt_ids = tok(prompts, add_special_tokens=True)["input_ids"]
    seeds = [[sample_seed(0, pid, k) for k in range(K)] for pid in ids]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    progress = NullProgress()
    gen.generate(prompt_ids, seeds, cfg.sampling, progress)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    if hasattr(gen, "close"):
        gen.close()
    del gen
    free_memory()
    return {"seconds": seconds, "tokens": progress.tokens, "tokens_per_s": progress.tokens / seconds}


def run_ours(backend: str, model_dir: Path, tmp: Path, prompts: list[str], ids: list[str],
             max_new: int, budget: int | None) -> dict:
    """Both measurements for one backend (a vLLM engine is started by each)."""
    stage = ours_stage(model_dir, str(tmp / "prompts"), tmp / f"gen-{backend}", max_new,
                       backend, budget)
    only = ours_generate_only(model_dir, prompts, ids, max_new, backend, budget)
    return {"stage": stage, "generate_only": only}


def write_prompts(path: Path, prompts: list[str]) -> list[str]:
    ids = [prompt_id_for(f"{i}:{p}") for i, p in enumerate(prompts)]
    with ShardWriter(str(path), "prompts") as w:
        w.write(0, pa.table({"prompt_id": ids, "prompt": prompts}))
        w.finish(total_chunks=1)
    return ids


def backends_of(choice: str) -> list[str]:
    return ["hf", "vllm"] if choice == "both" else [choice]


# --------------------------------------------------------------------------- CPU mode

def cpu_mode(args) -> dict:
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    try:
        model_dir = build_tiny_model(tmp / "model", hidden=args.hidden, layers=args.layers,
                                     heads=max(1, args.hidden // 64))
        tok = load_tokenizer(model_dir)
        prompts = random_texts(tok, args.prompts, 10, 200, seed=0)
        ids = write_prompts(tmp / "prompts", prompts)
        lengths = [len(tok(p)["input_ids"]) for p in prompts]
        ours_stage(model_dir, str(tmp / "prompts"), tmp / "warm", 4, "hf", None)   # warm-up
        sweep = {b: hf_generate(model_dir, prompts, b, args.max_new_tokens) for b in SWEEP}
        ours = {b: run_ours(b, model_dir, tmp, prompts, ids, args.max_new_tokens, None)
                for b in backends_of(args.backend)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = max(sweep, key=lambda b: sweep[b]["tokens_per_s"])
    return {"mode": "cpu", "prompts": args.prompts, "k": K, "max_new_tokens": args.max_new_tokens,
            "prompt_tokens": {"min": min(lengths), "max": max(lengths),
                              "mean": sum(lengths) / len(lengths)},
            "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.hidden // 64},
            "baseline_sweep": {str(b): r for b, r in sweep.items()}, "baseline_best": best,
            "ours": ours}


def print_cpu(res: dict) -> None:
    m = res["model"]
    print(f"\ngeneration on CPU: {res['prompts']} prompts ({res['prompt_tokens']['min']}-"
          f"{res['prompt_tokens']['max']} tokens), K={K}, {res['max_new_tokens']} new tokens, "
          f"model hidden {m['hidden']} x {m['layers']} layers\n")
    print(f"{'':<48}{'seconds':>9}{'tokens':>9}{'tokens/s':>10}{'vs best':>9}")
    best = res["baseline_sweep"][str(res["baseline_best"])]["tokens_per_s"]
    lines = [(f"transformers generate, {b} prompts x {K} per call", r)
             for b, r in res["baseline_sweep"].items()]
    for backend, r in res["ours"].items():
        lines += [(f"ours --backend {backend}: whole stage", r["stage"]),
                  (f"ours --backend {backend}: generate calls only", r["generate_only"])]
    for name, r in lines:
        print(f"{name:<48}{r['seconds']:>9.1f}{r['tokens']:>9}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s'] / best:>8.2f}x")


# --------------------------------------------------------------------------- GPU mode

def word_tokenizer(vocab_size: int = 32000):
    """A word-level tokenizer of ``vocab_size`` tokens (pseudo-words), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(0)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words: set[str] = set()
    while len(words) < vocab_size - len(specials):
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))))
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_1b(out: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig
    tok = word_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def device_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (reads + writes), the best of 5."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        best = max(best, 2 * x.numel() / (time.perf_counter() - t))
    del x, y
    return best


def bandwidth_bound(model_dir: Path, rows: int, mean_context: float, bandwidth: float) -> float:
    """Tokens/s if every decode step of ``rows`` sequences read all weights and each
    row's KV cache once at ``bandwidth``."""
    from transformers import AutoConfig

    from offline_rlhf.backends.hf import kv_bytes_per_token
    cfg = AutoConfig.from_pretrained(model_dir)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    step = weights + rows * mean_context * kv_bytes_per_token(cfg, torch.bfloat16)
    return rows * bandwidth / step


def gpu_mode(args) -> dict | None:
    if not torch.cuda.is_available():
        print("GPU mode: no CUDA device here; skipped (run it on a GPU machine)")
        return None
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-gpu-"))
    try:
        model_dir = build_1b(tmp / "model")
        tok = load_tokenizer(model_dir)
        rng = random.Random(0)
        words = [w for w in tok.get_vocab() if not w.startswith("<")]
        prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(64, 512)))
                   for _ in range(args.gpu_prompts)]
        ids = write_prompts(tmp / "prompts", prompts)
        new = args.gpu_max_new_tokens
        ours_stage(model_dir, str(tmp / "prompts"), tmp / "warm", 4, "hf", None)   # warm-up
        base = hf_generate(model_dir, prompts, 64, new)
        ours = {b: run_ours(b, model_dir, tmp, prompts, ids, new, None)
                for b in backends_of(args.backend)}
        lengths = [len(tok(p)["input_ids"]) for p in prompts]
        bound = bandwidth_bound(model_dir, len(prompts) * K, sum(lengths) / len(lengths) + new / 2,
                                device_bandwidth())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"mode": "gpu", "device": torch.cuda.get_device_name(), "prompts": len(prompts),
            "k": K, "max_new_tokens": new, "baseline_64x4": base, "ours": ours,
            "bandwidth_bound_tokens_per_s": bound}


def print_gpu(res: dict) -> None:
    print(f"\ngeneration on {res['device']}: 1.1B Llama-shaped (bf16), {res['prompts']} prompts "
          f"of 64-512 tokens, K={K}, {res['max_new_tokens']} new tokens\n")
    base = res["baseline_64x4"]["tokens_per_s"]
    print(f"{'':<48}{'tokens/s':>10}{'vs generate':>13}")
    rows = [("transformers generate, 64 prompts x 4 per call", base)]
    for b, r in res["ours"].items():
        rows += [(f"ours --backend {b} (defaults): whole stage", r["stage"]["tokens_per_s"]),
                 (f"ours --backend {b}: generate calls only", r["generate_only"]["tokens_per_s"])]
    rows.append(("bandwidth-bound estimate", res["bandwidth_bound_tokens_per_s"]))
    for name, v in rows:
        print(f"{name:<48}{v:>10.0f}{v / base:>12.2f}x")
    print("\ntargets: vllm >= 5x transformers generate 64 x 4; hf (defaults) >= 1.3x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["hf", "vllm", "both"], default="hf")
    ap.add_argument("--gpu", action="store_true", help="the 1.1B model on CUDA (skips without)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gpu-prompts", type=int, default=128)
    ap.add_argument("--gpu-max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/generate[-gpu].json)")
    args = ap.parse_args()
    res = gpu_mode(args) if args.gpu else cpu_mode(args)
    if res is None:
        return
    (print_gpu if args.gpu else print_cpu)(res)
    out = Path(args.out or Path(__file__).parent / "results" /
               ("generate-gpu.json" if args.gpu else "generate.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
