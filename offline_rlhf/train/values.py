"""The values trainers read, checked before a model loads.

This package's shard writer refuses a NaN or infinite reward or log-prob, but a dataset
written by another tool may hold one, and one such value makes a loss NaN from the step
that draws it (or, in a group's advantages, silently drops the group). A trainer names
the numeric columns it reads; the first non-finite value is refused in one line with the
shard file, row and column, worded as ``offline-rlhf validate`` words it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError, located


def first_non_finite(column: pa.ChunkedArray) -> tuple[int, str] | None:
    """(row, description) of the first NaN or infinite number in a numeric or
    list-of-numbers column (nulls are not values: the trainers refuse them apart)."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    nested = pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
    values = pc.list_flatten(arr) if nested else arr
    bad = pc.fill_null(pc.invert(pc.is_finite(values)), False)
    if not pc.any(bad).as_py():
        return None
    i = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
    value = values[i].as_py()
    if not nested:
        return i, str(value)
    row = int(pc.list_parent_indices(arr)[i].as_py())
    before = pc.sum(pc.list_value_length(arr.slice(0, row))).as_py() or 0
    return row, f"{value} at position {i - before}"


def check_finite(path: str, schema: str, columns: list[str], command: str) -> None:
    """Refuse a NaN or infinite value in ``columns`` of the ``schema`` dataset ``path``
    (files and datasets of another schema are left to the trainer's own checks)."""
    from ..shards import is_dataset, open_dataset
    if not columns or not is_dataset(path):
        return
    ds = open_dataset(path)
    if ds.schema_name != schema:
        return
    for entry, file in zip(ds.shards, ds.files()):
        table = ds.read_shard(entry["chunk"], columns=columns)
        for column in columns:
            found = first_non_finite(table.column(column))
            if found is not None:
                row, value = found
                raise InputError(located(f"non-finite value (NaN or inf): {value}; {command} "
                                         "refuses it before training", file, row, column))
