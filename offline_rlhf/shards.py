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

Writes are atomic (``storage.py``): a shard goes to a temporary name
(``.part-000001.parquet.<id>.tmp``: a dot file not ending in ``.parquet``, so neither
``*.parquet`` globs nor ``pyarrow.dataset`` see it), is fsynced and renamed; on object
stores it is one PUT.
A shard counts as committed once its entry exists, so a rerun skips it. Entries are
one file per shard, so workers writing disjoint chunks never contend; the aggregate
manifest is rewritten atomically after each commit and on :meth:`ShardWriter.finish`.

Each entry also holds the shard's *content hash* (its bytes less the run-time
``created_at`` column: the dataset's content key, :attr:`Dataset.fingerprint`, is built
from these, so two runs of one job agree on it) and a 64-bit hash of every row's key,
from which :meth:`ShardWriter.finish` refuses a key written twice anywhere in the
dataset without reading the data again (see ``digests.py``).

Writers claim chunks (locks under ``.offline-rlhf/writers/``, see ``locks.py``): a worker
slot before looking for work (:meth:`ShardWriter.claim`), else each chunk while it is
written, so two processes never write the same chunk at once; workers ``--worker i
--num-workers N`` own disjoint chunks and share the output freely. On object stores
there are no locks: run one process per worker slot there.

Readers verify each shard's size and sha256 against its entry before use and name
the file on any mismatch or decoding error.

Users' JSONL/JSON/Parquet files are read by ``datafiles.py`` (re-exported here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import digests
from .errors import InputError, located
from .lineage import code_version, utc_now
from .schemas import Schema, conform, find_violations, load_schema
from .storage import HASH_BLOCK, Staged, Store, storage_errors

FORMAT = "offline-rlhf-dataset"
FORMAT_VERSION = 1
META = ".offline-rlhf"
MANIFEST = f"{META}/manifest.json"
ENTRIES = f"{META}/shards"
WRITERS = f"{META}/writers"
# Row groups of about this many Arrow bytes: streaming readers hold one at a time.
ROW_GROUP_BYTES = 64 << 20


def shard_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


def _entry_name(chunk: int) -> str:
    return f"{ENTRIES}/part-{chunk:06d}.json"


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()


