import math

import pytest
import torch

from offline_rlhf.losses.reward import bradley_terry_loss
from offline_rlhf.losses.sft import sft_loss


def test_bradley_terry_hand_computed():
    losses, m = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]))
    assert losses.tolist() == pytest.approx([-math.log(1 / (1 + math.exp(-1.0))),
                                             -math.log(1 / (1 + math.exp(0.5)))])
    assert m["accuracy"].tolist() == [1.0, 0.0] and m["rewards/margins"].tolist() == [1.0, -0.5]


def test_bradley_terry_metrics_name_both_sides():
    _, m = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]))
    assert set(m) == {"accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"}
    assert m["rewards/chosen"].tolist() == [2.0, 0.0] and m["rewards/rejected"].tolist() == [1.0, 0.5]
    _, tie = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]))
    assert tie["accuracy"].item() == 0.0   # a tie is not a correct ranking


def test_margin_and_centering_terms():
    rc, rr, margin = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.75])
    losses, _ = bradley_terry_loss(rc, rr, margin, center_coef=0.1)
    want = -math.log(1 / (1 + math.exp(-(1.0 - 0.75)))) + 0.1 * (2.0 + 1.0) ** 2
    assert losses.item() == pytest.approx(want)
    # equal rewards: log 2, and centering pulls their sum towards zero
    losses, _ = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]))
    assert losses.item() == pytest.approx(math.log(2))


def test_sft_masking_prompt_positions_contribute_nothing():
    torch.manual_seed(0)
    logps = (-torch.rand(2, 6)).requires_grad_()
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])
    losses, m = sft_loss(logps, mask)
    assert m["response_tokens"].tolist() == [3.0, 6.0]
    assert losses[0].item() == pytest.approx(-logps[0, 2:5].mean().item())
    losses.sum().backward()
    grad = logps.grad.clone()
    prompt_positions = mask[:, 1:] == 0
    assert torch.all(grad[prompt_positions] == 0) and torch.all(grad[~prompt_positions] != 0)
    # changing the values under the mask changes neither the loss nor any gradient
    other = logps.detach().clone()
    other[prompt_positions] = -9.0
    other.requires_grad_()
    losses2, _ = sft_loss(other, mask)
    losses2.sum().backward()
    assert torch.equal(losses.detach(), losses2.detach()) and torch.equal(grad, other.grad)


def test_sft_loss_of_one_response_token_and_of_none():
    """A row with one response token: that token's NLL; a row with none: 0 (not NaN)."""
    logps = torch.tensor([[-0.5, -2.0, -0.25], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0]])
    losses, m = sft_loss(logps, mask)
    assert losses.tolist() == [2.0, 0.0]
    assert m["response_tokens"].tolist() == [1.0, 0.0] and m["logps"].tolist() == [-2.0, 0.0]
