"""Generation throughput: `offline-rlhf generate` vs a plain transformers generate loop.

    python bench/generate.py [--prompts 96] [--hidden 256] [--layers 4] [--out ...]

Same tiny model, same prompts (10-200 tokens, mixed), K=4 samples each, same decoding
(temperature 1, max_new_tokens), on CPU. The baseline calls `model.generate` over the
prompts in arrival order with a fixed batch size and `num_return_sequences=K`; ours is
the whole stage (token-budget batches, length bucketing, one prefill per prompt shared
by its K samples, finished rows leaving the batch, shard writing). Target (issue 3):
tokens/s >= 1.5x the baseline. Prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offline_rlhf.generation import GenerateConfig, generate  # noqa: E402
from offline_rlhf.models import load_policy, load_tokenizer  # noqa: E402
from offline_rlhf.shards import ShardWriter  # noqa: E402
from offline_rlhf.tiny import build_tiny_model, random_texts  # noqa: E402
from offline_rlhf.toy import prompt_id_for  # noqa: E402

K = 4


def baseline(model_dir: Path, prompts: list[str], batch: int, max_new: int) -> dict:
    model, tok = load_policy(model_dir), load_tokenizer(model_dir)
    torch.manual_seed(0)
    tokens = 0
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new, num_return_sequences=K,
                                 pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        # tokens up to and including the first EOS of each row
        for row in new.tolist():
            tokens += next((j + 1 for j, x in enumerate(row) if x == tok.eos_token_id), len(row))
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def ours(model_dir: Path, prompts_ds: str, out: Path, max_new: int, budget: int) -> dict:
    t = time.perf_counter()
    m = generate(GenerateConfig(prompts=prompts_ds, output=str(out), policy=str(model_dir),
                                num_samples=K, max_new_tokens=max_new, token_budget=budget,
                                max_prompt_tokens=512, chunk_prompts=10_000))
    seconds = time.perf_counter() - t
    tokens = m["run"]["tokens"]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="baseline prompts per batch")
    ap.add_argument("--token-budget", type=int, default=32768)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    try:
        model_dir = build_tiny_model(tmp / "model", hidden=args.hidden, layers=args.layers,
                                     heads=max(1, args.hidden // 64))
        tok = load_tokenizer(model_dir)
        prompts = random_texts(tok, args.prompts, 10, 200, seed=0)
        lengths = [len(tok(p)["input_ids"]) for p in prompts]
        import pyarrow as pa
        with ShardWriter(str(tmp / "prompts"), "prompts") as w:
            w.write(0, pa.table({"prompt_id": [prompt_id_for(f"{i}:{p}") for i, p in enumerate(prompts)],
                                 "prompt": prompts}))
            w.finish(total_chunks=1)
        ours(model_dir, str(tmp / "prompts"), tmp / "warm", 4, args.token_budget)  # warm-up
        base = baseline(model_dir, prompts, args.batch, args.max_new_tokens)
        mine = ours(model_dir, str(tmp / "prompts"), tmp / "gen", args.max_new_tokens,
                    args.token_budget)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"prompts": args.prompts, "k": K, "prompt_tokens": {"min": min(lengths), "max": max(lengths),
           "mean": sum(lengths) / len(lengths)}, "model": {"hidden": args.hidden, "layers": args.layers},
           "max_new_tokens": args.max_new_tokens, "baseline_batch_prompts": args.batch,
           "token_budget": args.token_budget, "baseline": base, "offline_rlhf": mine,
           "speedup": mine["tokens_per_s"] / base["tokens_per_s"]}
    print(f"\ngeneration: {args.prompts} prompts ({min(lengths)}-{max(lengths)} tokens), K={K}, "
          f"{args.max_new_tokens} new tokens, model hidden {args.hidden} x {args.layers} layers, CPU\n")
    print(f"{'':<36}{'seconds':>10}{'tokens':>10}{'tokens/s':>12}")
    for name, r in ((f"transformers generate (batch {args.batch})", base),
                    ("offline-rlhf generate", mine)):
        print(f"{name:<36}{r['seconds']:>10.1f}{r['tokens']:>10}{r['tokens_per_s']:>12.0f}")
    print(f"\nspeed-up {res['speedup']:.2f}x  (target >= 1.5)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
