import math

import pytest
import torch
import torch.nn.functional as F

from offline_rlhf.losses.common import masked_sums, token_logps
from offline_rlhf.losses.dpo import dpo_loss, nll_term


def sig(x):
    return 1 / (1 + math.exp(-x))


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def test_dpo_is_log2_when_policy_equals_reference():
    pc, pr = t(-5.0, -3.2, -9.9), t(-7.0, -1.0, -4.4)
    losses, m = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    assert torch.allclose(losses, torch.full((3,), math.log(2), dtype=torch.float64))
    assert torch.all(m["rewards/margins"] == 0) and torch.all(m["rewards/accuracies"] == 0)


def test_sigmoid_hand_computed():
    # delta = (-4 - -5) - (-6 - -5.5) = 1.5; beta 0.2 -> -log sigmoid(0.3)
    losses, m = dpo_loss(t(-4.0), t(-6.0), t(-5.0), t(-5.5), beta=0.2)
    assert losses.item() == pytest.approx(-math.log(sig(0.3)), abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(0.2) and m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/accuracies"].item() == 1.0 and m["logps/chosen"].item() == -4.0


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_label_smoothing_against_paper_equations(eps):
    beta, delta = 0.5, 1.5
    pc, pr, rc, rr = t(-4.0), t(-6.0), t(-5.0), t(-5.5)
    z = beta * delta
    # Mitchell (2023): expected DPO loss under flip rate eps
    cdpo, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="cdpo", label_smoothing=eps)
    assert cdpo.item() == pytest.approx(-(1 - eps) * math.log(sig(z)) - eps * math.log(sig(-z)), abs=1e-12)
    # Chowdhury et al. (2024) eq. 8: unbiased under flips
    robust, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    want = ((1 - eps) * -math.log(sig(z)) - eps * -math.log(sig(-z))) / (1 - 2 * eps)
    assert robust.item() == pytest.approx(want, abs=1e-12)
    # its expectation over a flip with probability eps is the clean loss
    flipped, _ = dpo_loss(pr, pc, rr, rc, beta=beta, loss_type="robust", label_smoothing=eps)
    assert ((1 - eps) * robust + eps * flipped).item() == pytest.approx(-math.log(sig(z)), abs=1e-12)


def test_ipo_against_paper_equation():
    # Azar et al. eq. 17 with per-token averaged log-ratios, tau = beta
    beta = 0.25
    losses, _ = dpo_loss(t(-4.0), t(-6.0), t(-5.0), t(-5.5), beta=beta, loss_type="ipo",
                         chosen_lengths=t(2.0), rejected_lengths=t(4.0))
    h = (1.0 / 2) - (-0.5 / 4)
    assert losses.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-12)


def test_hinge_and_simpo_hand_computed():
    losses, _ = dpo_loss(t(-4.0), t(-6.0), t(-5.0), t(-5.5), beta=0.2, loss_type="hinge")
    assert losses.item() == pytest.approx(1 - 0.3)
    losses, m = dpo_loss(t(-4.0), t(-6.0), None, None, beta=2.0, loss_type="simpo",
                         chosen_lengths=t(2.0), rejected_lengths=t(3.0), simpo_gamma=0.5)
    z = 2.0 * (-2.0 - -2.0) - 0.5
    assert losses.item() == pytest.approx(-math.log(sig(z)))
    assert m["rewards/chosen"].item() == pytest.approx(-4.0)


