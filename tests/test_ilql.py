import math

import pytest
import torch

from offline_rlhf.ilql import ILQLHeads, load_heads, save_heads, value_guided_hook
from offline_rlhf.losses.ilql import (
    awac_loss,
    cql_loss,
    expectile_loss,
    masked_mean,
    polyak_update,
    td_loss,
    td_targets,
)


def t(*x):
    return torch.tensor(x, dtype=torch.float32)


def test_td_targets_terminal_state():
    # r + gamma * V(next) * (1 - done); the last token is terminal
    out = td_targets(t(0.0, 0.0, 1.0), t(2.0, 3.0, 99.0), t(0.0, 0.0, 1.0), gamma=0.5)
    assert out.tolist() == [1.0, 1.5, 1.0]


def test_td_loss_is_squared_error_with_fixed_target():
    q = t(1.0, 2.0).requires_grad_()
    target = t(0.5, 4.0).requires_grad_()
    loss = td_loss(q, target)
    assert loss.tolist() == [0.25, 4.0]
    loss.sum().backward()
    assert q.grad.tolist() == [1.0, -4.0] and target.grad is None


def test_expectile_half_squared_error_at_tau_half_and_asymmetric_otherwise():
    v, q = t(1.0, 1.0, 3.0), t(3.0, -1.0, 3.0)
    assert expectile_loss(v, q, tau=0.5).tolist() == pytest.approx([0.5 * 4, 0.5 * 4, 0.0])
    assert expectile_loss(v, q, tau=0.7).tolist() == pytest.approx([0.7 * 4, 0.3 * 4, 0.0])


def test_cql_is_cross_entropy_of_q_against_taken_token():
    q = torch.tensor([[1.0, 2.0, 0.0]])
    want = -(2.0 - math.log(math.exp(1) + math.exp(2) + 1))
    assert cql_loss(q, torch.tensor([1])).item() == pytest.approx(want, abs=1e-6)


def test_awac_weights_and_behaviour_cloning():
    logp, adv = t(-1.0, -2.0), t(0.5, -0.5)
    assert awac_loss(logp, adv, beta=0.0).tolist() == [1.0, 2.0]
    assert awac_loss(logp, adv, beta=2.0).tolist() == pytest.approx([math.e, 2 * math.exp(-1)])
    assert awac_loss(t(-1.0), t(10.0), beta=1.0, max_weight=5.0).item() == 5.0


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).tolist() == [2.0, 2.0]


def test_polyak_update_exact():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    want = [0.25 * o.detach() + 0.75 * g.detach() for o, g in zip(online.parameters(), target.parameters())]
    polyak_update(target, online, 0.25)
    assert all(torch.equal(g, w) for g, w in zip(target.parameters(), want))


def test_heads_round_trip_and_value_guidance(tmp_path):
    torch.manual_seed(0)
    heads = ILQLHeads(8, 5)
    heads.sync_targets(1.0)   # targets = online
    save_heads(heads, tmp_path)
    back = load_heads(tmp_path)
    h = torch.randn(2, 8)
    assert torch.allclose(back.min_target_q(h), heads.min_target_q(h))
    logits = torch.randn(2, 5)
    adv = heads.min_target_q(h) - heads.v(h)
    assert torch.allclose(value_guided_hook(back, 2.0)(logits, h, None), logits + 2.0 * adv, atol=1e-6)
    assert torch.equal(value_guided_hook(back, 0.0)(logits, h, None), logits)
    topk = value_guided_hook(back, 1.0, top_k=2)(logits, h, None)
    assert torch.isinf(topk).sum().item() == 2 * 3


def test_ilql_task_masks_padding_and_terminal(tmp_path, policy_dir):
    """Rewards on padded positions change nothing; V(next) after the last token is 0."""
    import pyarrow as pa
    from conftest import generation_rows

    from offline_rlhf.models import load_policy, load_tokenizer
    from offline_rlhf.schemas import load_schema
    from offline_rlhf.shards import ShardWriter
    from offline_rlhf.train.ilql import ILQLTask, ILQLTrainConfig
    rows = generation_rows(4)
    rows[0]["response_token_ids"], rows[0]["behaviour_logps"], rows[0]["ref_logps"] = [7, 8], [-1.0] * 2, None
    with ShardWriter(str(tmp_path / "g"), "generations") as w:
        w.write(0, pa.Table.from_pylist(rows, schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    cfg = ILQLTrainConfig(data=str(tmp_path / "g"), output=str(tmp_path / "o"), policy=str(policy_dir))
    task = ILQLTask(cfg, load_tokenizer(policy_dir))
    model = load_policy(policy_dir, dtype="float32")   # on the package's device
    task.attach(ILQLHeads(64, 512).to(model.device))
    batch = task.collate([0, 1], model.device)
    assert batch["done"][0].tolist()[:2] == [0.0, 1.0] and batch["mask"][0].tolist()[2:] == [0.0] * 4
    assert batch["rewards"][0, 1] == task.rewards[0][-1] and batch["rewards"][0, 0] == 0
    with torch.no_grad():
        base, _ = task.loss(model, batch)
        batch["rewards"][0, 3] = 1e6   # a padded position
        again, _ = task.loss(model, batch)
    assert torch.equal(base, again)


def test_train_ilql_with_qlora_and_value_guided_generation(tmp_path, policy_dir):
    """ILQL trains on the shared loop (QLoRA with activation checkpointing here: the frugal
    set-up every trainer offers), saves its heads beside the merged model, and generate
    samples from them with beta > 0."""
    import json

    import pyarrow as pa
    from conftest import generation_rows

    from offline_rlhf.generation import GenerateConfig, generate
    from offline_rlhf.schemas import load_schema
    from offline_rlhf.shards import ShardWriter, open_dataset
    from offline_rlhf.toy import addition_prompts
    from offline_rlhf.train.ilql import ILQLTrainConfig, train_ilql
    with ShardWriter(str(tmp_path / "g"), "generations") as w:
        w.write(0, pa.Table.from_pylist(generation_rows(32), schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    train_ilql(ILQLTrainConfig(data=str(tmp_path / "g"), output=str(tmp_path / "o"), policy=str(policy_dir),
                               lora_r=4, bits=4, gradient_checkpointing=True, max_steps=3,
                               batch_size=8, lr=1e-3, tensorboard=False))
    hist = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/q", "loss/v", "loss/cql", "loss/awac", "q/mean", "v/mean", "advantage/mean"} <= set(hist[-1])
    assert hist[-1]["loss"] != hist[0]["loss"] and all(h["grad_norm"] > 0 for h in hist)
    from safetensors.torch import load_file
    adapter = load_file(str(tmp_path / "o" / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    final = tmp_path / "o" / "final"
    assert (final / "heads.safetensors").exists() and (tmp_path / "o" / "adapter").is_dir()
    heads = load_heads(final)
    assert not torch.equal(heads.q1[0].weight, heads.target_q1[0].weight)  # Polyak targets lag
    with ShardWriter(str(tmp_path / "p"), "prompts") as w:
        w.write(0, addition_prompts(4))
        w.finish(total_chunks=1)
    generate(GenerateConfig(prompts=str(tmp_path / "p"), output=str(tmp_path / "vg"), policy=str(final),
                            ilql_heads=str(final), ilql_beta=4.0, ilql_top_k=5, max_new_tokens=4,
                            num_samples=2))
    assert open_dataset(str(tmp_path / "vg"), require_complete=True).num_rows == 8
