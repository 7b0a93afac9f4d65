"""The Ray executor in Ray's local mode (one instance for the session, 2 CPUs): the
dataset it writes equals the local executor's, row for row, for generate, score and
logprobs; a killed driver's rerun and a chunk that raises once both end complete and
identical; bad input raised in an actor is refused on the driver.

Where Ray is missing these tests skip with the reason; `make test` sets
OFFLINE_RLHF_REQUIRE_RAY=1, which turns the skip into a failure, so CI never skips
them silently.

Float columns are compared exactly: CPU matmuls sum in an order that depends on the
thread count, so the local runs here use one torch thread, as the actors do (an actor
uses one thread per CPU it reserved, at least one: 0.5 -> 1, whatever OMP_NUM_THREADS
the test run has).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offline_rlhf.cli import main
from offline_rlhf.errors import InputError
from offline_rlhf.executors import ExecutorOptions, run_stage
from offline_rlhf.generation import GenerateConfig, generate, plan_generate
from offline_rlhf.logprobs import LogprobsConfig, compute_logprobs
from offline_rlhf.rewards.score import ScoreConfig, plan_score, score
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.toy import addition_prompts

RAY = dict(executor="ray", ray_actors=2, ray_cpus_per_actor=0.5)  # 2 actors fit 2 CPUs
# device cpu: the actors get no GPU (ray_gpus_per_actor 0), so the local runs compare only
# when they, too, compute on the CPU, in float32, wherever the suite runs
GEN = dict(num_samples=3, max_new_tokens=8, chunk_prompts=5, temperature=0.9, top_p=0.95,
           top_k=40, device="cpu")
VOLATILE = ["created_at"]  # wall-clock time of generation: differs between any two runs


@pytest.fixture(scope="session")
def ray_session():
    try:
        import ray
    except ImportError:
        if os.environ.get("OFFLINE_RLHF_REQUIRE_RAY") == "1":
            pytest.fail("OFFLINE_RLHF_REQUIRE_RAY=1 but ray is not installed "
                        "(pip install -e '.[ray]')")
        pytest.skip("ray is not installed: pip install -e '.[ray]' to run the Ray executor tests")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    # the failing worker below is defined here, where Ray's workers cannot import it
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def table(path, drop=()):
    return open_dataset(str(path), require_complete=True).read().drop_columns(list(drop))


def shards(manifest):
    return [(e["name"], e["chunk"], e["rows"], e["stats"]) for e in manifest["shards"]]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts"
    with ShardWriter(str(path), "prompts") as w:
        w.write(0, addition_prompts(20, seed=3, chat_fraction=0.25))
        w.finish(total_chunks=1)
    return str(path)


@pytest.fixture(scope="module")
def local_gen(tmp_path_factory, prompts, policy_dir):
    """The single-process generate output (4 chunks), and its manifest."""
    out = tmp_path_factory.mktemp("local") / "gen"
    with one_thread():
        m = generate(GenerateConfig(prompts=prompts, output=str(out), policy=str(policy_dir), **GEN))
    return str(out), m


def test_generate_on_ray_equals_local(tmp_path, ray_session, prompts, policy_dir, local_gen):
    local, lm = local_gen
    m = generate(GenerateConfig(prompts=prompts, output=str(tmp_path / "g"), policy=str(policy_dir),
                                **GEN, **RAY))
    assert m["complete"] and m["run"]["chunks_done"] == 4 and m["num_rows"] == 60
    assert table(tmp_path / "g", VOLATILE).equals(table(local, VOLATILE))
    assert shards(m) == shards(lm) and m["config_hash"] == lm["config_hash"]
    assert m["lineage"] == lm["lineage"] and m["run"]["samples"] == 60
    assert not list(Path(tmp_path / "g").glob(".*.tmp"))


def test_score_and_logprobs_on_ray_equal_local(tmp_path, ray_session, local_gen, reward_dir,
                                               policy_dir):
    gen, _ = local_gen
    scored = dict(generations=gen, reward_model=str(reward_dir),
                  weights={"reward_model": 1.0, "length_penalty": 0.1}, length_target=4, device="cpu")
    ref = dict(generations=gen, reference=str(policy_dir), token_budget=64, device="cpu")
    for cls, run, kw in ((ScoreConfig, score, scored), (LogprobsConfig, compute_logprobs, ref)):
        with one_thread():
            lm = run(cls(output=str(tmp_path / f"{cls.__name__}-local"), **kw))
        m = run(cls(output=str(tmp_path / f"{cls.__name__}-ray"), **kw, **RAY))
        assert m["complete"] and m["run"]["chunks_done"] == 4, cls.__name__
        a, b = table(tmp_path / f"{cls.__name__}-ray"), table(tmp_path / f"{cls.__name__}-local")
        assert a.num_rows == 60 and a.equals(b), cls.__name__
        assert shards(m) == shards(lm) and m["lineage"] == lm["lineage"]


class FailOnce:
    """A chunk worker that raises on ``chunk`` the first time it is asked for it (a
    marker file remembers, across processes), then computes like ``inner``."""

    def __init__(self, inner, chunk: int, marker: str):
        self.inner, self.chunk, self.marker = inner, chunk, marker

    def compute(self, chunk, progress):
        if chunk == self.chunk and not os.path.exists(self.marker):
            Path(self.marker).touch()
            raise RuntimeError(f"injected failure on chunk {chunk}")
        return self.inner.compute(chunk, progress)


def _rules(gen, out, **kw):
    return ScoreConfig(generations=gen, output=str(out), weights={"length_penalty": 1.0,
                       "format": 0.5}, **kw)


def test_chunk_that_raises_is_retried_and_the_dataset_completes(tmp_path, ray_session, local_gen):
    gen, _ = local_gen
    run_stage(plan_score(_rules(gen, tmp_path / "local")))
    plan = plan_score(_rules(gen, tmp_path / "ray", **RAY))
    plan.worker = FailOnce(plan.worker, 2, str(tmp_path / "failed"))
    m = run_stage(plan, ExecutorOptions(**RAY))
    assert (tmp_path / "failed").exists() and m["run"]["chunks_retried"] == 1
    assert m["complete"] and table(tmp_path / "ray").equals(table(tmp_path / "local"))

    # with no retries the failure ends the run, incomplete; a rerun redoes only what is missing
    plan = plan_score(_rules(gen, tmp_path / "again", **RAY))
    plan.worker = FailOnce(plan.worker, 1, str(tmp_path / "failed-again"))
    with pytest.raises(Exception, match="injected failure on chunk 1"):
        run_stage(plan, ExecutorOptions(**RAY, ray_retries=0))
    assert not open_dataset(str(tmp_path / "again")).complete
    m = score(_rules(gen, tmp_path / "again", **RAY))
    assert m["run"]["chunks_done"] >= 1 and m["run"]["chunks_done"] + m["run"]["chunks_skipped"] == 4
    assert table(tmp_path / "again").equals(table(tmp_path / "local"))


def test_bad_input_in_an_actor_is_refused_on_the_driver(tmp_path, ray_session):
    from conftest import generation_table
    with ShardWriter(str(tmp_path / "gen"), "generations") as w:
        for c in range(2):
            t = generation_table(4, start=4 * c)
            if c == 1:  # row 2 of chunk 1 has no reference answer
                answers = t.column("reference_answer").to_pylist()
                answers[2] = None
                t = t.set_column(t.schema.get_field_index("reference_answer"),
                                 "reference_answer", [answers])
            w.write(c, t)
        w.finish(total_chunks=2)
    cfg = ScoreConfig(generations=str(tmp_path / "gen"), output=str(tmp_path / "s"),
                      weights={"exact_match": 1.0}, **RAY)
    with pytest.raises(InputError, match=r"part-000001\.parquet.*row 2.*reference_answer"):
        score(cfg)
    assert not (tmp_path / "s").exists()   # score checks every input before any output


def test_killed_driver_rerun_equals_uninterrupted(tmp_path, ray_session, prompts, policy_dir):
    """A driver killed after 3+ commits, rerun: the rows equal an uninterrupted run's.

    Each row's ``code_version`` names the code of the process that made it, and the
    killed driver runs other code than this process whenever the checkout's HEAD moved
    after the test session started (a merge during the suite: the flake this test had).
    So the driver always runs here with no git checkout in sight (``GIT_DIR`` pointing
    nowhere: its rows say the bare package version) and the rows are checked shard by
    shard: the killed run's shards carry its code version, the rerun's this process's,
    and every other column (less ``created_at``) equals the clean run's."""
    from offline_rlhf import __version__
    from offline_rlhf.lineage import code_version
    opts = dict(GEN, chunk_prompts=2, max_new_tokens=16)  # 10 chunks
    with one_thread():
        generate(GenerateConfig(prompts=prompts, output=str(tmp_path / "clean"),
                                policy=str(policy_dir), **opts))
    out = tmp_path / "killed"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    address = ray_session.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-m", "offline_rlhf.cli", "generate", "--prompts", prompts, "--output",
         str(out), "--policy", str(policy_dir), *flags, "--executor", "ray", "--ray-address",
         address, "--ray-actors", "1", "--ray-cpus-per-actor", "0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "GIT_DIR": str(tmp_path / "no-git")})
    entries = out / ".offline-rlhf" / "shards"
    deadline = time.time() + 300
    while not (entries.exists() and len(list(entries.glob("*.json"))) >= 3):
        assert driver.poll() is None, driver.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGKILL)
    driver.communicate()
    killed = json.loads((out / ".offline-rlhf" / "manifest.json").read_text())
    assert not killed["complete"] and killed["lineage"]["code_version"] == __version__
    while ray_session.available_resources().get("CPU", 0) < 2:  # the dead job's actor is gone
        assert time.time() < deadline
        time.sleep(0.1)
    done_before = {int(p.stem.split("-")[1]) for p in entries.glob("*.json")}
    m = generate(GenerateConfig(prompts=prompts, output=str(out), policy=str(policy_dir),
                                **opts, **RAY))
    assert m["complete"] and m["run"]["chunks_skipped"] == len(done_before) >= 3
    assert m["run"]["chunks_done"] + m["run"]["chunks_skipped"] == 10
    assert m["lineage"]["code_version"] == code_version()
    made_by = [__version__ if e["chunk"] in done_before else code_version()
               for e in m["shards"] for _ in range(e["rows"])]
    got = table(out, VOLATILE)
    assert got.column("code_version").to_pylist() == made_by
    assert got.drop_columns(["code_version"]).equals(
        table(tmp_path / "clean", [*VOLATILE, "code_version"]))
    assert not list(out.glob(".*.tmp"))