def test_simpo_with_unequal_per_token_averages_hand_computed():
    """Chosen -4 over 2 tokens (-2 per token), rejected -9 over 3 (-3 per token); beta 2,
    gamma 0.5: z = 2 * (-2 - -3) - 0.5 = 1.5, loss = log(1 + e^-1.5). Swapping the sides
    gives z = -2.5, so the sign of the margin shows."""
    losses, m = dpo_loss(t(-4.0), t(-9.0), None, None, beta=2.0, loss_type="simpo",
                         chosen_lengths=t(2.0), rejected_lengths=t(3.0), simpo_gamma=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(-4.0)
    assert m["rewards/rejected"].item() == pytest.approx(-6.0)
    assert m["rewards/margins"].item() == pytest.approx(2.0) and m["rewards/accuracies"].item() == 1.0


def test_one_token_completions_average_to_their_sum():
    # SimPO: (-1 - -2) per token, z = 2 * 1 - 0.5 = 1.5
    losses, _ = dpo_loss(t(-1.0), t(-2.0), None, None, beta=2.0, loss_type="simpo",
                         chosen_lengths=t(1.0), rejected_lengths=t(1.0), simpo_gamma=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-12)
    # IPO: h = (-4 - -5) - (-6 - -5.5) = 1.5, beta 0.25: (1.5 - 2)^2
    losses, _ = dpo_loss(t(-4.0), t(-6.0), t(-5.0), t(-5.5), beta=0.25, loss_type="ipo",
                         chosen_lengths=t(1.0), rejected_lengths=t(1.0))
    assert losses.item() == pytest.approx(0.25, abs=1e-12)


def test_refusals_name_what_is_missing():
    pc, pr, rc, rr = t(-4.0), t(-6.0), t(-5.0), t(-5.5)
    with pytest.raises(ValueError, match="loss_type must be one of .*, not 'kto'"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="kto")
    for loss_type in ("ipo", "simpo"):   # one length missing is enough to refuse
        with pytest.raises(ValueError, match=f"{loss_type} needs chosen_lengths and rejected_lengths"):
            dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, chosen_lengths=t(2.0))
    with pytest.raises(ValueError, match="sigmoid needs reference log-probs"):
        dpo_loss(pc, pr, rc, None, beta=0.1)


def test_defaults_are_trls():
    """Left unset, beta, label smoothing and the SimPO margin are TRL's defaults
    (DPOConfig; CPOConfig for SimPO)."""
    trl = pytest.importorskip("trl")
    import dataclasses
    try:
        from trl import CPOConfig
    except ImportError:
        from trl.experimental.cpo import CPOConfig
    dpo = {f.name: f.default for f in dataclasses.fields(trl.DPOConfig)}
    cpo = {f.name: f.default for f in dataclasses.fields(CPOConfig)}
    pc, pr, rc, rr = t(-4.0), t(-6.0), t(-5.0), t(-5.5)
    for loss_type, kw in (("sigmoid", {}), ("robust", {}),
                          ("simpo", {"chosen_lengths": t(2.0), "rejected_lengths": t(3.0)})):
        default, _ = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, **kw)
        beta = cpo["beta"] if loss_type == "simpo" else dpo["beta"]
        explicit, _ = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta,
                               label_smoothing=dpo["label_smoothing"], simpo_gamma=cpo["simpo_gamma"], **kw)
        assert torch.equal(default, explicit), loss_type


def test_nll_term_is_per_token():
    assert nll_term(t(-6.0, -2.0), t(3.0, 4.0)).tolist() == [2.0, 0.5]


def test_nll_term_of_one_token_and_of_none():
    # one token: its own NLL; no tokens: 0, not a division by zero
    assert nll_term(t(-3.0, 0.0), t(1.0, 0.0)).tolist() == [3.0, 0.0]


def test_token_logps_and_masked_sums_match_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    lp = token_logps(logits, ids)
    ref = F.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(lp, ref, atol=1e-6)
    sums, counts = masked_sums(lp, mask)
    assert counts.tolist() == [2.0, 4.0]
    assert sums[0].item() == pytest.approx((ref[0, 1] + ref[0, 2]).item(), abs=1e-6)
    # counts come in the log-probs' dtype (a long count has no .mean(), which sft needs)
    assert counts.dtype == torch.float32
    assert masked_sums(lp.double(), mask.bool())[1].dtype == torch.float64


def test_matches_trl_dpo_trainer(tmp_path, policy_dir):
    pytest.importorskip("trl")
    import datasets
    from trl import DPOConfig, DPOTrainer

    from offline_rlhf.models import load_policy, load_tokenizer
    tok = load_tokenizer(policy_dir, padding_side="right")
    model, ref = load_policy(policy_dir, train=True), load_policy(policy_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    data = datasets.Dataset.from_list([{"prompt": f"What is {i}+1? Answer:", "chosen": f" {i + 1}",
                                        "rejected": f" {i + 2} or so"} for i in range(8)])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.1,
                     report_to=[], gradient_checkpointing=False, use_cpu=True, max_length=None)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(model, batch).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    def sums(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return masked_sums(token_logps(logits, batch["input_ids"]), batch["completion_mask"])[0]
    with torch.no_grad():
        pol, rf = sums(model), sums(ref)
    n = len(pol) // 2
    losses, metrics = dpo_loss(pol[:n], pol[n:], rf[:n], rf[n:], beta=0.1)
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected"):
        assert metrics[k].mean().item() == pytest.approx(trl_metrics[k], abs=1e-5), k
