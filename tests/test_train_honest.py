"""Training runs that never lie (issue 23: non-finite guard, input values, run identity,
every example every epoch) and the optimizer knobs (issue 22 item 3)."""

import json
import math
import shutil

import pyarrow as pa
import pytest
import torch
from cli_helpers import cli, one_error_line
from conftest import cli_on_cpu, finished, generation_rows
from safetensors.torch import load_file

from offline_rlhf.errors import InputError, TrainingDiverged
from offline_rlhf.schemas import load_schema
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.train.loop import make_optimizer, plan_epoch, total_steps
from offline_rlhf.train.sft import SFTTrainConfig, train_sft
from offline_rlhf.train.values import first_non_finite


def sft_file(path, n):
    path.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}"}) + "\n"
                            for i in range(n)))
    return path


def history(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def sft_args(data, out, policy, *extra):
    return ["train", "sft", "--data", data, "--output", out, "--policy", policy, "--report-to", "none",
            *extra]


# --------------------------------------------------------------------------- 1. non-finite guard

def test_diverged_run_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, policy_dir):
    data, out = sft_file(tmp_path / "d.jsonl", 32), tmp_path / "out"
    res = cli(*sft_args(data, out, policy_dir, "--lr", "1e8", "--batch-size", "8", "--max-steps", "6",
                        "--save-steps", "1"))
    line = one_error_line(res, "training diverged at step ", " of 6: ", "no final model was written")
    step = int(line.split("at step ")[1].split()[0])
    assert step >= 2
    assert not (out / "final").exists() and not (out / "train_summary.json").exists()
    kept = sorted((out / "checkpoints").glob("step-*"))
    assert kept and kept[-1].name == f"step-{step - 1:07d}" and str(kept[-1]) in line
    weights = load_file(str(kept[-1] / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    bad = history(out)[-1]          # the bad step is logged, with the term that is not finite
    assert bad["step"] == step
    named = [k for k in ("loss", "grad_norm") if not math.isfinite(bad[k])]
    assert named and all(f"{k} is nan" in line or f"{k} is inf" in line for k in named)


def test_the_bad_step_updates_no_weight(tmp_path, policy_dir, monkeypatch):
    """A loss that turns NaN at step 3: the optimizer stepped twice, never a third time."""
    import offline_rlhf.train.sft as sft
    calls, steps = {"n": 0}, []
    real_loss = sft.sft_loss

    def poisoned(logps, mask):
        calls["n"] += 1
        losses, metrics = real_loss(logps, mask)
        return (losses * float("nan") if calls["n"] == 3 else losses), metrics
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(sft, "sft_loss", poisoned)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or
                        real_step(self, *a, **k))
    cfg = SFTTrainConfig(data=str(sft_file(tmp_path / "d.jsonl", 16)), output=str(tmp_path / "o"),
                         policy=str(policy_dir), batch_size=4, micro_batch_size=4, max_steps=4,
                         report_to="none")
    with pytest.raises(TrainingDiverged, match="at step 3 of 4: loss is nan"):
        train_sft(cfg)
    assert len(steps) == 2
    assert not (tmp_path / "o" / "train_summary.json").exists()


def _poisoned_generations(path, monkeypatch, column, row, value):
    """A complete generations dataset holding one bad value, as another tool could write it
    (our writer's checks are switched off while it is written)."""
    rows = generation_rows(16)
    if column == "reward":
        rows[row]["reward"] = value
    else:
        rows[row][column][2] = value
    with monkeypatch.context() as m:
        m.setattr("offline_rlhf.shards.find_violations", lambda table, schema: [])
        with ShardWriter(str(path), "generations") as w:
            w.write(0, pa.Table.from_pylist(rows, schema=load_schema("generations").arrow))
            w.finish(total_chunks=1)
    return open_dataset(str(path)).files()[0]


@pytest.mark.parametrize("column,row,value,shown", [("reward", 5, math.inf, "inf"),
                                                    ("behaviour_logps", 9, math.nan, "nan at position 2")])
def test_poisoned_grpo_row_refused_before_training(tmp_path, policy_dir, monkeypatch, column, row,
                                                   value, shown):
    shard = _poisoned_generations(tmp_path / "gen", monkeypatch, column, row, value)
    res = cli("train", "grpo", "--data", tmp_path / "gen", "--output", tmp_path / "out",
              "--policy", policy_dir, "--report-to", "none")
    one_error_line(res, f"{shard}, row {row}, column '{column}': non-finite value (NaN or inf): {shown}")
    assert not (tmp_path / "out").exists()


def _forged(path, schema, rows, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr("offline_rlhf.shards.find_violations", lambda table, schema: [])
        with ShardWriter(str(path), schema) as w:
            w.write(0, pa.Table.from_pylist(rows, schema=load_schema(schema).arrow))
            w.finish(total_chunks=1)
    return open_dataset(str(path)).files()[0]


def _pair_rows(pairs_ds, column, row, value):
    """8 pairs with reference sums and margins, one bad value in ``column``."""
    rows = open_dataset(pairs_ds).read().to_pylist()[:8]
    for r in rows:
        r.update(chosen_ref_logps_sum=-1.0, rejected_ref_logps_sum=-2.0, margin=0.5)
    rows[row][column] = value
    return rows


@pytest.mark.parametrize("algo", ["dpo", "rm", "ilql", "sft"])
def test_every_trainer_refuses_non_finite_values_before_loading_a_model(
        tmp_path, policy_dir, pairs_ds, monkeypatch, algo):
    from offline_rlhf.train import ALGORITHMS
    if algo in ("dpo", "rm"):
        column = "rejected_ref_logps_sum" if algo == "dpo" else "margin"
        rows, schema = _pair_rows(pairs_ds, column, 3, math.nan if algo == "dpo" else math.inf), "pairs"
        extra = {"use_margin": True} if algo == "rm" else {}
    else:
        rows, schema, extra = generation_rows(16), "generations", {}
        column = "token_rewards" if algo == "ilql" else "reward"
        for r in rows:
            r["token_rewards"] = [0.0] * len(r["response_token_ids"])
        if algo == "ilql":
            rows[4]["token_rewards"][1] = -math.inf
        else:
            rows[4]["reward"] = math.nan
    shard = _forged(tmp_path / "data", schema, rows, monkeypatch)
    loaded = []
    monkeypatch.setattr("offline_rlhf.train.loop.load_model_for_training",
                        lambda *a, **k: loaded.append(1))
    cls, run, _ = ALGORITHMS[algo]
    cfg = cls(data=str(tmp_path / "data"), output=str(tmp_path / "out"), policy=str(policy_dir),
              report_to="none", **extra)
    with pytest.raises(InputError, match=f"{shard}, row (3|4), column '{column}': non-finite value"):
        run(cfg)
    assert not loaded and not (tmp_path / "out").exists()


def test_first_non_finite_names_row_and_position():
    assert first_non_finite(pa.chunked_array([[1.0, None, 2.0]])) is None
    assert first_non_finite(pa.chunked_array([[1.0, 2.0], [-math.inf]])) == (2, "-inf")
    lists = pa.chunked_array([[[0.0, -1.0], None, [-1.0, -2.0, math.nan]]])
    assert first_non_finite(lists) == (2, "nan at position 2")


# --------------------------------------------------------------------------- 2. run identity

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, policy_dir):
    """A finished SFT run (16 examples, batch 4, 4 steps, checkpoints every 2)."""
    d = tmp_path_factory.mktemp("finished")
    data = sft_file(d / "d.jsonl", 16)
    train_sft(SFTTrainConfig(data=str(data), output=str(d / "out"), policy=str(policy_dir), lr=1e-3,
                             batch_size=4, max_steps=4, save_steps=2, report_to="none"))
    return d, data


def test_identical_finished_rerun_does_nothing(finished_run, policy_dir):
    d, data = finished_run
    out = d / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    res = cli(*sft_args(data, out, policy_dir, "--lr", "1e-3", "--batch-size", "4", "--max-steps", "4",
                        "--save-steps", "2", "--micro-batch-size", "2"))   # not in the identity
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already trained by an identical run (4 steps); nothing to do" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_changed_rerun_refused_naming_the_options_then_overwrite_starts_afresh(
        tmp_path, finished_run, policy_dir):
    d, _ = finished_run
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    shutil.rmtree(out / "final")                     # as if killed before the end: resume is due
    (out / "train_summary.json").unlink()
    other = sft_file(tmp_path / "other.jsonl", 24)
    args = sft_args(other, out, policy_dir, "--lr", "5e-2", "--batch-size", "4", "--max-steps", "4",
                    "--save-steps", "2")
    one_error_line(cli(*args), f"{out / 'checkpoints' / 'step-0000002'}: written by a run with other "
                   "settings (data: other content; lr: 0.001 before, 0.05 now)",
                   "--overwrite", "--resume never")
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 1e-3   # untouched
    res = cli(*args, "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" not in res.stdout + res.stderr
    ran = json.loads((out / "config.json").read_text())
    assert ran["config"]["lr"] == 5e-2 and ran["config"]["data"] == str(other)
    assert [h["step"] for h in history(out)] == [1, 2, 3, 4]
    assert json.loads((out / "train_summary.json").read_text())["identity"] == ran["identity"]


def test_identical_killed_run_resumes_and_another_policy_is_refused(tmp_path, finished_run, policy_dir):
    d, data = finished_run
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    shutil.rmtree(out / "final")
    (out / "train_summary.json").unlink()
    other = tmp_path / "policy2"
    shutil.copytree(policy_dir, other)
    w = load_file(str(other / "model.safetensors"))
    from safetensors.torch import save_file
    save_file({k: v + 0.01 for k, v in w.items()}, str(other / "model.safetensors"))
    common = ["--lr", "1e-3", "--batch-size", "4", "--max-steps", "4", "--save-steps", "2"]
    one_error_line(cli(*sft_args(data, out, other, *common)), "(policy: other content)")
    res = cli(*sft_args(data, out, policy_dir, *common))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr and "2 steps in" in res.stdout
    a = load_file(str(d / "out" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))   # (bit-exact resume: test_kills.py)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_never_trains_from_step_0_over_another_run(tmp_path, finished_run, policy_dir):
    d, data = finished_run
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    kw = dict(data=str(data), output=str(out), policy=str(policy_dir), lr=2e-3, batch_size=4,
              max_steps=4, save_steps=3, report_to="none")
    with pytest.raises(InputError, match=r"\(lr: 0.001 before, 0.002 now\)"):
        train_sft(SFTTrainConfig(**kw))
    s = train_sft(SFTTrainConfig(resume="never", **kw))
    assert s["steps_run"] == 4 and s["resumed_from"] is None
    # the other run's checkpoint (step 2) is gone; this run's own (step 3) is there
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000003"]
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 2e-3


# --------------------------------------------------------------------------- 3. every example

def test_plan_covers_every_example_every_epoch():
    for n, b in ((64, 48), (30, 16), (5, 16), (32, 8)):
        for epoch in range(3):
            steps = plan_epoch(n, b, seed=1, epoch=epoch)
            assert len(steps) == -(-n // b)
            assert sorted(i for s in steps for i in s) == list(range(n))
            assert all(len(s) == b for s in steps[:-1])
    cfg = SFTTrainConfig(data="x", output="o", policy="p", batch_size=48, epochs=2.0)
    assert total_steps(cfg, 64) == 4
    assert total_steps(SFTTrainConfig(data="x", output="o", policy="p", batch_size=16, epochs=1.5), 30) == 3
    assert total_steps(SFTTrainConfig(data="x", output="o", policy="p", batch_size=16, epochs=0.1), 30) == 1


def test_64_examples_at_batch_48_train_all_64(tmp_path, policy_dir):
    out = tmp_path / "out"
    res = cli(*sft_args(sft_file(tmp_path / "d.jsonl", 64), out, policy_dir, "--batch-size", "48",
                        "--micro-batch-size", "16", "--lr", "1e-3", "--epochs", "1"))
    assert res.returncode == 0, res.stderr[-2000:]
    h = history(out)
    assert [r["examples"] for r in h] == [48, 16] and sum(r["examples"] for r in h) == 64
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2


def test_dataset_smaller_than_the_batch_trains_one_step_of_all(tmp_path, policy_dir):
    out = tmp_path / "out"
    res = cli(*sft_args(sft_file(tmp_path / "d.jsonl", 5), out, policy_dir, "--batch-size", "16", "--epochs", "1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert [(r["step"], r["examples"]) for r in history(out)] == [(1, 5)]
    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_two_gloo_processes_match_one_with_a_last_step_smaller_than_the_world(tmp_path, policy_dir):
    """9 examples at batch 4: steps of 4, 4 and 1; with 2 processes the last step leaves
    one process a zero-weighted pass. Same trajectory as one process."""
    data = sft_file(tmp_path / "d.jsonl", 9)
    extra = ["--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--epochs", "2"]
    finished(cli_on_cpu(sft_args(data, tmp_path / "one", policy_dir, *extra)))
    finished(cli_on_cpu(sft_args(data, tmp_path / "two", policy_dir, *extra), nproc=2))
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert [r["examples"] for r in one] == [r["examples"] for r in two] == [4, 4, 1, 4, 4, 1]
    for x, y in zip(one, two):
        for k in ("loss", "grad_norm", "logps"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (x["step"], k)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# --------------------------------------------------------------------------- optimizer knobs

def _schedule(cfg, steps):
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt, sched = make_optimizer(cfg, params, steps)
    rates = []
    for _ in range(steps):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return opt, rates


def _cfg(**kw):
    return SFTTrainConfig(data="x", output="o", policy="p", lr=1e-3, **kw)


def test_schedules_match_hand_computed_values():
    lr, total = 1e-3, 10
    # linear after 2 warm-up steps: step s < 2 -> s/2; else (10 - s) / 8
    _, rates = _schedule(_cfg(schedule="linear", warmup_steps=2), total)
    assert rates == pytest.approx([lr * x for x in (0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8)])
    # warmup_ratio 0.25 of 10 steps -> ceil(2.5) = 3 warm-up steps; cosine to 0 over the other 7
    _, rates = _schedule(_cfg(schedule="cosine", warmup_ratio=0.25), total)
    want = [s / 3 for s in range(3)] + [0.5 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(3, 10)]
    assert rates == pytest.approx([lr * x for x in want])
    # cosine_with_min_lr, floor 0.1: 0.1 + 0.9 * cosine factor; no warm-up
    _, rates = _schedule(_cfg(schedule="cosine_with_min_lr", min_lr_ratio=0.1), total)
    want = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert rates == pytest.approx([lr * x for x in want])
    assert rates[5] == pytest.approx(lr * 0.55)
    # constant_with_warmup (and its alias constant): s/4 during 4 warm-up steps, then lr
    for name in ("constant_with_warmup", "constant"):
        _, rates = _schedule(_cfg(schedule=name, warmup_steps=4), total)
        assert rates == pytest.approx([lr * x for x in (0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1)])


def test_adamw_gets_the_betas_and_epsilon():
    opt, _ = _schedule(_cfg(adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1), 1)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.1


@pytest.mark.parametrize("kw,message", [
    (dict(warmup_steps=2, warmup_ratio=0.1), "warmup_steps and warmup_ratio: set one of them, not both"),
    (dict(min_lr_ratio=0.1), "min_lr_ratio: only used by the cosine_with_min_lr schedule"),
    (dict(schedule="cosine_with_restarts"), "schedule: must be one of linear, cosine, cosine_with_min_lr"),
    (dict(adam_beta2=1.0), "adam_beta2: must be in [0, 1), got 1.0"),
    (dict(adam_epsilon=0.0), "adam_epsilon: must be > 0"),
])
def test_bad_optimizer_options_refused_naming_the_option(kw, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        _cfg(**kw)


def test_knobs_through_the_cli_reach_the_run(tmp_path, policy_dir):
    out = tmp_path / "out"
    res = cli(*sft_args(sft_file(tmp_path / "d.jsonl", 16), out, policy_dir, "--batch-size", "4",
                        "--max-steps", "4", "--lr", "1e-3", "--schedule", "cosine_with_min_lr",
                        "--min-lr-ratio", "0.2", "--warmup-ratio", "0.25", "--adam-beta1", "0.8",
                        "--adam-beta2", "0.95", "--adam-epsilon", "1e-6"))
    assert res.returncode == 0, res.stderr[-2000:]
    # 1 warm-up step (ceil(0.25 * 4)), then 0.2 + 0.8 * 0.5 * (1 + cos(pi * (s - 1) / 3))
    want = [0.0] + [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in (1, 2, 3)]
    assert [r["lr"] for r in history(out)] == pytest.approx([1e-3 * x for x in want])
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["adam_beta1"], config["adam_beta2"], config["adam_epsilon"]) == (0.8, 0.95, 1e-6)
    help_text = cli("train", "sft", "--help").stdout
    for flag in ("--warmup-ratio", "--adam-beta1", "--adam-beta2", "--adam-epsilon", "--min-lr-ratio",
                 "cosine_with_min_lr", "--overwrite"):
        assert flag in help_text
