import json
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from offline_rlhf.generation import GenerateConfig, generate
from offline_rlhf.rewards.score import ScoreConfig, score
from offline_rlhf.schemas import load_schema
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.toy import addition_prompts
from offline_rlhf.train.rm import RMTrainConfig, held_out, train_rm
from offline_rlhf.train.sft import SFTTrainConfig, train_sft

WORDS = ["the", "of", "to", "and", "in", "is", "it", "you"]


def apple_pairs(path, n=640, seed=0):
    """Pairs labelled by a hidden rule: more 'apple' words is better (8 words each)."""
    rng = random.Random(seed)

    def response(k):
        words = ["apple"] * k + [rng.choice(WORDS) for _ in range(8 - k)]
        rng.shuffle(words)
        return " " + " ".join(words)
    rows = []
    for i in range(n):
        a, b = rng.sample(range(9), 2)
        hi, lo = max(a, b), min(a, b)
        rows.append({"pair_id": f"{i:08x}", "prompt_id": "p", "prompt": "Rate:",
                     "chosen": response(hi), "rejected": response(lo)})
    with ShardWriter(str(path), "pairs") as w:
        w.write(0, pa.Table.from_pylist(rows, schema=load_schema("pairs").arrow))
        w.finish(total_chunks=1)
    return rows


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, policy_dir):
    d = tmp_path_factory.mktemp("rm")
    rows = apple_pairs(d / "pairs")
    summary = train_rm(RMTrainConfig(data=str(d / "pairs"), output=str(d / "out"), policy=str(policy_dir),
                                     lr=2e-3, max_steps=150, batch_size=16, micro_batch_size=16,
                                     eval_fraction=0.2, report_to="none", schedule="constant"))
    return d, rows, summary


def test_reward_model_learns_hidden_rule(trained_rm, policy_dir):
    d, _, summary = trained_rm
    assert summary["eval"]["eval/accuracy"] > 0.9, summary["eval"]
    assert summary["data"]["eval_pairs"] > 50
    hist = [json.loads(x) for x in (d / "out" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.3
    cfg = json.loads((d / "out" / "final" / "config.json").read_text())
    assert len(cfg["id2label"]) == 1 and cfg["pad_token_id"] is not None


def test_round_trip_score_ranks_held_out_pairs_as_in_training(trained_rm, tmp_path):
    d, rows, summary = trained_rm
    held = [r for r in rows if held_out(r["pair_id"], 0.2)]
    gen = []
    for i, r in enumerate(held):
        for k, side in enumerate(("chosen", "rejected")):
            gen.append({"prompt_id": f"h{i}", "prompt": r["prompt"], "sample_index": k,
                        "response": r[side], "response_token_ids": [1], "finish_reason": "eos"})
    with ShardWriter(str(tmp_path / "gen"), "generations") as w:
        w.write(0, pa.Table.from_pylist(gen, schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    score(ScoreConfig(generations=str(tmp_path / "gen"), output=str(tmp_path / "s"),
                      reward_model=str(d / "out" / "final"), token_budget=256, dtype="float32"))
    r = np.array(open_dataset(str(tmp_path / "s")).read().column("reward").to_pylist()).reshape(-1, 2)
    accuracy = float((r[:, 0] > r[:, 1]).mean())
    assert accuracy == pytest.approx(summary["eval"]["eval/accuracy"], abs=1.5 / len(held))


@pytest.mark.parametrize("bits", [None, 4])
def test_rm_lora_and_qlora_round_trip(tmp_path, policy_dir, bits):
    """LoRA, and QLoRA with activation checkpointing: the head and adapters train, and the
    merged model (unquantized) loads as a one-label reward model."""
    apple_pairs(tmp_path / "pairs", n=64)
    s = train_rm(RMTrainConfig(data=str(tmp_path / "pairs"), output=str(tmp_path / "o"),
                               policy=str(policy_dir), lr=1e-3, max_steps=3, batch_size=8, lora_r=4,
                               bits=bits, gradient_checkpointing=bits is not None, report_to="none"))
    assert s["last"]["loss"] != s["first"]["loss"] and s["last"]["grad_norm"] > 0
    adapter = load_file(str(tmp_path / "o" / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    from offline_rlhf.models import load_reward_model
    model = load_reward_model(tmp_path / "o" / "final", dtype="float32")
    assert model.config.num_labels == 1 and "quantization_config" not in model.config.to_dict()


def test_sft_raises_rule_score_of_greedy_generations(tmp_path, policy_dir):
    rule = {"weights": {"format": 1.0}, "format_pattern": r"\s*\d.*"}   # answer starts with a digit
    with ShardWriter(str(tmp_path / "train_p"), "prompts") as w:
        w.write(0, addition_prompts(48, seed=1))
        w.finish(total_chunks=1)
    with ShardWriter(str(tmp_path / "test_p"), "prompts") as w:
        w.write(0, addition_prompts(24, seed=1, split="test"))
        w.finish(total_chunks=1)
    generate(GenerateConfig(prompts=str(tmp_path / "train_p"), output=str(tmp_path / "g"),
                            policy=str(policy_dir), num_samples=16, max_new_tokens=3, seed=3))
    score(ScoreConfig(generations=str(tmp_path / "g"), output=str(tmp_path / "s"), **rule))
    s = train_sft(SFTTrainConfig(data=str(tmp_path / "s"), output=str(tmp_path / "sft"),
                                 policy=str(policy_dir), threshold=1.0, lr=3e-3, max_steps=40,
                                 batch_size=8, report_to="none", schedule="constant"))
    assert s["data"]["kept"] > 0 and s["data"]["below_threshold"] > 0

    def greedy_score(model, name):
        generate(GenerateConfig(prompts=str(tmp_path / "test_p"), output=str(tmp_path / f"e{name}"),
                                policy=str(model), num_samples=1, max_new_tokens=3, greedy=True))
        score(ScoreConfig(generations=str(tmp_path / f"e{name}"), output=str(tmp_path / f"es{name}"), **rule))
        return float(np.mean(open_dataset(str(tmp_path / f"es{name}")).read().column("reward").to_pylist()))
    before, after = greedy_score(policy_dir, "0"), greedy_score(tmp_path / "sft" / "final", "1")
    assert after > before + 0.3, (before, after)


def test_sft_five_steps_change_parameters_from_plain_data(tmp_path, policy_dir):
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}"}) + "\n"
                           for i in range(40)))
    train_sft(SFTTrainConfig(data=str(src), output=str(tmp_path / "o"), policy=str(policy_dir),
                             lr=1e-3, max_steps=5, batch_size=8, report_to="none"))
    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "o" / "final" / "model.safetensors"))
    assert all(not torch.equal(before[k], after[k]) for k in before)
    hist = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_sft_qlora_with_activation_checkpointing(tmp_path, policy_dir):
    """The frugal set-up (4-bit base, LoRA, activation checkpointing) trains SFT, through
    the current transformers API: no deprecation warning about checkpointing."""
    import warnings
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}"}) + "\n"
                           for i in range(40)))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        s = train_sft(SFTTrainConfig(data=str(src), output=str(tmp_path / "o"), policy=str(policy_dir),
                                     lr=3e-3, max_steps=5, batch_size=8, bits=4, lora_r=8,
                                     gradient_checkpointing=True, report_to="none"))
    assert not [w for w in seen if "checkpointing" in str(w.message)], [str(w.message) for w in seen]
    assert s["last"]["loss"] < s["first"]["loss"]
    adapter = load_file(str(tmp_path / "o" / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "o" / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
