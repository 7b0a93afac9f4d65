"""A dataset's bookkeeping: the layout, the manifest and per-shard entries, and their checks.

A dataset directory holds ``part-NNNNNN.parquet`` shards and, in one hidden folder,
``.offline-rlhf/manifest.json`` (the header: format, schema, config, lineage; and the
aggregate of every entry) and ``.offline-rlhf/shards/part-NNNNNN.json`` (one entry per
committed shard: rows, bytes, sha256, content hash, stats, row key hashes).

Nothing read from these files is trusted: a manifest or entry that is not a JSON object,
has another format version, names a shard outside the dataset (``../x.parquet``) or
a chunk other than its own, or says the dataset is complete while a chunk is missing,
is refused in one line naming the file. Local files are read without following links.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq

from . import digests
from .errors import InputError, located
from .schemas import Schema
from .storage import Store

FORMAT = "offline-rlhf-dataset"
FORMAT_VERSION = 1
KNOWN_VERSIONS = (1,)
META = ".offline-rlhf"
MANIFEST = f"{META}/manifest.json"
ENTRIES = f"{META}/shards"
WRITERS = f"{META}/writers"
SHARD = re.compile(r"part-(\d{6})\.parquet")
ENTRY_FILE = re.compile(r"part-(\d{6})\.json")


def shard_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


def entry_name(chunk: int) -> str:
    return f"{ENTRIES}/part-{chunk:06d}.json"


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()


def _parse(store: Store, rel: str, data: bytes) -> dict:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{store.display(rel)}: not a valid JSON manifest ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{store.display(rel)}: not a manifest: a JSON object is expected, "
                         f"this holds {type(obj).__name__} {json.dumps(obj)[:40]}")
    return obj


def read_json(store: Store, rel: str) -> dict | None:
    """A bookkeeping file as a JSON object (None when missing); anything else refused."""
    try:
        return _parse(store, rel, store.read_bytes(rel))
    except FileNotFoundError:
        return None


def check_header(store: Store, header: dict) -> dict:
    """The manifest's header fields: known format and version, the types readers rely on."""
    where = store.display(MANIFEST)
    if header.get("format") != FORMAT:
        raise InputError(f"{where}: unknown format {header.get('format')!r}")
    version = header.get("format_version")
    if version not in KNOWN_VERSIONS or isinstance(version, bool):
        raise InputError(f"{where}: format_version {version!r} is not one this version reads "
                         f"({', '.join(map(str, KNOWN_VERSIONS))}); upgrade offline-rlhf or "
                         "rewrite the dataset")
    types = {"schema": str, "schema_version": str, "complete": bool, "lineage": (dict, type(None)),
             "config_hash": (str, type(None)), "config": (dict, type(None)),
             "num_chunks": int, "shards": list}
    for key, tp in types.items():
        if key in header and not isinstance(header[key], tp):
            raise InputError(f"{where}: '{key}' has the wrong type ({type(header[key]).__name__})")
    for key in ("schema", "schema_version"):
        if key not in header:
            raise InputError(f"{where}: '{key}' is missing")
    return header


def check_entry(store: Store, rel: str, entry: dict) -> dict:
    """One shard entry: a shard name of this dataset (``part-NNNNNN.parquet``, never a
    path) that matches its chunk and its entry file, and counts of the right types."""
    where = store.display(rel)
    name, chunk = entry.get("name"), entry.get("chunk")
    if not isinstance(name, str) or not SHARD.fullmatch(name):
        raise InputError(f"{where}: shard name {name!r} is not a shard of this dataset "
                         "(expected part-NNNNNN.parquet inside it)")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or name != shard_name(chunk):
        raise InputError(f"{where}: chunk {chunk!r} does not match shard {name}")
    if rel != entry_name(chunk):
        raise InputError(f"{where}: holds the entry of {name}")
    for key, tp in (("rows", int), ("bytes", int), ("sha256", str)):
        if not isinstance(entry.get(key), tp) or isinstance(entry.get(key), bool):
            raise InputError(f"{where}: '{key}' is missing or has the wrong type")
    if not isinstance(entry.get("stats", {}), dict):
        raise InputError(f"{where}: 'stats' has the wrong type")
    return entry


def read_entries(store: Store) -> dict[str, dict]:
    """Every shard entry, checked, by shard name."""
    names = [n for n in store.listdir(ENTRIES) if n.endswith(".json") and not n.startswith(".")]
    rels = [f"{ENTRIES}/{n}" for n in names]
    if store.local:
        blobs = {rel: store.read_bytes(rel) for rel in rels}
    else:
        paths = [store.path(rel) for rel in rels]
        got = store.fs.cat(paths) if paths else {}
        if isinstance(got, bytes):  # fsspec returns bare bytes for a single path
            got = {paths[0]: got}
        blobs = {rel: got[store.path(rel)] for rel in rels}
    out = {}
    for rel in rels:
        entry = check_entry(store, rel, _parse(store, rel, blobs[rel]))
        out[entry["name"]] = entry
    return out


def missing_chunks(header: dict, entries: dict[str, dict]) -> list[int]:
    """Chunks a complete manifest promises that have no entry: ``0..num_chunks-1`` (or,
    for manifests written before ``num_chunks``, the shards the manifest lists)."""
    have = {e["chunk"] for e in entries.values()}
    if isinstance(header.get("num_chunks"), int):
        want = set(range(header["num_chunks"]))
    else:
        want = {s.get("chunk") for s in header.get("shards", []) if isinstance(s, dict)}
    return sorted(c for c in want - have if isinstance(c, int))


def aggregate(header: dict, entries: dict[str, dict]) -> dict:
    """The manifest: the header plus every entry (less its row key hashes) and totals."""
    totals: dict[str, int] = {}
    for e in entries.values():
        for k, v in e.get("stats", {}).items():
            totals[k] = totals.get(k, 0) + v
    return {**header, "shards": [{k: v for k, v in entries[n].items() if k != "key_hashes"}
                                 for n in sorted(entries)],
            "num_rows": sum(e["rows"] for e in entries.values()),
            "num_shards": len(entries), "stats": totals}


def config_diff(old: dict | None, new: dict | None, opaque: tuple[str, ...] = ()) -> str:
    """The options that differ between two resolved configs, as ``key: OLD before, NEW now``
    (``key: other content`` for the ``opaque`` keys, e.g. fingerprints of models and data)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))

    def shown(v) -> str:
        text = json.dumps(v, sort_keys=True, default=str)
        return text if len(text) <= 40 else text[:37] + "..."
    return "; ".join(f"{k}: other content" if k in opaque else
                     f"{k}: {shown(old.get(k))} before, {shown(new.get(k))} now" for k in keys)


def check_unique_keys(store: Store, entries: list[dict], schema: Schema) -> None:
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
