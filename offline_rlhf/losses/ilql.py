"""ILQL: Implicit Language Q-Learning (Snell et al. 2022), one pure function per term.

Tokens are actions; the state s_t is the prompt plus the response tokens before t.
With online heads Q1, Q2, target heads Q1', Q2' (Polyak averages of the online ones)
and a value head V:

- TD (eq. 2): ``(Q_i(s_t, a_t) - [r_t + gamma * V(s_{t+1}) * (1 - done_t)])^2``, the
  target held fixed; at the terminal token ``done_t = 1``.
- Expectile value (eq. 3): ``|tau - 1(u < 0)| * u^2`` with
  ``u = min(Q1', Q2')(s_t, a_t) - V(s_t)``; tau = 0.5 is half the squared error.
- CQL (eq. 4): cross-entropy of Q(s_t, .) over the vocabulary against the taken token.
- AWAC: ``-exp(beta * (min Q' - V)) * log pi(a_t | s_t)``, the weight clipped; beta = 0
  is behaviour cloning.

The hyper-parameters have no defaults here: the trainer passes them from ``ILQLTrainConfig``,
whose defaults follow the paper and the public reference implementation (tau 0.7, gamma
0.99, cql 0.1, awac 1, Polyak alpha 0.001). Value-guided decoding samples from
``logits + beta * (min Q'(s, .) - V(s))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import masked_mean  # noqa: F401  (re-exported: the ILQL terms are averaged with it)


def next_values(v: torch.Tensor) -> torch.Tensor:
    """``V(s_{t+1})`` at each position t of per-token values ``v`` [B, T]: ``v`` shifted one
    token left, 0 after the last position (its ``done`` multiplies it away), detached."""
    return torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1).detach()


def td_targets(rewards: torch.Tensor, v_next: torch.Tensor, done: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """r_t + gamma * V(s_{t+1}) * (1 - done_t), detached; ``v_next`` from :func:`next_values`."""
    return (rewards + gamma * v_next * (1.0 - done)).detach()


def advantage(target_q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``A(s_t, a_t) = min_i Q_i'(s_t, a_t) - V(s_t)``: positive where the taken token is
    better than the state's value (the AWAC weight's exponent)."""
    return target_q - v


def td_loss(q_taken: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token squared TD error of one Q head."""
    return (q_taken - targets.detach()) ** 2


def expectile_loss(v: torch.Tensor, target_q: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-token expectile regression of V toward the (detached) target Q."""
    u = target_q.detach() - v
    weight = torch.abs(tau - (u < 0).to(u.dtype))
    return weight * u ** 2


def cql_loss(q_all: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of Q over the vocabulary against the taken token."""
    return F.cross_entropy(q_all.float(), actions, reduction="none")


def awac_loss(logp_taken: torch.Tensor, advantage: torch.Tensor, beta: float,
              max_weight: float = 100.0) -> torch.Tensor:
    """Per-token advantage-weighted log-likelihood; beta = 0 is behaviour cloning."""
    weight = torch.exp(beta * advantage.detach()).clamp(max=max_weight)
    return -weight * logp_taken


@torch.no_grad()
def polyak_update(target: torch.nn.Module, online: torch.nn.Module, alpha: float) -> None:
    """target <- alpha * online + (1 - alpha) * target, parameter by parameter."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(1.0 - alpha).add_(o.detach(), alpha=alpha)
