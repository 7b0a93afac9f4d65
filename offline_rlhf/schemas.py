"""Table schemas: loaded from the JSON files in ``data_schemas/`` and enforced on write.

The JSON files are the single source of truth. Each names its columns with an Arrow
type string (``list<float32>``, ``struct<role: string, content: string>``,
``timestamp[us, tz=UTC]``), a nullability flag, a description and optional checks:

- ``non_empty`` (strings), ``non_negative``, ``finite`` and ``non_positive`` (numbers,
  lists of numbers, or the ``value`` field of a list of structs), ``{"in": [...]}``.
- Table level: ``key`` (unique columns), ``same_length`` (list columns of equal
  length per row when both are set), ``require_one_of`` (at least one non-null).

:func:`conform` casts a table to the schema (adding missing nullable columns,
refusing unknown ones and invalid UTF-8); :func:`find_violations` returns every row
that breaks a check, so a writer can refuse it or quarantine it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError, located

SCHEMA_NAMES = ("prompts", "generations", "pairs", "history")
README_MARKER = "<!-- The sections below are generated from the JSON files: python -m offline_rlhf.schemas -->"
META_SCHEMA = b"offline_rlhf.schema"
META_VERSION = b"offline_rlhf.schema_version"
# Log-probs computed in float32 can exceed 0 by rounding; anything above this is a bug.
LOGP_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool
    description: str
    checks: tuple


@dataclass(frozen=True)
class Schema:
    name: str
    version: str
    description: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    same_length: tuple[tuple[str, str], ...] = ()
    require_one_of: tuple[tuple[str, ...], ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"schema '{self.name}' has no column '{name}'")

    @functools.cached_property
    def arrow(self) -> pa.Schema:
        fields = [pa.field(c.name, c.type, nullable=c.nullable,
                           metadata={b"description": c.description.encode()})
                  for c in self.columns]
        return pa.schema(fields, metadata={META_SCHEMA: self.name.encode(),
                                           META_VERSION: self.version.encode()})


# --------------------------------------------------------------------------- type strings

def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside <...> or [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<[":
            depth += 1
        elif ch in ">]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def parse_type(text: str) -> pa.DataType:
    """Parse an Arrow type string such as ``list<struct<name: string, value: float64>>``."""
    text = text.strip()
    if text.startswith("timestamp[") and text.endswith("]"):
        args = _split_top(text[len("timestamp["):-1])
        tz = None
        for a in args[1:]:
            if not a.startswith("tz="):
                raise ValueError(f"bad timestamp option '{a}' in '{text}'")
            tz = a[3:]
        return pa.timestamp(args[0], tz=tz)
    if "<" in text:
        if not text.endswith(">"):
            raise ValueError(f"unbalanced type string '{text}'")
        head, inner = text.split("<", 1)
        args = _split_top(inner[:-1])
        head = head.strip()
        if head == "list" and len(args) == 1:
            return pa.list_(parse_type(args[0]))
        if head == "map" and len(args) == 2:
            return pa.map_(parse_type(args[0]), parse_type(args[1]))
        if head == "struct":
            fields = []
            for a in args:
                fname, _, ftype = a.partition(":")
                fields.append(pa.field(fname.strip(), parse_type(ftype)))
            return pa.struct(fields)
        raise ValueError(f"unknown type constructor in '{text}'")
    return pa.type_for_alias(text)


# --------------------------------------------------------------------------- loading

def _schema_from_dict(d: dict) -> Schema:
    cols = tuple(Column(c["name"], parse_type(c["type"]), bool(c["nullable"]),
                        c["description"], tuple(c.get("checks", ())))
                 for c in d["columns"])
    return Schema(d["name"], d["version"], d["description"], cols,
                  key=tuple(d.get("key", ())),
                  same_length=tuple(tuple(p) for p in d.get("same_length", ())),
                  require_one_of=tuple(tuple(p) for p in d.get("require_one_of", ())))


@functools.cache
def load_schema(name: str) -> Schema:
    """Load a schema shipped in ``data_schemas/`` by name (prompts, generations, pairs)."""
    if name not in SCHEMA_NAMES:
        raise InputError(f"unknown schema '{name}' (known: {', '.join(SCHEMA_NAMES)})")
    text = resources.files("offline_rlhf").joinpath("data_schemas", f"{name}.json").read_text()
    return _schema_from_dict(json.loads(text))


# --------------------------------------------------------------------------- conform

def _first_bad_utf8(arr: pa.Array) -> int | None:
    for i, v in enumerate(arr.cast(pa.large_binary()).to_pylist()):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                return i
    return None


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _text_as_number(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether casting ``src`` to ``dst`` would parse text into numbers or booleans
    (Arrow reads "5" as 5), at the top level or inside lists and structs."""
    if _is_text(src):
        return not (_is_text(dst) or pa.types.is_timestamp(dst) or pa.types.is_binary(dst))
    if pa.types.is_list(src) or pa.types.is_large_list(src):
        return (pa.types.is_list(dst) or pa.types.is_large_list(dst)) and \
            _text_as_number(src.value_type, dst.value_type)
    if pa.types.is_struct(src) and pa.types.is_struct(dst):
        names = {f.name: f.type for f in dst}
        return any(f.name in names and _text_as_number(f.type, names[f.name]) for f in src)
    return False


