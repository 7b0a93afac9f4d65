"""Unpaired preference losses: KTO, BCO and APO-zero's unpaired form, over single completions.

Each example is one (prompt x, completion y) with a label: desirable or undesirable. With
``r = log pi(y|x) - log pi_ref(y|x)`` (summed over the completion's tokens):

- ``kto`` (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
  Optimization", eq. 7, the number TRL cites): ``lambda_D (1 - sigmoid(beta (r - z0)))`` for a desirable example,
  ``lambda_U (1 - sigmoid(beta (z0 - r)))`` for an undesirable one. The reference point
  ``z0`` estimates ``KL(pi || pi_ref)`` as the paper does in practice: the batch mean of ``r`` over *mismatched*
  (prompt, completion) pairs, with no gradient through it, clamped at 0 (:func:`kto_kl`).
- ``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, eq. 7 unpaired, as TRL):
  ``lambda_D (1 - sigmoid(beta r))`` and ``lambda_U sigmoid(beta r)``; no reference point.
- ``bco`` (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
  Alignment", arXiv:2404.04656: the binary cross-entropy that bounds the DPO loss from
  above, with the paper's reward shift): a logistic classifier whose logit is the
  implicit reward ``beta r`` shifted by ``delta``: ``-lambda_D log sigmoid(beta r -
  delta)`` for a desirable example, ``-lambda_U log sigmoid(-(beta r - delta))`` for an
  undesirable one. ``delta`` is the running mean of the rewards ``beta r`` seen in training
  (:func:`bco_delta`). The paper's density-ratio weights for mismatched prompt
  distributions (its UDM classifier) are not built.

TRL 1.16's ``KTOTrainer`` averages the weighted per-example losses over the batch; so does
the trainer's loop with these per-example losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired", "bco")


def kto_kl(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """The reference point z0 as KTO estimates it: ``max(0, mean(pi - pi_ref))`` over the
    batch's mismatched pairs, detached (a scalar)."""
    return (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)


def bco_delta(mean: float, count: int, batch_mean: float, batch_count: int) -> tuple[float, int]:
    """BCO's reward shift, the running mean of the rewards ``beta r`` over every example
    trained on so far: ``(mean, count)`` updated with a batch of ``batch_count`` rewards whose
    mean is ``batch_mean`` (every example weighs the same, as TRL's BCOTrainer keeps it)."""
    total = count + batch_count
    return mean + (batch_mean - mean) * batch_count / max(total, 1), total


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor | float = 0.0, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto", delta: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses ``[n]`` and metrics. ``desirable`` is a bool ``[n]``; ``kl`` is
    z0 from :func:`kto_kl` (used by ``kto`` only); ``delta`` BCO's reward shift (used by
    ``bco`` only, which adds the metric ``delta``).

    Metrics (per example, averaged by the loop): ``rewards`` (beta r), ``desirable`` (1 or
    0), ``rewards/desirable_sum`` and ``rewards/undesirable_sum`` (beta r on one class, 0 on
    the other: divided by the class fraction they give the class means) and ``kl``.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, not {loss_type!r}")
    logratios = policy_logps - ref_logps
    kl = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device)
    if loss_type == "kto":
        good = 1 - torch.sigmoid(beta * (logratios - kl))
        bad = 1 - torch.sigmoid(beta * (kl - logratios))
    elif loss_type == "bco":
        shifted = beta * logratios - delta
        good, bad = -F.logsigmoid(shifted), -F.logsigmoid(-shifted)
    else:
        good = 1 - torch.sigmoid(beta * logratios)
        bad = torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    rewards = (beta * logratios).detach()
    d = desirable.to(rewards.dtype)
    metrics = {"rewards": rewards, "desirable": d, "rewards/desirable_sum": rewards * d,
               "rewards/undesirable_sum": rewards * (1 - d), "kl": kl.detach().expand_as(rewards),
               "logps": policy_logps.detach()}
    if loss_type == "bco":
        metrics["delta"] = torch.full_like(rewards, float(delta))
    return losses, metrics


def balanced_weights(n_desirable: int, n_undesirable: int, desirable_weight: float | None,
                     undesirable_weight: float | None) -> tuple[float, float]:
    """Class weights with ``lambda_D n_D = lambda_U n_U`` (the lower end of the KTO paper's
    recommended ``lambda_D n_D / (lambda_U n_U)`` in ``[1, 4/3]``; eq. 8 as TRL cites it) for
    those not given: with neither
    given, the minority class is weighted up and the majority keeps 1."""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    if desirable_weight is None and undesirable_weight is None:
        return (n_u / n_d, 1.0) if n_d < n_u else (1.0, n_d / n_u)
    if desirable_weight is None:
        return undesirable_weight * n_u / n_d, undesirable_weight
    if undesirable_weight is None:
        return desirable_weight, desirable_weight * n_d / n_u
    return desirable_weight, undesirable_weight
