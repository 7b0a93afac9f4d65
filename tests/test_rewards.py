import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from offline_rlhf.errors import InputError
from offline_rlhf.rewards import rules
from offline_rlhf.rewards.score import ScoreConfig, group_normalize, score
from offline_rlhf.schemas import load_schema
from offline_rlhf.shards import ShardWriter, open_dataset

REWARD_COLUMNS = ["reward", "reward_components", "reward_normalized", "reward_fingerprint"]


@pytest.mark.parametrize("response, reference, expected", [
    (" 19", "19", 1.0), ("19\n", " 19 ", 1.0), (" 19 apples", "19", 0.0),
    ("<think>9+10</think><answer> 19 </answer>", "19", 1.0), ("<answer>18</answer>", "19", 0.0),
    ("", "19", 0.0),
])
def test_exact_match(response, reference, expected):
    assert rules.exact_match(response, reference) == expected


@pytest.mark.parametrize("response, reference, expected", [
    ("the answer is 19", "19", 1.0), ("so 1,234.0 total", "1234", 1.0),
    ("first 3 then 19.5", "19.5", 1.0), ("3 then 4", "3", 0.0), ("no number", "3", 0.0),
    ("<answer>-2</answer> then 7", "-2", 1.0), ("x = 1e3", "1000", 1.0),
])
def test_numeric_match(response, reference, expected):
    assert rules.numeric_match(response, reference) == expected


@pytest.mark.parametrize("response, expected", [
    ("<think>a\nb</think><answer>4</answer>", 1.0), ("  <think></think> <answer>4</answer>\n", 1.0),
    ("<answer>4</answer>", 0.0), ("<think>x</think><answer>4</answer> extra", 0.0),
])
def test_format_match(response, expected):
    assert rules.format_match(response, rules.DEFAULT_FORMAT) == expected


def test_length_penalty():
    assert rules.length_penalty(10, 4) == -6.0 and rules.length_penalty(3, 4) == 0.0


def test_group_normalize_closed_form():
    r = np.array([1.0, 3.0, 5.0, 2.0, 2.0, 7.0])
    out = group_normalize(["a", "a", "a", "b", "b", "c"], r)
    std = np.std([1.0, 3.0, 5.0])
    np.testing.assert_allclose(out[:3], [(1 - 3) / std, 0.0, (5 - 3) / std])
    assert list(out[3:]) == [0.0, 0.0, 0.0]  # equal rewards and single samples give 0


def _generations(tmp_path, rows=12):
    from conftest import generation_rows
    data = generation_rows(rows)
    for i, r in enumerate(data):
        r["response"] = [" 1", " 7", "<think>x</think><answer>5</answer>"][i % 3]
        r["reference_answer"] = ["1", "5", "5"][i % 3]
        r.update(reward=None, reward_components=None, reward_normalized=None)
    path = tmp_path / "gen"
    with ShardWriter(str(path), "generations") as w:
        w.write(0, pa.Table.from_pylist(data[:8], schema=load_schema("generations").arrow))
        w.write(1, pa.Table.from_pylist(data[8:], schema=load_schema("generations").arrow))
        w.finish(total_chunks=2)
    return str(path)


def test_rule_scoring_weighted_total(tmp_path):
    gen = _generations(tmp_path)
    score(ScoreConfig(generations=gen, output=str(tmp_path / "s"),
                      weights={"exact_match": 2.0, "format": 0.5, "length_penalty": 0.1},
                      length_target=4))
    rows = open_dataset(str(tmp_path / "s"), True).read().to_pylist()
    for r in rows:
        c = {x["name"]: x["value"] for x in r["reward_components"]}
        assert set(c) == {"exact_match", "format", "length_penalty"}
        assert c["length_penalty"] == -2.0  # 6 tokens, target 4
        assert r["reward"] == pytest.approx(2 * c["exact_match"] + 0.5 * c["format"] - 0.2)
    assert [r["reward_components"][0]["value"] for r in rows[:3]] == [1.0, 0.0, 1.0]


