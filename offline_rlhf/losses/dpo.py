"""The DPO family of preference losses: every TRL 1.16 ``loss_type``, ours, and their sums.

Notation: for a pair (prompt x, chosen y_w, rejected y_l), ``pi_w = log pi(y_w|x)`` summed
over the completion tokens, ``ref_w`` the same under the reference model, likewise
``pi_l`` and ``ref_l``; the log-ratios ``cl = pi_w - ref_w``, ``rl = pi_l - ref_l``.
Each loss is one function in :mod:`.dpo_terms` (its paper and equation in the docstring);
:func:`dpo_loss` evaluates one or several of them on the same pairs and sums them with
weights (MPO; Wang et al. 2024, "Mixed Preference Optimization", eq. 2, which combines
``sigmoid``, ``bco_pair`` and ``sft``).

- **f-divergences** (f-DPO; Wang et al. 2023, "Beyond Reverse KL", Thm. 1): the scores
  ``cs``, ``rs`` that ``delta = cs - rs`` compares are ``f'(pi/pi_ref)`` of each log-ratio
  (:func:`f_scores`). Reverse KL (``f'(t) = log t``) is plain DPO. The reparameterisation
  leaves a ``beta log Z(x)`` that cancels only in a chosen-minus-rejected difference, so
  only the losses of ``F_DIVERGENCE_LOSSES`` take another divergence.
- **LD-DPO** (Liu et al. 2024, "Eliminating Biased Length Reliance of DPO via Down-Sampled
  KL Divergence", eq. 9): completion tokens past the shorter completion's length count
  with weight alpha in the log-prob sums (:func:`ld_token_weights`); the caller sums
  with these weights, for policy and reference alike.
- :func:`nll_term` is the per-token NLL of the chosen response, added with weight alpha
  by the trainer (RPO; Pang et al. 2024, eq. 3).

Batch-level losses: ``aot`` and ``aot_unpaired`` sort over the pairs they are given, and
``sft`` normalises by the mean chosen length of the batch (``sft_mean_tokens``, else the
given pairs'); the trainer gives one forward pass's pairs to the first, the step's mean
length to the second (so accumulation does not change it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import dpo_terms as T

# TRL 1.16 DPOConfig.loss_type names, then ours
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LOSS_TYPES = TRL_LOSS_TYPES + ("cdpo", "simpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# losses built on delta = cs - rs only (TRL's list, plus our cdpo, which is one too)
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                       "sft", "cdpo")
REFERENCE_FREE = ("simpo", "sft")          # need no reference log-probs
NEED_LENGTHS = ("ipo", "sigmoid_norm", "simpo", "sft")
SMOOTHED = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired")   # read label_smoothing


def f_scores(logratios: torch.Tensor, divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """``f'(t)`` at ``t = pi/pi_ref = exp(logratios)`` (f-DPO, Wang et al. 2023, Table 1):
    reverse KL ``log t``; forward KL ``1 - 1/t``; Jensen-Shannon ``log(2t / (1 + t))``;
    alpha-divergence ``(t^(alpha-1) - 1) / (alpha - 1)`` (its exponent clamped at 80, as
    TRL does, so that ``exp`` stays finite; alpha = 1 is reverse KL)."""
    if divergence == "reverse_kl":
        return logratios
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        return (torch.exp(torch.clamp((alpha - 1.0) * logratios, max=80.0)) - 1.0) / (alpha - 1.0)
    raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, not {divergence!r}")


def ld_token_weights(position: torch.Tensor, chosen_len: torch.Tensor, rejected_len: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """LD-DPO weight of a completion token at 0-based ``position`` in its completion, for
    a pair whose completions have ``chosen_len`` and ``rejected_len`` tokens: 1 within
    the shorter length (the shared part), alpha beyond it (the verbose tail)."""
    shared = torch.minimum(chosen_len, rejected_len)
    return torch.where(position < shared, torch.ones_like(position, dtype=torch.float64),
                       torch.full_like(position, alpha, dtype=torch.float64))


def parse_losses(names: str | Sequence[str], weights: Sequence[float] | None = None
                 ) -> list[tuple[str, float]]:
    """``"sigmoid,bco_pair"`` or a list, with equal weights 1 unless given: (name, weight)."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in LOSS_TYPES]
    if bad or not names:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {bad[0] if bad else ''!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type names a loss twice: {','.join(names)}")
    weights = [1.0] * len(names) if weights is None or len(weights) == 0 else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} weights for {len(names)} losses")
    return list(zip(names, map(float, weights)))


