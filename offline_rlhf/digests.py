"""Content digests of shards, for the shard store.

- **Content hash**: a shard's sha256 changes with its ``created_at`` column (the time the
  rows were made), so two runs of the same job never agree on it. The content hash is
  a 128-bit XXH3 over the shard's Parquet bytes *except* the column chunks of run-time
  columns and the footer (which holds their statistics): the bytes of the row data
  themselves, taken in the same pass that computes the file's sha256. Same rows, same writer
  settings -> same content hash, whenever and however often they are written.
- **Key hashes**: a 64-bit hash per row of the table's unique key (e.g.
  ``(prompt_id, sample_index)``: a polynomial hash of the text's bytes, mixed with the
  integers, computed vectorised), in row order, recorded in each shard's entry. Finding
  a key written twice across the whole dataset then needs the entries only; a hash
  match is confirmed against the real key values before anything is refused.
"""

from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

# Columns that say when a row was made, not what it is: left out of the content hash.
RUNTIME_COLUMNS = frozenset({"created_at"})


def content_ranges(meta: pq.FileMetaData, size: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of a Parquet file that hold its content: everything
    between the leading magic and the footer, less the run-time columns' chunks."""
    skip = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        for j in range(rg.num_columns):
            col = rg.column(j)
            if col.path_in_schema.split(".")[0] in RUNTIME_COLUMNS:
                start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
                skip.append((start, start + col.total_compressed_size))
    footer_start = size - 8 - meta.serialized_size
    keep, at = [], 4
    for start, end in sorted(skip):
        if start > at:
            keep.append((at, start))
        at = max(at, end)
    if footer_start > at:
        keep.append((at, footer_start))
    return keep


class RangeHasher:
    """A 128-bit XXH3 of the bytes of a stream that fall inside ``ranges``, fed block by
    block (XXH3 runs at memory speed: the file's sha256 in the same pass is the cost)."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges, self.pos, self.h = ranges, 0, xxhash.xxh3_128()

    def update(self, block) -> None:
        lo, hi = self.pos, self.pos + len(block)
        view = memoryview(block)
        for start, end in self.ranges:
            if end > lo and start < hi:
                self.h.update(view[max(start, lo) - lo:min(end, hi) - lo])
        self.pos = hi

    def hexdigest(self) -> str:
        return f"xxh3_128:{self.h.hexdigest()}"


# 64-bit arithmetic wraps around in NumPy arrays: the hash below is mod 2**64.
_BASE = np.uint64(0x100000001B3)
_LENGTH = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: spreads every input bit over the output."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _text_hashes(arr: pa.Array) -> np.ndarray:
    """A polynomial hash of each string's UTF-8 bytes (and its length), vectorised."""
    arr = arr.cast(pa.large_string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    values = data[offsets[0]:offsets[-1]].astype(np.uint64)
    # byte k of a string of length L weighs BASE**(L-1-k)
    powers = np.multiply.accumulate(np.r_[np.uint64(1), np.full(int(lengths.max(initial=0)), _BASE)])
    from_end = np.repeat(offsets[1:], lengths) - 1 - np.arange(offsets[0], offsets[-1])
    sums = np.r_[np.uint64(0), np.cumsum(values * powers[from_end], dtype=np.uint64)]
    local = offsets - offsets[0]
    return _mix(sums[local[1:]] - sums[local[:-1]] + lengths.astype(np.uint64) * _LENGTH)


def key_hashes(table: pa.Table, key: tuple[str, ...]) -> np.ndarray:
    """64-bit hash of each row's key, in row order (text and integer key columns)."""
    h = np.full(table.num_rows, _LENGTH, dtype=np.uint64)
    for name in key:
        col = table.column(name)
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        part = col.cast(pa.int64()).to_numpy().view(np.uint64) if pa.types.is_integer(col.type) \
            else _text_hashes(col.cast(pa.string()))
        h = _mix(h * _BASE + part)
    return h


def key_value(table: pa.Table, key: tuple[str, ...], row: int) -> tuple:
    """One row's key as Python values."""
    return tuple(table.column(k)[row].as_py() for k in key)


def encode_hashes(hashes: np.ndarray) -> str:
    return base64.b64encode(hashes.astype("<u8").tobytes()).decode()


def decode_hashes(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<u8")


def colliding_rows(per_shard: list[np.ndarray]) -> list[tuple[int, int, int, int]]:
    """``(shard, row, first_shard, first_row)`` for every row whose key hash was
    already seen at an earlier (shard, row), in order of position."""
    if not per_shard:
        return []
    hashes = np.concatenate(per_shard)
    shard = np.concatenate([np.full(len(h), i, dtype=np.int64) for i, h in enumerate(per_shard)])
    row = np.concatenate([np.arange(len(h), dtype=np.int64) for h in per_shard])
    order = np.argsort(hashes, kind="stable")   # stable: earlier positions first
    sorted_h = hashes[order]
    repeat = np.flatnonzero(sorted_h[1:] == sorted_h[:-1]) + 1
    if not len(repeat):
        return []
    # the first position of each run of equal hashes
    run_start = np.maximum.accumulate(np.where(np.r_[True, sorted_h[1:] != sorted_h[:-1]],
                                               np.arange(len(sorted_h)), 0))
    out = [(int(shard[order[i]]), int(row[order[i]]),
            int(shard[order[run_start[i]]]), int(row[order[run_start[i]]])) for i in repeat]
    return sorted(out)
