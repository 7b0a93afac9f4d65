import json
import re

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import cli_on_cpu, finished, kill_when
from safetensors.torch import load_file

from offline_rlhf.errors import InputError
from offline_rlhf.schemas import replace_column
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.train.grpo import GRPOTrainConfig, plan_examples, train_grpo


def _rewrite(src, dst, **columns):
    t = open_dataset(str(src)).read()
    for name, values in columns.items():
        t = replace_column(t, name, values)
    with ShardWriter(str(dst), "generations") as w:
        w.write(0, t)
        w.finish(total_chunks=1)
    return str(dst)


@pytest.fixture(scope="module")
def gens(tmp_path_factory, policy_dir):
    """Samples of the tiny policy (K=4) with a reward that varies within groups (the
    count of even token ids), and reference log-probs: a fresh, scored dataset. Made in
    float32 on CPU wherever the tests run: the identities below (ratio 1 on fresh data)
    hold only when training computes as sampling did."""
    from offline_rlhf.generation import GenerateConfig, generate
    from offline_rlhf.logprobs import LogprobsConfig, compute_logprobs
    d = tmp_path_factory.mktemp("grpo")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i}+{i % 3}? Answer:"}) + "\n"
                                             for i in range(16)))
    generate(GenerateConfig(prompts=str(d / "prompts.jsonl"), output=str(d / "gen"), policy=str(policy_dir),
                            num_samples=4, temperature=1.0, max_new_tokens=6, seed=1, device="cpu"))
    t = open_dataset(str(d / "gen")).read()
    rewards = [float(sum(x % 2 == 0 for x in ids)) for ids in t.column("response_token_ids").to_pylist()]
    _rewrite(d / "gen", d / "scored", reward=rewards, reward_normalized=[0.0] * len(rewards))
    compute_logprobs(LogprobsConfig(generations=str(d / "scored"), output=str(d / "ref"),
                                    reference=str(policy_dir), device="cpu"))
    return {"scored": str(d / "scored"), "ref": str(d / "ref"), "dir": d}


def cfg(data, out, policy, **kw):
    base = dict(data=data, output=str(out), policy=str(policy), lr=1e-3, max_steps=5, batch_size=16,
                micro_batch_size=8, report_to="none")
    base.update(kw)
    return GRPOTrainConfig(**base)


