"""The local executor: this process computes the chunks it owns, in order.

Worker ``i`` of ``N`` owns the chunks with ``c % N == i`` (from ``--worker/--num-workers``
or the launcher's environment: see :func:`offline_rlhf.stage.resolve_worker`); several
such processes write to one output with no coordinator.
"""

from __future__ import annotations

from ..stage import Progress, StagePlan, resolve_worker


def run(plan: StagePlan, options) -> dict:
    worker, num_workers = resolve_worker(options.worker, options.num_workers)
    writer = plan.open_writer()
    writer.claim(worker, num_workers)  # before looking: another live writer is refused
    mine = [c for c in range(plan.total_chunks) if c % num_workers == worker]
    todo = [c for c in mine if not writer.committed(c)]
    progress = Progress(sum(plan.units[c] for c in todo), plan.name, plan.unit)
    try:
        with writer:
            for c in todo:
                table, stats = plan.worker.compute(c, progress)
                writer.write(c, table, stats=stats)
            manifest = writer.finish(total_chunks=plan.total_chunks, info=plan.info)
    finally:
        run = progress.close()
        plan.worker.close()
    run.update(chunks_done=len(todo), chunks_skipped=len(mine) - len(todo))
    return {**manifest, "run": run}