def _read_json(store: Store, rel: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{store.display(rel)}: not a valid JSON manifest ({e})") from None


def _read_entries(store: Store) -> dict[str, dict]:
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
    """The manifest: the header plus every entry (less its row key hashes) and totals."""
    totals: dict[str, int] = {}
    for e in entries.values():
        for k, v in e.get("stats", {}).items():
            totals[k] = totals.get(k, 0) + v
    return {**header, "shards": [{k: v for k, v in entries[n].items() if k != "key_hashes"}
                                 for n in sorted(entries)],
            "num_rows": sum(e["rows"] for e in entries.values()),
            "num_shards": len(entries), "stats": totals}


def _check_unique_keys(store: Store, entries: list[dict], schema: Schema) -> None:
    """Refuse a key (e.g. ``(prompt_id, sample_index)``) present in two rows of the
    dataset, naming the file and row of the second; uses the entries' key hashes (a
    shard written without them has its key columns read)."""
    if not schema.key or not entries:
        return
    key = tuple(schema.key)
    cache: dict[str, pa.Table] = {}

    def keys_of(entry: dict) -> pa.Table:
        if entry["name"] not in cache:
            try:
                cache[entry["name"]] = pq.read_table(store.path(entry["name"]), columns=list(key),
                                                     filesystem=store.fs)
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"{store.display(entry['name'])}: cannot read shard "
                                 f"({(str(e).splitlines() or [''])[0]})") from None
        return cache[entry["name"]]

    per_shard = [digests.decode_hashes(e["key_hashes"]) if "key_hashes" in e
                 else digests.key_hashes(keys_of(e), key) for e in entries]
    for shard, row, first_shard, first_row in digests.colliding_rows(per_shard):
        value = digests.key_value(keys_of(entries[shard]), key, row)
        if value == digests.key_value(keys_of(entries[first_shard]), key, first_row):
            shown = "(" + ", ".join(str(v) for v in value) + ")"   # (not a hash collision)
            raise InputError(located(
                f"duplicate key ({', '.join(key)}) = {shown}, first at "
                f"{store.display(entries[first_shard]['name'])} row {first_row}",
                store.display(entries[shard]["name"]), row, key[-1]))


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

    Two processes never write one chunk at once: :meth:`write` claims its chunk until
    the commit is done, unless the writer holds a worker slot (:meth:`claim`, as the
    stage executors do before they look for work) that covers it.
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
        self.store = Store(self.url)
        self.quarantine_store = Store(self.store.url + ".quarantine")
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
        self._stale = self.store.stale_tmp(("", ENTRIES))
        self._stale_quarantine = self.quarantine_store.stale_tmp(("",))
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-commit")
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-encode")
        self._pending: list[Future] = []
        self._claim, self._slot = None, (0, 1)
        self._file_meta = {b"offline_rlhf.schema": self.schema.name.encode(),
                           b"offline_rlhf.schema_version": self.schema.version.encode(),
                           b"offline_rlhf.lineage": json.dumps(self.lineage, default=str).encode(),
                           b"offline_rlhf.config_hash": str(self.config_hash).encode()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def claim(self, worker: int = 0, num_workers: int = 1) -> None:
        """Lock the chunks ``c % num_workers == worker`` against other writers until
        :meth:`finish` or :meth:`close`.

        Refused (one line naming the holder: host, pid, start time) while a live process
        claims any of the same chunks; a claim left by a killed writer is taken over.
        Workers with disjoint slots (``--worker i --num-workers N``) share the dataset.
        Local filesystems only: on object stores this does nothing.
        """
        if self._claim is None and self.store.local:
            self._claim = self._lock(worker, num_workers)
            self._slot = (worker, num_workers)

    def _lock(self, worker: int, num_workers: int | None):
        from .locks import claim
        return claim(self.store.path(WRITERS), worker, num_workers,
                     f"{self.store.url}: dataset is being written by another process")

    def _claim_chunk(self, chunk: int):
        """The lock of one chunk for one write, unless a slot of ours covers it."""
        if not self.store.local or (self._claim is not None
                                    and chunk % self._slot[1] == self._slot[0]):
            return None
        return self._lock(chunk, None)

    def _unclaim(self) -> None:
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def committed(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is already written (its entry and shard both exist)."""
        name = shard_name(chunk)
        entry = _read_json(self.store, _entry_name(chunk))
        return entry is not None and self.store.exists(name) and \
            self.store.size(name) == entry["bytes"]

    def _encode(self, table: pa.Table, staged: Staged) -> None:
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
        held = self._claim_chunk(chunk)
        try:
            return self._write(chunk, table, stats, source, row_offset, held)
        except BaseException:
            if held is not None:
                held.release()
            raise

    def _write(self, chunk, table, stats, source, row_offset, held) -> dict:
        name = shard_name(chunk)
        source = source or self.store.display(name)
        table = conform(table, self.schema, source)
        with storage_errors(self.store.display(name)):
            self.store.remove_stale_tmp(name, self._stale)
            self.store.remove_stale_tmp(_entry_name(chunk), self._stale)
            staged = Staged(self.store, name, parquet=True)
        # Encode on the helper thread while the checks run here (both release the GIL);
        # a refused chunk's temporary file is deleted, never renamed.
        encoding = self._encoder.submit(self._encode, table, staged)
        try:
            good, quarantined = self._split_invalid(table, source, row_offset)
            keys = digests.encode_hashes(digests.key_hashes(good, self.schema.key)) \
                if self.schema.key else None
            with storage_errors(self.store.display(name)):
                encoding.result()
        except BaseException:
            with contextlib.suppress(BaseException):
                encoding.result()
            staged.abort()
            raise
        stats = dict(stats or {})
        if quarantined is not None:
            with storage_errors(self.store.display(name)):
                staged = self._quarantine(name, staged, good, quarantined)
            stats["quarantined_rows"] = quarantined.num_rows
        entry = {"name": name, "chunk": chunk, "rows": good.num_rows, "stats": stats,
                 "created_at": utc_now().isoformat()}
        self._pending.append(self._committer.submit(self._commit, staged, entry, keys, held))
        return entry

    def _quarantine(self, name: str, staged: Staged, good: pa.Table, bad: pa.Table) -> Staged:
        """Re-encode the good rows as the shard; commit the bad ones to the quarantine."""
        staged.abort()
        staged = Staged(self.store, name, parquet=True)
        self._encode(good, staged)
        self.quarantine_store.remove_stale_tmp(name, self._stale_quarantine)
        q = Staged(self.quarantine_store, name)
        self._encode(bad, q)
        q.commit()
        return staged

    def _commit(self, staged: Staged, entry: dict, keys: str | None, held) -> None:
        try:
            with storage_errors(self.store.display(entry["name"])):
                staged.commit()
                entry.update(bytes=staged.size, sha256=staged.sha256,
                             content_hash=staged.content_hash)
                on_disk = entry if keys is None else {**entry, "key_hashes": keys}
                self.store.write_atomic(_entry_name(entry["chunk"]), _json_bytes(on_disk))
        finally:
            if held is not None:   # the chunk is committed (or failed): let it go
                held.release()
        self._entries[entry["name"]] = entry
        with storage_errors(self.store.display(MANIFEST)):
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
            self._unclaim()

    def _write_manifest(self, complete: bool) -> dict:
        with self.store.lock(f"{META}/lock"):
            if self.store.local:  # under the lock no live writer has a manifest temp open
                self.store.remove_stale_tmp(MANIFEST, self.store.stale_tmp((META,)))
            manifest = {**_aggregate(self.header, self._entries), "complete": complete,
                        "updated_at": utc_now().isoformat()}
            self.store.write_atomic(MANIFEST, _json_bytes(manifest))
        return manifest

    def finish(self, total_chunks: int | None = None, info: dict | None = None) -> dict:
        """Commit everything, rewrite the manifest from every worker's entries, and mark
        it complete when all chunks are in. A key present in two rows anywhere in the
        dataset is refused here (file and row named) and the dataset stays incomplete.

        With ``total_chunks`` the dataset is complete only once chunks 0..total-1 are
        all committed (by any worker); without it, the caller vouches for completeness.
        """
        try:
            self.flush()
            self._entries = _read_entries(self.store)
            _check_unique_keys(self.store, [self._entries[n] for n in sorted(self._entries)],
                               self.schema)
            done = {e["chunk"] for e in self._entries.values()}
            complete = total_chunks is None or done.issuperset(range(total_chunks))
            if info:
                self.header = {**self.header, "info": info}
            with storage_errors(self.store.display(MANIFEST)):
                return self._write_manifest(complete=complete)
        finally:
            self._unclaim()


# --------------------------------------------------------------------------- reading

class Dataset:
    """A dataset written by :class:`ShardWriter`, opened for reading.

    Every reader checks each shard's size and sha256 against the manifest first
    (``verify=False`` skips the hash, not the size) and names the file on failure.
    ``require_complete`` refuses a dataset whose writing stage did not finish, or
    (written by another tool or an older version) with a key in two rows.
    """

    def __init__(self, url: str, require_complete: bool = False):
        self.store = Store(url)
        self.url = self.store.url
        header = _read_json(self.store, MANIFEST)
        if header is None:
            raise InputError(f"{self.url}: not an offline-rlhf dataset (no {MANIFEST})")
        if header.get("format") != FORMAT:
            raise InputError(f"{self.store.display(MANIFEST)}: unknown format {header.get('format')!r}")
        self._entries = _read_entries(self.store)
        self.manifest = {**header, **_aggregate(header, self._entries)}
        if require_complete and not self.complete:
            raise InputError(f"{self.url}: dataset is incomplete (a stage did not finish); "
                             "rerun the stage that writes it")
        if require_complete:
            self.check_keys()

    def check_keys(self) -> None:
        """Refuse a key (e.g. ``(prompt_id, sample_index)``) present in two rows, naming
        the file and row (from the entries' key hashes; no data is read for them)."""
        _check_unique_keys(self.store, [self._entries[n] for n in sorted(self._entries)],
                           load_schema(self.schema_name))

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
        """The content key: sha256 over the schema and every shard's content hash (its
        rows, less when they were made), so two runs of one job agree on it. Shards
        written before content hashes existed count with their file sha256."""
        h = hashlib.sha256(f"{self.schema_name}:{self.schema_version}".encode())
        for e in self.shards:
            h.update(f"\n{e['name']}:{e.get('content_hash') or e['sha256']}".encode())
        return h.hexdigest()

    def unreadable(self, error: Exception) -> InputError:
        """The one-line error for a failure while reading (e.g. in polars): the first
        shard that does not decode, named; else the error itself."""
        for entry in self.shards:
            try:
                self._read_file(entry, None)
            except InputError as e:
                return e
        return InputError(f"{self.url}: cannot read ({(str(error).splitlines() or [''])[0]})")

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
    return Store(url).exists(MANIFEST)


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


# users' files, read by datafiles.py; re-exported where the readers always lived
from .datafiles import column_stats, read_rows, read_table_file  # noqa: E402,F401
