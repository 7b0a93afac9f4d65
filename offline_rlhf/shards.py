"""The shard store: the only code in the package that reads or writes Parquet.

A *dataset* is a directory (local path or fsspec URL) of Parquet shards::

    part-000000.parquet                   one shard per input chunk, deterministic name
    part-000001.parquet
    .offline-rlhf/manifest.json           schema, lineage, config hash, every shard, completeness
    .offline-rlhf/shards/part-000000.json per-shard entry: rows, bytes, sha256, stats

The bookkeeping lives in one hidden folder so that readers pointed at the directory
(``pyarrow.dataset``, HF ``load_dataset(dir)``, ``*.parquet`` globs) see only shards;
HF would otherwise take a folder with more JSON than Parquet files for a JSON dataset.

and, when the caller asked for quarantine, a sibling ``<dataset>.quarantine/`` with the
refused rows and a reason column (outside the dataset: recursive ``**/*.parquet`` globs
in duckdb and polars, and HF ``load_dataset(dir)``, would otherwise read them).

Writes are atomic: a shard goes to a temporary name (``.part-000001.parquet.<id>.tmp``:
a dot file not ending in ``.parquet``, so neither ``*.parquet`` globs nor
``pyarrow.dataset`` see it), is fsynced and renamed; on object stores it is one PUT.
A shard counts as committed once its entry exists, so a rerun skips it. Entries are
one file per shard, so workers writing disjoint chunks never contend; the aggregate
manifest is rewritten atomically after each commit and on :meth:`ShardWriter.finish`.

Readers verify each shard's size and sha256 against its entry before use and name
the file on any mismatch or decoding error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import InputError, located
from .lineage import code_version, utc_now
from .schemas import Schema, conform, find_violations, load_schema

FORMAT = "offline-rlhf-dataset"
FORMAT_VERSION = 1
META = ".offline-rlhf"
MANIFEST = f"{META}/manifest.json"
ENTRIES = f"{META}/shards"
# Row groups of about this many Arrow bytes: streaming readers hold one at a time.
ROW_GROUP_BYTES = 64 << 20
HASH_BLOCK = 8 << 20


def shard_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


def _entry_name(chunk: int) -> str:
    return f"{ENTRIES}/part-{chunk:06d}.json"


def _fsync(fd: int) -> None:
    # A seam of its own so that crash tests can stop a writer exactly here.
    os.fsync(fd)


class _Store:
    """File operations on a dataset root, local or any fsspec filesystem."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def display(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def size(self, rel: str) -> int:
        return self.fs.size(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        target = self.path(rel) if rel else self.root
        if not self.fs.exists(target):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(target, detail=False))

    def stale_tmp(self, folders: tuple[str, ...] = ("", ENTRIES)) -> set[str]:
        """Temporary files present now (left by killed writers), as relative paths.

        Listed once when a writer opens: a stale temporary file of a chunk can only come
        from a run that died before, while files that appear later belong to live
        workers writing other chunks."""
        return {f"{folder}/{n}" if folder else n for folder in folders
                for n in self.listdir(folder) if n.startswith(".") and n.endswith(".tmp")}

    def remove_stale_tmp(self, rel: str, stale: set[str]) -> None:
        """Delete the stale temporary files of ``rel`` (this chunk only)."""
        folder, _, name = rel.rpartition("/")
        prefix = f"{folder}/.{name}." if folder else f".{name}."
        for other in [t for t in stale if t.startswith(prefix)]:
            self.fs.rm_file(self.path(other))
            stale.discard(other)

    def write_atomic(self, rel: str, data: bytes) -> None:
        staged = _Staged(self, rel)
        staged.write(data)
        staged.commit()

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock for manifest rewrites (local filesystems; a no-op elsewhere)."""
        if not self.local:
            yield
            return
        import fcntl
        os.makedirs(self.path(META), exist_ok=True)
        with open(self.path(f"{META}/lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


class _Staged:
    """A file written under a temporary name; :meth:`commit` hashes it and makes it
    visible at its final name (fsync + rename locally, one PUT elsewhere).

    ``sink`` is an Arrow output stream, so pyarrow encodes Parquet straight into it
    from C++; the sha256 is taken at commit time from the page cache.
    """

    def __init__(self, store: _Store, rel: str):
        self.store, self.final = store, store.path(rel)
        self.size, self.sha256 = 0, None
        if store.local:
            folder, _, name = self.final.rpartition("/")
            os.makedirs(folder, exist_ok=True)
            self.tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
            self.sink = pa.OSFile(self.tmp, "wb")
        else:
            self.tmp, self.sink = None, pa.BufferOutputStream()

    def write(self, data) -> None:
        self.sink.write(data)

    def commit(self) -> None:
        h = hashlib.sha256()
        try:
            if self.tmp is None:
                data = self.sink.getvalue()
                h.update(memoryview(data))
                self.size = data.size
                self.store.fs.makedirs(self.final.rsplit("/", 1)[0], exist_ok=True)
                self.store.fs.pipe_file(self.final, data.to_pybytes())
            else:
                self.sink.close()
                with open(self.tmp, "rb") as f:
                    while block := f.read(HASH_BLOCK):
                        h.update(block)
                        self.size += len(block)
                    _fsync(f.fileno())
                os.replace(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise
        self.sha256 = h.hexdigest()
        if self.tmp is not None:
            dir_fd = os.open(self.final.rpartition("/")[0], os.O_RDONLY)
            try:
                _fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError, pa.ArrowException):
            if not self.sink.closed:
                self.sink.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()


def _read_json(store: _Store, rel: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{store.display(rel)}: not a valid JSON manifest ({e})") from None


def _read_entries(store: _Store) -> dict[str, dict]:
    names = [n for n in store.listdir(ENTRIES) if n.endswith(".json") and not n.startswith(".")]
    paths = [store.path(f"{ENTRIES}/{n}") for n in names]
    blobs = store.fs.cat(paths) if paths else {}
    if isinstance(blobs, bytes):  # fsspec returns bare bytes for a single path
        blobs = {paths[0]: blobs}
    out = {}
    for p in paths:
        entry = json.loads(blobs[p])
        out[entry["name"]] = entry
    return out


def _aggregate(header: dict, entries: dict[str, dict]) -> dict:
    totals: dict[str, int] = {}
    for e in entries.values():
        for k, v in e.get("stats", {}).items():
            totals[k] = totals.get(k, 0) + v
    return {**header, "shards": [entries[k] for k in sorted(entries)],
            "num_rows": sum(e["rows"] for e in entries.values()),
            "num_shards": len(entries), "stats": totals}


# --------------------------------------------------------------------------- writing

@dataclass
class ShardWriter:
    """Writes one dataset, chunk by chunk, atomically and resumably.

    ``on_invalid`` is ``"error"`` (refuse the shard, write nothing) or ``"quarantine"``
    (write the good rows; the bad ones go to ``<url>.quarantine/`` with a reason column,
    and the shard's ``quarantined_rows`` count says how many).
    Reopening a dataset written under another schema or config hash is refused.

    :meth:`write` validates and encodes a chunk in the caller's thread; the commit
    (fsync, rename, entry, manifest) runs on one background thread in submission
    order, so encoding the next chunk overlaps the disk. :meth:`flush`, :meth:`finish`
    and :meth:`close` wait for pending commits and raise their errors; a commit error
    also surfaces at the next :meth:`write`. Use the writer as a context manager.
    """

    url: str
    schema: Schema | str
    lineage: dict = field(default_factory=dict)
    config_hash: str | None = None
    on_invalid: str = "error"
    compression: str = "zstd"
    row_group_bytes: int = ROW_GROUP_BYTES

    def __post_init__(self):
        if isinstance(self.schema, str):
            self.schema = load_schema(self.schema)
        if self.on_invalid not in ("error", "quarantine"):
            raise ValueError(f"on_invalid must be 'error' or 'quarantine', not {self.on_invalid!r}")
        self.store = _Store(self.url)
        self.quarantine_store = _Store(self.store.url + ".quarantine")
        self.header = {"format": FORMAT, "format_version": FORMAT_VERSION,
                       "schema": self.schema.name, "schema_version": self.schema.version,
                       "config_hash": self.config_hash, "lineage": self.lineage,
                       "code_version": code_version()}
        old = _read_json(self.store, MANIFEST)
        if old is not None:
            for key in ("schema", "config_hash"):
                if old.get(key) != self.header[key]:
                    raise InputError(
                        f"{self.store.display(MANIFEST)}: dataset was written with {key} "
                        f"{old.get(key)!r}, this run has {self.header[key]!r}; "
                        "write to a new path or delete the old dataset")
        self._entries = _read_entries(self.store)
        self._stale = self.store.stale_tmp()
        self._stale_quarantine = self.quarantine_store.stale_tmp(("",))
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-commit")
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-encode")
        self._pending: list[Future] = []
        self._file_meta = {b"offline_rlhf.schema": self.schema.name.encode(),
                           b"offline_rlhf.schema_version": self.schema.version.encode(),
                           b"offline_rlhf.lineage": json.dumps(self.lineage, default=str).encode(),
                           b"offline_rlhf.config_hash": str(self.config_hash).encode()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def committed(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is already written (its entry and shard both exist)."""
        name = shard_name(chunk)
        entry = _read_json(self.store, _entry_name(chunk))
        return entry is not None and self.store.exists(name) and \
            self.store.size(name) == entry["bytes"]

    def _encode(self, table: pa.Table, staged: _Staged) -> None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self._file_meta})
        per_row = max(1, table.nbytes // max(1, table.num_rows))
        pq.write_table(table, staged.sink, compression=self.compression,
                       row_group_size=max(256, self.row_group_bytes // per_row))

    def _split_invalid(self, table: pa.Table, source: str, row_offset: int):
        violations = find_violations(table, self.schema)
        if not violations:
            return table, None
        if self.on_invalid == "error":
            first = min(violations, key=lambda v: v.rows[0])
            shifted = type(first)(first.column, first.rows + row_offset, first.message)
            raise InputError(shifted.describe(source))
        reasons: dict[int, str] = {}
        for v in violations:
            for r in v.rows:
                reasons.setdefault(int(r), f"column '{v.column}': {v.message}")
        bad = np.array(sorted(reasons), dtype=np.int64)
        keep = np.setdiff1d(np.arange(table.num_rows), bad)
        quarantined = table.take(pa.array(bad)).append_column(
            "quarantine_reason", pa.array([reasons[int(r)] for r in bad], pa.string()))
        return table.take(pa.array(keep)), quarantined

    def write(self, chunk: int, table: pa.Table, *, stats: dict | None = None,
              source: str | None = None, row_offset: int = 0) -> dict:
        """Validate and encode ``table`` as the shard of ``chunk`` and queue its commit.

        Returns the shard's entry (name, chunk, rows, stats; ``bytes`` and ``sha256``
        are added when the commit completes). ``source`` and ``row_offset`` locate bad
        rows in the caller's input for error messages (default: the shard's own path).
        Nothing becomes visible unless the whole chunk passes (or, with quarantine,
        until its good rows are encoded).
        """
        self._reap(wait=False)
        name = shard_name(chunk)
        source = source or self.store.display(name)
        table = conform(table, self.schema, source)
        self.store.remove_stale_tmp(name, self._stale)
        self.store.remove_stale_tmp(_entry_name(chunk), self._stale)
        staged = _Staged(self.store, name)
        # Encode on the helper thread while the checks run here (both release the GIL);
        # a refused chunk's temporary file is deleted, never renamed.
        encoding = self._encoder.submit(self._encode, table, staged)
        try:
            good, quarantined = self._split_invalid(table, source, row_offset)
            encoding.result()
        except BaseException:
            with contextlib.suppress(BaseException):
                encoding.result()
            staged.abort()
            raise
        stats = dict(stats or {})
        if quarantined is not None:
            staged.abort()
            staged = _Staged(self.store, name)
            self._encode(good, staged)
            self.quarantine_store.remove_stale_tmp(name, self._stale_quarantine)
            q = _Staged(self.quarantine_store, name)
            self._encode(quarantined, q)
            q.commit()
            stats["quarantined_rows"] = quarantined.num_rows
        entry = {"name": name, "chunk": chunk, "rows": good.num_rows, "stats": stats,
                 "created_at": utc_now().isoformat()}
        self._pending.append(self._committer.submit(self._commit, staged, entry))
        return entry

    def _commit(self, staged: _Staged, entry: dict) -> None:
        staged.commit()
        entry.update(bytes=staged.size, sha256=staged.sha256)
        self.store.write_atomic(_entry_name(entry["chunk"]), _json_bytes(entry))
        self._entries[entry["name"]] = entry
        self._write_manifest(complete=False)

    def _reap(self, wait: bool) -> None:
        still = []
        for fut in self._pending:
            if wait or fut.done():
                fut.result()  # raises the commit's error, if any
            else:
                still.append(fut)
        self._pending = still

    def flush(self) -> None:
        """Wait until every written shard is committed (raises a failed commit's error)."""
        self._reap(wait=True)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._committer.shutdown(wait=True)
            self._encoder.shutdown(wait=True)

    def _write_manifest(self, complete: bool) -> dict:
        with self.store.lock():
            manifest = {**_aggregate(self.header, self._entries), "complete": complete,
                        "updated_at": utc_now().isoformat()}
            self.store.write_atomic(MANIFEST, _json_bytes(manifest))
        return manifest

    def finish(self, total_chunks: int | None = None, info: dict | None = None) -> dict:
        """Commit everything, rewrite the manifest from every worker's entries, and mark
        it complete when all chunks are in.

        With ``total_chunks`` the dataset is complete only once chunks 0..total-1 are
        all committed (by any worker); without it, the caller vouches for completeness.
        """
        self.flush()
        self._entries = _read_entries(self.store)
        done = {e["chunk"] for e in self._entries.values()}
        complete = total_chunks is None or done.issuperset(range(total_chunks))
        if info:
            self.header = {**self.header, "info": info}
        return self._write_manifest(complete=complete)


# --------------------------------------------------------------------------- reading

class Dataset:
    """A dataset written by :class:`ShardWriter`, opened for reading.

    Every reader checks each shard's size and sha256 against the manifest first
    (``verify=False`` skips the hash, not the size) and names the file on failure.
    """

    def __init__(self, url: str, require_complete: bool = False):
        self.store = _Store(url)
        self.url = self.store.url
        header = _read_json(self.store, MANIFEST)
        if header is None:
            raise InputError(f"{self.url}: not an offline-rlhf dataset (no {MANIFEST})")
        if header.get("format") != FORMAT:
            raise InputError(f"{self.store.display(MANIFEST)}: unknown format {header.get('format')!r}")
        self.manifest = {**header, **_aggregate(header, _read_entries(self.store))}
        if require_complete and not self.complete:
            raise InputError(f"{self.url}: dataset is incomplete (a stage did not finish); "
                             "rerun the stage that writes it")

    schema_name = property(lambda self: self.manifest["schema"])
    schema_version = property(lambda self: self.manifest["schema_version"])
    lineage = property(lambda self: self.manifest.get("lineage") or {})
    config_hash = property(lambda self: self.manifest.get("config_hash"))
    complete = property(lambda self: bool(self.manifest.get("complete")))
    num_rows = property(lambda self: self.manifest["num_rows"])
    shards = property(lambda self: self.manifest["shards"])
    stats = property(lambda self: self.manifest["stats"])

    def files(self) -> list[str]:
        """Full paths (within the filesystem) of the committed shards, in chunk order."""
        return [self.store.path(e["name"]) for e in self.shards]

    @property
    def filesystem(self):
        return self.store.fs

    def check_shard(self, entry: dict, verify: bool = True) -> None:
        """Raise :class:`InputError` naming the file if a shard is missing, truncated or altered."""
        name, where = entry["name"], self.store.display(entry["name"])
        try:
            size = self.store.size(name)
        except FileNotFoundError:
            raise InputError(f"{where}: shard listed in the manifest is missing") from None
        if size != entry["bytes"]:
            raise InputError(f"{where}: shard is truncated or altered "
                             f"({size} bytes, manifest says {entry['bytes']})")
        if verify:
            h = hashlib.sha256()
            with self.store.fs.open(self.store.path(name), "rb") as f:
                while block := f.read(HASH_BLOCK):
                    h.update(block)
            if h.hexdigest() != entry["sha256"]:
                raise InputError(f"{where}: sha256 mismatch (shard corrupted or altered)")

    def verify(self, verify: bool = True) -> None:
        for e in self.shards:
            self.check_shard(e, verify)

    @contextlib.contextmanager
    def _reading(self, entry: dict):
        try:
            yield
        except (pa.ArrowException, OSError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{self.store.display(entry['name'])}: cannot read shard ({msg})") from None

    def iter_batches(self, batch_size: int = 1024, columns: list[str] | None = None,
                     verify: bool = True) -> Iterator[pa.RecordBatch]:
        """Stream record batches shard by shard; memory stays at about one row group."""
        for entry in self.shards:
            self.check_shard(entry, verify)
            with self._reading(entry), self.store.fs.open(self.store.path(entry["name"]), "rb") as f:
                pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
                have = set(pf.schema_arrow.names)
                missing = [c for c in (columns or []) if c not in have]
                for batch in pf.iter_batches(batch_size=batch_size, use_threads=False,
                                             columns=[c for c in columns if c in have] if columns else None):
                    yield self._fill(batch, columns, missing) if missing else batch

    def _fill(self, batch: pa.RecordBatch, columns: list[str], missing: list[str]) -> pa.RecordBatch:
        schema = load_schema(self.schema_name).arrow
        arrays = {n: batch.column(n) for n in batch.schema.names}
        for c in missing:
            arrays[c] = pa.nulls(batch.num_rows, schema.field(c).type)
        return pa.RecordBatch.from_arrays([arrays[c] for c in columns], names=columns)

    @property
    def fingerprint(self) -> str:
        """Content fingerprint: sha256 over the schema and every shard's sha256."""
        h = hashlib.sha256(f"{self.schema_name}:{self.schema_version}".encode())
        for e in self.shards:
            h.update(f"\n{e['name']}:{e['sha256']}".encode())
        return h.hexdigest()

    def entry(self, chunk: int) -> dict:
        for e in self.shards:
            if e["chunk"] == chunk:
                return e
        raise InputError(f"{self.url}: has no shard for chunk {chunk}")

    def _read_file(self, entry: dict, columns: list[str] | None) -> pa.Table:
        """One shard's table with the current schema's columns: a nullable column that
        the file predates (written under an older minor version) reads as nulls."""
        schema = load_schema(self.schema_name).arrow
        path = self.store.path(entry["name"])
        with self._reading(entry):
            names = set(pq.read_schema(path, filesystem=self.store.fs).names)
            want = columns or [n for n in schema.names if n in names or schema.field(n).nullable]
            table = pq.read_table(path, columns=[c for c in want if c in names],
                                  filesystem=self.store.fs)
        for c in want:
            if c not in names:
                if c not in schema.names:
                    raise InputError(f"{self.store.display(entry['name'])}: no column '{c}'")
                table = table.append_column(schema.field(c), pa.nulls(table.num_rows, schema.field(c).type))
        return table.select(want)

    def read_shard(self, chunk: int, columns: list[str] | None = None,
                   verify: bool = True) -> pa.Table:
        """One shard (by chunk number) as an Arrow table."""
        entry = self.entry(chunk)
        self.check_shard(entry, verify)
        return self._read_file(entry, columns)

    def read(self, columns: list[str] | None = None, verify: bool = True) -> pa.Table:
        """The whole dataset (or some columns) as one Arrow table."""
        tables = []
        for entry in self.shards:
            self.check_shard(entry, verify)
            tables.append(self._read_file(entry, columns))
        if not tables:
            schema = load_schema(self.schema_name).arrow
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def to_arrow_dataset(self, verify: bool = True):
        """A ``pyarrow.dataset.Dataset`` over the committed shards."""
        import pyarrow.dataset as pads
        self.verify(verify)
        return pads.dataset(self.files(), format="parquet", filesystem=self.store.fs,
                            schema=load_schema(self.schema_name).arrow)

    def to_polars(self, verify: bool = True):
        """A polars ``LazyFrame`` over the committed shards."""
        import polars as pl
        if self.store.local:
            self.verify(verify)
            if not self.shards:
                return pl.from_arrow(self.read(verify=False)).lazy()
            schema = pl.from_arrow(load_schema(self.schema_name).arrow.empty_table()).schema
            return pl.scan_parquet(self.files(), schema=schema, missing_columns="insert")
        return pl.scan_pyarrow_dataset(self.to_arrow_dataset(verify))

    def to_hf(self, verify: bool = True):
        """A Hugging Face ``datasets.Dataset`` over the committed shards."""
        import datasets
        if self.store.local and self.shards:
            self.verify(verify)
            return datasets.Dataset.from_parquet(self.files())
        return datasets.Dataset(self.read(verify=verify))


def open_dataset(url: str, require_complete: bool = False) -> Dataset:
    return Dataset(url, require_complete)


def is_dataset(url: str) -> bool:
    return _Store(url).exists(MANIFEST)


def is_complete(url: str) -> bool:
    """Whether ``url`` holds a dataset whose writing stage finished."""
    return is_dataset(url) and Dataset(url).complete


def open_dataset_of(url: str, schema: str, command: str, made_by: str = "") -> Dataset:
    """The complete dataset at ``url`` if it holds ``schema`` rows, else one line that
    says what ``command`` reads (and, for a file, which command makes the dataset)."""
    if not is_dataset(url):
        fs, p = fsspec.core.url_to_fs(str(url))
        if fs.isfile(p):
            raise InputError(f"{url}: is a file; {command} reads a {schema} dataset (a directory"
                             + (f" made by {made_by})" if made_by else ")"))
    ds = Dataset(url, require_complete=True)
    if ds.schema_name != schema:
        raise InputError(f"{url}: is a {ds.schema_name} dataset; {command} reads {schema}"
                         + (f" (made by {made_by})" if made_by else ""))
    return ds


def claim_output(url: str, overwrite: bool) -> None:
    """Refuse to write over an existing dataset or non-empty directory at ``url`` unless
    ``overwrite``; with it, delete what is there (call once the new data is checked)."""
    fs, p = fsspec.core.url_to_fs(str(url))
    if not fs.exists(p) or (fs.isdir(p) and not fs.ls(p)):
        return
    if not overwrite:
        what = f"a {Dataset(url).schema_name} dataset" if is_dataset(url) else "a file or directory"
        raise InputError(f"{url}: already exists ({what}); pass --overwrite to replace it")
    fs.rm(p, recursive=True)
    quarantine = p.rstrip("/") + ".quarantine"
    if fs.exists(quarantine):
        fs.rm(quarantine, recursive=True)


# --------------------------------------------------------------------------- external files

def _open_input(path: str):
    fs, p = fsspec.core.url_to_fs(str(path))
    if not fs.exists(p):
        raise InputError(f"{path}: no such file")
    if fs.isdir(p) and not fs.exists(f"{p}/{MANIFEST}"):
        raise InputError(f"{path}: is a directory, not a dataset or a data file")
    return fs, p


def read_rows(path: str) -> tuple[list[dict], list[str]]:
    """A user's JSONL/JSON/Parquet file (or a dataset) as Python rows and column names.

    JSON rows stay plain Python values, so a column may mix text and lists (prompts
    given as strings in some rows and chat messages in others).
    """
    fs, p = _open_input(path)
    if p.lower().endswith((".jsonl", ".json", ".ndjson")):
        rows = _read_json_rows(fs, p, str(path))
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return rows, columns
    table = read_table_file(path)
    return table.to_pylist(), table.column_names


def read_table_file(path: str) -> pa.Table:
    """Read a user's Parquet, JSONL or JSON-array file (or a dataset) as an Arrow table.

    Errors name the file (and, for JSONL, the line).
    """
    fs, p = _open_input(path)
    if fs.isdir(p):
        return Dataset(str(path)).read()
    lower = p.lower()
    try:
        if lower.endswith(".parquet"):
            return pq.read_table(p, filesystem=fs)
        if lower.endswith((".jsonl", ".json", ".ndjson")):
            rows = _read_json_rows(fs, p, str(path))
            # pa.array infers the type from every row (from_pylist looks at the first only)
            return pa.Table.from_struct_array(pa.array(rows)) if rows else pa.table({})
    except (pa.ArrowException, OSError, TypeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    raise InputError(f"{path}: unknown file type (expected .parquet, .jsonl or .json)")


def _read_json_rows(fs, p: str, display: str) -> list[dict]:
    with fs.open(p, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{display}: line {line}: invalid UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{display}: line {e.lineno}: invalid JSON ({e.msg})") from None
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{display}: line {i}: invalid JSON ({e.msg})") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(located("each row must be a JSON object", display, i))
    return rows


def column_stats(values: pa.Array) -> dict:
    """count / mean / std / min / max of a numeric column (nulls ignored)."""
    arr = pc.drop_null(values)
    if len(arr) == 0:
        return {"count": 0}
    return {"count": len(arr), "mean": pc.mean(arr).as_py(), "std": pc.stddev(arr).as_py(),
            "min": pc.min(arr).as_py(), "max": pc.max(arr).as_py()}
