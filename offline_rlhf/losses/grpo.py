"""Off-policy group policy gradient: GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline.

Notation: prompt q has a group of G stored responses o_1..o_G with rewards r_1..r_G,
sampled by a behaviour policy mu whose per-token log-probs are stored
(``behaviour_logps``); pi is the policy being trained, ref the reference whose per-token
log-probs are stored too (``ref_logps``). For token t of response i the log-ratio is
``l_it = log pi(o_it | q, o_i<t) - log mu(o_it | q, o_i<t)``.

Advantages (one per response, shared by its tokens; :func:`advantages`):

- ``grpo``: ``(r_i - mean(r)) / (std(r) + eps)`` over the group (Shao et al. 2024,
  DeepSeekMath, sec. 4.1.2, outcome supervision). std with Bessel's correction and
  eps = 1e-4, as TRL and OpenRLHF compute it.
- ``dr_grpo``: ``r_i - mean(r)`` (Liu et al. 2025, "Understanding R1-Zero-Like Training",
  Dr. GRPO: no std, which biases toward too easy and too hard questions).
- ``rloo``: ``r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))`` (Ahmadian et al.
  2024, "Back to Basics", the REINFORCE leave-one-out estimator).
- ``reinforce_pp``: ``a_i = r_i - mean(r)`` within the group, then
  ``(a_i - mean_B(a)) / (std_B(a) + eps)`` over the whole batch B (Hu et al. 2025,
  REINFORCE++-baseline).

Groups whose rewards are all equal (or of one response) carry no signal: DAPO's dynamic
sampling (Yu et al. 2025) drops them (:func:`informative_groups`).

Importance ratio against the stored behaviour policy (:func:`log_importance`):
``token``: ``rho_it = exp(l_it)`` (PPO/GRPO); ``sequence``: ``s_i = exp(mean_t l_it)``,
the length-normalised sequence ratio of GSPO (Zheng et al. 2025, "Group Sequence Policy
Optimization"), the same for every token of o_i; ``none``: the ratio is held at 1 with
the on-policy gradient (``exp(log pi - sg(log pi))``): the data are treated as if pi had
sampled them (plain REINFORCE), for ablations only.

Per-token objectives (to minimise), with A the advantage:

- ``clip`` (PPO's clipped surrogate, Schulman et al. 2017, eq. 7, with DAPO's decoupled
  bounds, "clip-higher"): ``-min(min(rho, C) * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)``;
  C caps the unclipped ratio, which bounds the loss of negative-advantage tokens whose
  ratio has grown (dual-clip PPO, Ye et al. 2020; TRL's ``delta``). C = inf is PPO.
- ``truncate``: ``-sg(min(rho, C)) * A * log pi``, the policy gradient with truncated
  importance weights (IMPALA, Espeholt et al. 2018, sec. 4.2: rho_bar = min(C, pi/mu);
  CISPO, MiniMax-M1 2025). Every token keeps a gradient; its weight is at most C.

Tokens whose ratio leaves ``[band_low, band_high]`` can be masked out of the policy
term (:func:`band_mask`; stale tokens whose ratio says the policy has moved too far).
KL to the reference: Schulman's k3 estimator ``exp(ref - log pi) - (ref - log pi) - 1``
per token (DeepSeekMath eq. 4), added with coefficient beta (0 allowed).

Aggregation (:func:`aggregate`): per-sequence losses whose mean over one optimiser
step's sequences is the step's loss: ``sequence_mean`` (GRPO eq. 3: each response's
token mean, then the mean over responses), ``token_mean`` (DAPO's token-level loss: the
sum over all the step's tokens over their number; the caller passes the step's mean
response length), ``constant`` (Dr. GRPO: the sum over tokens over a constant L, e.g.
the generation's max_new_tokens).

Staleness: ``(rho - 1) - log rho`` per token is k3 with the roles swapped: under samples
from mu its mean estimates KL(mu || pi), how far the policy has moved from the one that
sampled the data (:func:`staleness_kl`).
"""

from __future__ import annotations

import math

import torch

from .common import masked_mean

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
IMPORTANCE = ("token", "sequence", "none")
OBJECTIVES = ("clip", "truncate")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


# --------------------------------------------------------------------------- advantages

