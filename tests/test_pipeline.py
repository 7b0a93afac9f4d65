import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_task_inputs, cpu_env
from safetensors.torch import load_file

from offline_rlhf.errors import InputError
from offline_rlhf.pipeline import load_pipeline, plan, run_pipeline
from offline_rlhf.shards import ShardWriter, open_dataset

ROOT = Path(__file__).resolve().parents[1]

MINI = """
name = "mini"
workdir = "{work}"
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
chunk_prompts = 4
[stages.score]
kind = "score"
generations = "stages.generate"
reward_model = "inputs.reward_model"
weights = {{ reward_model = 1.0, length_penalty = 0.1 }}
[stages.logprobs]
kind = "logprobs"
generations = "stages.score"
reference = "inputs.policy"
[stages.pairs]
kind = "pairs"
generations = "stages.logprobs"
[stages.train]
kind = "train"
algorithm = "dpo"
data = "stages.pairs"
policy = "inputs.policy"
lr = 1e-3
max_steps = {steps}
batch_size = 4
micro_batch_size = 2
save_steps = 5
report_to = "none"
[stages.eval]
kind = "eval"
policy = "stages.train"
baseline = "inputs.policy"
prompts = "inputs.heldout"
reward_model = "inputs.reward_model"
weights = {{ reward_model = 1.0 }}
metrics = ["stages.train"]
max_new_tokens = 6
kl_samples = 2
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, policy_dir, reward_dir):
    return copy_task_inputs(tmp_path_factory.mktemp("pipe_inputs"), policy_dir, reward_dir, 12, 6)


def job(tmp_path, inputs, work, steps=6):
    f = tmp_path / f"{Path(work).name}.toml"
    f.write_text(MINI.format(work=work, steps=steps, **inputs))
    return str(f)


def mtimes(stage_dir: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in stage_dir.rglob("*") if p.is_file()}


def test_unchanged_rerun_recomputes_nothing(tmp_path, inputs):
    f = job(tmp_path, inputs, tmp_path / "w")
    p = load_pipeline(f)
    assert [r["action"] for r in plan(p)] == ["run"] * 6
    run_pipeline(p)
    before = mtimes(tmp_path / "w" / "stages")
    again = load_pipeline(f)
    assert [r["action"] for r in run_pipeline(again)] == ["reuse"] * 6
    assert mtimes(tmp_path / "w" / "stages") == before
    results = json.loads(next((tmp_path / "w" / "stages").glob("eval-*/results.json")).read_text())
    assert 0 <= results["win_rate"] <= 1 and results["policy"]["kl_to_reference"] >= 0
    # the win rate recounted from the two scored datasets the eval stage kept
    ev = next((tmp_path / "w" / "stages").glob("eval-*"))
    p, b = ({(r["prompt_id"], r["sample_index"]): r["reward"] for r in open_dataset(str(ev / side / "scored"))
             .read(columns=["prompt_id", "sample_index", "reward"]).to_pylist()} for side in ("policy", "baseline"))
    assert p.keys() == b.keys() and len(p) == 6
    assert results["win_rate"] == pytest.approx(sum(1.0 * (p[k] > b[k]) + 0.5 * (p[k] == b[k]) for k in p) / 6)
    assert (tmp_path / "w" / "pipeline.resolved.json").exists()
    log = (tmp_path / "w" / "run.log").read_text()
    assert log.count("run generate") == 1 and log.count("reuse generate") == 1
    for png in next((tmp_path / "w" / "stages").glob("eval-*")).glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_new_reward_model_reruns_score_and_later_only(tmp_path, inputs, reward_dir):
    f = job(tmp_path, inputs, tmp_path / "w", steps=2)
    run_pipeline(load_pipeline(f))
    gen = next((tmp_path / "w" / "stages").glob("generate-*"))
    before = mtimes(gen)
    other = tmp_path / "rm2"
    shutil.copytree(reward_dir, other)
    from offline_rlhf.models import load_reward_model
    m = load_reward_model(other, dtype="float32", device="cpu")
    with torch.no_grad():
        m.score.weight.mul_(-1)
    m.save_pretrained(other, safe_serialization=True)
    p = load_pipeline(f, [f"inputs.reward_model={other}"])
    assert {r["stage"]: r["action"] for r in plan(p)} == {
        "generate": "reuse", "score": "run", "logprobs": "run", "pairs": "run", "train": "run", "eval": "run"}
    run_pipeline(p)
    assert mtimes(gen) == before


def test_killed_pipeline_resumes_to_the_same_outputs(tmp_path, inputs):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    fk, fc = job(tmp_path, inputs, killed, steps=20), job(tmp_path, inputs, clean, steps=20)
    cli = [sys.executable, "-m", "offline_rlhf.cli", "pipeline", "run"]
    # on CPU: bit-identical weights after a resume are a CPU promise (GPU kernels need not be
    # deterministic)
    proc = subprocess.Popen(cli + [fk], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cpu_env())
    deadline = time.time() + 300
    while not list((killed / "stages").glob("train-*/checkpoints/step-0000005/state.json")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((killed / "stages").glob("eval-*/results.json"))
    for f in (fk, fc):
        out = subprocess.run(cli + [f], capture_output=True, text=True, timeout=600, env=cpu_env())
        assert out.returncode == 0, out.stderr[-2000:]
    a = load_file(str(next((killed / "stages").glob("train-*/final/model.safetensors"))))
    b = load_file(str(next((clean / "stages").glob("train-*/final/model.safetensors"))))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads(next((killed / "stages").glob("eval-*/results.json")).read_text())
    rb = json.loads(next((clean / "stages").glob("eval-*/results.json")).read_text())
    assert ra["policy"]["reward_mean"] == rb["policy"]["reward_mean"]
    assert ra["win_rate"] == rb["win_rate"]


def _fixture_for(key: str, inputs, scored, pairs):
    return {"policy": inputs["policy"], "judge": inputs["policy"], "reward_model": inputs["rm"],
            "prompts": inputs["prompts"],
            "heldout": inputs["heldout"], "generations": scored, "scored": scored,
            "pairs": pairs}[key]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "pipelines").glob("*.toml")))
def test_every_shipped_pipeline_validates(tmp_path, inputs, name):
    from conftest import generation_table

    from offline_rlhf.config import load_file
    from offline_rlhf.pairs import import_pairs
    with ShardWriter(str(tmp_path / "scored"), "generations") as w:
        w.write(0, generation_table(8))
        w.finish(total_chunks=1)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    import_pairs(str(tmp_path / "p.jsonl"), str(tmp_path / "pairs"))
    data = load_file(ROOT / "pipelines" / name)
    overrides = [f"inputs.{k}={_fixture_for(k, inputs, tmp_path / 'scored', tmp_path / 'pairs')}"
                 for k in data["inputs"]] + [f"workdir={tmp_path / 'w'}"]
    p = load_pipeline(str(ROOT / "pipelines" / name), overrides)
    assert len(p.stages) == len(data["stages"]) and all(r["action"] == "run" for r in plan(p))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("num_samples = 4", "num_samples = 4\nnum_smaples = 2"),
     "stages.generate.num_smaples: unknown key for a generate stage"),
    (lambda s: s.replace("num_samples = 4", 'num_samples = "four"'),
     "stages.generate.num_samples: expected int, got str 'four'"),
    (lambda s: s.replace('reference = "inputs.policy"', 'reference = "models/missing"'),
     "stages.logprobs.reference: path not found: models/missing"),
    (lambda s: s.replace('data = "stages.pairs"', 'data = "stages.nope"'),
     "stages.train.data: stages.nope is not an earlier stage"),
])
def test_bad_pipeline_files_one_line_errors(tmp_path, inputs, edit, message):
    f = Path(job(tmp_path, inputs, tmp_path / "w"))
    f.write_text(edit(f.read_text()))
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pipeline(str(f))
    out = subprocess.run([sys.executable, "-m", "offline_rlhf.cli", "pipeline", "run", str(f), "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr
    missing = Path(job(tmp_path, {**inputs, "policy": tmp_path / "no_model"}, tmp_path / "w2"))
    with pytest.raises(InputError, match=r"inputs.policy: path not found"):
        load_pipeline(str(missing))
