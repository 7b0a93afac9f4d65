"""Defaults chosen by what a run can see (issue 22 item 2): the learning-rate rule of
offline_rlhf/train/defaults.py, and the run's first line saying what it chose."""

import json

import pytest
from cli_helpers import cli

from offline_rlhf.rest import RestConfig, improve_plan
from offline_rlhf.train.defaults import (
    BASE_EPOCHS,
    CONTRASTS,
    MIN_STEPS,
    auto_beta,
    auto_epochs,
    auto_lr,
    count_parameters,
    resolve_beta,
    resolve_epochs,
    resolve_lr,
)
from offline_rlhf.train.dpo import DPOTrainConfig
from offline_rlhf.train.kto import KTOTrainConfig
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


def test_kto_and_grpo_run_at_0_3_times_the_rule():
    assert auto_lr(10**9, False, "kto") == auto_lr(10**9, False, "grpo") == pytest.approx(0.3e-5)
    assert auto_lr(10**9, True, "kto") == pytest.approx(0.3e-4)
    assert auto_lr(10**9, False, "dpo") == auto_lr(10**9, False, "sft") == pytest.approx(1e-5)


@pytest.mark.parametrize("examples, batch, want", [
    (1000, 16, 3),            # 63 steps a pass: three passes (189 steps)
    (300, 16, 3),             # 19 steps a pass: three are 57 steps
    (200, 16, 4),             # 13 steps a pass: three are 39, four are 52
    (105, 16, 7),             # 7 steps a pass: 7 passes, 49 steps
    (5, 16, 48),              # one step a pass
])
def test_epochs_rule_by_hand(examples, batch, want):
    assert (BASE_EPOCHS, MIN_STEPS) == (3, 48) and auto_epochs(examples, batch) == want
    assert auto_epochs(examples, batch, "ilql") == auto_epochs(examples, batch, "grpo") == want   # as sft
    assert auto_epochs(examples, batch, "kto") == want                                           # with beta 1


@pytest.mark.parametrize("examples, batch, want", [
    (1000, 16, 1),            # 63 steps a pass: one pass
    (753, 16, 1),             # 47 full steps and a last one: 48
    (752, 16, 2),             # 47 steps a pass: one short, two passes
    (137, 16, 6),             # 9 steps a pass: 6 passes, 54 steps
    (5, 16, 48),
])
def test_contrasts_start_from_one_pass(examples, batch, want):
    assert CONTRASTS == ("dpo", "rm")
    assert all(auto_epochs(examples, batch, a) == want for a in CONTRASTS)


def test_explicit_epochs_win_and_unset_are_said():
    given = SFTTrainConfig(data="x", output="o", policy="p", epochs=2.0)
    assert resolve_epochs(given, 105) is None and given.epochs == 2.0
    unset = SFTTrainConfig(data="x", output="o", policy="p")
    assert resolve_epochs(unset, 105) == "epochs 7 (auto: 105 examples, 7 steps of 16 a pass, at least " \
                                         "48 steps; --epochs sets it)" and unset.epochs == 7.0
    many = SFTTrainConfig(data="x", output="o", policy="p")
    assert resolve_epochs(many, 1000) == "epochs 3 (auto: 1000 examples, 63 steps of 16 a pass; " \
                                        "--epochs sets it)" and many.epochs == 3.0
    dpo = DPOTrainConfig(data="x", output="o", policy="p")
    assert resolve_epochs(dpo, 1000) == "epochs 1 (auto: 1000 examples, 63 steps of 16 a pass; " \
                                       "--epochs sets it)" and dpo.epochs == 1.0
    steps = SFTTrainConfig(data="x", output="o", policy="p", max_steps=3)
    assert resolve_epochs(steps, 105) is None                    # max_steps decides: nothing to say


@pytest.mark.parametrize("passes, want", [(0.5, 0.1), (1, 0.1), (1.02, 2.0), (6, 2.0)])
def test_dpo_beta_rule_by_hand(passes, want):
    assert auto_beta(passes) == auto_beta(passes, "dpo") == want


@pytest.mark.parametrize("passes, want", [(0.5, 0.1), (1, 0.1), (1.02, 1.0), (3, 1.0)])
def test_kto_beta_rule_by_hand(passes, want):
    assert auto_beta(passes, "kto") == want


