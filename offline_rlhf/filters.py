"""Sample filters over scored generations: rejection sampling (SFT) and ReST's improve steps.

Rows are kept when they pass every given rule: ``top_k`` best per prompt, ``threshold``
(absolute reward), ``percentile`` (per-prompt: reward at or above that percentile of
its prompt's rewards, as in ReST's improve steps). Identical (prompt, response) pairs
are de-duplicated and ``max_per_prompt`` caps what each prompt keeps (best first).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .errors import InputError


@dataclasses.dataclass
class SampleFilter:
    top_k: int = 0                  # keep the k best per prompt (0: no limit)
    threshold: float | None = None  # keep reward >= threshold
    percentile: float | None = None  # keep reward >= this per-prompt percentile (0-100)
    max_per_prompt: int = 0         # cap per prompt after the rules (0: none)
    dedupe: bool = True
    reward_column: str = "reward"

    def __post_init__(self):
        if self.percentile is not None and not 0 <= self.percentile <= 100:
            raise InputError(f"percentile: must be in [0, 100], got {self.percentile}")
        if self.top_k < 0 or self.max_per_prompt < 0:
            raise InputError("top_k and max_per_prompt must be >= 0")


def select(rows: list[dict], f: SampleFilter) -> tuple[list[int], dict]:
    """Indices of the rows kept (in input order) and counters."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get(f.reward_column) is None:
            raise InputError(f"row {i}: no {f.reward_column}; run `offline-rlhf score` first")
        if not math.isfinite(r[f.reward_column]):   # a dataset written by another tool
            raise InputError(f"row {i}: {f.reward_column} is {r[f.reward_column]} (not finite)")
        groups.setdefault(r["prompt_id"], []).append(i)
    kept: list[int] = []
    stats = {"rows": len(rows), "duplicates": 0, "below_threshold": 0, "below_percentile": 0,
             "beyond_top_k": 0, "beyond_cap": 0}
    for idx in groups.values():
        rewards = np.array([rows[i][f.reward_column] for i in idx], dtype=np.float64)
        order = sorted(range(len(idx)), key=lambda j: (-rewards[j], rows[idx[j]].get("sample_index", 0)))
        cut = np.percentile(rewards, f.percentile) if f.percentile is not None else None
        seen, mine = set(), []
        for j in order:
            r = rows[idx[j]]
            if f.dedupe and r["response"] in seen:
                stats["duplicates"] += 1
                continue
            seen.add(r["response"])
            if f.threshold is not None and rewards[j] < f.threshold:
                stats["below_threshold"] += 1
            elif cut is not None and rewards[j] < cut:
                stats["below_percentile"] += 1
            elif f.top_k and len(mine) >= f.top_k:
                stats["beyond_top_k"] += 1
            elif f.max_per_prompt and len(mine) >= f.max_per_prompt:
                stats["beyond_cap"] += 1
            else:
                mine.append(idx[j])
        kept += mine
    kept.sort()
    stats["kept"] = len(kept)
    return kept, stats
