import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from offline_rlhf.losses.grpo import (
    advantages,
    aggregate,
    band_mask,
    clip_active,
    clipped_surrogate,
    dr_grpo_advantages,
    group_mean_std,
    group_sums,
    grpo_advantages,
    grpo_loss,
    informative_groups,
    k3_kl,
    log_importance,
    reinforce_pp_advantages,
    rloo_advantages,
    staleness_kl,
    truncated_surrogate,
)


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


# group 0: four responses, rewards 1 0 0 1; group 1: all equal; group 2: a single response
REWARDS = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0)
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])


def test_group_statistics_hand_computed():
    mean, std, count = group_mean_std(REWARDS, GROUPS)
    assert mean.tolist() == [0.5] * 4 + [2.0] * 3 + [5.0]
    assert std[:4].tolist() == pytest.approx([math.sqrt(1 / 3)] * 4)  # Bessel: sum 4 * 0.25 / 3
    assert std[4:].tolist() == [0.0] * 4 and count.tolist() == [4] * 4 + [3] * 3 + [1]
    _, pair_std, _ = group_mean_std(t(1.0, 3.0), torch.tensor([0, 0]))   # (1 + 1) / (2 - 1)
    assert pair_std.tolist() == pytest.approx([math.sqrt(2)] * 2)
    assert rloo_advantages(t(1.0, 3.0), torch.tensor([0, 0])).tolist() == [-2.0, 2.0]
    assert reinforce_pp_advantages(t(4.0), torch.tensor([0])).tolist() == [0.0]
    # two responses are enough for a batch std: centred -1, 1 -> std sqrt(2)
    want = [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)]
    assert reinforce_pp_advantages(t(1.0, 3.0), torch.tensor([0, 0])).tolist() == pytest.approx(want)


def test_an_empty_batch_gives_empty_statistics_on_the_inputs_device():
    empty, no_ids = t(), torch.tensor([], dtype=torch.long)
    assert all(x.shape == (0,) for x in group_mean_std(empty, no_ids))
    assert informative_groups(empty, no_ids).shape == (0,)
    # the sums live where the rewards do (no host tensor mixed into a GPU batch)
    sums = group_sums(torch.ones(3, device="meta"), torch.tensor([0, 0, 1], device="meta"), 2)
    assert sums.device.type == "meta" and sums.shape == (2,)


def test_advantages_hand_computed():
    s = math.sqrt(1 / 3)
    assert grpo_advantages(REWARDS, GROUPS).tolist() == pytest.approx(
        [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0])
    assert dr_grpo_advantages(REWARDS, GROUPS).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    # leave-one-out: 1 - mean(0, 0, 1) = 2/3 = 4/3 * (1 - 0.5); a group of one has no baseline
    assert rloo_advantages(REWARDS, GROUPS).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    centred = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]  # batch mean 0, batch std sqrt(1/7)
    want = [c / (math.sqrt(1 / 7) + 1e-4) for c in centred]
    assert reinforce_pp_advantages(REWARDS, GROUPS).tolist() == pytest.approx(want)
    for kind, fn in (("grpo", grpo_advantages), ("rloo", rloo_advantages)):
        assert torch.equal(advantages(REWARDS, GROUPS, kind), fn(REWARDS, GROUPS))
    assert advantages(REWARDS, GROUPS).tolist() == pytest.approx(grpo_advantages(REWARDS, GROUPS).tolist())
    # eps reaches the normalised kinds: eps = 1 turns sqrt(1/3) into sqrt(1/3) + 1
    assert advantages(REWARDS, GROUPS, "grpo", eps=1.0).tolist() == pytest.approx(
        [0.5 / (s + 1), -0.5 / (s + 1), -0.5 / (s + 1), 0.5 / (s + 1), 0, 0, 0, 0])
    assert advantages(REWARDS, GROUPS, "reinforce_pp").tolist() == pytest.approx(want)
    assert advantages(REWARDS, GROUPS, "reinforce_pp", eps=1.0).tolist() == pytest.approx(
        [c / (math.sqrt(1 / 7) + 1) for c in centred])
    with pytest.raises(ValueError, match="advantage must be one of"):
        advantages(REWARDS, GROUPS, "ppo")


