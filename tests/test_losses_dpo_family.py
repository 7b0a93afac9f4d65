"""Every DPO-family loss: closed forms, hand-computed values, and parity with TRL's own code.

Parity: TRL 1.16 has no standalone loss function; its losses live inline in
``DPOTrainer._compute_loss``. We call that method unbound on a bare instance
(``object.__new__(DPOTrainer)``, no ``__init__``) carrying only the attributes it reads, with
a stand-in model whose forward returns fixed per-token log-probs (TRL's fused LM head
returns ``log_probs``, zero outside the completion) and precomputed reference sums
(``precompute_ref_logps``). Our pure functions get the same numbers as sums and lengths.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from offline_rlhf.losses.dpo import (
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    LOSS_TYPES,
    REFERENCE_FREE,
    TRL_LOSS_TYPES,
    dpo_loss,
    f_scores,
    ld_token_weights,
    parse_losses,
)

N, T, PROMPT = 6, 12, 3


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def random_batch(seed: int):
    """Per-token log-probs ``[2N, T-1]`` of chosen then rejected rows (zero outside the
    completion), their completion mask ``[2N, T]`` and reference sums."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T - PROMPT + 1, (2 * N,), generator=g)
    mask = torch.zeros(2 * N, T, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        mask[i, PROMPT:PROMPT + n] = 1
    per_token = -torch.rand(2 * N, T - 1, generator=g, dtype=torch.float32) * 2 * mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * N, generator=g) * 0.8    # log-ratios ~ N(0, 0.8)
    return per_token, mask, ref[:N], ref[N:]


def ours_from_tokens(per_token, mask, ref_c, ref_r, ld_alpha=None, **kw):
    shift = mask[:, 1:].to(per_token.dtype)
    lengths = shift.sum(1)
    sums = per_token.sum(1)
    full = sums
    if ld_alpha is not None:
        pos = (shift.cumsum(1) - 1).long()
        nc, nr = lengths[:N], lengths[N:]
        w = ld_token_weights(pos, torch.cat([nc, nc])[:, None], torch.cat([nr, nr])[:, None], ld_alpha)
        sums = (per_token * (w * shift).float()).sum(1)
    losses, metrics = dpo_loss(sums[:N], sums[N:], ref_c, ref_r, chosen_lengths=lengths[:N],
                               rejected_lengths=lengths[N:], policy_chosen_full_logps=full[:N], **kw)
    return losses.mean().item(), metrics


class FakeModel:
    """What ``_compute_loss`` calls: ``model(**kw).log_probs`` etc., and ``.training``."""
    training = True

    def __init__(self, per_token):
        self.per_token = per_token

    def __call__(self, **kw):
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


def trl_loss(per_token, mask, ref_c, ref_r, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0,
             ld_alpha=None, f_divergence="reverse_kl", f_alpha=0.5, discopop_tau=0.05):
    trl = pytest.importorskip("trl")
    tr = object.__new__(trl.DPOTrainer)
    model = FakeModel(per_token)
    tr.__dict__.update(
        model=model, aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=ld_alpha,
        f_divergence_type=f_divergence, f_alpha_divergence_coef=f_alpha, loss_types=list(loss_type),
        loss_weights=loss_weights or [1.0] * len(loss_type), beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                    gather_for_metrics=lambda x: x),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = trl.DPOTrainer._compute_loss(tr, model, inputs, False)
    return loss.item(), {k: v[-1] for k, v in tr._metrics["train"].items()}


def settings(name):
    return {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.2},
            "aot": {"label_smoothing": 0.1}, "aot_unpaired": {"label_smoothing": 0.1}}.get(name, {})


