"""Scoring throughput: the `offline-rlhf score` stage vs the bare reward-model forward.

    python bench/score.py [--rows 2048] [--hidden 256] [--layers 4] [--out ...]

Rows are scored generations with ~150-token responses (mixed, 20-300). The bare side
runs only the reward model over the same pre-tokenized rows in the same token-budget
batches; ours is the whole stage: read shards, verify hashes, tokenize, batch, forward,
rule rewards, group normalisation, validate and write shards. Target (issue 3):
stage rows/s >= 0.85x the bare forward (at most ~15% overhead). Prints a table, saves JSON.
"""

from __future__ import annotations

import argparse
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
from offline_rlhf.models import load_tokenizer  # noqa: E402
from offline_rlhf.rewards.reward_model import RewardModelScorer  # noqa: E402
from offline_rlhf.rewards.score import ScoreConfig, score  # noqa: E402
from offline_rlhf.schemas import load_schema  # noqa: E402
from offline_rlhf.shards import ShardWriter  # noqa: E402
from offline_rlhf.tiny import build_tiny_model, default_corpus  # noqa: E402

K = 4


def make_generations(path: Path, tokenizer, rows: int, chunk: int = 512) -> None:
    rng = random.Random(0)
    corpus = default_corpus(300, seed=3)
    vocab = len(tokenizer)
    schema = load_schema("generations").arrow
    with ShardWriter(str(path), "generations") as w:
        for c in range(rows // chunk):
            data = []
            for i in range(c * chunk, (c + 1) * chunk):
                n = rng.randint(20, 300)
                resp = [rng.randrange(10, vocab) for _ in range(n)]
                data.append({"prompt_id": f"p{i // K:06d}", "prompt": rng.choice(corpus) + " Answer:",
                             "sample_index": i % K, "response": tokenizer.decode(resp),
                             "response_token_ids": resp, "reference_answer": "7",
                             "finish_reason": "length"})
            w.write(c, pa.Table.from_pylist(data, schema=schema))
        w.finish(total_chunks=rows // chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "score.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        rm = build_tiny_model(tmp / "rm", kind="reward", hidden=args.hidden, layers=args.layers,
                              heads=max(1, args.hidden // 64))
        tok = load_tokenizer(rm)
        make_generations(tmp / "gen", tok, args.rows)
        from offline_rlhf.shards import open_dataset
        t = open_dataset(str(tmp / "gen")).read(columns=["prompt", "response"])
        scorer = RewardModelScorer(str(rm), token_budget=args.token_budget)
        seqs, _ = scorer.encode(t.column("prompt").to_pylist(), t.column("response").to_pylist())
        n_tokens = sum(len(s) for s in seqs)
        bare, stage = [], []
        for r in range(args.repeats):  # interleaved; best of N
            t0 = time.perf_counter()
            scorer.score_ids(seqs)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            score(ScoreConfig(generations=str(tmp / "gen"), output=str(tmp / f"s{r}"),
                              reward_model=str(rm), token_budget=args.token_budget,
                              weights={"reward_model": 1.0, "numeric_match": 0.5}))
            stage.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"rows": args.rows, "tokens": n_tokens, "model": {"hidden": args.hidden, "layers": args.layers},
           "bare_forward_rows_per_s": args.rows / min(bare), "stage_rows_per_s": args.rows / min(stage),
           "bare_seconds": bare, "stage_seconds": stage}
    res["ratio"] = res["stage_rows_per_s"] / res["bare_forward_rows_per_s"]
    print(f"\nscoring: {args.rows} rows, {n_tokens / args.rows:.0f} tokens/row, reward model hidden "
          f"{args.hidden} x {args.layers} layers, CPU\n")
    print(f"{'':<44}{'rows/s':>10}")
    print(f"{'bare reward-model forward (pre-tokenized)':<44}{res['bare_forward_rows_per_s']:>10.1f}")
    print(f"{'offline-rlhf score (whole stage, I/O incl.)':<44}{res['stage_rows_per_s']:>10.1f}")
    print(f"\nratio {res['ratio']:.2f}x  (target >= 0.85)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
