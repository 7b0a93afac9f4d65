"""Executors: where the chunks of a stage run (see :mod:`offline_rlhf.stage`).

An explicit name -> module table; each module has ``run(plan, *, worker, num_workers,
**options) -> manifest``. Modules are imported on use, so an executor's own
dependencies are needed only when it is chosen.
"""

from __future__ import annotations

import importlib

from ..errors import InputError

EXECUTORS = {
    "local": "offline_rlhf.executors.local",   # this process; static --worker/--num-workers
}


def get_executor(name: str):
    if name not in EXECUTORS:
        raise InputError(f"executor: must be one of {', '.join(EXECUTORS)}, got {name!r}")
    return importlib.import_module(EXECUTORS[name]).run
