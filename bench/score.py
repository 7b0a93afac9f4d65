"""Scoring throughput: the `offline-rlhf score` stage vs a bare forward and a plain loop.

    python bench/score.py [--rows 2048] [--hidden 256] [--layers 4] [--out ...]

Rows are scored generations with ~150-token responses (mixed, 20-300). Three sides, all
over the same rows in the same token-budget batches, model loading not timed:

- plain transformers loop (the independent baseline): the tokenizer's own batched call
  with padding, then the sequence-classification model's forward, its logits the reward;
- bare reward-model forward: the project's scorer over pre-tokenized rows, forward only;
- ours, the whole stage: read shards, verify hashes, tokenize, batch, forward, rule
  rewards, group normalisation, validate and write shards.

The plain loop's rewards are checked against the scorer's (same rows, same numbers).
Target (issue 3), judged on the overhead figure: stage rows/s >= 0.85x the bare forward
(at most ~15% overhead). The plain loop says how the forward itself compares with what
a user would write. Prints a table, saves JSON.
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

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offline_rlhf.batching import budget_batches  # noqa: E402
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


def plain_loop(rm: Path, texts: list[str], batches: list[list[int]]):
    """A plain transformers loop over ``batches`` of ``texts``: a timing function and the
    model it times (loaded here, outside the timing)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(str(rm), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(rm), padding_side="right")

    @torch.no_grad()
    def run() -> np.ndarray:
        out = np.zeros(len(texts))
        for batch in batches:
            enc = tok([texts[i] for i in batch], padding=True, return_tensors="pt")
            out[batch] = model(**enc).logits[:, 0].float().numpy()
        return out
    return run


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
        prompts, responses = t.column("prompt").to_pylist(), t.column("response").to_pylist()
        scorer = RewardModelScorer(str(rm), token_budget=args.token_budget)
        seqs, _ = scorer.encode(prompts, responses)
        n_tokens = sum(len(s) for s in seqs)
        plain = plain_loop(rm, [p + r for p, r in zip(prompts, responses)],
                           budget_batches([len(s) for s in seqs], args.token_budget))
        gap = float(np.abs(plain() - scorer.score_ids(seqs)).max())
        if gap > 1e-3:
            raise SystemExit(f"the plain loop and the scorer disagree by {gap:.3g}: not the same rows")
        plain_s, bare, stage = [], [], []
        for r in range(args.repeats):  # interleaved; best of N
            t0 = time.perf_counter()
            plain()
            plain_s.append(time.perf_counter() - t0)
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
           "plain_transformers_rows_per_s": args.rows / min(plain_s),
           "bare_forward_rows_per_s": args.rows / min(bare), "stage_rows_per_s": args.rows / min(stage),
           "plain_seconds": plain_s, "bare_seconds": bare, "stage_seconds": stage,
           "max_reward_gap_plain_vs_scorer": gap}
    res["ratio"] = res["stage_rows_per_s"] / res["bare_forward_rows_per_s"]
    res["ratio_vs_plain"] = res["stage_rows_per_s"] / res["plain_transformers_rows_per_s"]
    print(f"\nscoring: {args.rows} rows, {n_tokens / args.rows:.0f} tokens/row, reward model hidden "
          f"{args.hidden} x {args.layers} layers, CPU\n")
    print(f"{'':<46}{'rows/s':>10}")
    print(f"{'plain transformers loop (tokenize + forward)':<46}{res['plain_transformers_rows_per_s']:>10.1f}")
    print(f"{'bare reward-model forward (pre-tokenized)':<46}{res['bare_forward_rows_per_s']:>10.1f}")
    print(f"{'offline-rlhf score (whole stage, I/O incl.)':<46}{res['stage_rows_per_s']:>10.1f}")
    print(f"\nstage / bare forward (overhead)   {res['ratio']:.2f}x  (target >= 0.85)")
    print(f"stage / plain transformers loop   {res['ratio_vs_plain']:.2f}x  "
          f"(rewards agree within {gap:.1g})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