def _cast_column(arr: pa.ChunkedArray, col: Column, source: str | None) -> pa.ChunkedArray:
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        if pa.types.is_string(col.type):
            arr = arr.combine_chunks()
            bad = _first_bad_utf8(arr)
            if bad is not None:
                raise InputError(located("invalid UTF-8", source, bad, col.name))
    if _text_as_number(arr.type, col.type):   # Arrow would parse "5" as 5: refused, not coerced
        arr = arr.combine_chunks()
        valid = arr.is_valid()
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            valid = pc.and_(valid, pc.greater(pc.list_value_length(arr), 0))
        rows = np.flatnonzero(pc.fill_null(valid, False).to_numpy(zero_copy_only=False))
        if len(rows):
            raise InputError(located(f"expected {col.type}, got text: {arr[int(rows[0])].as_py()!r}"[:200],
                                     source, int(rows[0]), col.name))
    try:
        out = arr.cast(col.type) if arr.type != col.type else arr
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputError(located(f"cannot read {arr.type} as {col.type} ({e})".splitlines()[0],
                                 source, None, col.name)) from None
    if pa.types.is_string(col.type):
        try:
            out.validate(full=True)
        except pa.ArrowInvalid:
            bad = _first_bad_utf8(out.combine_chunks())
            raise InputError(located("invalid UTF-8", source, bad, col.name)) from None
    return out


def conform(table: pa.Table, schema: Schema, source: str | None = None) -> pa.Table:
    """Return ``table`` with exactly the schema's columns, in order and with its types.

    Missing nullable columns are added as nulls; missing required columns, unknown
    columns, uncastable types and invalid UTF-8 raise :class:`InputError`.
    """
    seen = set()
    for n in table.column_names:
        if n in seen:
            raise InputError(located("column appears more than once", source, None, n))
        seen.add(n)
    unknown = [n for n in table.column_names if n not in schema.names]
    if unknown:
        raise InputError(located(f"unknown column for schema '{schema.name}' "
                                 f"(expected some of: {', '.join(schema.names)})",
                                 source, None, unknown[0]))
    arrays = []
    for col in schema.columns:
        if col.name in table.column_names:
            arrays.append(_cast_column(table.column(col.name), col, source))
        elif col.nullable:
            arrays.append(pa.nulls(table.num_rows, col.type))
        else:
            raise InputError(located(f"missing required column for schema '{schema.name}'",
                                     source, None, col.name))
    return pa.Table.from_arrays(arrays, schema=schema.arrow)


# --------------------------------------------------------------------------- checks

@dataclass(frozen=True)
class Violation:
    """Rows (0-based) of a table that break one check."""
    column: str
    rows: np.ndarray
    message: str

    def describe(self, source: str | None = None) -> str:
        extra = f" (and {len(self.rows) - 1} more rows)" if len(self.rows) > 1 else ""
        return located(self.message + extra, source, int(self.rows[0]), self.column)


def _rows(mask: pa.Array) -> np.ndarray:
    mask = pc.fill_null(mask, False)
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))


def _numeric_values(arr: pa.Array) -> pa.Array:
    """The numbers inside a column: list elements, or the ``value`` field of list<struct>."""
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        values = arr.values.slice(arr.offsets[0].as_py(), arr.offsets[-1].as_py() - arr.offsets[0].as_py())
        if pa.types.is_struct(values.type):
            values = pc.struct_field(values, "value")
        return values
    return arr


def _bad_rows(arr: pa.Array, bad_values: pa.Array) -> np.ndarray:
    """Rows holding a bad value; the (costly) row mapping runs only when there is one."""
    if not pc.any(pc.fill_null(bad_values, False)).as_py():
        return np.array([], dtype=np.int64)
    idx = _rows(bad_values)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        parents = pc.list_parent_indices(arr).to_numpy()
        return np.unique(parents[idx])
    return idx


_NO_ROWS = np.array([], dtype=np.int64)


def _check(arr: pa.Array, check) -> tuple[np.ndarray, str]:
    if check == "non_empty":
        return _rows(pc.equal(pc.utf8_length(arr), 0)), "empty string"
    if check == "non_negative":
        return _rows(pc.less(arr, 0)), "negative value"
    if check == "finite":
        values = _numeric_values(arr)
        finite = pc.is_finite(values)
        if pc.all(finite).as_py() in (True, None):   # the common case: one pass, no row mapping
            return _NO_ROWS, ""
        return _bad_rows(arr, pc.invert(finite)), "non-finite value (NaN or inf)"
    if check == "non_positive":
        positive = pc.greater(_numeric_values(arr), LOGP_TOLERANCE)
        if not pc.any(positive).as_py():                  # the common case: no row mapping
            return _NO_ROWS, ""
        return _bad_rows(arr, positive), "positive log-probability (log-probs must be <= 0)"
    if isinstance(check, dict) and "in" in check:
        allowed = pa.array(check["in"], type=arr.type)
        return (_rows(pc.invert(pc.is_in(arr, value_set=allowed))),
                f"value not in {check['in']}")
    raise ValueError(f"unknown check {check!r}")


