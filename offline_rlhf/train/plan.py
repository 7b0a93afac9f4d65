"""How a run's examples are cut into steps and forward passes (pure functions).

An epoch is a seeded permutation of the examples cut into ceil(n / batch_size) steps,
the last one holding the rest; each step's examples are cut by length into
micro-batches dealt round-robin to the processes (see ``loop.py``).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError


def micro_batches(indices: list[int], lengths: np.ndarray, max_rows: int, max_tokens: int,
                  world: int, group_by_length: bool = True) -> list[list[int]]:
    """Split one step's examples into micro-batches of at most ``max_rows`` examples and
    (when grouped by length) ``max_tokens`` padded tokens; the count is a multiple of
    ``world`` so that every process does the same number of passes."""
    if not group_by_length:
        return _even_out([indices[i:i + max_rows] for i in range(0, len(indices), max_rows)],
                         world, len(indices))
    out: list[list[int]] = []
    for i in sorted(indices, key=lambda i: (-int(lengths[i]), i)):
        if out and len(out[-1]) < max_rows and \
                (len(out[-1]) + 1) * max(int(lengths[out[-1][0]]), int(lengths[i])) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return _even_out(out, world, len(indices))


def _even_out(out: list[list[int]], world: int, n: int) -> list[list[int]]:
    """Halve the largest micro-batches until their count is a multiple of ``world``. A
    step of fewer examples than processes gets empty micro-batches: a process given one
    runs a pass whose loss counts zero (see :func:`_step`), so that every process makes
    the same collective calls."""
    while len(out) % world:
        big = max(range(len(out)), key=lambda j: len(out[j]))
        if len(out[big]) < 2:
            out.append([])
            continue
        half = len(out[big]) // 2
        out[big:big + 1] = [out[big][:half], out[big][half:]]
    return out


def plan_epoch(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Examples of each step of an epoch: a seeded permutation cut into batches of
    ``batch_size``, the last one holding the rest (every example, every epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    if n == 0:
        raise InputError("no training examples")
    return -(-n // batch_size)


def total_steps(cfg, n: int) -> int:
    """``max_steps``, else ``epochs`` passes of ceil(n / batch_size) steps (a fraction of
    an epoch rounds down, to at least one step)."""
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    return cfg.max_steps or max(1, math.floor(per_epoch * cfg.epochs + 1e-9))


def warmup_steps(cfg, steps: int) -> int:
    """``warmup_steps``, or ``warmup_ratio`` of the total steps rounded up (as transformers)."""
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
