"""Defaults chosen by what a run can see (issue 22 item 2): the learning-rate rule of
offline_rlhf/train/defaults.py, and the run's first line saying what it chose."""

import json

import pytest
from cli_helpers import cli

from offline_rlhf.train.defaults import auto_lr, count_parameters, resolve_lr
from offline_rlhf.train.sft import SFTTrainConfig


@pytest.mark.parametrize("params, lora, want", [
    (1e5, False, 1e-3),       # the bench's toy models: the calibration point
    (1e3, False, 1e-3),       # smaller still: capped at 1e-3
    (1e7, False, 1e-4),       # 1e-3 * sqrt(1e5 / 1e7)
    (1e9, False, 1e-5),
    (1e13, False, 1e-6),      # floor
    (1e9, True, 1e-4),        # LoRA: ten times full fine-tuning
    (1e5, True, 1e-3),        # ... within [1e-5, 1e-3]
    (1e13, True, 1e-5),
])
def test_rule_by_hand(params, lora, want):
    assert auto_lr(int(params), lora) == pytest.approx(want)


def test_parameters_counted_from_the_file_headers(policy_dir):
    from offline_rlhf.models import load_policy
    model = load_policy(policy_dir, device="cpu")
    assert count_parameters(policy_dir) == sum(p.numel() for p in model.parameters())


def test_explicit_value_wins_and_unset_is_resolved(policy_dir):
    n = count_parameters(policy_dir)
    given = SFTTrainConfig(data="x.jsonl", output="o", policy=str(policy_dir), lr=5e-4)
    assert resolve_lr(given) is None and given.lr == 5e-4
    unset = SFTTrainConfig(data="x.jsonl", output="o", policy=str(policy_dir))
    assert resolve_lr(unset) == f"lr {auto_lr(n, False):.3g} (auto: full fine-tuning, {n / 1e6:.2g}M params; " \
                                "--lr sets it)"
    lora = SFTTrainConfig(data="x.jsonl", output="o", policy=str(policy_dir), lora_r=4)
    assert "auto: LoRA r=4" in resolve_lr(lora) and lora.lr == auto_lr(n, True)


def test_first_line_shows_the_choice_and_the_run_records_it(tmp_path, policy_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" a {i}"}) + "\n" for i in range(8)))
    res = cli("train", "sft", "--data", data, "--output", tmp_path / "out", "--policy", policy_dir,
              "--report-to", "none", "--max-steps", "2", "--batch-size", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    lr = auto_lr(count_parameters(policy_dir), False)
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"lr {lr:.3g} (auto: full fine-tuning, ") and "M params" in first, res.stderr
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())
    assert recorded["config"]["lr"] == recorded["identity"]["lr"] == lr
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])["lr"] == \
        pytest.approx(lr)                                        # cosine: step 1 runs at the peak
    assert "unset: chosen by the model's parameter count" in \
        " ".join(cli("train", "dpo", "--help").stdout.split())
