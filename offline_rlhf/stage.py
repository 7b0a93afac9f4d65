"""The chunked-stage contract shared by generate, score, logprobs and pairs.

A stage maps input chunk ``c`` to output shard ``c``. It describes itself as a
:class:`StagePlan`: where its output goes (the :class:`~offline_rlhf.shards.ShardWriter`
arguments), how many chunks there are, how much work each holds, and a *chunk worker*:
a picklable object whose ``compute(chunk, progress)`` returns the chunk's Arrow table
and counters, loading its models lazily on first use (once per process or actor).

*Executors* (``offline_rlhf/executors/``) decide only where chunks run: this process
(``local``: worker ``i`` of ``N`` owns the chunks with ``c % N == i``, so any launcher
fans workers out with no coordinator) or an actor pool. Whichever runs, the output is
the same dataset: same chunk names, atomic commits, manifest and per-sample seeds.
Committed chunks are skipped, so a killed stage rerun recomputes only what is missing,
and the output is marked complete once every chunk (from any worker) is in.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Protocol

import pyarrow as pa

from .console import progress
from .errors import InputError

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
    """A progress bar over work units (and chunks done of ``chunks``, when given) with one
    throughput: tokens/s where the stage counts tokens (generate, score, logprobs), else
    its unit per second (pairs: rows/s)."""

    def __init__(self, total: int, desc: str, unit: str, chunks: int | None = None):
        self.bar = progress(total, desc, unit)
        self.start = time.perf_counter()
        self.samples = self.tokens = self.chunks_done = 0
        self.chunks = chunks

    def update(self, units: int = 0, samples: int = 0, tokens: int = 0, chunks: int = 0) -> None:
        self.samples += samples
        self.tokens += tokens
        self.chunks_done += chunks
        shown = {"chunks": f"{self.chunks_done}/{self.chunks}"} if self.chunks is not None else {}
        if hasattr(self.bar, "count_rate"):   # plain lines (or silent): one rate
            if tokens:
                self.bar.count_rate(tokens, "tokens")
        elif self.tokens:   # tqdm on a terminal: its own rate, and tokens/s beside it
            dt = max(time.perf_counter() - self.start, 1e-9)
            shown["tokens/s"] = f"{self.tokens / dt:.4g}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(units)

    def close(self) -> dict:
        self.bar.close()
        dt = time.perf_counter() - self.start
        return {"seconds": dt, "samples": self.samples, "tokens": self.tokens}


class NullProgress:
    """Counts like :class:`Progress` and shows nothing (inside actors, for instance)."""

    def __init__(self):
        self.samples = self.tokens = self.units = 0

    def update(self, units: int = 0, samples: int = 0, tokens: int = 0) -> None:
        self.units += units
        self.samples += samples
        self.tokens += tokens


class ChunkWorker(Protocol):
    """Computes chunks of one stage; picklable until its first ``compute``."""

    def compute(self, chunk: int, progress) -> tuple[pa.Table, dict]:
        """The output table of ``chunk`` and counters for its shard entry."""

    def close(self) -> None:
        """Release models and engines once the executor is done with this worker."""


class LazyWorker:
    """Base of chunk workers: ``self.loaded`` holds what ``load()`` returned (models,
    tokenizers), made on first use and never pickled, so a worker ships to another
    process or actor as its configuration alone and loads there, once."""

    _loaded: Any = None

    def load(self) -> Any:
        raise NotImplementedError

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_loaded"}

    def close(self) -> None:
        """Drop what ``load()`` made, calling ``close()`` on the parts that have one (an
        engine hands its device memory back); the next ``compute`` loads again."""
        from .models import free_memory
        loaded, self._loaded = self._loaded, None
        for part in loaded if isinstance(loaded, tuple) else (loaded,):
            if callable(getattr(part, "close", None)):
                part.close()
        loaded = part = None   # this frame's references too, or the collection cannot free them
        free_memory()   # the next stage (pairs, training) gets the models' memory


@dataclasses.dataclass
class StagePlan:
    """Everything an executor needs to run a stage."""
    name: str                     # progress label, e.g. "generate"
    unit: str                     # what ``units`` counts: "prompts" or "rows"
    writer: dict                  # ShardWriter keyword arguments (url, schema, lineage, ...)
    units: list[int]              # work units per chunk; len(units) is the chunk count
    worker: ChunkWorker
    info: dict = dataclasses.field(default_factory=dict)
    overwrite: bool = False       # remove an existing output first (--overwrite)

    @property
    def total_chunks(self) -> int:
        return len(self.units)

    def open_writer(self):
        from .shards import ShardWriter
        return ShardWriter(**self.writer)

