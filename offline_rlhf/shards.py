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

The manifest, the entries and their checks are in ``manifest.py``; the reader
(:class:`Dataset`, which verifies each shard's size and sha256 against its entry
before use) in ``dataset.py``; users' JSONL/JSON/Parquet files in ``datafiles.py``.
All are re-exported here. Local files inside a dataset are never opened through a
symbolic link (see ``storage.py``).
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import digests
from .datafiles import column_stats, read_rows, read_table_file  # noqa: F401

# the reader and the layout, where callers always found them
from .dataset import Dataset, is_complete, is_dataset, open_dataset, open_dataset_of  # noqa: F401
from .errors import InputError
from .lineage import code_version, utc_now
from .manifest import (  # noqa: F401
    ENTRIES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META,
    WRITERS,
    aggregate,
    check_header,
    check_unique_keys,
    config_diff,
    entry_name,
    json_bytes,
    read_entries,
    read_json,
    shard_name,
)
from .schemas import Schema, conform, find_violations, load_schema
from .storage import Staged, Store, refuse_link, storage_errors

# Row groups of about this many Arrow bytes: streaming readers hold one at a time.
ROW_GROUP_BYTES = 64 << 20


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
    config: dict | None = None    # what config_hash hashes: kept, so a rerun can name what differs
    on_invalid: str = "error"
    compression: str = "zstd"
    row_group_bytes: int = ROW_GROUP_BYTES

    def __post_init__(self):
        if isinstance(self.schema, str):
            self.schema = load_schema(self.schema)
        if self.on_invalid not in ("error", "quarantine"):
            raise ValueError(f"on_invalid must be 'error' or 'quarantine', not {self.on_invalid!r}")
        self.store = Store(self.url)
        self.store.refuse_links(META, ENTRIES, WRITERS)
        self.quarantine_store = Store(self.store.url + ".quarantine")
        self.header = {"format": FORMAT, "format_version": FORMAT_VERSION,
                       "schema": self.schema.name, "schema_version": self.schema.version,
                       "config_hash": self.config_hash, "lineage": self.lineage,
                       "code_version": code_version()}
        if self.config is not None:
            self.header["config"] = self.config
        self._check_same_run(read_json(self.store, MANIFEST))
        self._entries = read_entries(self.store)
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

    def _check_same_run(self, old: dict | None) -> None:
        """Reopening a dataset is resuming it: refused unless the same schema and config
        (the message names the options that differ)."""
        if old is None:
            return
        check_header(self.store, old)
        for key in ("schema", "config_hash"):
            if old.get(key) != self.header[key]:
                diff = config_diff(old.get("config"), self.config) if key == "config_hash" else ""
                what = f"other options ({diff})" if diff else \
                    f"{key} {old.get(key)!r}, this run has {self.header[key]!r}"
                raise InputError(f"{self.store.display(MANIFEST)}: dataset was written with "
                                 f"{what}; pass --overwrite to start afresh, or write to a new "
                                 "path")

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
        entry = read_json(self.store, entry_name(chunk))
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
            self.store.remove_stale_tmp(entry_name(chunk), self._stale)
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
                self.store.write_atomic(entry_name(entry["chunk"]), json_bytes(on_disk))
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
            manifest = {**aggregate(self.header, self._entries), "complete": complete,
                        "updated_at": utc_now().isoformat()}
            self.store.write_atomic(MANIFEST, json_bytes(manifest))
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
            self._entries = read_entries(self.store)
            check_unique_keys(self.store, [self._entries[n] for n in sorted(self._entries)],
                               self.schema)
            done = {e["chunk"] for e in self._entries.values()}
            complete = total_chunks is None or done.issuperset(range(total_chunks))
            if info:
                self.header = {**self.header, "info": info}
            if total_chunks is not None:   # what readers of a complete dataset expect
                self.header = {**self.header, "num_chunks": total_chunks}
            with storage_errors(self.store.display(MANIFEST)):
                return self._write_manifest(complete=complete)
        finally:
            self._unclaim()


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



def remove_dataset(url: str) -> None:
    """``--overwrite`` of a stage: delete the dataset at ``url`` (and its quarantine) so
    that the stage starts afresh. Only a dataset or an empty directory is removed: a
    file or another directory is refused, as are (locally) a link at ``url`` and a
    dataset that a live process is writing."""
    store = Store(url)
    if store.local:
        refuse_link(store.root)
    if not store.fs.exists(store.root):
        return
    if not is_dataset(url):
        if store.fs.isdir(store.root) and not store.fs.ls(store.root):
            return
        raise InputError(f"{url}: --overwrite replaces datasets only, and this is not one (a "
                         "file or another directory); remove it yourself or write elsewhere")
    if store.local:
        from .locks import describe, is_held, read_holder
        store.refuse_links(META, WRITERS)
        for name in store.listdir(WRITERS):
            lock = store.path(f"{WRITERS}/{name}")
            if is_held(lock):
                raise InputError(f"{url}: is being written by {describe(read_holder(lock))}; "
                                 "--overwrite would delete its work: let it finish or stop it")
    store.fs.rm(store.root, recursive=True)
    quarantine = store.root.rstrip("/") + ".quarantine"
    if store.fs.exists(quarantine):
        store.fs.rm(quarantine, recursive=True)
