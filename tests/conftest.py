"""Shared fixtures: tiny models built from config, realistic generation rows."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cpu_env(**extra) -> dict:
    """Environment for a child process that must run on CPU even where a GPU is visible
    (gloo process groups, bit-exact resume checks): no CUDA device is shown to it."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", **extra}


def cli_on_cpu(args, nproc: int = 1) -> subprocess.Popen:
    """``offline-rlhf ARGS`` in a child on CPU (:func:`cpu_env`): one process, or ``nproc``
    gloo processes under torchrun with one thread each (two NCCL ranks on one GPU fail);
    ``--standalone``: a free port of its own, so parallel test workers never share one."""
    head = [sys.executable, "-m", "offline_rlhf.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "offline_rlhf.cli"]
    env = cpu_env(OMP_NUM_THREADS="1") if nproc > 1 else cpu_env()
    return subprocess.Popen(head + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    """stdout and stderr of ``proc`` once it exits 0; a hang (gloo at exit) fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{proc.args[:4]} hung")
    assert proc.returncode == 0, err
    return out, err


def copy_task_inputs(directory, policy_dir, reward_dir, prompts: int, heldout: int) -> dict:
    """Prompt and held-out shards of the copy task, with the tiny policy and reward model:
    the inputs of the pipeline and nights jobs in the tests."""
    from offline_rlhf.shards import ShardWriter
    from offline_rlhf.toy import copy_prompts
    for name, t in (("prompts", copy_prompts(prompts)),
                    ("heldout", copy_prompts(prompts, split="test").slice(0, heldout))):
        with ShardWriter(str(directory / name), "prompts") as w:
            w.write(0, t)
            w.finish(total_chunks=1)
    return {"policy": policy_dir, "rm": reward_dir, "prompts": directory / "prompts",
            "heldout": directory / "heldout"}


# The order files start in: the longest first (CPU seconds per file, measured with
# OFFLINE_RLHF_TEST_CPU), then the rest in collection order. make test runs one file per
# process at a time (pytest-xdist --dist loadfile, with --no-loadscope-reorder so that
# xdist keeps this order instead of sorting files by their number of tests): a long file
# started last would leave the other process idle at the end (longest processing time first).
LONG_FILES = ("test_demo.py", "test_train_dpo.py", "test_ray_executor.py", "test_vllm.py",
              "test_generation.py", "test_pipeline.py", "test_train_honest.py",
              "test_train_grpo.py", "test_front_door.py", "test_export.py", "test_nights.py",
              "test_kills.py", "test_locks.py", "test_bad_inputs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))   # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """OFFLINE_RLHF_TEST_CPU=FILE: append each test's CPU seconds, set-up included (this
    process, its subprocesses and the CLI server's children), to FILE: what a test costs,
    a measure that holds on a busy machine, unlike wall time."""
    path = os.environ.get("OFFLINE_RLHF_TEST_CPU")
    if not path:
        return (yield)
    import resource

    import cli_helpers
    def used():
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + cli_helpers._SERVER.cpu_seconds
    start = used()
    try:
        return (yield)
    finally:
        with open(path, "a") as f:
            f.write(f"{item.nodeid}\t{used() - start:.2f}\n")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OFFLINE_RLHF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf"))


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """accelerate keeps process-wide state; tests (and TRL) create accelerators with
    different settings, so each test starts from none."""
    yield
    import sys
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tokenizer():
    from offline_rlhf.tiny import train_tokenizer
    return train_tokenizer()


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory, tokenizer):
    from offline_rlhf.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("policy"), tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="session")
def reward_dir(tmp_path_factory, tokenizer):
    from offline_rlhf.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("reward"), kind="reward",
                            tokenizer=tokenizer, seed=1)


@pytest.fixture(scope="session")
def pairs_ds(tmp_path_factory, policy_dir):
    """48 imported text pairs (prompt/chosen/rejected), without reference log-probs."""
    import json

    from offline_rlhf.pairs import import_pairs
    d = tmp_path_factory.mktemp("pairs")
    src = d / "prefs.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"What is {i}+{i % 5}? Answer:",
                                       "chosen": f" {i + i % 5}", "rejected": f" {i * 3} maybe"}) + "\n"
                           for i in range(48)))
    import_pairs(str(src), str(d / "pairs"))
    return str(d / "pairs")


def generation_rows(n: int, start: int = 0, k: int = 4, tokens: int = 6) -> list[dict]:
    """``n`` valid generation rows: prompt (start + i) // k, sample (start + i) % k."""
    import datetime as dt
    rows = []
    for i in range(start, start + n):
        rows.append({
            "prompt_id": f"p{i // k:05d}", "prompt": f"What is {i}+1? Answer:",
            "reference_answer": str(i + 1), "sample_index": i % k,
            "response": f" {i + 1}", "prompt_token_ids": [5, 6, 7],
            "response_token_ids": list(range(tokens)),
            "behaviour_logps": [-0.5 - 0.01 * j for j in range(tokens)],
            "finish_reason": "eos", "reward": float(i % 7) - 3.0,
            "reward_components": [{"name": "exact_match", "value": float(i % 2)},
                                  {"name": "reward_model", "value": float(i % 7) - 3.5}],
            "reward_normalized": 0.25 * (i % 5) - 0.5,
            "ref_logps_sum": -0.5 * tokens, "ref_logps": [-0.5] * tokens,
            "decoding": {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "max_new_tokens": 32,
                         "greedy": False, "seed": 7},
            "policy_fingerprint": "a" * 64, "reward_fingerprint": "b" * 64,
            "reference_fingerprint": "c" * 64, "config_hash": "d" * 64,
            "code_version": "test", "created_at": dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc),
        })
    return rows


def generation_table(n: int, start: int = 0, **kw) -> pa.Table:
    from offline_rlhf.schemas import load_schema
    return pa.Table.from_pylist(generation_rows(n, start, **kw),
                                schema=load_schema("generations").arrow)


def kill_when(proc, ready, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (it must still be running then)."""
    import signal
    import time
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "timed out waiting to kill"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
