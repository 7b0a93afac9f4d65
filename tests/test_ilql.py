import math

import pytest
import torch

from offline_rlhf.ilql import ILQLHeads, load_heads, save_heads, value_guided_hook
from offline_rlhf.losses.ilql import (
    advantage,
    awac_loss,
    cql_loss,
    expectile_loss,
    masked_mean,
    next_values,
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


def test_td_targets_and_advantages_of_a_three_token_episode():
    """Hand-computed: V = (0.5, 0.2, -0.4), reward 1 on the last (terminal) token, gamma 0.5.
    Targets bootstrap from the NEXT state: 0 + 0.5 * 0.2, 0 + 0.5 * -0.4, 1 (no bootstrap)."""
    v = torch.tensor([[0.5, 0.2, -0.4]], requires_grad=True)
    v_next = next_values(v)
    assert v_next[0].tolist() == pytest.approx([0.2, -0.4, 0.0]) and not v_next.requires_grad
    targets = td_targets(t(0.0, 0.0, 1.0)[None], v_next, t(0.0, 0.0, 1.0)[None], gamma=0.5)
    assert targets[0].tolist() == pytest.approx([0.1, -0.2, 1.0])
    # min target Q of the taken tokens (0.7, 0.1, -0.2) minus V: better than expected -> positive
    adv = advantage(torch.tensor([[0.7, 0.1, -0.2]]), v)
    assert adv[0].tolist() == pytest.approx([0.2, -0.1, 0.2])


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
    # the trainer's clip: weights stop at 100 (e^10 would be 22026)
    assert awac_loss(t(-1.0, -1.0), t(10.0, math.log(99.0)), beta=1.0).tolist() == pytest.approx([100.0, 99.0])


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
                               batch_size=8, lr=1e-3, report_to="none"))
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


class _FixedHeads(torch.nn.Module):
    """Heads whose V and taken-token Q values are given per position (all other Q zero)."""

    def __init__(self, actions, vocab, **values):
        super().__init__()
        self.actions, self.vocab, self.values = actions, vocab, values

    def forward(self, hidden):
        def q(taken):
            full = torch.zeros(*self.actions.shape, self.vocab)
            return full.scatter(-1, self.actions[..., None], torch.tensor(taken)[..., None])
        return {"v": torch.tensor(self.values["v"]),
                **{k: q(x) for k, x in self.values.items() if k != "v"}}


