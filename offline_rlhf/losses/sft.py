"""Supervised fine-tuning loss: negative log-likelihood of the response tokens only.

Prompt tokens are masked: they are context, never targets, so changing them under
the mask changes no gradient through the target terms. Each example's loss is the
mean NLL over its response tokens (sequence-level averaging, so every example counts
once whatever its length).
"""

from __future__ import annotations

import torch

from .common import masked_sums


def sft_loss(per_token_logps: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``per_token_logps[:, t]`` predicts token ``t+1``; ``response_mask[:, t]`` marks
    response tokens. Returns per-example mean NLL and metrics (tokens, summed log-prob)."""
    sums, counts = masked_sums(per_token_logps, response_mask)
    losses = -sums / counts.clamp(min=1)
    return losses, {"response_tokens": counts.detach(), "logps": sums.detach()}
