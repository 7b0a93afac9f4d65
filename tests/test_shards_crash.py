"""A writer killed with SIGKILL leaves nothing a reader picks up; the rerun completes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offline_rlhf.shards import open_dataset

CHILD = r"""
import os, sys, time
sys.path.insert(0, {tests!r})
from conftest import generation_table
from offline_rlhf import shards, storage

mode, url, marker = sys.argv[1:4]
real_fsync = storage._fsync

def stop_here(fd):
    target = os.readlink(f"/proc/self/fd/{{fd}}")
    if mode == "mid_shard" and ".part-000002.parquet." in target:
        os.truncate(target, os.stat(target).st_size // 2)   # half the bytes reached the disk
        stop = True
    else:
        stop = mode == "before_entry" and ".part-000002.json." in target
    if stop:
        open(marker, "w").close()
        time.sleep(600)
    real_fsync(fd)

storage._fsync = stop_here
w = shards.ShardWriter(url, "generations", config_hash="crash")
for c in range(5):
    if not w.committed(c):
        w.write(c, generation_table(50, start=50 * c))
w.finish(total_chunks=5)
"""


def run_writer(tmp_path, url, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    marker = tmp_path / f"marker-{mode}"
    proc = subprocess.Popen([sys.executable, str(script), mode, url, str(marker)])
    if mode == "normal":
        assert proc.wait(timeout=120) == 0
        return
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, "writer exited before reaching the kill point"
        assert time.time() < deadline, "writer never reached the kill point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def rows_seen_by_every_reader(d: Path, tmp_path) -> dict:
    import datasets
    import duckdb
    import polars as pl
    import pyarrow.dataset as pads
    seen = {
        "pyarrow.dataset": pads.dataset(str(d), format="parquet").count_rows(),
        "polars glob": pl.scan_parquet(f"{d}/*.parquet").collect().height,
        "polars recursive glob": pl.scan_parquet(f"{d}/**/*.parquet").collect().height,
        "duckdb glob": duckdb.sql(f"select count(*) from read_parquet('{d}/*.parquet')").fetchall()[0][0],
        "duckdb recursive glob":
            duckdb.sql(f"select count(*) from read_parquet('{d}/**/*.parquet')").fetchall()[0][0],
        "hf load_dataset(dir)": datasets.load_dataset(
            str(d), split="train", cache_dir=str(tmp_path / "hf1")).num_rows,
        "hf parquet glob": datasets.load_dataset(
            "parquet", data_files=f"{d}/*.parquet", split="train",
            cache_dir=str(tmp_path / "hf2")).num_rows,
        "offline_rlhf": open_dataset(str(d)).read().num_rows,
    }
    return seen


@pytest.mark.parametrize("mode", ["mid_shard", "before_entry"])
def test_sigkill_then_rerun(tmp_path, mode):
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    run_writer(tmp_path, str(crashed), mode)
    if mode == "mid_shard":
        # chunk 2 died mid-commit; chunks 3 and 4 may be encoded, waiting behind it
        leftovers = sorted(p.name for p in crashed.iterdir() if p.name.endswith(".tmp"))
        assert leftovers and leftovers[0].startswith(".part-000002.parquet.")
        assert not (crashed / "part-000003.parquet").exists()
        seen = rows_seen_by_every_reader(crashed, tmp_path)
        assert seen == {k: 100 for k in seen}, seen  # chunks 0 and 1 only
    assert not open_dataset(str(crashed)).complete

    run_writer(tmp_path, str(crashed), "normal")   # the rerun
    run_writer(tmp_path, str(clean), "normal")     # a run that never died
    a, b = open_dataset(str(crashed), True), open_dataset(str(clean), True)
    assert not [p for p in crashed.rglob("*") if p.name.endswith(".tmp")]
    assert a.num_rows == 250
    ta, tb = a.read(), b.read()
    keys = list(zip(ta.column("prompt_id").to_pylist(), ta.column("sample_index").to_pylist()))
    assert len(set(keys)) == 250
    assert ta.drop_columns(["created_at"]).equals(tb.drop_columns(["created_at"]))
    seen = rows_seen_by_every_reader(crashed, tmp_path)
    assert seen == {k: 250 for k in seen}, seen
