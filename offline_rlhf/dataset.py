"""Reading a dataset written by :class:`~offline_rlhf.shards.ShardWriter`.

Opening one checks the whole manifest first (see :mod:`offline_rlhf.manifest`): its
header and every entry, and that every committed shard is there with the size its
entry gives (a complete dataset: every chunk it promises). Readers check each shard's
size and sha256 before use and name the file on any mismatch or decoding error;
:meth:`Dataset.verify` checks them all at once, as the stages do before their first
output.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .manifest import (
    ENTRIES,
    MANIFEST,
    META,
    aggregate,
    check_header,
    check_unique_keys,
    missing_chunks,
    read_entries,
    read_json,
)
from .schemas import load_schema
from .storage import HASH_BLOCK, Store


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
        self.store.refuse_links(META, ENTRIES)
        header = read_json(self.store, MANIFEST)
        if header is None:
            raise InputError(f"{self.url}: not an offline-rlhf dataset (no {MANIFEST})")
        check_header(self.store, header)
        self._entries = read_entries(self.store)
        self.manifest = {**header, **aggregate(header, self._entries)}
        if self.complete:
            self._check_chunks(header)
        if require_complete and not self.complete:
            raise InputError(f"{self.url}: dataset is incomplete (a stage did not finish); "
                             "rerun the stage that writes it")
        if require_complete:
            self.check_keys()

    def _check_chunks(self, header: dict) -> None:
        """A complete dataset has every chunk it promises, each shard with its size."""
        missing = missing_chunks(header, self._entries)
        if missing:
            raise InputError(f"{self.store.display(MANIFEST)}: says complete, but chunk "
                             f"{missing[0]} has no entry ({len(missing)} chunk(s) missing); "
                             "rerun the stage that writes it")
        sizes = self.store.sizes()
        for e in self.shards:
            if e["name"] not in sizes:   # missing, or (refused by size()) a planted link
                self.check_shard(e, verify=False)
            elif sizes[e["name"]] != e["bytes"]:
                raise InputError(f"{self.store.display(e['name'])}: shard is truncated or altered "
                                 f"({sizes[e['name']]} bytes, manifest says {e['bytes']})")

    def check_keys(self) -> None:
        """Refuse a key (e.g. ``(prompt_id, sample_index)``) present in two rows, naming
        the file and row (from the entries' key hashes; no data is read for them)."""
        check_unique_keys(self.store, [self._entries[n] for n in sorted(self._entries)],
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
            with self.store.open_read(name) as f:
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
            with self._reading(entry), self.store.open_read(entry["name"]) as f:
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
