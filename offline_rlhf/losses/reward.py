"""Reward-model losses.

Bradley-Terry (Bradley and Terry 1952; as used for RLHF reward models by Ouyang et al.
2022, eq. 1): ``-log sigmoid(r_chosen - r_rejected - m)``, where the optional margin
``m`` (Touvron et al. 2023, Llama 2, eq. 2) asks for a larger gap on pairs whose
preference is stronger. Reward centering (Eisenstein et al. 2023, "Helping or Herding?")
adds ``c * (r_chosen + r_rejected)^2`` so that rewards stay near zero mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and metrics (accuracy, rewards of both sides, their margin)."""
    diff = r_chosen - r_rejected
    losses = -F.logsigmoid(diff - margin if margin is not None else diff)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    metrics = {"accuracy": (diff > 0).float().detach(), "rewards/chosen": r_chosen.detach(),
               "rewards/rejected": r_rejected.detach(), "rewards/margins": diff.detach()}
    return losses, metrics
