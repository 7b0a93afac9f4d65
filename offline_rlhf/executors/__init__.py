"""Executors: where the chunks of a stage run (see :mod:`offline_rlhf.stage`).

An explicit name -> module table; each module has ``run(plan, options) -> manifest``,
``options`` an :class:`ExecutorOptions`. Modules are imported on use, so an
executor's own dependencies (Ray) are needed only when it is chosen.

:class:`ExecutorOptions` is mixed into the config of every chunked stage (generate,
score, logprobs), so the flags, config-file keys and pipeline keys are defined once.
None of them changes which rows are written, only where they are made: they are left
out of every config hash and pipeline key (:data:`EXECUTOR_OPTIONS`).

:func:`run_stage` is what a stage calls: it removes an old output first when the plan
says ``overwrite`` (after the plan has checked every input), then runs the executor.
It lives here, not in ``stage.py``, so that the stage contract never imports its
executors (layers point down).
"""

from __future__ import annotations

import dataclasses
import importlib

from ..config import opt
from ..errors import InputError
from ..stage import StagePlan, resolve_worker

EXECUTORS = {
    "local": "offline_rlhf.executors.local",   # this process; static --worker/--num-workers
    "ray": "offline_rlhf.executors.ray",       # a Ray Data actor pool, local or on a cluster
}


@dataclasses.dataclass(kw_only=True)
class ExecutorOptions:
    """executor options (where chunks run; rows are the same whichever runs)"""

    executor: str = opt("local", f"where chunks run: {' | '.join(EXECUTORS)} (local: this "
                        "process, one of --num-workers static workers; ray: a Ray Data actor "
                        "pool that loads the models once per actor)")
    worker: int | None = opt(None, "local executor: this worker's index (default: RANK from "
                             "the launcher, else 0)")
    num_workers: int | None = opt(None, "local executor: number of workers (default: "
                                  "WORLD_SIZE, else 1)")
    ray_address: str | None = opt(None, "ray executor: cluster to join (host:port, ray://host:"
                                  "10001, or auto: the one started on this node by `ray start`); "
                                  "default: RAY_ADDRESS if set, else start a local instance")
    ray_actors: int = opt(1, "ray executor: actors in the pool (the minimum when "
                          "ray_max_actors is set)")
    ray_max_actors: int | None = opt(None, "ray executor: let the pool grow to this many "
                                     "actors as the cluster has room (default: fixed size)")
    ray_cpus_per_actor: float = opt(1.0, "ray executor: CPUs reserved per actor (fractions "
                                    "allowed; also the actor's torch thread count)")
    ray_gpus_per_actor: float = opt(0.0, "ray executor: GPUs per actor (0: models run on "
                                    "CPU; 0.5: two actors share a GPU)")
    ray_retries: int = opt(2, "ray executor: times a chunk whose computation raised is retried "
                           "(bad input is never retried; actors lost with their node are "
                           "restarted by Ray and their chunk resubmitted)")
    ray_verbose: bool = opt(False, "ray executor: show Ray's own logs and progress bars "
                            "instead of the driver's one progress line")

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise InputError(f"executor: must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.executor != "local" and (self.worker is not None or self.num_workers is not None):
            raise InputError(f"worker/num_workers: static workers belong to --executor local; "
                             f"the {self.executor} executor hands out every chunk itself")
        if self.worker is not None or self.num_workers is not None:
            resolve_worker(self.worker, self.num_workers)  # refuse a bad pair before any work
        checks = [("ray_actors", self.ray_actors >= 1, "must be >= 1"),
                  ("ray_max_actors", self.ray_max_actors is None
                   or self.ray_max_actors >= self.ray_actors, "must be >= ray_actors"),
                  ("ray_cpus_per_actor", self.ray_cpus_per_actor > 0, "must be > 0"),
                  ("ray_gpus_per_actor", self.ray_gpus_per_actor >= 0, "must be >= 0"),
                  ("ray_retries", self.ray_retries >= 0, "must be >= 0")]
        for name, ok, why in checks:
            if not ok:
                raise InputError(f"{name}: {why}, got {getattr(self, name)!r}")
        later = getattr(super(), "__post_init__", None)  # cooperative: other option mixins
        if later is not None:
            later()


EXECUTOR_OPTIONS = tuple(f.name for f in dataclasses.fields(ExecutorOptions))


def get_executor(name: str):
    if name not in EXECUTORS:
        raise InputError(f"executor: must be one of {', '.join(EXECUTORS)}, got {name!r}")
    return importlib.import_module(EXECUTORS[name]).run


def run_stage(plan: StagePlan, options: ExecutorOptions | None = None) -> dict:
    """Run ``plan`` where ``options`` (an :class:`ExecutorOptions`, e.g. the stage's
    config; default: this process alone) says; return the output manifest (with ``run``
    timing figures of this run)."""
    options = options if options is not None else ExecutorOptions()
    if plan.overwrite:   # the plan has checked every input: now the old output may go
        if options.executor == "local" and resolve_worker(options.worker, options.num_workers)[1] > 1:
            raise InputError("overwrite: with several workers each would delete the others' "
                             "shards; remove the output once before launching them")
        from ..shards import remove_dataset
        remove_dataset(plan.writer["url"])
    return get_executor(options.executor)(plan, options)