def test_informative_groups_are_the_ones_with_unequal_rewards():
    assert informative_groups(REWARDS, GROUPS).tolist() == [True] * 4 + [False] * 4
    # groups need not be contiguous
    assert informative_groups(t(1, 3, 1, 3), torch.tensor([0, 1, 0, 1])).tolist() == [False] * 4
    # tol = 0 asks for exact equality: equal rewards are still uninformative
    assert informative_groups(REWARDS, GROUPS, tol=0.0).tolist() == [True] * 4 + [False] * 4


def test_grpo_advantages_match_trl_formula():
    """TRL's GRPO: (r - group mean) / (nanstd(group) + 1e-4), nanstd with Bessel's correction."""
    from_trl = pytest.importorskip("trl.trainer.utils")
    r = torch.tensor([0.3, 1.0, 0.0, 0.7, 2.0, -1.0, 0.5, 0.5, 0.0, 1.0, 1.0, 0.25])
    g = torch.arange(3).repeat_interleave(4)
    grouped = r.view(3, 4)
    want = (r - grouped.mean(1).repeat_interleave(4)) / (from_trl.nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    assert torch.allclose(grpo_advantages(r, g), want, atol=1e-6)


# --------------------------------------------------------------------------- ratios and objectives

def _batch(seed=0, b=4, t_=5):
    gen = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(b, t_, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    behaviour = logps.detach() + 0.4 * torch.randn(b, t_, generator=gen, dtype=torch.float64)
    ref = logps.detach() + 0.3 * torch.randn(b, t_, generator=gen, dtype=torch.float64)
    mask = torch.ones(b, t_, dtype=torch.float64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)[:b]
    return logps, behaviour, ref, mask, adv


@pytest.mark.parametrize("objective", ["clip", "truncate"])
@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_behaviour_equal_to_policy_gives_ratio_one_and_the_on_policy_gradient(objective, importance, aggregation):
    logps, _, _, mask, adv = _batch()
    length = 3.0
    losses, m = grpo_loss(logps, logps.detach(), adv, mask, objective=objective, importance=importance,
                          eps_low=0.2, eps_high=0.28, aggregation=aggregation, length=length)
    assert torch.allclose(m["ratio"], m["tokens"]) and torch.all(m["clipped"] == 0)
    assert torch.allclose(m["staleness_kl"], torch.zeros(4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(losses.mean(), logps)
    # the on-policy objective: -A * log pi, aggregated the same way
    on_policy = aggregate(-adv[:, None] * logps, mask, aggregation, length).mean()
    (want,) = torch.autograd.grad(on_policy, logps)
    assert torch.allclose(grad, want, atol=1e-12)
    # and importance "none" is that same objective whatever the behaviour log-probs say
    _, behaviour, _, _, _ = _batch()
    none, _ = grpo_loss(logps, behaviour, adv, mask, objective=objective, importance="none",
                        aggregation=aggregation, length=length)
    (g_none,) = torch.autograd.grad(none.mean(), logps)
    assert torch.allclose(g_none, want, atol=1e-12)


def test_clipped_surrogate_hand_computed_with_clip_higher_and_cap():
    ratio = t(0.5, 0.9, 1.1, 1.25, 1.5, 0.5, 1.5, 4.0)
    adv = t(1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0)
    got = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28)
    # A > 0: -min(r, clip(r)) -> -0.5, -0.9, -1.1, -1.25, -1.28 ; A < 0: -min(-r, -clip(r)) = max(r, clip(r))
    assert got.tolist() == pytest.approx([-0.5, -0.9, -1.1, -1.25, -1.28, 0.8, 1.5, 4.0])
    capped = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28, cap=3.0)
    assert capped[-1].item() == pytest.approx(3.0) and capped[:-1].tolist() == pytest.approx(got[:-1].tolist())
    active = clip_active(ratio, adv, 0.2, 0.28)
    assert active.tolist() == [False, False, False, False, True, True, False, False]
    # at the bounds themselves both branches agree: not clipped
    assert clip_active(t(0.8, 1.28), t(-1.0, 1.0), 0.2, 0.28).tolist() == [False, False]
    assert clip_active(t(0.79, 1.29), t(-1.0, 1.0), 0.2, 0.28).tolist() == [True, True]
    # A = 0: both branches are 0, nothing clipped; a low ratio with A > 0 is never clipped
    assert clip_active(t(0.5, 1.5), t(0.0, 0.0), 0.2, 0.28).tolist() == [False, False]
    assert clip_active(t(0.5, 0.5), t(0.5, 1.0), 0.2, 0.28).tolist() == [False, False]


def test_clipped_tokens_have_no_gradient_and_the_others_the_ratio_gradient():
    logps, behaviour, _, mask, adv = _batch(seed=3)
    losses, m = grpo_loss(logps, behaviour, adv, mask, aggregation="constant", length=1.0)
    (grad,) = torch.autograd.grad(losses.sum(), logps)
    ratio = torch.exp(logps.detach() - behaviour)
    active = clip_active(ratio, adv[:, None].expand_as(ratio), 0.2, 0.2)
    want = torch.where(active, torch.zeros_like(ratio), -adv[:, None] * ratio) * mask  # d(r A)/dlogp = r A
    assert active[mask.bool()].any() and (~active[mask.bool()]).any()
    assert torch.allclose(grad, want, atol=1e-12)
    assert m["clipped"].sum().item() == (active.double() * mask).sum().item()


def test_truncated_weights_against_their_equation():
    logps, behaviour, _, mask, adv = _batch(seed=1)
    cap = 1.2
    losses, m = grpo_loss(logps, behaviour, adv, mask, objective="truncate", ratio_cap=cap,
                          aggregation="constant", length=1.0)
    ratio = torch.exp(logps.detach() - behaviour)
    weight = ratio.clamp(max=cap)
    want = (-(weight * adv[:, None] * logps.detach()) * mask).sum(-1)
    assert torch.allclose(losses.detach(), want, atol=1e-12)
    (grad,) = torch.autograd.grad(losses.sum(), logps)
    assert torch.allclose(grad, -weight * adv[:, None] * mask, atol=1e-12)
    assert m["clipped"].sum().item() == ((ratio > cap).double() * mask).sum().item()
    # below the cap the truncated gradient is the importance-weighted one: grad of -r A
    per_token = truncated_surrogate(torch.exp(logps - behaviour), adv[:, None], logps, cap=math.inf)
    (g_full,) = torch.autograd.grad((per_token * mask).sum(), logps)
    assert torch.allclose(g_full, -ratio * adv[:, None] * mask, atol=1e-12)


def test_sequence_ratio_is_the_length_normalised_gspo_ratio():
    logps, behaviour, _, mask, _ = _batch(seed=2)
    log_s = log_importance(logps, behaviour, mask, "sequence")
    for i in range(4):
        n = int(mask[i].sum())
        want = (logps[i, :n] - behaviour[i, :n]).sum() / n
        assert torch.allclose(log_s[i], want.expand(log_s.shape[1]))
    with pytest.raises(ValueError, match="importance must be one of"):
        log_importance(logps, behaviour, mask, "segment")


def test_band_mask_removes_tokens_from_the_policy_term_only():
    ratio = t(0.1, 0.5, 1.0, 2.0, 9.0)
    assert band_mask(ratio, 0.5, 2.0).tolist() == [0, 1, 1, 1, 0]
    logps, behaviour, ref, mask, adv = _batch(seed=4)
    out, m = grpo_loss(logps, behaviour, adv, mask, ref_logps=ref, kl_coef=0.1, band_low=0.9,
                       band_high=1.1, aggregation="constant", length=1.0)
    (grad,) = torch.autograd.grad(out.sum(), logps)
    r = torch.exp(logps.detach() - behaviour)
    outside = ((r < 0.9) | (r > 1.1)) & mask.bool()
    kl_grad = 0.1 * (1 - torch.exp(ref - logps.detach()))  # d k3 / d logp
    assert outside.any()
    assert torch.allclose(grad[outside], kl_grad[outside], atol=1e-12)
    assert m["masked"].sum().item() == outside.sum().item()


def test_all_equal_groups_contribute_nothing():
    logps = (-torch.rand(8, 4, dtype=torch.float64) * 2).requires_grad_(True)
    behaviour = logps.detach() - 0.2
    mask = torch.ones(8, 4, dtype=torch.float64)
    for kind in ("grpo", "dr_grpo", "rloo"):
        adv = advantages(REWARDS, GROUPS, kind)
        losses, _ = grpo_loss(logps, behaviour, adv, mask, aggregation="sequence_mean")
        (grad,) = torch.autograd.grad(losses.sum(), logps)
        uninformative = ~informative_groups(REWARDS, GROUPS)
        assert torch.all(grad[uninformative] == 0) and torch.any(grad[~uninformative] != 0)


def test_kl_estimators_hand_computed():
    logp, ref = t(-1.0, -2.0), t(-1.5, -2.0)
    # k3 with x = ref - logp = -0.5: exp(-0.5) + 0.5 - 1
    assert k3_kl(logp, ref).tolist() == pytest.approx([math.exp(-0.5) - 0.5, 0.0])
    # staleness with log rho = logp - behaviour = 0.5: (e^0.5 - 1) - 0.5
    assert staleness_kl(logp, t(-1.5, -2.0)).tolist() == pytest.approx([math.exp(0.5) - 1.5, 0.0])
    # k3 is unbiased for KL(mu || pi) when tokens come from mu: check on a small categorical
    mu, pi = t(0.5, 0.3, 0.2), t(0.2, 0.5, 0.3)
    est = (mu * staleness_kl(pi.log(), mu.log())).sum()
    assert est.item() == pytest.approx((mu * (mu / pi).log()).sum().item())


def test_aggregations_hand_computed():
    per_token = t(1.0, 2.0, 3.0, 4.0).view(2, 2)
    mask = t(1.0, 1.0, 1.0, 0.0).view(2, 2)
    assert aggregate(per_token, mask, "sequence_mean").tolist() == [1.5, 3.0]
    # token mean: mean over the step of sum / mean length (1.5) = (1 + 2 + 3) / 3 tokens
    assert aggregate(per_token, mask, "token_mean", length=1.5).mean().item() == pytest.approx(2.0)
    assert aggregate(per_token, mask, "constant", length=10).tolist() == [0.3, 0.3]
    with pytest.raises(ValueError, match="positive length"):
        aggregate(per_token, mask, "constant")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate(per_token, mask, "sum", length=1.0)
    # the loss keeps the per-token dtype whatever the mask's
    assert aggregate(per_token.to(torch.bfloat16), mask.float(), "sequence_mean").dtype == torch.bfloat16


# --------------------------------------------------------------------------- metrics and defaults

def _two_sequences():
    """Two responses, mask [[1, 1, 0], [1, 0, 0]]; ratios pi/mu 2, 0.5 | 0.5 on the real tokens
    (padding ratios 4, 3, 3 that nothing may count); ref - logp = 0, ln 2 | -ln 2 (padding 1)."""
    ln2 = math.log(2)
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.5, -0.7]], dtype=torch.float64)
    log_ratio = torch.tensor([[ln2, -ln2, math.log(4)], [-ln2, math.log(3), math.log(3)]], dtype=torch.float64)
    ref = logps + torch.tensor([[0.0, ln2, 1.0], [-ln2, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    return logps.requires_grad_(True), logps - log_ratio, ref, mask, t(1.0, -1.0)


def test_loss_and_metrics_hand_computed():
    logps, behaviour, ref, mask, adv = _two_sequences()
    ln2 = math.log(2)
    losses, m = grpo_loss(logps, behaviour, adv, mask, ref_logps=ref, kl_coef=0.1, band_high=1.5,
                          aggregation="sequence_mean")
    # seq 0 (A = 1): ratio 2 is clipped to 1.2 but leaves the band (> 1.5): 0; ratio 0.5: -0.5;
    # k3: 0 and e^ln2 - ln2 - 1. seq 1 (A = -1): ratio 0.5 -> -min(-0.5, -0.8) = 0.8; k3 0.5 + ln2 - 1
    assert losses.tolist() == pytest.approx([(-0.5 + 0.1 * (1 - ln2)) / 2, 0.8 + 0.1 * (ln2 - 0.5)])
    want = {"tokens": [2, 1], "clipped": [1, 1], "masked": [1, 0], "ratio": [2.5, 0.5],
            "ratio_sq": [4.25, 0.25], "ratio/max": [2, 0.5],
            "staleness_kl": [(1 - ln2) + (-0.5 + ln2), -0.5 + ln2],  # (r - 1) - ln r
            "kl_ref": [1 - ln2, ln2 - 0.5], "advantage": [1, -1]}
    assert set(m) == set(want)
    for key, value in want.items():
        assert m[key].shape == (2,) and m[key].tolist() == pytest.approx(value), key
    # without a reference there is no kl_ref
    _, m = grpo_loss(logps, behaviour, adv, mask, aggregation="sequence_mean")
    assert "kl_ref" not in m and m["ratio"].tolist() == pytest.approx([2.5, 0.5])


@pytest.mark.parametrize("importance", ["token", "sequence", "none"])
def test_ratio_metrics_report_the_importance_weight_in_use(importance):
    logps, behaviour, _, mask, adv = _two_sequences()
    _, m = grpo_loss(logps, behaviour, adv, mask, importance=importance, aggregation="sequence_mean")
    if importance == "sequence":  # seq 0: exp(mean(ln 2, -ln 2)) = 1 on both tokens; seq 1: 0.5
        want = {"ratio": [2, 0.5], "ratio_sq": [2, 0.25], "ratio/max": [1, 0.5]}
    else:  # the token ratios pi/mu, also when the loss holds them at 1 ("none")
        want = {"ratio": [2.5, 0.5], "ratio_sq": [4.25, 0.25], "ratio/max": [2, 0.5]}
    for key, value in want.items():
        assert m[key].tolist() == pytest.approx(value), key


def test_ratio_cap_bounds_the_loss_of_negative_advantage_tokens():
    logps = t(0.0).view(1, 1).requires_grad_(True)
    behaviour, mask, adv = -t(math.log(4)).view(1, 1), t(1.0).view(1, 1), t(-1.0)
    uncapped, _ = grpo_loss(logps, behaviour, adv, mask, aggregation="constant", length=1.0)
    capped, m = grpo_loss(logps, behaviour, adv, mask, ratio_cap=3.0, aggregation="constant", length=1.0)
    assert uncapped.item() == pytest.approx(4.0) and capped.item() == pytest.approx(3.0)  # -min(-4, -1.2)
    # the capped token has no gradient (the loss is the constant 3 there): it counts as clipped
    capped.sum().backward()
    assert logps.grad.item() == 0.0 and m["clipped"].tolist() == [1.0]
    _, m = grpo_loss(logps, behaviour, adv, mask, ratio_cap=5.0, aggregation="constant", length=1.0)
    assert m["clipped"].tolist() == [0.0]   # ratio 4 < C = 5 with A < 0: the unclipped branch


def test_truncation_counts_only_ratios_above_the_cap():
    logps, _, _, mask, adv = _two_sequences()
    # pi = mu and a cap of 1 (CISPO): every ratio is exactly the cap, none is truncated
    _, m = grpo_loss(logps, logps.detach(), adv, mask, objective="truncate", ratio_cap=1.0,
                     aggregation="sequence_mean")
    assert m["clipped"].tolist() == [0, 0]
    _, m = grpo_loss(logps, logps.detach() - 1e-3, adv, mask, objective="truncate", ratio_cap=1.0,
                     aggregation="sequence_mean")
    assert m["clipped"].tolist() == [2, 1]


def test_dtypes_follow_the_policy_log_probs():
    logps, behaviour, ref, mask, _ = _two_sequences()
    logps = logps.detach().float().requires_grad_(True)
    losses, m = grpo_loss(logps, behaviour.float(), t(1.0, -1.0), mask.bool(), ref_logps=ref.float(),
                          aggregation="sequence_mean")
    assert losses.dtype == torch.float32 and all(v.dtype == torch.float32 for v in m.values())
    assert m["tokens"].mean().item() == 1.5  # a float, so metrics can be averaged


def test_documented_defaults():
    assert advantages(t(1.0, 3.0), torch.tensor([0, 0])).tolist() == pytest.approx(
        [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])  # grpo
    logps, behaviour, _, mask, adv = _two_sequences()
    assert torch.equal(log_importance(logps, behaviour, mask), logps - behaviour)  # token
    # PPO's eps = 0.2 on both sides
    assert clipped_surrogate(t(0.5, 1.5), t(-1.0, 1.0)).tolist() == pytest.approx([0.8, -1.2])
    # truncation at C = 1: -min(1.5, 1) * 2 * (-0.5)
    assert truncated_surrogate(t(1.5), t(2.0), t(-0.5)).tolist() == pytest.approx([1.0])
    assert band_mask(t(0.0, 0.5, 1e6)).tolist() == [1, 1, 1]  # the band is [0, inf)
    per_token, pad = t(1.0, 2.0, 3.0, 4.0).view(2, 2), t(1.0, 1.0, 1.0, 0.0).view(2, 2)
    assert aggregate(per_token, pad, length=1.5).tolist() == pytest.approx([2.0, 2.0])  # token_mean
    losses, _ = grpo_loss(logps, behaviour, adv, mask, length=1.5)
    want, _ = grpo_loss(logps, behaviour, adv, mask, aggregation="token_mean", length=1.5)
    assert torch.equal(losses, want)


def test_grpo_loss_rejects_bad_arguments():
    logps, behaviour, _, mask, adv = _two_sequences()
    with pytest.raises(ValueError, match="objective must be one of"):
        grpo_loss(logps, behaviour, adv, mask, objective="ppo", length=1.0)
    with pytest.raises(ValueError, match="^kl_coef > 0 needs ref_logps$"):
        grpo_loss(logps, behaviour, adv, mask, kl_coef=0.1, length=1.0)


# --------------------------------------------------------------------------- TRL parity

def _trl_loss(loss_type, logps, old, ref, adv, mask, beta, level, eps_low, eps_high, delta, max_len):
    """TRL's GRPOTrainer._compute_loss on these tensors: the trainer object is built
    without __init__ and its model forward replaced by the given per-token log-probs."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    tr = object.__new__(GRPOTrainer)
    acc = SimpleNamespace(num_processes=1, sync_gradients=True, reduce=lambda x, reduction: x,
                          gather=lambda x: x, gather_for_metrics=lambda x: x)
    tr.__dict__.update(
        accelerator=acc, model=SimpleNamespace(training=True), beta=beta, loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, importance_sampling_level=level,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        max_completion_length=max_len, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1))
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    b, width = logps.shape
    inputs = {"prompt_ids": torch.ones(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.ones(b, width, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return tr._compute_loss(None, inputs)


PARITY = [  # TRL loss_type -> our (objective, aggregation)
    ("grpo", "clip", "sequence_mean"), ("bnpo", "clip", "token_mean"), ("dapo", "clip", "token_mean"),
    ("dr_grpo", "clip", "constant"), ("cispo", "truncate", "token_mean")]


@pytest.mark.parametrize("loss_type,objective,aggregation", PARITY)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_parity_with_trl_grpo_loss(loss_type, objective, aggregation, level, beta):
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(7)
    b, width, max_len = 6, 7, 12
    base = -torch.rand(b, width, generator=gen) * 3
    old = base + 0.3 * torch.randn(b, width, generator=gen)
    ref = base + 0.2 * torch.randn(b, width, generator=gen)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    adv = torch.randn(b, generator=gen)
    eps_low, eps_high = 0.2, (0.28 if objective == "clip" else 1.5)  # cispo: epsilon_high is the cap
    delta = 1.6 if objective == "clip" else None
    mine_in = base.clone().requires_grad_(True)
    trl_in = base.clone().requires_grad_(True)
    length = {"token_mean": mask.sum().item() / b, "constant": float(max_len)}.get(aggregation)
    ours, _ = grpo_loss(mine_in, old, adv, mask, ref_logps=ref, kl_coef=beta, objective=objective,
                        importance=level, eps_low=eps_low, eps_high=eps_high,
                        ratio_cap=eps_high if objective == "truncate" else delta,
                        aggregation=aggregation, length=length)
    theirs = _trl_loss(loss_type, trl_in, old, ref, adv, mask, beta, level, eps_low, eps_high, delta, max_len)
    assert ours.mean().item() == pytest.approx(theirs.item(), abs=1e-5)
    (g_ours,) = torch.autograd.grad(ours.mean(), mine_in)
    (g_trl,) = torch.autograd.grad(theirs, trl_in)
    assert torch.allclose(g_ours * mask, g_trl * mask, atol=1e-5)
    assert g_trl.abs().sum() > 0


@pytest.mark.parametrize("cap", [math.inf, 3.0, 1.1, 0.5])
def test_clipped_metric_marks_exactly_the_tokens_without_gradient(cap):
    """Checked against autograd, not a formula: over a grid of ratios (none on a branch
    edge) and advantages of each sign, a token counts as clipped exactly where its
    per-token clipped-surrogate loss has zero gradient. A = 0 tokens have no gradient
    whatever the ratio, and are not counted: no branch clipped them."""
    ratios = torch.tensor([0.3, 0.75, 0.95, 1.05, 1.15, 1.3, 2.0, 3.5, 5.0], dtype=torch.float64)
    assert not clip_active(ratios, torch.zeros_like(ratios), 0.2, 0.2, cap).any()
    for a in (-1.5, -0.5, 0.5, 1.5):
        r = ratios.clone().requires_grad_(True)
        adv = torch.full_like(r, a)
        clipped_surrogate(r, adv, 0.2, 0.2, cap).sum().backward()
        no_grad = r.grad == 0
        assert clip_active(r.detach(), adv, 0.2, 0.2, cap).tolist() == no_grad.tolist(), (a, cap)


def test_a_ratio_exactly_at_the_cap_still_has_its_gradient():
    """On the dual-clip cap itself (A < 0, rho = C = 3 > 1 + eps_high) the capped branch
    is taken and clamp passes its gradient: the token is not clipped."""
    r = torch.tensor([3.0, 3.0, 1.2], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    clipped_surrogate(r, adv, 0.2, 0.2, 3.0).sum().backward()
    assert r.grad.tolist() == [1.0, 0.0, -1.0]
    assert clip_active(r.detach(), adv, 0.2, 0.2, 3.0).tolist() == [False, True, False]