def test_dpo_beta_follows_the_passes_and_explicit_wins():
    few = DPOTrainConfig(data="x", output="o", policy="p")       # 137 pairs: 9 steps a pass, 6 passes
    resolve_epochs(few, 137)
    assert resolve_beta(few, 137) == "beta 2 (auto: 6 passes over 137 pairs; --beta sets it)" and few.beta == 2.0
    many = DPOTrainConfig(data="x", output="o", policy="p")      # 1000 pairs: 63 steps, one pass
    resolve_epochs(many, 1000)
    assert resolve_beta(many, 1000) == "beta 0.1 (auto: 1 pass over 1000 pairs; --beta sets it)"
    steps = DPOTrainConfig(data="x", output="o", policy="p", max_steps=100)   # 100 / 63 passes
    resolve_epochs(steps, 1000)
    assert resolve_beta(steps, 1000) == "beta 2 (auto: 1.59 passes over 1000 pairs; --beta sets it)"
    given = DPOTrainConfig(data="x", output="o", policy="p", epochs=3.0, beta=0.3)
    assert resolve_beta(given, 1000) is None and given.beta == 0.3
    sft = SFTTrainConfig(data="x", output="o", policy="p", epochs=3.0)   # no beta: nothing to choose
    assert resolve_beta(sft, 1000) is None


def test_kto_beta_follows_the_passes_and_explicit_wins():
    unset = KTOTrainConfig(data="x", output="o", policy="p")     # 1000 examples: 63 steps, 3 passes
    assert resolve_epochs(unset, 1000) == "epochs 3 (auto: 1000 examples, 63 steps of 16 a pass; " \
                                          "--epochs sets it)"
    assert resolve_beta(unset, 1000) == "beta 1 (auto: 3 passes over 1000 examples; --beta sets it)" \
        and unset.beta == 1.0
    once = KTOTrainConfig(data="x", output="o", policy="p", epochs=1.0)
    assert resolve_beta(once, 1000) == "beta 0.1 (auto: 1 pass over 1000 examples; --beta sets it)"
    given = KTOTrainConfig(data="x", output="o", policy="p", beta=0.3)
    resolve_epochs(given, 1000)
    assert resolve_beta(given, 1000) is None and given.beta == 0.3


@pytest.mark.parametrize("kept, settings, want", [
    (100, {}, (7, 49)),                          # 7 steps a pass: the train rule, 7 passes
    (1000, {}, (3, 189)),                        # 63 steps a pass: 3 passes
    (100, {"epochs_per_improve": 1.5}, (1.5, 10)),   # given: floor(1.5 * 7)
    (100, {"steps_per_improve": 5}, (None, 5)),
    (10, {}, (48, 48)),                          # fewer than a batch: one step a pass
])
def test_rest_improve_steps_follow_the_train_rule(kept, settings, want):
    cfg = RestConfig(policy="m", prompts="p", output="o", **settings)
    assert improve_plan(cfg, kept) == want


def test_rest_says_what_each_improve_step_chose(capsys):
    from offline_rlhf.rest import _say_choice
    _say_choice(RestConfig(policy="m", prompts="p", output="o"), 0, 1, 5e-4, 7, 49, 100)
    _say_choice(RestConfig(policy="m", prompts="p", output="o", lrs=[1e-3, 5e-4, 2e-4],
                           epochs_per_improve=2), 0, 0, 1e-3, 2, 14, 100)
    assert capsys.readouterr().err.splitlines() == [
        "grow 0 improve 2: lr 0.0005 (auto: the train rule's rate / 2; lrs sets it), epochs 7 of 100 kept "
        "samples, 49 steps (auto; epochs_per_improve sets it)",
        "grow 0 improve 1: lr 0.001, epochs 2 of 100 kept samples, 14 steps"]


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
    kto = KTOTrainConfig(data="x.jsonl", output="o", policy=str(policy_dir))
    assert resolve_lr(kto).endswith("params, x0.3 for kto; --lr sets it)") and kto.lr == auto_lr(n, False, "kto")


def test_first_line_shows_the_choice_and_the_run_records_it(tmp_path, policy_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" a {i}"}) + "\n" for i in range(8)))
    res = cli("train", "sft", "--data", data, "--output", tmp_path / "out", "--policy", policy_dir,
              "--report-to", "none", "--batch-size", "4", "--epochs", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    lr = auto_lr(count_parameters(policy_dir), False)
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"lr {lr:.3g} (auto: full fine-tuning, ") and "M params" in first, res.stderr
    assert "epochs" not in res.stderr                               # given: nothing to say
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())
    assert recorded["config"]["lr"] == recorded["identity"]["lr"] == lr
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])["lr"] == \
        pytest.approx(lr)                                        # cosine: step 1 runs at the peak
    help_text = " ".join(cli("train", "dpo", "--help").stdout.split())
    assert "unset: chosen by the model's parameter count" in help_text
    assert "unset: 3 epochs (train sft, kto, ilql, grpo, rest's improve steps) or 1 (train dpo, rm), " \
           "or as many whole epochs as make at least 48 optimizer steps" in help_text
    assert "unset: 0.1 when the run passes over its data once, 2 when more than once" in help_text
    kto_help = " ".join(cli("train", "kto", "--help").stdout.split())
    assert "unset: 0.1 when the run passes over its data once, 1 when more than once" in kto_help
