"""Concurrency: one `pipeline run` per workdir, one writer per chunk, dead holders taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from cli_helpers import SMALL_JOB, cli, one_error_line, popen
from conftest import generation_table

from offline_rlhf.errors import InputError
from offline_rlhf.locks import FileLock, claim, read_holder
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.toy import copy_prompts

# Wraps the CLI so that the pipeline stops before its first stage until GATE exists
# (holding the workdir lock), and says so by creating GATE.waiting.
GATED = """
import os, sys, time
from offline_rlhf import cli, pipeline
gate, real = os.environ["GATE"], pipeline._run_stage
def gated(*a, **kw):
    open(gate + ".waiting", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.05)
    return real(*a, **kw)
pipeline._run_stage = gated
sys.exit(cli.main(sys.argv[1:]))
"""



@pytest.fixture()
def job(tmp_path, policy_dir):
    prompts = tmp_path / "prompts"
    with ShardWriter(str(prompts), "prompts") as w:
        w.write(0, copy_prompts(8))
        w.finish(total_chunks=1)
    f = tmp_path / "job.toml"
    f.write_text(SMALL_JOB.format(work=tmp_path / "w", policy=policy_dir, prompts=prompts))
    return f


def wait_for(path: Path, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def shard_files(work: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (work / "stages").rglob("*.parquet")}


def test_two_concurrent_runs_one_refused_one_waits_third_reuses(tmp_path, job):
    script = tmp_path / "gated.py"
    script.write_text(GATED)
    gate = tmp_path / "gate"
    first = popen("pipeline", "run", job, script=str(script), env={"GATE": str(gate)})
    wait_for(Path(f"{gate}.waiting"), first)          # holds the lock, stage not started
    holder = read_holder(tmp_path / "w" / "pipeline.lock")
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

    refused = cli("pipeline", "run", job)
    line = one_error_line(refused, f"{tmp_path / 'w'}: workdir is in use by another pipeline run: "
                          f"held by pid {first.pid} on host {socket.gethostname()} since "
                          f"{holder['started_at']}", "--wait")
    assert "Traceback" not in line and not (tmp_path / "w" / "stages").exists()

    waiting = popen("pipeline", "run", job, "--wait")
    said = waiting.stderr.readline()                  # queued behind the first run
    assert said.startswith(f"waiting for {tmp_path / 'w' / 'pipeline.lock'}: held by pid {first.pid}")
    assert waiting.poll() is None
    gate.touch()
    assert first.wait(timeout=600) == 0, first.communicate()[1][-3000:]
    out, err = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, err[-3000:]
    assert out.count(" reuse ") == 3 and " run " not in out   # it found everything done
    before = shard_files(tmp_path / "w")

    third = cli("pipeline", "run", job)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count(" reuse ") == 3 and " run " not in third.stdout
    assert shard_files(tmp_path / "w") == before       # nothing rewritten
    log = (tmp_path / "w" / "run.log").read_text()
    assert log.count("run generate") == 1 and log.count("reuse generate") == 2
    assert (tmp_path / "w" / "pipeline.lock").read_text() == ""   # released, no holder


def test_lock_of_a_killed_run_is_taken_over(tmp_path, job):
    script = tmp_path / "gated.py"
    script.write_text(GATED)
    gate = tmp_path / "gate"
    dead = popen("pipeline", "run", job, script=str(script), env={"GATE": str(gate)})
    wait_for(Path(f"{gate}.waiting"), dead)
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    assert read_holder(tmp_path / "w" / "pipeline.lock")["pid"] == dead.pid   # record left behind
    out = cli("pipeline", "run", job)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"took over {tmp_path / 'w' / 'pipeline.lock'} from pid {dead.pid} on host" in out.stderr
    assert "which died holding it" in (tmp_path / "w" / "run.log").read_text()


def test_dry_run_needs_no_lock(tmp_path, job):
    lock = FileLock(tmp_path / "w" / "pipeline.lock")
    lock.acquire()
    try:
        out = cli("pipeline", "run", job, "--dry-run")
        assert out.returncode == 0 and out.stdout.count(" run ") == 3
    finally:
        lock.release()


# ------------------------------------------------------------------ dataset writers

def test_second_writer_of_the_same_chunks_is_refused(tmp_path):
    url = str(tmp_path / "ds")
    a = ShardWriter(url, "generations")
    a.claim()                                        # all chunks, as an executor does
    a.write(0, generation_table(4))
    b = ShardWriter(url, "generations")
    with pytest.raises(InputError, match=rf"^{url}: dataset is being written by another process "
                       rf"\(worker 0 of 1, overlapping chunk 1\): held by pid {os.getpid()} on host "):
        b.write(1, generation_table(4, start=4))
    assert not (tmp_path / "ds" / "part-000001.parquet").exists()
    a.write(1, generation_table(4, start=4))
    assert a.finish(total_chunks=2)["complete"]      # finish lets go ...
    b.write(2, generation_table(4, start=8))         # ... and another writer may go on
    assert b.finish(total_chunks=3)["complete"]


def test_writers_without_a_slot_share_a_dataset_chunk_by_chunk(tmp_path):
    """Writers that claim no slot (an actor pool) lock each chunk only while writing it."""
    url = str(tmp_path / "ds")
    busy = claim(str(tmp_path / "ds" / ".offline-rlhf" / "writers"), 5, None, "test")
    w = ShardWriter(url, "generations")
    w.write(4, generation_table(4, start=16))        # another chunk: fine
    with pytest.raises(InputError, match=rf"^{url}: dataset is being written by another process "
                       rf"\(chunk 5\): held by pid {os.getpid()}"):
        w.write(5, generation_table(4, start=20))
    busy.release()
    w.write(5, generation_table(4, start=20))
    w.flush()
    assert [e["chunk"] for e in open_dataset(url).shards] == [4, 5]
    with pytest.raises(InputError, match=r"\(chunk 4, overlapping worker 0 of 2\)"):
        held = claim(str(tmp_path / "ds" / ".offline-rlhf" / "writers"), 4, None, "test")
        try:
            ShardWriter(url, "generations").claim(0, 2)
        finally:
            held.release()


def test_workers_share_a_dataset_overlapping_slots_do_not(tmp_path):
    url = str(tmp_path / "ds")
    w0, w1 = ShardWriter(url, "generations"), ShardWriter(url, "generations")
    w0.claim(0, 2)
    w1.claim(1, 2)                                   # disjoint chunks: both hold a claim
    whole = ShardWriter(url, "generations")
    with pytest.raises(InputError, match=r"worker 0 of 2, overlapping worker 0 of 1"):
        whole.claim(0, 1)
    w0.write(0, generation_table(4))
    w0.flush()
    w1.write(1, generation_table(4, start=4))
    assert not w1.finish(total_chunks=3)["complete"]   # chunk 2 is worker 0's, not in yet
    w0.write(2, generation_table(4, start=8))
    assert w0.finish(total_chunks=3)["complete"]
    whole.claim(0, 1)                                # both gone: free again
    whole.close()


def test_cli_writer_refused_while_another_holds_the_output(tmp_path, policy_dir):
    holder = tmp_path / "holder.py"
    holder.write_text("""