@pytest.mark.parametrize("name", TRL_LOSS_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_trl_loss_matches_trl(name, seed):
    batch = random_batch(seed)
    want, trl_metrics = trl_loss(*batch, [name], beta=0.3, **settings(name))
    got, metrics = ours_from_tokens(*batch, loss_type=name, beta=0.3, **settings(name))
    assert got == pytest.approx(want, abs=1e-5), name
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected"):
        assert metrics[k].mean().item() == pytest.approx(trl_metrics[k], abs=1e-5), k


def test_mpo_combination_matches_trl():
    """MPO's recipe: sigmoid + bco_pair + sft with weights 0.8, 0.2, 1.0."""
    batch = random_batch(3)
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    want, _ = trl_loss(*batch, names, weights)
    got, metrics = ours_from_tokens(*batch, loss_type=",".join(names), loss_weights=weights)
    assert got == pytest.approx(want, abs=1e-5)
    parts = sum(w * metrics[f"loss/{n}"].mean().item() for n, w in zip(names, weights))
    assert parts == pytest.approx(got, abs=1e-6)     # the logged parts add up to the total


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm"])
def test_f_divergences_match_trl(name, divergence):
    batch = random_batch(4)
    kw = dict(beta=0.2, **settings(name))
    want, _ = trl_loss(*batch, [name], f_divergence=divergence, f_alpha=0.3, **kw)
    got, _ = ours_from_tokens(*batch, loss_type=name, f_divergence=divergence, f_alpha=0.3, **kw)
    assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
def test_ld_dpo_matches_trl(ld_alpha):
    per_token, mask, rc, rr = random_batch(5)
    want, _ = trl_loss(per_token, mask, rc, rr, ["sigmoid", "sft"], ld_alpha=ld_alpha)
    got, _ = ours_from_tokens(per_token, mask, rc, rr, ld_alpha=ld_alpha, loss_type="sigmoid,sft")
    assert got == pytest.approx(want, abs=1e-5)


def test_ld_token_weights_hand_computed():
    # chosen 2 tokens, rejected 4: the shared length is 2, so positions 2 and 3 are the tail
    w = ld_token_weights(torch.arange(4), torch.tensor(2), torch.tensor(4), 0.25)
    assert w.tolist() == [1.0, 1.0, 0.25, 0.25]


@pytest.mark.parametrize("name", [n for n in LOSS_TYPES if n not in REFERENCE_FREE])
def test_closed_forms_at_policy_equal_reference(name):
    """Policy = reference: every log-ratio is 0, so each loss is a number of its equation."""
    beta, eps = 0.25, 0.1
    pc, pr = t(-5.0, -3.0), t(-7.0, -1.0)
    nc, nr = t(2.0, 4.0), t(5.0, 1.0)
    exo_eps = 1e-3
    want = {
        "sigmoid": math.log(2), "cdpo": math.log(2), "robust": math.log(2), "sigmoid_norm": math.log(2),
        "aot": math.log(2), "aot_unpaired": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2,
        "sppo_hard": 2 * (1 / (2 * beta)) ** 2, "nca_pair": 2 * math.log(2), "bco_pair": 2 * math.log(2),
        "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * math.log(2) + 0.5,
        "exo_pair": 0.5 * math.log(0.5 / (1 - exo_eps)) + 0.5 * math.log(0.5 / exo_eps),
    }[name]
    ls = exo_eps if name == "exo_pair" else (eps if name in ("cdpo", "robust", "aot", "aot_unpaired") else 0.0)
    losses, _ = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, loss_type=name, label_smoothing=ls,
                         chosen_lengths=nc, rejected_lengths=nr)
    assert losses.tolist() == pytest.approx([want, want], abs=1e-12)


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_every_f_divergence_is_zero_at_ratio_one(divergence):
    """f'(1) = 0 for each f in f-DPO's Table 1, so DPO is log 2 at policy = reference."""
    assert f_scores(t(0.0), divergence, 0.3).item() == pytest.approx(0.0, abs=1e-15)
    assert f_scores(t(0.7), divergence, 0.3).item() > 0      # and increasing through 0
    assert f_scores(t(-0.7), divergence, 0.3).item() < 0


def test_f_divergence_values_hand_computed():
    x = 0.5
    assert f_scores(t(x), "forward_kl").item() == pytest.approx(1 - math.exp(-x))
    assert f_scores(t(x), "js_divergence").item() == pytest.approx(math.log(2 * math.exp(x) / (1 + math.exp(x))))
    assert f_scores(t(x), "alpha_divergence", 0.3).item() == pytest.approx((math.exp(-0.7 * x) - 1) / -0.7)
    assert f_scores(t(x), "alpha_divergence", 1.0).item() == pytest.approx(x)
    # the exponent is clamped at 80 (as TRL in float32), so a huge ratio stays finite
    assert f_scores(t(100.0), "alpha_divergence", 2.0).item() == pytest.approx(math.exp(80) - 1)


