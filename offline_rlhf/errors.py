"""User-facing errors.

An :class:`InputError` is bad input (data, configuration, paths) rather than a bug:
the CLI prints its message as one line and exits with status 2. Messages name the
file, row and column where they are known, through :func:`located`.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user. The message is one line and says where and what."""


def located(message: str, file: str | None = None, row: int | None = None,
            column: str | None = None) -> str:
    """Prefix ``message`` with ``file, row R, column 'C': `` for the parts that are known."""
    where = []
    if file is not None:
        where.append(str(file))
    if row is not None:
        where.append(f"row {row}")
    if column is not None:
        where.append(f"column '{column}'")
    return f"{', '.join(where)}: {message}" if where else message


class TrainingDiverged(InputError):
    """A training run stopped at a non-finite loss or gradient norm, before that step's
    update. Reported like bad input (one line, exit 2): what to change is an option (the
    learning rate) or the data, and nothing of the run looks finished."""
