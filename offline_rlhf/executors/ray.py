"""The Ray executor: a Ray Data actor pool computes and commits whole chunks.

``--executor ray`` runs a stage on a Ray cluster (``--ray-address``) or on a local
instance started here, and writes the same dataset the local executor writes, chunk
for chunk: the plan's own chunk worker computes each chunk (per-sample seeds come from
(seed, prompt id, k) inside it) and :class:`~offline_rlhf.shards.ShardWriter` commits it.

A run:

1. The driver (this process) opens the output, so a dataset written under another
   schema or config hash is refused before anything starts, and lists the chunks not
   yet committed: a killed run, rerun, redoes only those.
2. A Ray Data dataset holds those chunk ids, one block each, and ``map_batches`` with
   an actor pool (``compute=ActorPoolStrategy``) hands each to the next idle actor: a
   slow actor holds up one chunk, not a fixed share, and the pool may grow as the
   cluster does.
3. Each actor receives the chunk worker once, loads its models once (with whichever
   backend the worker uses, on the CPUs and GPUs Ray reserved for the actor; torch uses
   one thread per reserved CPU, at least one), opens its
   own writer on the output URL and, per chunk, computes the table and commits it:
   atomic shard, then its entry file (one file per shard, so actors never contend).
   It returns one summary row per chunk.
4. The driver turns the summary rows into one progress line (chunks, rows, rows/s)
   and finally marks the dataset complete once every chunk is in.

Actors commit whole chunks instead of handing rows to a ``ray.data.Datasink``: the
chunk is the unit of commit and resume, while Ray Data's blocks are not chunks (it
splits large blocks and bundles small ones into one write task), so a sink would have
to regroup rows by chunk before one atomic commit, and every row would cross the
object store on its way. Here rows never leave the actor that made them.

Failures: an exception while computing a chunk is retried in the same actor up to
``ray_retries`` times (Ray Data's ``retried_map_errors`` and ``max_map_retries``). Bad
input (:class:`~offline_rlhf.errors.InputError`) is never retried: it is sent back and
raised on the driver. An actor that dies (node lost, out of memory) is restarted by
Ray and its chunk resubmitted (Ray Data's actor defaults). A chunk already committed
is never computed again, by a retry or by a rerun.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import Counter

import pyarrow as pa

from ..errors import InputError
from ..stage import NullProgress, Progress, StagePlan, resolve_worker


def run(plan: StagePlan, options) -> dict:
    """Run ``plan`` on an actor pool; return the output manifest with ``run`` figures:
    seconds, samples, tokens, chunks done/skipped/retried, ray_init_seconds and
    actor start-up (``actor_load_seconds``: the slowest actor's model load;
    ``first_actor_ready_seconds``: from the start of this call)."""
    _, launched = resolve_worker(None, None)
    if launched > 1:
        raise InputError(f"executor ray: this process is one of {launched} launched workers "
                         "(RANK/WORLD_SIZE, a Slurm array or an indexed job); the ray executor "
                         "is one driver that hands out every chunk: launch it once")
    t0, wall0 = time.perf_counter(), time.time()
    writer = plan.open_writer()
    todo = [c for c in range(plan.total_chunks) if not writer.committed(c)]
    counts = Counter(chunks_skipped=plan.total_chunks - len(todo))
    if todo:
        ray, started = _connect(options)
        counts["ray_init_seconds"] = time.perf_counter() - t0
        _announce(ray, plan, todo, options, started)
    progress = Progress(sum(plan.units[c] for c in todo), f"{plan.name} (ray)", plan.unit,
                        chunks=len(todo))
    try:
        with writer:
            if todo:
                with _data_context(ray, options):
                    for row in _pool(ray, plan, todo, options).iter_rows():
                        _account(row, plan.units[row["chunk"]], progress, counts, wall0)
            manifest = writer.finish(total_chunks=plan.total_chunks, info=plan.info)
    finally:
        figures = progress.close()
    if not manifest["complete"]:
        missing = [c for c in range(plan.total_chunks) if not writer.committed(c)]
        raise InputError(f"{plan.writer['url']}: actors reported chunks committed that this "
                         f"process cannot see (chunk {missing[0]}, {len(missing)} in all): "
                         "the output must be on storage every Ray node shares (a shared "
                         "filesystem or an object store URL)")
    return {**manifest, "run": {**figures, **counts, "seconds": time.perf_counter() - t0}}


def _connect(options):
    """Import Ray and join (or start) an instance; an instance already up is reused.
    Returns Ray and whether this call started a local instance."""
    try:
        import ray
        import ray.data  # noqa: F401  (the executor's engine)
    except ImportError:
        raise InputError("executor ray: Ray Data is not installed; install it with "
                         "pip install 'offline-rlhf[ray]'") from None
    started = False
    if not ray.is_initialized():
        address = options.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        started = address == "local"
        quiet = not options.ray_verbose
        local = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, log_to_driver=not quiet,
                 logging_level=logging.ERROR if quiet else logging.INFO, **local)
    if not options.ray_verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray, started


def _announce(ray, plan: StagePlan, todo: list[int], options, started: bool) -> None:
    """One line on what runs where; refuse a pool that a local instance can never place
    (a cluster may still grow: there, Ray waits for room)."""
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    need = options.ray_actors * options.ray_cpus_per_actor
    size = f"{options.ray_actors}" + (f"-{options.ray_max_actors}" if options.ray_max_actors else "")
    print(f"{plan.name}: {len(todo)} chunks to do ({plan.total_chunks - len(todo)} already "
          f"committed) on {size} Ray actors x ({options.ray_cpus_per_actor:g} CPU, "
          f"{options.ray_gpus_per_actor:g} GPU); cluster: {cpus:g} CPU, {gpus:g} GPU",
          file=sys.stderr)
    if need > cpus and started:
        raise InputError(f"ray_actors: {options.ray_actors} actors x ray_cpus_per_actor "
                         f"{options.ray_cpus_per_actor:g} need {need:g} CPUs, the Ray instance "
                         f"has {cpus:g}; use fewer actors or fractional ray_cpus_per_actor")
    if gpus and not options.ray_gpus_per_actor:
        print(f"warning: the Ray cluster has {gpus:g} GPUs but ray_gpus_per_actor is 0: the "
              "actors run their models on CPU", file=sys.stderr)


@contextlib.contextmanager
def _data_context(ray, options):
    """Ray Data settings for this run only: retries, and quiet unless ray_verbose."""
    ctx = ray.data.DataContext.get_current().copy()
    ctx.retried_map_errors = True
    ctx.max_map_retries = options.ray_retries
    verbose = options.ray_verbose
    ctx.enable_progress_bars = ctx.print_on_execution_start = ctx.enable_auto_log_stats = verbose
    with ray.data.DataContext.current(ctx):
        yield


def _pool(ray, plan: StagePlan, todo: list[int], options):
    """The dataset of summary rows: one block per chunk id, mapped by the actor pool."""
    chunks = ray.data.from_items([{"chunk": c} for c in todo], override_num_blocks=len(todo))
    sizes = ({"min_size": options.ray_actors, "max_size": options.ray_max_actors}
             if options.ray_max_actors else {"size": options.ray_actors})
    return chunks.map_batches(
        ChunkActor, fn_constructor_args=(plan.worker, plan.writer, options.ray_cpus_per_actor),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(**sizes, max_tasks_in_flight_per_actor=1),
        num_cpus=options.ray_cpus_per_actor, num_gpus=options.ray_gpus_per_actor)


def _account(row: dict, units: int, progress: Progress, counts: Counter, wall0: float) -> None:
    if row["error"]:
        raise InputError(row["error"])
    if row["skipped"]:
        counts["chunks_skipped"] += 1
        progress.update(units=units, chunks=1)
        return
    counts["chunks_done"] += 1
    counts["chunks_retried"] += int(row["attempt"] > 1)
    counts["actor_load_seconds"] = max(counts["actor_load_seconds"], float(row["load_seconds"]))
    ready = float(row["ready_at"]) - wall0
    counts["first_actor_ready_seconds"] = min(counts.get("first_actor_ready_seconds", ready), ready)
    progress.update(units=units, samples=int(row["samples"]),
                    tokens=int(row["tokens"]), chunks=1)


class ChunkActor:
    """One member of the actor pool: loads the chunk worker's models once, then computes
    and commits the chunks it is handed, returning a summary row for each."""

    def __init__(self, worker, writer: dict, cpus: float = 1.0):
        start = time.perf_counter()
        # as many torch threads as CPUs reserved (at least one), whatever OMP_NUM_THREADS the
        # driver's environment passed on: CPU rows then do not depend on the caller's shell
        import torch
        torch.set_num_threads(max(1, int(cpus)))
        self.worker = worker
        if hasattr(worker, "load"):
            worker.loaded  # noqa: B018  (load the models now, once per actor)
        from ..shards import ShardWriter
        self.writer = ShardWriter(**writer)
        self.load_seconds = time.perf_counter() - start
        self.ready_at = time.time()
        self.attempts: Counter = Counter()

    def __call__(self, batch: dict) -> pa.Table:
        return pa.Table.from_pylist([self.chunk(int(c)) for c in batch["chunk"]])

    def chunk(self, c: int) -> dict:
        self.attempts[c] += 1
        row = {"chunk": c, "attempt": self.attempts[c], "skipped": False, "error": "",
               "samples": 0, "tokens": 0, "rows": 0,
               "load_seconds": self.load_seconds, "ready_at": self.ready_at}
        if self.writer.committed(c):  # a retry after the commit, or another run got here first
            return {**row, "skipped": True}
        progress = NullProgress()
        try:
            table, stats = self.worker.compute(c, progress)
            self.writer.write(c, table, stats=stats)
            self.writer.flush()  # committed before the driver hears of it
        except InputError as e:
            return {**row, "error": str(e)}
        return {**row, "samples": progress.samples,
                "tokens": progress.tokens, "rows": table.num_rows}