def _duplicate_rows(table: pa.Table, key: tuple[str, ...]) -> np.ndarray:
    idx = pa.array(np.arange(table.num_rows))
    t = table.select(list(key)).append_column("__row", idx)
    g = t.group_by(list(key), use_threads=False).aggregate(
        [("__row", "count"), ("__row", "list")])
    counts = g.column("__row_count").to_numpy()
    if not (counts > 1).any():
        return np.array([], dtype=np.int64)
    lists = g.column("__row_list").to_pylist()
    later = [r for c, rows in zip(counts, lists) if c > 1 for r in sorted(rows)[1:]]
    return np.array(sorted(later), dtype=np.int64)


def _array(column: pa.ChunkedArray) -> pa.Array:
    """One contiguous array (no copy when there is a single chunk, the usual case)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def find_violations(table: pa.Table, schema: Schema) -> list[Violation]:
    """Every check of ``schema`` that some row of a conformed ``table`` breaks."""
    out = []
    for col in schema.columns:
        arr = _array(table.column(col.name))
        if not col.nullable and arr.null_count:
            out.append(Violation(col.name, _rows(pc.is_null(arr)), "null in a required column"))
        for check in col.checks:
            rows, message = _check(arr, check)
            if len(rows):
                out.append(Violation(col.name, rows, message))
    for a, b in schema.same_length:
        la = pc.list_value_length(_array(table.column(a)))
        lb = pc.list_value_length(_array(table.column(b)))
        rows = _rows(pc.not_equal(la, lb))
        if len(rows):
            out.append(Violation(b, rows, f"length differs from '{a}'"))
    for names in schema.require_one_of:
        mask = None
        for n in names:
            m = pc.is_null(_array(table.column(n)))
            mask = m if mask is None else pc.and_(mask, m)
        rows = _rows(mask)
        if len(rows):
            out.append(Violation(names[0], rows, f"one of {list(names)} must be set"))
    if schema.key:
        rows = _duplicate_rows(table, schema.key)
        if len(rows):
            out.append(Violation(schema.key[-1], rows,
                                 f"duplicate key ({', '.join(schema.key)})"))
    return out


def replace_column(table: pa.Table, name: str, values) -> pa.Table:
    """``table`` with column ``name`` replaced by ``values`` (an Arrow array or Python /
    NumPy values), keeping the field and its type."""
    i = table.schema.get_field_index(name)
    field = table.schema.field(i)
    array = values.cast(field.type) if isinstance(values, pa.Array) else pa.array(values, type=field.type)
    return table.set_column(i, field, array)


def validate(table: pa.Table, schema: Schema | str, source: str | None = None) -> pa.Table:
    """Conform ``table`` to ``schema`` and raise :class:`InputError` on the first bad row."""
    if isinstance(schema, str):
        schema = load_schema(schema)
    table = conform(table, schema, source)
    violations = find_violations(table, schema)
    if violations:
        first = min(violations, key=lambda v: v.rows[0])
        raise InputError(first.describe(source))
    return table


# --------------------------------------------------------------------------- docs

def _check_text(check) -> str:
    return f"in {check['in']}" if isinstance(check, dict) else str(check)


def schema_markdown() -> str:
    """The column tables of ``data_schemas/README.md``, generated from the JSON files."""
    out = []
    for name in SCHEMA_NAMES:
        s = load_schema(name)
        raw = json.loads(resources.files("offline_rlhf").joinpath(
            "data_schemas", f"{name}.json").read_text())
        out += [f"## `{name}` (version {s.version})", "", s.description, ""]
        if s.key:
            out.append(f"Unique key: ({', '.join(s.key)}).")
        for a, b in s.same_length:
            out.append(f"`{a}` and `{b}` have the same length in every row where both are set.")
        for names in s.require_one_of:
            out.append(f"Every row sets at least one of {', '.join(f'`{n}`' for n in names)}.")
        out += ["", "| column | type | nullable | checks | description |",
                "|---|---|---|---|---|"]
        for c, rc in zip(s.columns, raw["columns"]):
            checks = ", ".join(_check_text(x) for x in c.checks) or "-"
            out.append(f"| `{c.name}` | `{rc['type']}` | {'yes' if c.nullable else 'no'} "
                       f"| {checks} | {c.description} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # regenerate data_schemas/README.md below its marker
    import sys
    from pathlib import Path
    readme = Path(__file__).resolve().parent / "data_schemas" / "README.md"
    head = readme.read_text().split(README_MARKER)[0]
    readme.write_text(head + README_MARKER + "\n\n" + schema_markdown())
    sys.stdout.write(f"wrote {readme}\n")
