"""Shard store vs plain pyarrow.parquet: write/read throughput, polars pairs, streaming memory.

    python bench/shards.py [--rows 200000] [--big-rows 1000000] [--out bench/results/shards.json]

Rows are realistic scored generations: K=4 samples per prompt, ~150-token responses
(100-200) with per-token behaviour and reference log-probs, ~50-token prompts, two
reward components and the lineage columns. Both sides write the same chunks (10k rows
per file) with the same compression; the store also validates every row, hashes each
shard, fsyncs, renames and rewrites the manifest. Targets (issue 2): store write >=
0.85x plain pyarrow; streaming peak memory at 1M rows within 1.2x of 200k rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offline_rlhf.schemas import load_schema  # noqa: E402
from offline_rlhf.shards import ShardWriter, open_dataset  # noqa: E402

CHUNK = 10_000
K = 4
LETTERS = np.frombuffer(b"etaoinshrdlucmfwypvbgkqjxz", dtype=np.uint8)


def _text(rng, lengths) -> pa.Array:
    """Text-like strings (letters and spaces) of the given lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    weights = 1.0 / np.arange(1, len(LETTERS) + 1)
    data = rng.choice(LETTERS, size=int(offsets[-1]), p=weights / weights.sum())
    data[rng.random(len(data)) < 0.17] = ord(" ")
    return pa.StringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data))


def _lists(rng, lengths, make) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(make(int(offsets[-1]))))


def make_chunk(chunk: int, rows: int = CHUNK) -> pa.Table:
    rng = np.random.default_rng(chunk)
    first = chunk * rows
    idx = np.arange(first, first + rows)
    n_prompts = rows // K
    prompt_text = _text(rng, rng.integers(120, 400, n_prompts))
    prompt_ids = _lists(rng, rng.integers(30, 80, n_prompts),
                        lambda n: rng.integers(0, 32000, n, dtype=np.int32))
    rep = np.repeat(np.arange(n_prompts), K)
    resp_len = rng.integers(100, 201, rows)
    reward = rng.normal(size=rows)
    comp_offsets = pa.array(np.arange(0, 2 * rows + 1, 2, dtype=np.int32))
    comps = pa.StructArray.from_arrays(
        [pa.array(np.tile(["reward_model", "format"], rows)),
         pa.array(np.stack([reward, rng.integers(0, 2, rows)], 1).ravel().astype(np.float64))],
        names=["name", "value"])
    logps = lambda n: -rng.exponential(1.0, n).astype(np.float32)  # noqa: E731
    behaviour = _lists(rng, resp_len, logps)
    ref = _lists(rng, resp_len, logps)
    n = rows
    const = lambda v, t=None: pa.array([v] * n, t or pa.string())  # noqa: E731
    decoding = pa.array([{"temperature": 1.0, "top_p": 0.95, "top_k": 0, "max_new_tokens": 256,
                          "greedy": False, "seed": 1234}] * n,
                        load_schema("generations").arrow.field("decoding").type)
    cols = {
        "prompt_id": pa.array([f"{first // K + i:012x}" for i in range(n_prompts)]).take(rep),
        "prompt": prompt_text.take(rep), "messages": pa.nulls(n),
        "reference_answer": pa.nulls(n), "sample_index": pa.array(idx % K, pa.int32()),
        "response": _text(rng, resp_len * 4),
        "prompt_token_ids": prompt_ids.take(rep),
        "response_token_ids": _lists(rng, resp_len, lambda m: rng.integers(0, 32000, m, dtype=np.int32)),
        "behaviour_logps": behaviour,
        "finish_reason": pa.array(np.where(rng.random(n) < 0.9, "eos", "length")),
        "reward": pa.array(reward),
        "reward_components": pa.ListArray.from_arrays(comp_offsets, comps),
        "reward_normalized": pa.array(rng.normal(size=n)), "token_rewards": pa.nulls(n),
        "ref_logps_sum": pa.array(np.asarray(pa.compute.list_value_length(ref)) * -1.0),
        "ref_logps": ref, "decoding": decoding,
        "policy_fingerprint": const("a" * 64), "reward_fingerprint": const("b" * 64),
        "reference_fingerprint": const("c" * 64), "config_hash": const("d" * 64),
        "code_version": const("0.1.0"),
        "created_at": const(dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc),
                            pa.timestamp("us", tz="UTC")),
    }
    schema = load_schema("generations").arrow
    return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in schema], schema=schema)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def write_store(path: Path, chunks: list[pa.Table]) -> float:
    w = ShardWriter(str(path), "generations", lineage={"policy_fingerprint": "a" * 64},
                    config_hash="d" * 64)
    t = time.perf_counter()
    for i, c in enumerate(chunks):
        w.write(i, c)
    w.finish(total_chunks=len(chunks))
    return time.perf_counter() - t


def write_plain(path: Path, chunks: list[pa.Table], compression: str) -> float:
    path.mkdir(parents=True)
    t = time.perf_counter()
    for i, c in enumerate(chunks):
        pq.write_table(c, path / f"part-{i:06d}.parquet", compression=compression)
    return time.perf_counter() - t


