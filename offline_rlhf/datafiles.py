"""Users' data files: JSONL, JSON arrays and Parquet (or a dataset) read as rows or tables.

Errors name the file, and for JSON the line or the row and column.
"""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .dataset import Dataset
from .errors import InputError, located
from .manifest import MANIFEST


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

    Errors name the file (and, for JSON, the line, or the row and column).
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
            try:  # pa.array infers the type from every row (from_pylist looks at the first only)
                return pa.Table.from_struct_array(pa.array(rows)) if rows else pa.table({})
            except (pa.ArrowException, TypeError):
                conflict = type_conflict(rows, str(path))
                if conflict:
                    raise InputError(conflict) from None
                raise
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


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def type_conflict(rows: list[dict], display: str) -> str | None:
    """Where JSON rows disagree on a value's type (a column is text in one row and a
    number in another, also inside lists and objects): the first row that differs,
    its column and the row that set the type; None when they agree."""
    first: dict[str, tuple[str, int]] = {}

    def walk(value, path: str, row: int, column: str) -> str | None:
        if value is None:
            return None
        kind = _kind(value)
        seen_kind, seen_row = first.setdefault(path, (kind, row))
        if kind != seen_kind:
            inside = f" at {path[len(column):].lstrip('.')}" if path != column else ""
            return located(f"{kind}{inside}, but {seen_kind} in row {seen_row}", display, row, column)
        items = value.items() if isinstance(value, dict) else \
            (("[]", v) for v in value) if isinstance(value, list) else ()
        for k, v in items:
            found = walk(v, f"{path}{k}" if k == "[]" else f"{path}.{k}", row, column)
            if found:
                return found
        return None

    for i, r in enumerate(rows):
        for k, v in r.items():
            found = walk(v, k, i, k)
            if found:
                return found
    return None


def column_stats(values: pa.Array) -> dict:
    """count / mean / std / min / max of a numeric column (nulls ignored)."""
    arr = pc.drop_null(values)
    if len(arr) == 0:
        return {"count": 0}
    return {"count": len(arr), "mean": pc.mean(arr).as_py(), "std": pc.stddev(arr).as_py(),
            "min": pc.min(arr).as_py(), "max": pc.max(arr).as_py()}
