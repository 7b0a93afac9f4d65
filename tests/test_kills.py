"""SIGKILL at a chosen write (a dataset's manifest rename, each done file), then rerun:
the interrupted work is redone, nothing half-written is reused, no temporary is left."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from cli_helpers import SMALL_JOB, cli, popen

from offline_rlhf.pipeline import load_pipeline, plan
from offline_rlhf.shards import ShardWriter, is_complete
from offline_rlhf.toy import copy_prompts

# Wraps the CLI: when the storage layer fsyncs a file whose path contains every part of
# KILL_AT (the temporary of the file being written, before its rename), it creates
# MARKER and stops there, to be killed.
KILLABLE = """
import os, sys, time
from offline_rlhf import cli, storage
parts, marker, real = os.environ["KILL_AT"].split("|"), os.environ["MARKER"], storage._fsync
def stop_here(fd):
    if all(p in os.readlink(f"/proc/self/fd/{fd}") for p in parts):
        open(marker, "w").close()
        time.sleep(600)
    real(fd)
storage._fsync = stop_here
sys.exit(cli.main(sys.argv[1:]))
"""

# SMALL_JOB (generate -> score -> pairs), scored by a reward model (distinct rewards make
# pairs), then a model, its evaluation and a ReST run
JOB = SMALL_JOB.replace("weights = {{ exact_match = 1.0, length_penalty = 0.1 }}",
                        'reward_model = "{rm}"\nweights = {{ reward_model = 1.0 }}') + """
[stages.train]
kind = "train"
algorithm = "dpo"
data = "stages.pairs"
policy = "inputs.policy"
reference = "inputs.policy"
max_steps = 2
batch_size = 2
micro_batch_size = 2
report_to = "none"
[stages.eval]
kind = "eval"
policy = "stages.train"
baseline = "inputs.policy"
prompts = "inputs.prompts"
weights = {{ exact_match = 1.0 }}
max_new_tokens = 4
[stages.rest]
kind = "rest"
policy = "inputs.policy"
prompts = "inputs.prompts"
improve_steps = 1
thresholds = [0.0]
lrs = [1e-4]
num_samples = 2
max_new_tokens = 4
weights = {{ exact_match = 1.0 }}
steps_per_improve = 1
batch_size = 2
micro_batch_size = 2
"""


def make_job(tmp_path, policy_dir, reward_dir) -> Path:
    with ShardWriter(str(tmp_path / "prompts"), "prompts") as w:
        w.write(0, copy_prompts(12))
        w.finish(total_chunks=1)
    f = tmp_path / "job.toml"
    f.write_text(JOB.format(work=tmp_path / "w", policy=policy_dir, prompts=tmp_path / "prompts",
                            rm=reward_dir))
    return f


def run_until_killed(tmp_path, job: Path, *where: str) -> None:
    script, marker = tmp_path / "killable.py", tmp_path / f"marker-{len(list(tmp_path.glob('marker-*')))}"
    script.write_text(KILLABLE)
    proc = popen("pipeline", "run", job, script=str(script),
                 env={"KILL_AT": "|".join(where), "MARKER": str(marker)})
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None, f"exited before the kill point: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "never reached the kill point"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def actions(job: Path) -> dict:
    return {r["stage"]: r["action"] for r in plan(load_pipeline(str(job)))}


def stage_dir(tmp_path, name: str) -> Path:
    return next((tmp_path / "w" / "stages").glob(f"{name}-*"))


def test_kill_at_each_done_write_then_rerun_redoes_it(tmp_path, policy_dir, reward_dir):
    job = make_job(tmp_path, policy_dir, reward_dir)

    # 1. the manifest rename of the score stage's dataset
    run_until_killed(tmp_path, job, "/stages/score-", "/.offline-rlhf/.manifest.json.")
    meta = stage_dir(tmp_path, "score") / ".offline-rlhf"
    assert list(meta.glob(".manifest.json.*.tmp"))            # the killed write's temporary
    assert actions(job)["score"] == "run"

    # 2. the train stage's train_summary.json (written last: its presence means done)
    run_until_killed(tmp_path, job, "/stages/train-", "/.train_summary.json.")
    assert not list(meta.glob(".*.tmp")) and is_complete(str(meta.parent))   # swept, redone
    train = stage_dir(tmp_path, "train")
    assert (train / "final").is_dir() and not (train / "train_summary.json").exists()
    assert actions(job)["train"] == "run"

    # 3. the eval stage's results.json
    run_until_killed(tmp_path, job, "/stages/eval-", "/.results.json.")
    assert json.loads((train / "train_summary.json").read_text())["steps"] == 2
    assert not (stage_dir(tmp_path, "eval") / "results.json").exists()
    assert actions(job)["eval"] == "run"

    # 4. the rest stage's report.json
    run_until_killed(tmp_path, job, "/stages/rest-", "/.report.json.")
    assert not (stage_dir(tmp_path, "rest") / "report.json").exists()
    assert actions(job) == {"generate": "reuse", "score": "reuse", "pairs": "reuse",
                            "train": "reuse", "eval": "reuse", "rest": "run"}

    out = cli("pipeline", "run", job)
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(actions(job).values()) == {"reuse"}
    results = json.loads((stage_dir(tmp_path, "eval") / "results.json").read_text())
    assert 0 <= results["win_rate"] <= 1
    assert Path(json.loads((stage_dir(tmp_path, "rest") / "report.json").read_text())
                ["final_model"]).is_dir()
    log = (tmp_path / "w" / "run.log").read_text()
    for stage in ("score", "train", "eval", "rest"):   # each was redone once after its kill
        assert log.count(f"run {stage} (") == 2, (stage, log)
    assert log.count("run generate (") == 1
    assert log.count("which died holding it") == 4     # every rerun took the dead run's lock
    assert not [p for p in (tmp_path / "w").rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def test_done_files_cut_short_by_older_versions_are_not_reused(tmp_path, policy_dir, reward_dir):
    """A 0-byte or cut results.json / train_summary.json / report.json (left by a kill
    before done files were atomic) does not count as done."""
    job = make_job(tmp_path, policy_dir, reward_dir)
    p = load_pipeline(str(job))
    outputs = {s.name: s.output for s in p.stages}
    (outputs["train"] / "final").mkdir(parents=True)
    for stage, name, text in (("train", "train_summary.json", ""), ("eval", "results.json", '{"pol'),
                              ("rest", "report.json", "[]")):
        outputs[stage].mkdir(parents=True, exist_ok=True)
        (outputs[stage] / name).write_text(text)
    assert all(r["action"] == "run" for r in plan(p))
    (outputs["eval"] / "results.json").write_text('{"policy": {}}')
    assert {r["stage"]: r["action"] for r in plan(p)}["eval"] == "reuse"