def pairs_with_polars(ds) -> tuple[float, int]:
    import polars as pl

    def build():
        lf = ds.to_polars(verify=False).select("prompt_id", "response", "reward")
        ranked = lf.with_columns(
            best=pl.col("reward").rank("ordinal", descending=True).over("prompt_id") == 1,
            worst=pl.col("reward").rank("ordinal").over("prompt_id") == 1)
        best = ranked.filter("best").select("prompt_id", chosen="response", chosen_reward="reward")
        worst = ranked.filter("worst").select("prompt_id", rejected="response",
                                              rejected_reward="reward")
        return best.join(worst, on="prompt_id").filter(
            pl.col("chosen_reward") > pl.col("rejected_reward")).collect()
    seconds, pairs = _timed(build)
    return seconds, pairs.height


def _hwm_kib() -> int:
    # VmHWM resets at exec; ru_maxrss on Linux carries over the parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def stream_child(path: str) -> None:
    """Run in a fresh process: peak RSS of streaming the whole dataset."""
    ds = open_dataset(path)
    base = _hwm_kib()
    t = time.perf_counter()
    rows = tokens = 0
    for batch in ds.iter_batches(batch_size=1024):
        rows += batch.num_rows
        tokens += len(batch.column("response_token_ids").values)
    peak = _hwm_kib()
    print(json.dumps({"rows": rows, "tokens": tokens, "seconds": time.perf_counter() - t,
                      "rss_before_mib": base / 1024, "peak_rss_mib": peak / 1024}))


def stream_peak(path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--stream-child", str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--big-rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "shards.json"))
    ap.add_argument("--stream-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stream_child:
        return stream_child(args.stream_child)

    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        n_chunks = args.rows // CHUNK
        chunks = [make_chunk(i) for i in range(n_chunks)]
        nbytes = sum(c.nbytes for c in chunks)
        res = {"rows": args.rows, "arrow_bytes": nbytes, "chunk_rows": CHUNK,
               "tokens_per_row": sum(len(c.column("response_token_ids").combine_chunks().values)
                                     for c in chunks) / args.rows}
        times = {"store": [], "plain_zstd": [], "plain_default": []}
        for r in range(args.repeats):  # interleaved, best of N
            times["store"].append(write_store(tmp / f"store{r}", chunks))
            times["plain_zstd"].append(write_plain(tmp / f"pz{r}", chunks, "zstd"))
            times["plain_default"].append(write_plain(tmp / f"pd{r}", chunks, "snappy"))
        w = {k: args.rows / min(v) for k, v in times.items()}
        ds = open_dataset(str(tmp / "store0"))
        read = {
            "store read() + sha256": args.rows / min(_timed(lambda: ds.read())[0]
                                                     for _ in range(args.repeats)),
            "store iter_batches + sha256": args.rows / min(_timed(
                lambda: sum(b.num_rows for b in ds.iter_batches(4096)))[0]
                for _ in range(args.repeats)),
            "plain pq.read_table": args.rows / min(_timed(
                lambda: pq.read_table(tmp / "pz0"))[0] for _ in range(args.repeats)),
        }
        pair_s, n_pairs = pairs_with_polars(ds)
        res.update(write_rows_per_s=w, read_rows_per_s=read,
                   write_ratio_vs_plain_same_compression=w["store"] / w["plain_zstd"],
                   write_ratio_vs_plain_default=w["store"] / w["plain_default"],
                   bytes_on_disk={"store_zstd": sum(f.stat().st_size for f in (tmp / "store0").glob("*.parquet")),
                                  "plain_snappy": sum(f.stat().st_size for f in (tmp / "pd0").glob("*.parquet"))},
                   polars_best_worst_pairs={"seconds": pair_s, "pairs": n_pairs})
        for r in range(args.repeats):
            for sub in ("store", "pz", "pd"):
                shutil.rmtree(tmp / f"{sub}{r}", ignore_errors=True)
        del chunks

        write_store(tmp / "small", [make_chunk(i) for i in range(n_chunks)])
        small = stream_peak(tmp / "small")
        big_path = tmp / "big"
        w = ShardWriter(str(big_path), "generations", config_hash="d" * 64)
        for i in range(args.big_rows // CHUNK):
            w.write(i, make_chunk(i))
        w.finish()
        big = stream_peak(big_path)
        res["streaming"] = {"small": small, "big": big,
                            "peak_ratio_big_vs_small": big["peak_rss_mib"] / small["peak_rss_mib"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nshard store benchmark: {args.rows:,} rows, {res['tokens_per_row']:.0f} response "
          f"tokens/row, {nbytes / 2**20:.0f} MiB in Arrow\n")
    print(f"{'operation':<38}{'rows/s':>14}")
    for k, v in res["write_rows_per_s"].items():
        print(f"{'write ' + k:<38}{v:>14,.0f}")
    for k, v in res["read_rows_per_s"].items():
        print(f"{'read ' + k:<38}{v:>14,.0f}")
    print(f"\nwrite ratio store / plain pyarrow (zstd, same files)   "
          f"{res['write_ratio_vs_plain_same_compression']:.2f}x  (target >= 0.85)")
    print(f"write ratio store / plain pyarrow (default snappy)     "
          f"{res['write_ratio_vs_plain_default']:.2f}x")
    print(f"polars best/worst pairs: {n_pairs:,} pairs in {pair_s:.2f} s")
    s, b = res["streaming"]["small"], res["streaming"]["big"]
    print(f"streaming peak RSS: {s['rows']:,} rows {s['peak_rss_mib']:.0f} MiB, "
          f"{b['rows']:,} rows {b['peak_rss_mib']:.0f} MiB -> "
          f"{res['streaming']['peak_ratio_big_vs_small']:.2f}x  (target <= 1.2)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