def _history(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_refuses_rows_without_behaviour_logps(tmp_path, gens, policy_dir):
    n = open_dataset(gens["ref"]).num_rows
    bad = _rewrite(gens["ref"], tmp_path / "bad", behaviour_logps=pa.nulls(n, pa.list_(pa.float32())),
                   reward=[1.0] * n)
    with pytest.raises(InputError, match=r"part-000000.parquet, row 0, column 'behaviour_logps': no behaviour "
                       r"log-probs.*never assumed"):
        train_grpo(cfg(bad, tmp_path / "o", policy_dir))


def test_kl_needs_stored_reference_logps_and_names_the_stage(tmp_path, gens, policy_dir):
    with pytest.raises(InputError, match=r"column 'ref_logps': .*`offline-rlhf logprobs`"):
        train_grpo(cfg(gens["scored"], tmp_path / "o", policy_dir, kl_coef=0.05))
    n = open_dataset(gens["scored"]).num_rows
    unscored = _rewrite(gens["scored"], tmp_path / "u", reward=pa.nulls(n, pa.float64()))
    with pytest.raises(InputError, match=r"row 0, column 'reward': unscored"):
        train_grpo(cfg(unscored, tmp_path / "o", policy_dir))
    with pytest.raises(InputError, match="objective: must be one of clip, truncate"):
        cfg(gens["scored"], tmp_path / "o", policy_dir, objective="ppo")


def test_plan_computes_advantages_over_whole_groups_and_drops_equal_ones(gens):
    rows = open_dataset(gens["scored"]).read().to_pylist()
    for r in rows:
        r["source"] = 0
    rows[0]["prompt_token_ids"] = list(range(5000))  # too long: left out, its group's advantages unchanged
    c = GRPOTrainConfig(data="x", output="y", policy="z", advantage="dr_grpo")
    kept, adv, stats = plan_examples(rows, c)
    by_group = {}
    for i, r in enumerate(rows):
        by_group.setdefault(r["prompt_id"], []).append(i)
    for idx in by_group.values():
        rewards = np.array([rows[i]["reward"] for i in idx])
        if rewards.max() == rewards.min():
            assert not set(idx) & set(kept)
        else:
            assert adv[idx] == pytest.approx(rewards - rewards.mean())
    assert 0 not in kept and stats["rows_dropped_overlong"] == 1
    assert stats["groups_dropped"] == sum(1 for idx in by_group.values()
                                          if len({rows[i]["reward"] for i in idx}) == 1)
    assert stats["examples"] == len(kept) == stats["rows"] - 1 - 4 * stats["groups_dropped"]


def test_five_steps_change_parameters_move_loss_and_log_off_policy_metrics(tmp_path, gens, policy_dir):
    out = tmp_path / "o"
    s = train_grpo(cfg(gens["ref"], out, policy_dir, kl_coef=0.05, epochs=3, max_steps=0, device="cpu"))
    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert not [k for k in before if torch.equal(before[k], after[k])]
    hist = _history(out)
    n = s["data"]["examples"]     # every example every epoch: the last step trains the rest
    assert s["steps"] == 3 * -(-n // 16) == len(hist)
    assert sum(h["examples"] for h in hist) == 3 * n
    first, last = hist[0], hist[-1]
    # fresh data: at the first step the policy is the behaviour policy
    assert first["is_weight/mean"] == pytest.approx(1.0, abs=1e-4)
    assert first["staleness_kl"] == pytest.approx(0.0, abs=1e-6) and first["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert first["clip_fraction"] == 0.0 and first["is_weight/ess"] == pytest.approx(1.0, abs=1e-6)
    # after some steps the policy has moved: the same data are now stale, and the loss has moved
    assert last["staleness_kl"] > 1e-4 and last["kl_ref"] > 1e-4 and last["is_weight/max"] > 1.0
    assert last["loss"] != first["loss"] and min(h["loss"] for h in hist) < first["loss"]
    for k in ("is_weight/ess", "advantage/mean", "advantage/max", "advantage/min", "masked_fraction",
              "groups_dropped", "tokens", "grad_norm"):
        assert k in last, k
    assert last["advantage/min"] < 0 < last["advantage/max"]


def test_accumulation_does_not_change_the_token_mean(tmp_path, gens, policy_dir):
    """One step's gradient is the same from one micro-batch of 8 as from 8 of 1: the
    token-mean normaliser is the whole step's, not the micro-batch's."""
    from accelerate import Accelerator

    from offline_rlhf.models import load_policy, load_tokenizer
    from offline_rlhf.train.grpo import GRPOTask
    from offline_rlhf.train.loop import _step
    acc = Accelerator(cpu=True)
    task = GRPOTask(cfg(gens["ref"], tmp_path / "o", policy_dir, kl_coef=0.1),
                    load_tokenizer(policy_dir, padding_side="right"))
    model = load_policy(policy_dir, train=True, device="cpu")
    with torch.no_grad():  # move the policy off the behaviour policy, so that ratios are not all 1
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    grads = []
    for plan in ([list(range(8))], [[i] for i in range(8)]):
        model.zero_grad(set_to_none=True)
        task.begin_step(list(range(8)))
        _step(acc, model, task, plan, 8)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4), n
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_previous_nights_are_separate_groups(tmp_path, gens, policy_dir):
    s = train_grpo(cfg(gens["ref"], tmp_path / "o", policy_dir, previous_data=[gens["scored"]], max_steps=2,
                       importance="sequence", objective="truncate", aggregation="constant"))
    one = train_grpo(cfg(gens["ref"], tmp_path / "p", policy_dir, max_steps=1))
    assert s["data"]["sources"] == 2 and s["data"]["groups"] == 2 * one["data"]["groups"]
    assert s["data"]["examples"] == 2 * one["data"]["examples"]


def test_lora_trains_an_adapter(tmp_path, gens, policy_dir):
    out = tmp_path / "lora"
    train_grpo(cfg(gens["ref"], out, policy_dir, lora_r=4, max_steps=3, lr=5e-3))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert (out / "final" / "model.safetensors").exists()


# --------------------------------------------------------------------------- processes

def _train_args(data, out, policy, *extra):
    return ["train", "grpo", "--data", data, "--output", str(out), "--policy", str(policy), "--lr", "1e-3",
            "--batch-size", "8", "--micro-batch-size", "2", "--kl-coef", "0.05", "--clip-high", "0.28",
            "--report-to", "none", *extra]


def test_killed_after_checkpoint_resumes_to_identical_weights(tmp_path, gens, policy_dir):
    extra = ["--max-steps", "24", "--save-steps", "8"]
    finished(cli_on_cpu(_train_args(gens["ref"], tmp_path / "full", policy_dir, *extra)))
    killed = cli_on_cpu(_train_args(gens["ref"], tmp_path / "k", policy_dir, *extra))
    kill_when(killed, (tmp_path / "k" / "checkpoints" / "step-0000008" / "state.json").exists)
    assert not (tmp_path / "k" / "final").exists(), "the run finished before it could be killed"
    out, err = finished(cli_on_cpu(_train_args(gens["ref"], tmp_path / "k", policy_dir, *extra)))
    assert "resumed from" in out + err and re.search(r"(\d+) steps in", out).group(1) in ("16", "8")
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "k" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = _history(tmp_path / "full"), _history(tmp_path / "k")
    assert [h["step"] for h in hb] == list(range(1, 25))
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert [h["staleness_kl"] for h in ha] == [h["staleness_kl"] for h in hb]


def test_two_gloo_processes_match_one(tmp_path, gens, policy_dir):
    extra = ["--max-steps", "4"]
    finished(cli_on_cpu(_train_args(gens["ref"], tmp_path / "one", policy_dir, *extra)))
    finished(cli_on_cpu(_train_args(gens["ref"], tmp_path / "two", policy_dir, *extra), nproc=2))
    la, lb = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        for k in ("loss", "grad_norm", "staleness_kl", "kl_ref", "clip_fraction", "is_weight/mean"):
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
        for k in ("is_weight/max", "advantage/max", "advantage/min"):  # reduced by max / min over processes
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
