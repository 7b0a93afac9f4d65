"""One function per DPO-family loss: per-pair losses ``[n]`` from per-pair tensors.

Notation (as in :mod:`.dpo`): ``cs``, ``rs`` are the chosen and rejected *scores* (the
log-ratios ``log pi/pi_ref`` of each completion, or their f-divergence transform, see
:func:`.dpo.f_scores`); ``delta = cs - rs``; ``cl``, ``rl`` the plain log-ratios; ``pc``,
``pr`` policy and ``rc``, ``rr`` reference log-prob sums; ``nc``, ``nr`` completion token
counts. ``eps`` is the label-smoothing (assumed flip) rate. Each function is the equation
of its paper as TRL 1.16 (``DPOTrainer._compute_loss``) implements it, which the parity
tests in ``tests/test_losses_dpo_family.py`` check to 1e-5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sigmoid(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta delta)``."""
    return -F.logsigmoid(beta * delta)


def cdpo(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the
    expected DPO loss when labels flip with probability eps:
    ``-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)``."""
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


def robust(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """rDPO (Chowdhury et al. 2024, eq. 8), unbiased under flip rate eps:
    ``[-(1 - eps) log sigmoid(beta delta) + eps log sigmoid(-beta delta)] / (1 - 2 eps)``."""
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def hinge(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF (Zhao et al. 2023, eq. 2 with the reference log-ratio): ``max(0, 1 - beta delta)``."""
    return torch.relu(1 - beta * delta)


def ipo(cs, rs, nc, nr, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, tau = beta) on per-token averaged scores, as the
    authors' results and TRL use: ``(cs/nc - rs/nr - 1/(2 beta))^2``."""
    return (cs / nc.clamp(min=1) - rs / nr.clamp(min=1) - 1 / (2 * beta)) ** 2


def sigmoid_norm(cs, rs, nc, nr, beta: float) -> torch.Tensor:
    """Length-normalised DPO (as TRL's ``sigmoid_norm``; cf. R-DPO, Park et al. 2024):
    ``-log sigmoid(beta (cs/nc - rs/nr))``."""
    return -F.logsigmoid(beta * (cs / nc.clamp(min=1) - rs / nr.clamp(min=1)))


def exo_pair(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, eq. 16, K = 2): ``KL(q || p)`` with
    ``q = (sigmoid(beta delta), sigmoid(-beta delta))`` and the smoothed labels
    ``p = (1 - eps, eps)``; eps must be > 0 (the paper uses 1e-3)."""
    z = beta * delta
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + \
        torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def nca_pair(cl, rl, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment", pairwise form):
    ``-log sigmoid(beta cl) - 1/2 log sigmoid(-beta cl) - 1/2 log sigmoid(-beta rl)``."""
    return -F.logsigmoid(beta * cl) - 0.5 * F.logsigmoid(-beta * cl) - 0.5 * F.logsigmoid(-beta * rl)


def bco_pair(cl, rl, beta: float) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, eq. 7 without the reward shift, as TRL 1.16):
    ``-log sigmoid(beta cl) - log sigmoid(-beta rl)``: each side is classified alone."""
    return -F.logsigmoid(beta * cl) - F.logsigmoid(-beta * rl)


def sppo_hard(cl, rl, beta: float) -> torch.Tensor:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities (1 for the chosen,
    0 for the rejected): ``(cl - 1/(2 beta))^2 + (rl + 1/(2 beta))^2``."""
    return (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2


def aot(pc, pr, rc, rr, beta: float, eps: float) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal
    Transport"): the policy's and the reference's chosen-minus-rejected log-ratios are
    each *sorted over the batch* and matched by rank, then smoothed DPO on the gaps. The
    loss of row i belongs to the i-th order statistic, not to pair i: it is a batch
    loss (the trainer's batch is one forward pass, as TRL's is one device batch)."""
    gap = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    return cdpo(gap, beta, eps)


def aot_unpaired(cl, rl, beta: float, eps: float) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): chosen and rejected log-ratios sorted over the
    batch separately and matched by rank (first-order stochastic dominance of the chosen
    reward distribution), then smoothed DPO on the gaps. A batch loss, as :func:`aot`."""
    gap = torch.sort(cl, dim=0).values - torch.sort(rl, dim=0).values
    return cdpo(gap, beta, eps)


def apo_zero(cl, rl, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7), when the chosen answers are better than
    the model's own: ``1 - sigmoid(beta cl) + sigmoid(beta rl)``."""
    return 1 - torch.sigmoid(beta * cl) + torch.sigmoid(beta * rl)


def apo_down(cl, rl, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8), when the chosen answers are worse than
    the model's own: ``sigmoid(beta cl) + 1 - sigmoid(beta (cl - rl))``."""
    return torch.sigmoid(beta * cl) + 1 - torch.sigmoid(beta * (cl - rl))


def discopop(delta: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, eq. 5): with
    ``z = beta delta`` and ``m = sigmoid(z / tau)``,
    ``(1 - m) * -log sigmoid(z) + m * exp(-z)``."""
    z = beta * delta
    m = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m


def sft(pc_full, nc_mean: torch.Tensor | float) -> torch.Tensor:
    """NLL of the chosen completions per token *over the batch* (as TRL's ``sft``: the
    summed chosen log-probs over the batch's chosen token count). Per pair:
    ``-pc / mean(nc)``, whose batch mean is ``-sum(pc) / sum(nc)``. ``nc_mean`` is the
    mean chosen length over the whole batch (the trainer passes the step's)."""
    return -pc_full / nc_mean


def simpo(pc, pr, nc, nr, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:
    ``-log sigmoid(beta (pc/nc - pr/nr) - gamma)``."""
    return -F.logsigmoid(beta * (pc / nc.clamp(min=1) - pr / nr.clamp(min=1)) - gamma)