def test_rescoring_changes_only_reward_columns(tmp_path, reward_dir):
    gen = _generations(tmp_path)
    # float32 (auto is bfloat16 on CUDA, where -3x the head is not exactly -3x the reward)
    score(ScoreConfig(generations=gen, output=str(tmp_path / "a"), reward_model=str(reward_dir),
                      dtype="float32"))
    other = tmp_path / "rm2"
    shutil.copytree(reward_dir, other)
    from offline_rlhf.models import load_reward_model
    m = load_reward_model(other, dtype="float32", device="cpu")
    with torch.no_grad():
        m.score.weight.mul_(-3.0)
    m.save_pretrained(other, safe_serialization=True)
    score(ScoreConfig(generations=str(tmp_path / "a"), output=str(tmp_path / "b"),
                      reward_model=str(other), dtype="float32"))
    src, a, b = (open_dataset(str(p), True).read() for p in (gen, tmp_path / "a", tmp_path / "b"))
    keep = [c for c in src.column_names if c not in REWARD_COLUMNS]
    assert src.select(keep).equals(a.select(keep)) and a.select(keep).equals(b.select(keep))
    ra, rb = np.array(a.column("reward").to_pylist()), np.array(b.column("reward").to_pylist())
    np.testing.assert_allclose(rb, -3.0 * ra, rtol=1e-4, atol=1e-5)
    assert a.column("reward_fingerprint")[0] != b.column("reward_fingerprint")[0]
    # the input is never modified
    assert open_dataset(gen).read().column("reward").null_count == 12


def test_reward_model_scores_last_real_token(tmp_path, reward_dir):
    from offline_rlhf.rewards.reward_model import RewardModelScorer
    s = RewardModelScorer(str(reward_dir), token_budget=64, dtype="float32")
    seqs = [[5, 6, 7], [8, 9], [5, 6, 7, 10, 11, 12, 13]]
    batched = s.score_ids(seqs)
    alone = np.array([s.score_ids([x])[0] for x in seqs])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    with torch.no_grad():
        direct = s.model(input_ids=torch.tensor([seqs[2]], device=s.device)).logits[0, 0].item()
    assert batched[2] == pytest.approx(direct, abs=1e-5)


def test_bad_score_inputs(tmp_path, reward_dir):
    gen = _generations(tmp_path)
    two = tmp_path / "two"
    shutil.copytree(reward_dir, two)
    cfg = json.loads((two / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "a", "1": "b"}, {"a": 0, "b": 1}
    (two / "config.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "offline_rlhf.cli", "score", "--generations", gen,
                          "--output", str(tmp_path / "x"), "--reward-model", str(two)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "reward model has 2 labels" in out.stderr
    with pytest.raises(InputError, match="weights.bogus: unknown component"):
        ScoreConfig(generations=gen, output="x", weights={"bogus": 1.0})
    with pytest.raises(InputError, match="nothing to score"):
        ScoreConfig(generations=gen, output="x")


def test_kimi_length_reward_hand_computed():
    # lengths 2..6: lambda = 0.5 - (n - 2) / 4 = 0.5, 0.25, 0, -0.25, -0.5
    got = rules.kimi_length([2, 3, 4, 5, 6], [True, False, True, True, False])
    assert got == [0.5, 0.0, 0.0, -0.25, -0.5]  # incorrect: min(0, lambda)
    assert rules.kimi_length([4, 4, 4], [True, False, True]) == [0.0, 0.0, 0.0]


def test_kimi_length_is_relative_to_each_prompts_group(tmp_path):
    from conftest import generation_rows
    rows = generation_rows(6, k=3)  # prompts p00000 and p00001, three samples each
    lengths = [2, 4, 6, 5, 5, 9]
    for r, n, ok in zip(rows, lengths, [True, True, False, False, True, True]):
        r["response_token_ids"] = list(range(n))
        r["behaviour_logps"], r["ref_logps"] = [-0.5] * n, [-0.5] * n
        r["response"], r["reference_answer"] = (" 7", "7") if ok else (" 8", "7")
    with ShardWriter(str(tmp_path / "gen"), "generations") as w:
        w.write(0, pa.Table.from_pylist(rows, schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    score(ScoreConfig(generations=str(tmp_path / "gen"), output=str(tmp_path / "s"),
                      weights={"exact_match": 1.0, "kimi_length": 0.5}))
    out = open_dataset(str(tmp_path / "s")).read().to_pylist()
    kimi = [{c["name"]: c["value"] for c in r["reward_components"]}["kimi_length"] for r in out]
    # group 1: lengths 2 4 6 -> 0.5, 0, -0.5 (the last is wrong: min(0, -0.5)); group 2: 5 5 9
    assert kimi == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.5, -0.5])
    assert [r["reward"] for r in out] == pytest.approx([1.25, 1.0, -0.25, 0.0, 1.25, 0.75])
    with pytest.raises(InputError, match="length_correct: must be one of"):
        ScoreConfig(generations="g", output="o", weights={"kimi_length": 1.0}, length_correct="f1")