import sys, time
from offline_rlhf.shards import ShardWriter
w = ShardWriter(sys.argv[1], "generations", config_hash=None)
w.claim(0, 2)
open(sys.argv[2], "w").close()
time.sleep(600)
""")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(4)))
    out_dir, ready = tmp_path / "gen", tmp_path / "ready"
    proc = popen(out_dir, ready, script=str(holder))
    try:
        wait_for(ready, proc)
        args = ["generate", "--prompts", prompts, "--output", out_dir, "--policy", policy_dir,
                "--num-samples", 2, "--max-new-tokens", 3, "--chunk-prompts", 1]
        one_error_line(cli(*args), f"{out_dir}: dataset is being written by another process",
                       f"held by pid {proc.pid} on host {socket.gethostname()}")
        assert not (out_dir / "part-000000.parquet").exists()
        other = cli(*args, "--worker", 1, "--num-workers", 2)   # the slot nobody holds
        assert other.returncode == 0, other.stderr[-3000:]
        assert sorted(e["chunk"] for e in open_dataset(str(out_dir)).shards) == [1, 3]
    finally:
        proc.kill()
        proc.wait()
    assert cli(*args).returncode == 0                 # the holder died: its claim is free
    assert open_dataset(str(out_dir), require_complete=True).num_rows == 8
