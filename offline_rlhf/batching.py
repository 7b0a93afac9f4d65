"""Token-budget batching with length bucketing, and padding.

Batches are sized by tokens, not rows: sequences are sorted by length and packed while
``rows x longest`` stays within the budget, so short sequences travel in large batches
and long ones in small, and little compute is spent on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def budget_batches(lengths: Sequence[int], budget: int, *, extra: int = 0,
                   row_multiplier: int = 1, max_rows: int | None = None) -> list[list[int]]:
    """Group indices into batches whose padded cost fits ``budget`` tokens.

    The cost of a batch is ``rows * row_multiplier * (longest + extra)``: ``extra`` covers
    tokens added later (new tokens in generation), ``row_multiplier`` rows that share
    an input (K samples per prompt). Indices are sorted longest first; a sequence too
    long for the budget on its own gets a batch of one.
    """
    if budget <= 0:
        raise ValueError("budget must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        cost = (len(current) + 1) * row_multiplier * (new_longest + extra)
        if current and (cost > budget or (max_rows and len(current) >= max_rows)):
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
        device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists into ``(ids, attention_mask)`` tensors."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if not len(s):
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "left":
            ids[r, width - len(s):] = t
            mask[r, width - len(s):] = 1
        else:
            ids[r, :len(s)] = t
            mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding safe)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
