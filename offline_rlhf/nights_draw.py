"""The nights' prompt pool: which prompts each night draws, and the history it draws from.

Plain draw (``[nights] prompts_per_night = N``, ``curate = "none"``): the pool is
walked in passes; pass k visits every prompt once, in the order of
sha256(seed, k, prompt id). Night n takes the next N prompts of the walk, so nights
draw disjoint prompts until the pool is used up, then a new pass begins (a prompt
that ends one pass and would open the next in the same night moves to the end of the
next pass). The draw is a function of (seed, night) and the pool only.

Curated draw (``curate = "informative"``): reads the stored history (one dataset per
night, ``WORKDIR/history/night-NNN``, schema ``history``: the night's groups, their
mean reward and whether they were informative). A prompt is *skipped* when it was
drawn on at least ``skip_after`` nights and its last ``skip_after`` groups were all
uninformative (all right or all wrong); the others are ranked unseen-or-last-informative
first, then seen-and-last-uninformative, ties broken by sha256(seed, night, id). When
too few prompts remain, skipped ones fill the night (least recently drawn first);
with ``fill = false`` they do not (the night generates fewer samples) unless none
remains, when a night of skipped prompts retests them.
It is DAPO's dynamic sampling (Yu et al., 2025, section 3.2) done across nights from
stored data: the groups a trainer would drop are not generated at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from .errors import InputError
from .generation import load_prompt_table
from .shards import ShardWriter, is_complete, is_dataset, open_dataset

CURATE = ("none", "informative")


def _rank(seed: int, k: int, prompt_id: str) -> str:
    return hashlib.sha256(f"{seed}:{k}:{prompt_id}".encode()).hexdigest()


def plain_draws(ids: list[str], per_night: int, seed: int, nights: int) -> list[list[str]]:
    """The prompts of nights 0..nights-1 of a plain draw (see the module text)."""
    if per_night > len(ids):
        raise InputError(f"nights.prompts_per_night: {per_night} is more than the pool's "
                         f"{len(ids)} prompts")
    draws, queue, k = [], [], 0
    for _ in range(nights):
        night: list[str] = []
        while len(night) < per_night:
            if not queue:
                order = sorted(ids, key=lambda i: _rank(seed, k, i))
                taken = set(night)
                queue = [i for i in order if i not in taken] + [i for i in order if i in taken]
                k += 1
            night.append(queue.pop(0))
        draws.append(night)
    return draws


def curated_draw(ids: list[str], per_night: int, seed: int, night: int,
                 history: dict[str, list[tuple[int, bool]]], skip_after: int,
                 fill: bool = True) -> tuple[list[str], dict]:
    """Night ``night``'s prompts from the pool and the history ({id: [(night, informative)]},
    in night order); also how many prompts were skipped and how many drawn again. With
    ``fill`` false a night draws only prompts not skipped (fewer than ``per_night`` when
    fewer remain), unless none remains: then the skipped ones fill it as usual."""
    if per_night > len(ids):
        raise InputError(f"nights.prompts_per_night: {per_night} is more than the pool's "
                         f"{len(ids)} prompts")

    def skipped(i: str) -> bool:
        h = history.get(i, [])
        return len(h) >= skip_after and not any(inf for _, inf in h[-skip_after:])

    def klass(i: str) -> int:
        h = history.get(i)
        return 0 if not h or h[-1][1] else 1

    skip = [i for i in ids if skipped(i)]
    keep = sorted((i for i in ids if not skipped(i)), key=lambda i: (klass(i), _rank(seed, night, i)))
    filler = sorted(skip, key=lambda i: (history[i][-1][0], _rank(seed, night, i)))
    draw = (keep + filler)[:per_night] if fill or not keep else keep[:per_night]
    skipped_set = set(skip)
    return draw, {"skipped": len(skip) - sum(1 for i in draw if i in skipped_set),
                  "replayed": sum(1 for i in draw if i in history),
                  "unseen": sum(1 for i in draw if i not in history)}


# --------------------------------------------------------------------------- the pool

def pool_ids(path: str) -> tuple[pa.Table, list[str]]:
    table, _ = load_prompt_table(path)
    return table, table.column("prompt_id").to_pylist()


def write_draw(pool: pa.Table, ids: list[str], out: Path) -> str:
    """The drawn prompts as a prompts dataset (reused when already complete)."""
    if not is_complete(str(out)):
        index = {p: i for i, p in enumerate(pool.column("prompt_id").to_pylist())}
        with ShardWriter(str(out), "prompts", lineage={"drawn_by": "nights"}) as w:
            w.write(0, pool.take([index[i] for i in ids]))
            w.finish(total_chunks=1)
    return str(out)


# --------------------------------------------------------------------------- history

def group_history(scored: str, night: int) -> pa.Table:
    """One row per prompt of a night's scored generations: group size, reward mean,
    min and max, informative (rewards not all equal)."""
    t = open_dataset(scored).read(columns=["prompt_id", "reward"])
    groups: dict[str, list[float]] = {}
    for pid, r in zip(t.column("prompt_id").to_pylist(), t.column("reward").to_pylist()):
        if r is not None:
            groups.setdefault(pid, []).append(float(r))
    ids = sorted(groups)
    rs = [groups[i] for i in ids]
    return pa.table({"night": pa.array([night] * len(ids), pa.int32()), "prompt_id": ids,
                     "samples": pa.array([len(r) for r in rs], pa.int32()),
                     "reward_mean": [sum(r) / len(r) for r in rs],
                     "reward_min": [min(r) for r in rs], "reward_max": [max(r) for r in rs],
                     "informative": [max(r) > min(r) for r in rs]})


def write_history(workdir: Path, night: int, scored: str) -> dict:
    """Store night ``night``'s groups in WORKDIR/history/night-NNN; its summary figures."""
    out = workdir / "history" / f"night-{night:03d}"
    if not is_complete(str(out)):
        with ShardWriter(str(out), "history", lineage={"scored": scored}) as w:
            w.write(0, group_history(scored, night))
            w.finish(total_chunks=1)
    t = open_dataset(str(out)).read(columns=["informative", "reward_mean"])
    inf = t.column("informative").to_pylist()
    return {"history": str(out), "groups": len(inf), "informative": sum(inf),
            "informative_fraction": sum(inf) / len(inf) if inf else None}


def read_history(workdir: Path, before: int) -> dict[str, list[tuple[int, bool]]]:
    """{prompt id: [(night, informative), ...]} over nights 0..before-1, in night order."""
    out: dict[str, list[tuple[int, bool]]] = {}
    for n in range(before):
        path = str(workdir / "history" / f"night-{n:03d}")
        if not is_dataset(path):
            continue
        t = open_dataset(path).read(columns=["prompt_id", "informative"])
        for pid, inf in zip(t.column("prompt_id").to_pylist(), t.column("informative").to_pylist()):
            out.setdefault(pid, []).append((n, bool(inf)))
    return out
