"""Token log-probabilities from logits (shared by every sequence-level loss)."""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``log p(input_ids[:, t+1] | prefix)`` for each position: shape ``[B, T-1]``.

    Uses ``logit[target] - logsumexp(logits)`` so the full log-softmax is never stored.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def masked_sums(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``per_token[:, t]`` where ``mask[:, t+1]`` is set (the predicted token is
    in the completion), and the number of such tokens, per row."""
    m = mask[:, 1:].to(per_token.dtype)
    return (per_token * m).sum(-1), m.sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``x`` ``[B, T]`` over ``mask``; 0 for an empty row."""
    m = mask.to(x.dtype)
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)
