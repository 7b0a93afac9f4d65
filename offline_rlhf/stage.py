"""The chunked stage runner shared by generate, score and logprobs.

A stage maps input chunk ``c`` to output shard ``c``. Worker ``i`` of ``N`` owns the
chunks with ``c % N == i``: no coordinator, any launcher (accelerate, torchrun, Slurm
arrays, Kubernetes indexed jobs) can fan workers out. Committed chunks are skipped,
so a killed stage rerun recomputes only what is missing, and the output is marked
complete once every chunk (from any worker) is in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pyarrow as pa
from tqdm.auto import tqdm

from .errors import InputError
from .shards import ShardWriter

WORKER_ENV = (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
              ("JOB_COMPLETION_INDEX", "OFFLINE_RLHF_NUM_WORKERS"))


def resolve_worker(worker: int | None, num_workers: int | None) -> tuple[int, int]:
    """``(worker, num_workers)`` from the flags, else from the launcher's environment
    (accelerate/torchrun ``RANK``/``WORLD_SIZE``, Slurm arrays, Kubernetes indexed jobs)."""
    if worker is None and num_workers is None:
        for rank_var, size_var in WORKER_ENV:
            if rank_var in os.environ and size_var in os.environ:
                worker, num_workers = int(os.environ[rank_var]), int(os.environ[size_var])
                break
    worker = 0 if worker is None else worker
    num_workers = 1 if num_workers is None else num_workers
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise InputError(f"--worker {worker} --num-workers {num_workers}: need 0 <= worker < num_workers")
    return worker, num_workers


class Progress:
    """A progress bar over work units with samples/s and tokens/s."""

    def __init__(self, total: int, desc: str, unit: str):
        self.bar = tqdm(total=total, desc=desc, unit=unit, mininterval=1.0, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.samples = self.tokens = 0

    def update(self, units: int = 0, samples: int = 0, tokens: int = 0) -> None:
        self.samples += samples
        self.tokens += tokens
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix({"samples/s": f"{self.samples / dt:.1f}",
                              "tokens/s": f"{self.tokens / dt:.0f}"}, refresh=False)
        self.bar.update(units)

    def close(self) -> dict:
        self.bar.close()
        dt = time.perf_counter() - self.start
        return {"seconds": dt, "samples": self.samples, "tokens": self.tokens}


def run_chunks(writer: ShardWriter, total_chunks: int, worker: int, num_workers: int,
               compute: Callable[[int, Progress], tuple[pa.Table, dict]], *,
               units_per_chunk: Callable[[int], int], desc: str, unit: str,
               info: dict | None = None) -> dict:
    """Compute and write every uncommitted chunk this worker owns; return the manifest
    (with ``run`` timing figures of this process)."""
    writer.claim(worker, num_workers)  # before looking: another live writer is refused
    mine = [c for c in range(total_chunks) if c % num_workers == worker]
    todo = [c for c in mine if not writer.committed(c)]
    progress = Progress(sum(units_per_chunk(c) for c in todo), desc, unit)
    try:
        with writer:
            for c in todo:
                table, stats = compute(c, progress)
                writer.write(c, table, stats=stats)
            manifest = writer.finish(total_chunks=total_chunks, info=info)
    finally:
        run = progress.close()
    run.update(chunks_done=len(todo), chunks_skipped=len(mine) - len(todo))
    return {**manifest, "run": run}