def test_hand_computed_values():
    # cl = 1, rl = -0.5, beta = 0.5
    pc, pr, rc, rr = t(-4.0), t(-6.0), t(-5.0), t(-5.5)
    s = torch.sigmoid

    def one(name, **kw):
        return dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=name, **kw)[0].item()
    assert one("sppo_hard") == pytest.approx((1 - 1) ** 2 + (-0.5 + 1) ** 2)
    assert one("bco_pair") == pytest.approx(-math.log(s(t(0.5)).item()) - math.log(s(t(0.25)).item()))
    assert one("apo_zero") == pytest.approx(1 - s(t(0.5)).item() + s(t(-0.25)).item())
    assert one("apo_down") == pytest.approx(s(t(0.5)).item() + 1 - s(t(0.75)).item())
    assert one("nca_pair") == pytest.approx(-math.log(s(t(0.5)).item()) - 0.5 * math.log(s(t(-0.5)).item())
                                            - 0.5 * math.log(s(t(0.25)).item()))
    z = 0.75    # beta * delta
    m = 1 / (1 + math.exp(-z / 0.05))
    assert one("discopop") == pytest.approx(-math.log(s(t(z)).item()) * (1 - m) + math.exp(-z) * m)


def test_sft_is_per_token_over_the_batch():
    """sft: minus the batch's summed chosen log-probs over its chosen tokens (TRL), whatever
    the split: with the step's mean length given, two halves average to the whole."""
    pc, nc = t(-6.0, -2.0, -9.0), t(3.0, 1.0, 1.0)
    whole, _ = dpo_loss(pc, pc, None, None, loss_type="sft", chosen_lengths=nc, rejected_lengths=nc)
    assert whole.mean().item() == pytest.approx(17.0 / 5.0)
    mean = nc.mean()
    a, _ = dpo_loss(pc[:1], pc[:1], None, None, loss_type="sft", chosen_lengths=nc[:1],
                    rejected_lengths=nc[:1], sft_mean_tokens=mean)
    b, _ = dpo_loss(pc[1:], pc[1:], None, None, loss_type="sft", chosen_lengths=nc[1:],
                    rejected_lengths=nc[1:], sft_mean_tokens=mean)
    assert torch.cat([a, b]).mean().item() == pytest.approx(17.0 / 5.0)


def test_aot_is_a_batch_loss_by_ranks():
    """AOT matches order statistics: the loss is the same for any order of the pairs, and
    differs from DPO where the sorted gaps differ from the per-pair ones."""
    pc, pr = t(-1.0, -5.0, -2.0), t(-4.0, -2.0, -3.0)
    rc, rr = t(-2.0, -2.0, -2.0), t(-1.0, -6.0, -2.0)
    a, _ = dpo_loss(pc, pr, rc, rr, loss_type="aot", beta=1.0)
    perm = [2, 0, 1]
    b, _ = dpo_loss(pc[perm], pr[perm], rc[perm], rr[perm], loss_type="aot", beta=1.0)
    assert a.mean().item() == pytest.approx(b.mean().item(), abs=1e-12)
    # policy gaps sorted (-3, 1, 3), reference gaps sorted (-1, 0, 4): deltas (-2, 1, -1)
    want = [-math.log(1 / (1 + math.exp(-d))) for d in (-2.0, 1.0, -1.0)]
    assert a.tolist() == pytest.approx(want)
    dpo, _ = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=1.0)
    assert dpo.mean().item() != pytest.approx(a.mean().item())


def test_combination_is_the_weighted_sum_of_its_parts():
    pc, pr, rc, rr = t(-4.0, -3.0), t(-6.0, -1.0), t(-5.0, -3.5), t(-5.5, -2.0)
    one = {n: dpo_loss(pc, pr, rc, rr, loss_type=n)[0] for n in ("sigmoid", "hinge")}
    both, m = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid,hinge", loss_weights=[0.3, 2.0])
    assert torch.allclose(both, 0.3 * one["sigmoid"] + 2.0 * one["hinge"])
    assert torch.equal(m["loss/hinge"], one["hinge"])
    _, single = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid")
    assert not any(k.startswith("loss/") for k in single)   # one term: the total is the part