def _term(name, *, pc, pr, rc, rr, cs, rs, cl, rl, nc, nr, beta, eps, gamma, tau, pc_full, nc_mean):
    delta = cs - rs
    table = {
        "sigmoid": lambda: T.sigmoid(delta, beta), "hinge": lambda: T.hinge(delta, beta),
        "cdpo": lambda: T.cdpo(delta, beta, eps), "robust": lambda: T.robust(delta, beta, eps),
        "exo_pair": lambda: T.exo_pair(delta, beta, eps),
        "discopop": lambda: T.discopop(delta, beta, tau),
        "ipo": lambda: T.ipo(cs, rs, nc, nr, beta),
        "sigmoid_norm": lambda: T.sigmoid_norm(cs, rs, nc, nr, beta),
        "nca_pair": lambda: T.nca_pair(cl, rl, beta), "bco_pair": lambda: T.bco_pair(cl, rl, beta),
        "sppo_hard": lambda: T.sppo_hard(cl, rl, beta),
        "apo_zero": lambda: T.apo_zero(cl, rl, beta), "apo_down": lambda: T.apo_down(cl, rl, beta),
        "aot": lambda: T.aot(pc, pr, rc, rr, beta, eps),
        "aot_unpaired": lambda: T.aot_unpaired(cl, rl, beta, eps),
        "sft": lambda: T.sft(pc_full, nc_mean),
        "simpo": lambda: T.simpo(pc, pr, nc, nr, beta, gamma),
    }
    return table[name]()


def _check(terms, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, f_divergence, eps):
    names = [n for n, _ in terms]
    for n in names:
        if n in NEED_LENGTHS and (chosen_lengths is None or rejected_lengths is None):
            raise ValueError(f"{n} needs chosen_lengths and rejected_lengths")
        if n not in REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
            raise ValueError(f"{n} needs reference log-probs")
    if f_divergence != "reverse_kl":
        if f_divergence not in F_DIVERGENCES:
            raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, not {f_divergence!r}")
        other = [n for n in names if n not in F_DIVERGENCE_LOSSES]
        if other:
            raise ValueError(f"f_divergence {f_divergence} is defined only for {', '.join(F_DIVERGENCE_LOSSES)}"
                             f", not {', '.join(other)}")
    if "exo_pair" in names and not 0 < eps < 1:
        raise ValueError("exo_pair needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3)")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
             beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
             loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             simpo_gamma: float = 0.5, discopop_tau: float = 0.05, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5, policy_chosen_full_logps: torch.Tensor | None = None,
             sft_mean_tokens: torch.Tensor | float | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses ``[n]`` (the weighted sum of the ``loss_type`` terms) and per-pair
    metrics (each ``[n]``).

    ``policy_chosen_full_logps``: the chosen sums without LD-DPO weighting, for ``sft``
    (default: ``policy_chosen_logps``). Metrics: ``rewards/chosen`` = beta * cl (for a
    SimPO-only loss, beta * pi_w / |y_w|), ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies`` (1 when the chosen reward is higher), ``logps/chosen`` and
    ``logps/rejected`` (summed log-probs), and ``loss/NAME`` per term of a combination.
    """
    terms = parse_losses(loss_type, loss_weights)
    _check(terms, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
           f_divergence, label_smoothing)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    reference_free = all(n in REFERENCE_FREE for n, _ in terms)
    rc = torch.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps
    rr = torch.zeros_like(pr) if ref_rejected_logps is None else ref_rejected_logps
    cl, rl = pc - rc, pr - rr
    pc_full = pc if policy_chosen_full_logps is None else policy_chosen_full_logps
    nc_mean = chosen_lengths.mean().clamp(min=1) if sft_mean_tokens is None and chosen_lengths is not None \
        else sft_mean_tokens
    kw = dict(pc=pc, pr=pr, rc=rc, rr=rr, cs=f_scores(cl, f_divergence, f_alpha),
              rs=f_scores(rl, f_divergence, f_alpha), cl=cl, rl=rl, nc=chosen_lengths,
              nr=rejected_lengths, beta=beta, eps=label_smoothing, gamma=simpo_gamma,
              tau=discopop_tau, pc_full=pc_full, nc_mean=nc_mean)
    losses, parts = 0.0, {}
    for name, weight in terms:
        part = _term(name, **kw)
        parts[f"loss/{name}"] = part.detach()
        losses = losses + weight * part
    if reference_free and "simpo" in (n for n, _ in terms):
        chosen_scores, rejected_scores = pc / chosen_lengths.clamp(min=1), pr / rejected_lengths.clamp(min=1)
    else:
        chosen_scores, rejected_scores = cl, rl
    chosen_rewards = (beta * chosen_scores).detach()
    rejected_rewards = (beta * rejected_scores).detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
    }
    if len(terms) > 1:
        metrics.update(parts)
    return losses, metrics


def nll_term(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of the chosen response, per token (RPO eq. 3)."""
    return -chosen_logps / chosen_lengths.clamp(min=1)