def test_ilql_trainer_loss_uses_next_state_targets_and_positive_advantages(tmp_path, policy_dir):
    """The trainer's own loss on two 3-token episodes, against hand-computed TD targets,
    advantages and terms (V and Q heads fixed; the policy's log-probs read separately).

    Rewards -3 and -2 standardise to -1 and +1 on the last token; gamma 0.5, tau 0.7.
    Row 0: V = (.5, .2, -.4) -> targets (.5*.2, .5*-.4, -1) = (.1, -.2, -1);
    Q1 = (.3, 0, .6), Q2 = (.1, -.1, 1) -> TD errors .04 + 0, .04 + .01, 2.56 + 4: mean 6.65/3;
    min(Q1', Q2') = (.7, .1, -.2) -> advantages (.2, -.1, .2).
    Row 1: V = (.1, .3, .6) -> targets (.15, .3, 1); Q1 = (.2, .4, 1), Q2 = (0, .5, .5)
    -> TD errors .0025 + .0225, .01 + .04, 0 + .25: mean .325/3;
    min(Q1', Q2') = (.4, .2, .7) -> advantages (.3, -.1, .1).
    """
    import pyarrow as pa
    from conftest import generation_rows

    from offline_rlhf.models import load_policy, load_tokenizer
    from offline_rlhf.schemas import load_schema
    from offline_rlhf.shards import ShardWriter
    from offline_rlhf.train.ilql import ILQLTask, ILQLTrainConfig
    with ShardWriter(str(tmp_path / "g"), "generations") as w:
        w.write(0, pa.Table.from_pylist(generation_rows(2, tokens=3), schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    cfg = ILQLTrainConfig(data=str(tmp_path / "g"), output=str(tmp_path / "o"), policy=str(policy_dir),
                          gamma=0.5, tau=0.7, cql_scale=0.0, awac_scale=1.0, awac_beta=1.0)
    task = ILQLTask(cfg, load_tokenizer(policy_dir))
    batch = task.collate([0, 1], "cpu")
    assert batch["rewards"].tolist() == [[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]
    task.attach(_FixedHeads(
        batch["actions"], 512, v=[[0.5, 0.2, -0.4], [0.1, 0.3, 0.6]],
        q1=[[0.3, 0.0, 0.6], [0.2, 0.4, 1.0]], q2=[[0.1, -0.1, 1.0], [0.0, 0.5, 0.5]],
        target_q1=[[0.9, 0.1, 0.0], [0.4, 0.2, 0.7]], target_q2=[[0.7, 0.3, -0.2], [0.6, 0.3, 0.9]]))
    model = load_policy(policy_dir, device="cpu")   # the batch and the fixed heads are on the CPU
    with torch.no_grad():
        total, m = task.loss(model, batch)
        logits = model(input_ids=batch["input_ids"]).logits[:, 2:5]   # prompt is 3 tokens
    logp = torch.log_softmax(logits.double(), -1).gather(-1, batch["actions"][..., None])[..., 0]
    assert m["loss/q"].tolist() == pytest.approx([6.65 / 3, 0.325 / 3])
    assert m["advantage/mean"].tolist() == pytest.approx([0.1, 0.1])
    assert m["advantage/max"].tolist() == pytest.approx([0.2, 0.3])
    # expectile: weight 0.7 where the advantage is positive, 0.3 where negative
    assert m["loss/v"].tolist() == pytest.approx([(0.7 * 0.04 + 0.3 * 0.01 + 0.7 * 0.04) / 3,
                                                  (0.7 * 0.09 + 0.3 * 0.01 + 0.7 * 0.01) / 3])
    weights = torch.tensor([[0.2, -0.1, 0.2], [0.3, -0.1, 0.1]], dtype=torch.float64).exp()
    awac = (-(weights * logp).mean(-1)).tolist()
    assert m["loss/awac"].tolist() == pytest.approx(awac, rel=1e-5)
    assert total.tolist() == pytest.approx([a + b + c for a, b, c in zip(
        m["loss/q"].tolist(), m["loss/v"].tolist(), awac)], rel=1e-5)


def test_ilql_resume_is_exact_target_heads_included(tmp_path, policy_dir):
    """A run killed after its checkpoint and rerun ends with exactly the heads of a run
    that never died: the checkpoint holds the target Q heads too (they follow the
    trained heads by Polyak averaging, without a gradient)."""
    import shutil

    import pyarrow as pa
    from conftest import generation_rows
    from safetensors.torch import load_file

    from offline_rlhf.schemas import load_schema
    from offline_rlhf.shards import ShardWriter
    from offline_rlhf.train.ilql import ILQLTrainConfig, train_ilql
    with ShardWriter(str(tmp_path / "g"), "generations") as w:
        w.write(0, pa.Table.from_pylist(generation_rows(16), schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)

    def run(out):
        return train_ilql(ILQLTrainConfig(data=str(tmp_path / "g"), output=str(out), policy=str(policy_dir),
                                          max_steps=4, save_steps=2, batch_size=4, lr=1e-2,
                                          report_to="none", device="cpu"))
    run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")                 # as if killed after step 2's checkpoint
    (tmp_path / "b" / "train_summary.json").unlink()
    summary = run(tmp_path / "b")
    assert summary["resumed_from"] and summary["resumed_from"].endswith("step-0000002")
    a, b = (load_file(str(tmp_path / x / "final" / "heads.safetensors")) for x in "ab")
    assert any(k.startswith("target_") for k in a) and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