def test_refusals():
    pc, pr, rc, rr = t(-4.0), t(-6.0), t(-5.0), t(-5.5)
    with pytest.raises(ValueError, match="loss_weights has 1 weights for 2 losses"):
        parse_losses("sigmoid,ipo", [1.0])
    with pytest.raises(ValueError, match="names a loss twice"):
        parse_losses("sigmoid,sigmoid")
    with pytest.raises(ValueError, match="not 'kto'"):
        parse_losses("sigmoid,kto")
    with pytest.raises(ValueError, match="f_divergence js_divergence is defined only for .*not bco_pair"):
        dpo_loss(pc, pr, rc, rr, loss_type="sigmoid,bco_pair", f_divergence="js_divergence")
    with pytest.raises(ValueError, match="exo_pair needs 0 < label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    with pytest.raises(ValueError, match="apo_zero needs reference log-probs"):
        dpo_loss(pc, pr, None, None, loss_type="apo_zero")
    assert "sft" in F_DIVERGENCE_LOSSES and "simpo" not in F_DIVERGENCE_LOSSES


def test_refusal_messages_in_full():
    """The refusals word for word (a user reads them), and the edges of what is refused."""
    import re
    pc, pr, rc, rr = t(-4.0), t(-6.0), t(-5.0), t(-5.5)

    def refused(message, fn, *a, **kw):
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            fn(*a, **kw)
    refused("loss_type names a loss twice: sigmoid,ipo,sigmoid", parse_losses, "sigmoid,ipo,sigmoid")
    refused(f"loss_type must be one of {LOSS_TYPES}, not ''", parse_losses, [])
    refused(f"f_divergence must be one of {F_DIVERGENCES}, not 'kl'", f_scores, t(0.5), "kl")
    refused(f"f_divergence must be one of {F_DIVERGENCES}, not 'kl'", dpo_loss, pc, pr, rc, rr,
            f_divergence="kl")
    refused("f_divergence forward_kl is defined only for " + ", ".join(F_DIVERGENCE_LOSSES)
            + ", not nca_pair, bco_pair", dpo_loss, pc, pr, rc, rr, loss_type="sigmoid,nca_pair,bco_pair",
            f_divergence="forward_kl")
    for eps in (0.0, 1.0, 1.5):
        refused("exo_pair needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3)", dpo_loss, pc, pr, rc, rr,
                loss_type="exo_pair", label_smoothing=eps)
    assert parse_losses(["sigmoid", "ipo"], [0.5, 2]) == [("sigmoid", 0.5), ("ipo", 2.0)]
    assert parse_losses(" sigmoid, ipo") == [("sigmoid", 1.0), ("ipo", 1.0)]


def test_f_divergence_defaults():
    """f_scores defaults to reverse KL (the log-ratio itself) and alpha to 0.5, in
    f_scores and in dpo_loss alike."""
    x = t(0.5, -1.0)
    assert torch.equal(f_scores(x), x)
    want = (torch.exp(-0.5 * x) - 1) / -0.5
    assert torch.allclose(f_scores(x, "alpha_divergence"), want, atol=1e-12)
    pc, pr, rc, rr = t(-4.0), t(-6.0), t(-5.0), t(-5.5)
    got, _ = dpo_loss(pc, pr, rc, rr, f_divergence="alpha_divergence")
    cs, rs = (torch.exp(-0.5 * (pc - rc)) - 1) / -0.5, (torch.exp(-0.5 * (pr - rr)) - 1) / -0.5
    assert got.item() == pytest.approx(-F.logsigmoid(0.1 * (cs - rs)).item(), abs=1e-12)


def test_simpo_rewards_are_per_token_down_to_one_token():
    """SimPO's reward metrics are beta times the per-token average: a completion of one
    token is its own sum (the clamp only guards an empty one)."""
    pc, pr, n1 = t(-3.0, -6.0), t(-1.0, -8.0), t(1.0, 2.0)
    _, m = dpo_loss(pc, pr, None, None, beta=2.0, loss_type="simpo", chosen_lengths=n1,
                    rejected_lengths=n1.flip(0))
    assert m["rewards/chosen"].tolist() == [-6.0, -6.0]
    assert m["rewards/rejected"].tolist() == [-1.0, -16.0]


def test_f_divergence_refusal_is_trls():
    """The losses TRL takes another f-divergence for (a set literal in DPOTrainer.__init__)
    are the ones we take, plus our cdpo (a function of delta alone, like robust); simpo has
    no reference and takes none."""
    import ast
    import inspect
    import re
    trl = pytest.importorskip("trl")
    source = inspect.getsource(trl.DPOTrainer.__init__)
    theirs = ast.literal_eval(re.search(r"f_divergence_loss_types = (\{[^}]*\})", source).group(1))
    assert set(F_DIVERGENCE_LOSSES) == theirs | {"cdpo"}