# ------------------------------------------------------- options (no Ray needed)

def test_executor_options_leave_hashes_and_pipeline_keys_alone(tmp_path, prompts, policy_dir):
    from offline_rlhf.pipeline import load_pipeline
    base = dict(prompts=prompts, output=str(tmp_path / "g"), policy=str(policy_dir))
    local = plan_generate(GenerateConfig(**base)).writer["config_hash"]
    ray = plan_generate(GenerateConfig(**base, **RAY, ray_retries=5)).writer["config_hash"]
    assert local == ray
    job = tmp_path / "job.toml"
    job.write_text(f'workdir = "{tmp_path / "w"}"\n[inputs]\nprompts = "{prompts}"\n'
                   f'policy = "{policy_dir}"\n[stages.generate]\nkind = "generate"\n'
                   'prompts = "inputs.prompts"\npolicy = "inputs.policy"\nnum_samples = 2\n')
    keys = [load_pipeline(str(job), extra).stages[0].key for extra in
            ([], ["stages.generate.executor=ray", "stages.generate.ray_actors=4"])]
    assert keys[0] == keys[1]
    other = load_pipeline(str(job), ["stages.generate.num_samples=3"]).stages[0].key
    assert other != keys[0]  # the key does see options that change rows


@pytest.mark.parametrize("flags, message", [
    (["--executor", "spark"], "executor: must be one of local, ray, got 'spark'"),
    (["--executor", "ray", "--worker", "0", "--num-workers", "2"],
     "worker/num_workers: static workers belong to --executor local"),
    (["--executor", "ray", "--ray-actors", "0"], "ray_actors: must be >= 1"),
    (["--executor", "ray", "--ray-actors", "2", "--ray-max-actors", "1"],
     "ray_max_actors: must be >= ray_actors"),
])
def test_bad_executor_flags_one_line(tmp_path, capsys, flags, message):
    code = main(["score", "--generations", str(tmp_path), "--output", str(tmp_path / "s"),
                 "--weights", "format=1", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_ray_executor_refuses_to_run_once_per_launched_worker(tmp_path, monkeypatch, local_gen):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(InputError, match="one of 4 launched workers"):
        score(_rules(local_gen[0], tmp_path / "s", **RAY))
    assert not (tmp_path / "s").exists()


def test_executor_flags_reach_the_config():
    from offline_rlhf.cli import build_parser
    from offline_rlhf.config import from_namespace
    args = build_parser().parse_args(
        ["logprobs", "--generations", "g", "--output", "o", "--reference", "r", "--executor",
         "ray", "--ray-address", "10.0.0.1:6379", "--ray-actors", "2", "--ray-max-actors", "8",
         "--ray-cpus-per-actor", "0.5", "--ray-gpus-per-actor", "1"])
    cfg = from_namespace(LogprobsConfig, args)
    assert (cfg.executor, cfg.ray_address, cfg.ray_actors, cfg.ray_max_actors,
            cfg.ray_cpus_per_actor, cfg.ray_gpus_per_actor) == ("ray", "10.0.0.1:6379", 2, 8, 0.5, 1.0)