def group_sums(x: torch.Tensor, group_ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum of ``x`` over each group: ``[n_groups]`` (group ids are 0..n_groups-1)."""
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, group_ids, x)


def group_mean_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response: its group's mean reward, std (Bessel-corrected; 0 for a group of
    one) and size."""
    n_groups = int(group_ids.max()) + 1 if len(group_ids) else 0
    count = group_sums(torch.ones_like(rewards), group_ids, n_groups)
    mean = group_sums(rewards, group_ids, n_groups) / count.clamp(min=1)
    sq = group_sums((rewards - mean[group_ids]) ** 2, group_ids, n_groups)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return mean[group_ids], std[group_ids], count[group_ids]


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within each group (DeepSeekMath sec. 4.1.2)."""
    mean, std, _ = group_mean_std(rewards, group_ids)
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``r - mean`` within each group (Dr. GRPO)."""
    mean, _, _ = group_mean_std(rewards, group_ids)
    return rewards - mean


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``r_i`` minus the mean of the other responses of its group (RLOO); 0 for a group
    of one (no baseline)."""
    mean, _, count = group_mean_std(rewards, group_ids)
    others = (mean * count - rewards) / (count - 1).clamp(min=1)
    return torch.where(count > 1, rewards - others, torch.zeros_like(rewards))


def reinforce_pp_advantages(rewards: torch.Tensor, group_ids: torch.Tensor,
                            eps: float = 1e-4) -> torch.Tensor:
    """Group mean subtracted, then normalised over the whole batch (REINFORCE++-baseline;
    batch std with Bessel's correction)."""
    centred = dr_grpo_advantages(rewards, group_ids)
    if len(centred) < 2:
        return centred - centred.mean()
    return (centred - centred.mean()) / (centred.std() + eps)


def advantages(rewards: torch.Tensor, group_ids: torch.Tensor, kind: str = "grpo",
               eps: float = 1e-4) -> torch.Tensor:
    """One advantage per response (see the module docstring for each ``kind``)."""
    if kind == "grpo":
        return grpo_advantages(rewards, group_ids, eps)
    if kind == "dr_grpo":
        return dr_grpo_advantages(rewards, group_ids)
    if kind == "rloo":
        return rloo_advantages(rewards, group_ids)
    if kind == "reinforce_pp":
        return reinforce_pp_advantages(rewards, group_ids, eps)
    raise ValueError(f"advantage must be one of {ADVANTAGES}, not {kind!r}")


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Per response: True when its group's rewards are not all equal (DAPO's dynamic
    sampling keeps only these groups; a group of one is never informative)."""
    n_groups = int(group_ids.max()) + 1 if len(group_ids) else 0
    big = torch.finfo(rewards.dtype).max
    kw = {"dtype": rewards.dtype, "device": rewards.device}
    hi = torch.full((n_groups,), -big, **kw).scatter_reduce(0, group_ids, rewards, "amax")
    lo = torch.full((n_groups,), big, **kw).scatter_reduce(0, group_ids, rewards, "amin")
    return (hi - lo > tol)[group_ids]


# --------------------------------------------------------------------------- ratios

def log_importance(logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor,
                   level: str = "token") -> torch.Tensor:
    """``log rho`` per token ``[B, T]``: the token log-ratio (``token``), its mean over
    the response for every token (``sequence``, GSPO), or ``log pi - sg(log pi)``
    (``none``: value 0, the on-policy gradient)."""
    if level == "token":
        return logps - behaviour_logps
    if level == "sequence":
        seq = masked_mean(logps - behaviour_logps, mask)
        return seq[:, None].expand_as(logps)
    if level == "none":
        return logps - logps.detach()
    raise ValueError(f"importance must be one of {IMPORTANCE}, not {level!r}")


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.2,
                      eps_high: float = 0.2, cap: float = math.inf) -> torch.Tensor:
    """Per-token ``-min(min(rho, C) A, clip(rho, 1 - eps_low, 1 + eps_high) A)``."""
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    capped = ratio.clamp(max=cap) if math.isfinite(cap) else ratio
    return -torch.minimum(capped * adv, clipped * adv)


def truncated_surrogate(ratio: torch.Tensor, adv: torch.Tensor, logps: torch.Tensor,
                        cap: float = 1.0) -> torch.Tensor:
    """Per-token ``-sg(min(rho, C)) A log pi``: gradient ``-min(rho, C) A grad log pi``."""
    return -ratio.detach().clamp(max=cap) * adv * logps


def clip_active(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float,
                cap: float = math.inf) -> torch.Tensor:
    """Tokens of :func:`clipped_surrogate` that give no gradient (a constant branch is
    taken): with A > 0, ratio above min(C, 1 + eps_high); with A < 0, ratio below
    1 - eps_low or above max(C, 1 + eps_high) (the dual-clip cap C); never with A = 0."""
    up = 1 + eps_high
    return (((adv > 0) & (ratio > min(cap, up)))
            | ((adv < 0) & ((ratio < 1 - eps_low) | (ratio > max(cap, up)))))


def band_mask(ratio: torch.Tensor, low: float = 0.0, high: float = math.inf) -> torch.Tensor:
    """1 where ``low <= rho <= high``, else 0 (the token leaves the policy term)."""
    return ((ratio >= low) & (ratio <= high)).to(ratio.dtype)


# --------------------------------------------------------------------------- KL, staleness

def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1``."""
    x = ref_logps - logps
    return torch.exp(x) - x - 1


def staleness_kl(logps: torch.Tensor, behaviour_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(mu || pi) from tokens sampled by mu:
    ``(rho - 1) - log rho`` with ``rho = pi / mu``; non-negative, 0 when pi = mu."""
    log_rho = logps - behaviour_logps
    return torch.expm1(log_rho) - log_rho


# --------------------------------------------------------------------------- aggregation

def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token_mean",
              length: float | None = None) -> torch.Tensor:
    """Per-sequence losses whose mean over a step's sequences is the step's loss.

    ``sequence_mean``: the sequence's token mean. ``token_mean``: the token sum over
    ``length`` = the step's mean response length (so the step's mean is the sum over all
    its tokens over their number). ``constant``: the token sum over ``length`` = a fixed
    L (Dr. GRPO)."""
    m = mask.to(per_token.dtype)
    sums = (per_token * m).sum(-1)
    if how == "sequence_mean":
        return sums / m.sum(-1).clamp(min=1)
    if how in ("token_mean", "constant"):
        if not length or length <= 0:
            raise ValueError(f"aggregation {how} needs a positive length, got {length}")
        return sums / length
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {how!r}")


def grpo_loss(logps: torch.Tensor, behaviour_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, ref_logps: torch.Tensor | None = None, kl_coef: float = 0.0,
              objective: str = "clip", importance: str = "token", eps_low: float = 0.2,
              eps_high: float = 0.2, ratio_cap: float = math.inf, band_low: float = 0.0,
              band_high: float = math.inf, aggregation: str = "token_mean",
              length: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sequence losses ``[B]`` and per-sequence metrics over ``[B, T]`` token tensors.

    ``logps``: the policy's per-token log-probs (with gradient); ``behaviour_logps`` and
    ``ref_logps`` the stored ones; ``advantages`` ``[B]``; ``mask`` marks real response
    tokens. Metrics are per sequence, as sums over its tokens unless named otherwise:
    ``tokens``, ``clipped`` (tokens in the clipped branch, or truncated: rho > C),
    ``masked`` (tokens outside the band), ``ratio``/``ratio_sq`` (sums of the true
    importance weight pi/mu and its square, whatever ``importance`` is), ``ratio/max``,
    ``staleness_kl`` (KL(mu || pi) summed), ``kl_ref`` (k3 to the reference, summed),
    ``advantage``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if kl_coef and ref_logps is None:
        raise ValueError("kl_coef > 0 needs ref_logps")
    m = mask.to(logps.dtype)
    adv = advantages[:, None].to(logps.dtype)
    ratio = torch.exp(log_importance(logps, behaviour_logps, mask, importance))
    if objective == "clip":
        per_token = clipped_surrogate(ratio, adv, eps_low, eps_high, ratio_cap)
        clipped = clip_active(ratio.detach(), adv, eps_low, eps_high, ratio_cap)
    else:
        per_token = truncated_surrogate(ratio, adv, logps, ratio_cap)
        clipped = ratio.detach() > ratio_cap * (1 + 1e-6)  # not float noise around a cap of 1
    keep = band_mask(ratio.detach(), band_low, band_high)
    per_token = per_token * keep
    if kl_coef:
        per_token = per_token + kl_coef * k3_kl(logps, ref_logps)
    losses = aggregate(per_token, m, aggregation, length)
    with torch.no_grad():
        seq_ratio = torch.exp(log_importance(logps, behaviour_logps, mask,
                                             "sequence" if importance == "sequence" else "token"))
        metrics = {"tokens": m.sum(-1), "clipped": (clipped * m).sum(-1),
                   "masked": ((1 - keep) * m).sum(-1), "ratio": (seq_ratio * m).sum(-1),
                   "ratio_sq": (seq_ratio ** 2 * m).sum(-1),
                   "ratio/max": seq_ratio.masked_fill(m == 0, 0.0).amax(-1),
                   "staleness_kl": (staleness_kl(logps, behaviour_logps) * m).sum(-1),
                   "advantage": advantages.detach().to(logps.dtype)}
        if ref_logps is not None:
            metrics["kl_ref"] = (k3_kl(logps, ref_logps) * m).sum(-1)
    return losses, metrics
