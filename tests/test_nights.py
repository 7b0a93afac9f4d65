import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_task_inputs, kill_when

from offline_rlhf.errors import InputError
from offline_rlhf.nights import NightsConfig, NightsPlan, load_plan, night_overrides, run_nights

JOB = """
name = "nights"
workdir = "{work}"
[nights]
count = 2
previous = 1
reference_refresh = {refresh}
[inputs]
policy = "{policy}"
reward_model = "{rm}"
prompts = "{prompts}"
heldout = "{heldout}"
[stages.generate]
kind = "generate"
prompts = "inputs.prompts"
policy = "inputs.policy"
num_samples = 4
max_new_tokens = 6
seed = 5
[stages.score]
kind = "score"
generations = "stages.generate"
reward_model = "inputs.reward_model"
weights = {{ reward_model = 1.0 }}
[stages.logprobs]
kind = "logprobs"
generations = "stages.score"
reference = "inputs.policy"
[stages.train]
kind = "train"
algorithm = "{algorithm}"
data = "stages.logprobs"
policy = "inputs.policy"
lr = 1e-3
max_steps = 8
batch_size = 8
micro_batch_size = 4
save_steps = 2
kl_coef = 0.05
report_to = "none"
[stages.eval]
kind = "eval"
policy = "stages.train"
baseline = "inputs.policy"
prompts = "inputs.heldout"
reward_model = "inputs.reward_model"
weights = {{ reward_model = 1.0 }}
max_new_tokens = 6
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, policy_dir, reward_dir):
    return copy_task_inputs(tmp_path_factory.mktemp("nights_inputs"), policy_dir, reward_dir, 8, 4)


def job(tmp_path, inputs, refresh=1, algorithm="grpo", name="job"):
    f = tmp_path / f"{name}.toml"
    f.write_text(JOB.format(work=tmp_path / name, refresh=refresh, algorithm=algorithm, **inputs))
    return str(f)


def test_reference_refresh_and_previous_data_per_night():
    pl = NightsPlan(NightsConfig(count=6, previous=2, reference_refresh=0), Path("w"), "train", "train",
                    "logprobs", ["logprobs"], {"generate": 3})
    policies, data = [f"pol{i}" for i in range(6)], [f"data{i}" for i in range(5)]
    fixed = night_overrides(pl, 4, policies, data, {"logprobs": "pol0"})
    assert f"workdir={Path('w') / 'night-004'}" in fixed and "inputs.policy=pol4" in fixed
    assert "stages.logprobs.reference=pol0" in fixed and "stages.generate.seed=7" in fixed
    assert 'stages.train.previous_data=["data2", "data3"]' in fixed
    every2 = NightsPlan(NightsConfig(reference_refresh=2, previous=0), Path("w"), "train", "train",
                        None, ["logprobs"], {})
    refs = [next(x for x in night_overrides(every2, n, policies, data, {"logprobs": "ref0"})
                 if x.startswith("stages.logprobs")) for n in range(1, 6)]
    assert refs == [f"stages.logprobs.reference={x}" for x in ("ref0", "pol2", "pol2", "pol4", "pol4")]
    assert not any("previous_data" in x for x in night_overrides(every2, 3, policies, data, {"logprobs": "r"}))
    assert night_overrides(pl, 0, policies, data, {}) == [f"workdir={Path('w') / 'night-000'}"]


def test_bad_nights_tables_are_refused(tmp_path, inputs):
    with pytest.raises(InputError, match=r"nights.previous: only `train grpo` reads earlier nights' data"):
        load_plan(job(tmp_path, inputs, algorithm="dpo"))
    with pytest.raises(InputError, match=r"nights.policy_input: 'model' is not defined in \[inputs\]"):
        load_plan(job(tmp_path, inputs), ["nights.policy_input=model"])
    with pytest.raises(InputError, match=r"nights.countt: unknown key"):
        load_plan(job(tmp_path, inputs), ["nights.countt=3"])


def test_dry_run_plans_night_zero_and_waits_for_its_policy(tmp_path, inputs):
    records = run_nights(job(tmp_path, inputs), dry_run=True)
    assert [r["action"] for r in records[0]["stages"]] == ["run"] * 5
    assert records[1] == {"night": 1, "pending": "needs night-000's policy"}
    assert not (tmp_path / "job").exists()


def test_killed_nights_run_resumes_and_keeps_every_nights_lineage(tmp_path, inputs):
    f = job(tmp_path, inputs, refresh=1)
    work = tmp_path / "job"
    cli = [sys.executable, "-m", "offline_rlhf.cli", "pipeline", "run", f]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, lambda: any((work / "night-001" / "stages").glob("train-*/checkpoints/step-0000004/state.json")),
              timeout=600)
    assert not list((work / "night-001" / "stages").glob("eval-*/results.json"))
    out = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout + out.stderr
    for n in (0, 1):   # issue 27: each night's eval table (before/after, KL) and report path
        shown = out.stdout[out.stdout.index(f"night {n} eval:"):]
        assert "KL to ref" in shown and "baseline" in shown and "report: " in shown
    log0 = (work / "night-000" / "run.log").read_text()
    assert log0.count("run generate") == 1 and log0.count("reuse ") == 5   # night 0 was not redone
    records = json.loads((work / "nights.json").read_text())
    n0, n1 = records
    assert n1["policy_in"] == n0["policy_out"] and n1["policy_in_fingerprint"] == n0["policy_out_fingerprint"]
    assert n0["policy_in"] == str(inputs["policy"]) and n0["policy_out"].endswith("/final")
    assert n0["reference"] == {"logprobs": str(inputs["policy"])}
    assert n1["reference"] == {"logprobs": n1["policy_in"]}               # refreshed every night
    assert n1["previous_data"] == [n0["data"]] and n0["previous_data"] == []
    assert n0["train"]["data"]["sources"] == 1 and n1["train"]["data"]["sources"] == 2
    assert n1["train"]["first"]["staleness_kl"] > n0["train"]["first"]["staleness_kl"]  # night 0's data is stale
    for r in records:
        assert r["eval"]["policy_reward"] is not None and Path(r["eval"]["report"]).exists()
        assert Path(r["policy_out"], "model.safetensors").exists() and Path(r["data"]).exists()
    resolved = json.loads((work / "night-001" / "pipeline.resolved.json").read_text())
    assert resolved["stages"]["generate"]["seed"] == 6                    # fresh samples each night
    assert "| 1 |" in (work / "nights.md").read_text()
    again = run_nights(f)                                                 # nothing left to do
    assert all(x["action"] == "reuse" for r in again for x in r["stages"])
