"""The DPO family of preference losses.

Notation: for a pair (prompt x, chosen y_w, rejected y_l), ``pi_w = log pi(y_w|x)`` summed
over the completion tokens, ``ref_w`` the same under the reference model, likewise
``pi_l`` and ``ref_l``; ``delta = (pi_w - ref_w) - (pi_l - ref_l)``.

- ``sigmoid`` (DPO; Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * delta)``.
- ``cdpo`` (conservative DPO; Mitchell 2023, "A note on DPO with noisy preferences"):
  labels flipped with probability eps:
  ``-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)``.
- ``robust`` (rDPO; Chowdhury et al. 2024, eq. 8): an unbiased loss under flip rate eps:
  ``[-(1 - eps) log sigmoid(beta delta) + eps log sigmoid(-beta delta)] / (1 - 2 eps)``.
- ``ipo`` (Azar et al. 2023, eq. 17): ``(delta_avg - 1 / (2 beta))^2`` with the
  log-ratios averaged over completion tokens (as the IPO authors' results and TRL do).
- ``hinge`` (SLiC; Zhao et al. 2023): ``max(0, 1 - beta * delta)``.
- ``simpo`` (Meng et al. 2024, eq. 6): reference-free and length-normalised:
  ``-log sigmoid(beta * (pi_w / |y_w| - pi_l / |y_l|) - gamma)``.

:func:`nll_term` is the length-normalised negative log-likelihood of the chosen
response, added with weight alpha (RPO; Pang et al. 2024, eq. 3). Without it DPO can
lower the likelihood of the chosen responses along with the rejected ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None,
             simpo_gamma: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses ``[n]`` and per-pair metrics (each ``[n]``).

    Metrics: ``rewards/chosen`` = beta * (pi_w - ref_w) (for SimPO, beta * pi_w / |y_w|),
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (1 when the chosen
    reward is higher), ``logps/chosen`` and ``logps/rejected`` (summed log-probs).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    if loss_type in ("ipo", "simpo") and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"{loss_type} needs chosen_lengths and rejected_lengths")
    if loss_type == "simpo":
        chosen_scores = policy_chosen_logps / chosen_lengths.clamp(min=1)
        rejected_scores = policy_rejected_logps / rejected_lengths.clamp(min=1)
        logits = beta * (chosen_scores - rejected_scores) - simpo_gamma
        losses = -F.logsigmoid(logits)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"{loss_type} needs reference log-probs")
        chosen_scores = policy_chosen_logps - ref_chosen_logps
        rejected_scores = policy_rejected_logps - ref_rejected_logps
        delta = chosen_scores - rejected_scores
        eps = label_smoothing
        if loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * delta)
        elif loss_type == "cdpo":
            losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        elif loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * delta)
                      + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif loss_type == "ipo":
            avg = chosen_scores / chosen_lengths.clamp(min=1) - \
                rejected_scores / rejected_lengths.clamp(min=1)
            losses = (avg - 1 / (2 * beta)) ** 2
        else:  # hinge
            losses = torch.relu(1 - beta * delta)
    chosen_rewards = (beta * chosen_scores).detach()
    rejected_rewards = (beta * rejected_scores).detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }
    return losses, metrics


def nll_term(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of the chosen response, per token (RPO eq. 3)."""
    return -chosen_logps / chosen_lengths.clamp(min=1)
