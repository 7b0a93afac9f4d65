"""The store's edges of issue 23 (items 5 and 6), through the CLI as a user runs it:
every input checked before the first output, a rerun that names what differs,
``--overwrite``, no planted link followed, no odd manifest trusted, and pipeline errors
that name the job file and the stage."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli_helpers import cli, one_error_line
from conftest import generation_table

from offline_rlhf.pipeline import load_pipeline
from offline_rlhf.shards import ShardWriter, open_dataset

CHUNKS = 6


def gens(path: Path, chunks: int = CHUNKS) -> Path:
    """A complete generations dataset of ``chunks`` shards (8 rows: 2 prompts of 4)."""
    with ShardWriter(str(path), "generations") as w:
        for c in range(chunks):
            w.write(c, generation_table(8, start=8 * c))
        w.finish(total_chunks=chunks)
    return path


def shard(ds: Path, chunk: int) -> Path:
    return ds / f"part-{chunk:06d}.parquet"


def entry_file(ds: Path, chunk: int) -> Path:
    return ds / ".offline-rlhf" / "shards" / f"part-{chunk:06d}.json"


def forge_shard(ds: Path, chunk: int, table) -> None:
    """Replace one shard and its entry as another tool would (sizes and sha256 agree)."""
    pq.write_table(table, shard(ds, chunk))
    data = shard(ds, chunk).read_bytes()
    entry = json.loads(entry_file(ds, chunk).read_text())
    for k in ("content_hash", "key_hashes"):
        entry.pop(k, None)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    entry_file(ds, chunk).write_text(json.dumps(entry))


def committed(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("part-*.parquet")) if out.exists() else []


# ------------------------------------------------------- item 5: inputs before any output

def test_score_truncated_shard_commits_nothing(tmp_path):
    ds = gens(tmp_path / "gens")
    data = shard(ds, 3).read_bytes()
    shard(ds, 3).write_bytes(data[: len(data) // 2])
    out = tmp_path / "scored"
    one_error_line(cli("score", "--generations", ds, "--output", out,
                       "--weights", "exact_match=1"), f"{shard(ds, 3)}: shard is truncated")
    assert committed(out) == []


def test_logprobs_corrupted_shard_commits_nothing(tmp_path, policy_dir):
    ds = gens(tmp_path / "gens")
    data = bytearray(shard(ds, 4).read_bytes())
    data[8:40] = b"\0" * 32                       # same size: only the hash notices
    shard(ds, 4).write_bytes(bytes(data))
    out = tmp_path / "ref"
    one_error_line(cli("logprobs", "--generations", ds, "--output", out, "--reference", policy_dir),
                   f"{shard(ds, 4)}: sha256 mismatch")
    assert committed(out) == []


def test_pairs_nan_reward_commits_nothing(tmp_path):
    ds = gens(tmp_path / "gens")
    table = generation_table(8, start=8 * 3)
    rewards = table.column("reward").to_pylist()
    rewards[5] = math.nan
    forge_shard(ds, 3, table.set_column(table.schema.get_field_index("reward"), "reward",
                                        [rewards]))
    out = tmp_path / "pairs"
    one_error_line(cli("pairs", "--generations", ds, "--output", out),
                   f"{shard(ds, 3)}, row 5, column 'reward': reward is nan")
    assert committed(out) == []


def test_changed_rerun_names_the_option_and_overwrite_starts_afresh(tmp_path):
    ds = gens(tmp_path / "gens", chunks=2)
    out = tmp_path / "pairs"
    assert cli("pairs", "--generations", ds, "--output", out).returncode == 0
    line = one_error_line(cli("pairs", "--generations", ds, "--output", out,
                              "--strategy", "margin"), f"{out}/.offline-rlhf/manifest.json",
                          'strategy: "best_worst" before, "margin" now', "--overwrite")
    assert "config_hash" not in line
    first = open_dataset(str(out)).num_rows
    done = cli("pairs", "--generations", ds, "--output", out, "--strategy", "margin", "--overwrite")
    assert done.returncode == 0, done.stderr
    again = open_dataset(str(out))
    assert again.lineage["strategy"] == "margin" and again.num_rows > first


def test_generate_rerun_with_another_option_names_it(tmp_path, policy_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}+1?"}) + "\n" for i in range(3)))
    args = ["generate", "--prompts", prompts, "--policy", policy_dir, "--output", tmp_path / "g",
            "--num-samples", "1", "--max-new-tokens", "2"]
    assert cli(*args).returncode == 0
    line = one_error_line(cli(*args, "--temperature", "0.5"),
                          "temperature: 1.0 before, 0.5 now", "--overwrite")
    assert "config_hash" not in line and "max_new_tokens" not in line


def test_overwrite_refuses_what_is_not_a_dataset(tmp_path):
    ds = gens(tmp_path / "gens", chunks=1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    one_error_line(cli("pairs", "--generations", ds, "--output", mine, "--overwrite"),
                   f"{mine}: --overwrite replaces datasets only")
    assert (mine / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------- item 6: odd manifests

@pytest.mark.parametrize("manifest, says", [
    ([], "not a manifest: a JSON object is expected, this holds list []"),
    ("format_version=99", "format_version 99 is not one this version reads"),
])
def test_odd_manifest_refused(tmp_path, manifest, says):
    ds = gens(tmp_path / "gens", chunks=1)
    path = ds / ".offline-rlhf" / "manifest.json"
    if manifest == "format_version=99":
        manifest = {**json.loads(path.read_text()), "format_version": 99}
    path.write_text(json.dumps(manifest))
    one_error_line(cli("inspect", ds), f"{path}: {says}")
    one_error_line(cli("pairs", "--generations", ds, "--output", tmp_path / "p"), says)
    assert not (tmp_path / "p").exists()


def test_shard_name_outside_the_dataset_refused(tmp_path):
    ds = gens(tmp_path / "gens", chunks=2)
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(shard(ds, 1).read_bytes())
    entry = json.loads(entry_file(ds, 1).read_text())
    entry["name"] = "../outside.parquet"
    entry_file(ds, 1).write_text(json.dumps(entry))
    one_error_line(cli("inspect", ds), f"{entry_file(ds, 1)}: shard name '../outside.parquet' "
                   "is not a shard of this dataset")


def test_missing_chunk_of_a_complete_dataset(tmp_path):
    ds = gens(tmp_path / "gens")
    shard(ds, 2).unlink()
    entry_file(ds, 2).unlink()
    says = "says complete, but chunk 2 has no entry"
    one_error_line(cli("inspect", ds), f"{ds}/.offline-rlhf/manifest.json: {says}")
    out = tmp_path / "pairs"
    one_error_line(cli("pairs", "--generations", ds, "--output", out), says)
    assert committed(out) == []


def test_missing_shard_file_of_a_complete_dataset(tmp_path):
    ds = gens(tmp_path / "gens")
    shard(ds, 4).unlink()
    one_error_line(cli("inspect", ds, "--no-verify"),
                   f"{shard(ds, 4)}: shard listed in the manifest is missing")


# ------------------------------------------------------------- item 6: planted links

PAIRS_JOB = """
name = "links"
workdir = "{work}"
[inputs]
gens = "{gens}"
[stages.pairs]
kind = "pairs"
generations = "inputs.gens"
"""


def pairs_job(tmp_path: Path) -> tuple[Path, Path]:
    work = tmp_path / "work"
    job = tmp_path / "job.toml"
    job.write_text(PAIRS_JOB.format(work=work, gens=gens(tmp_path / "gens", chunks=2)))
    return job, work


def target(tmp_path: Path) -> Path:
    t = tmp_path / "precious.txt"
    t.write_text("precious\n")
    return t


@pytest.mark.parametrize("name", ["pipeline.lock", "run.log"])
def test_planted_file_link_in_workdir(tmp_path, name):
    job, work = pairs_job(tmp_path)
    t = target(tmp_path)
    work.mkdir()
    (work / name).symlink_to(t)
    one_error_line(cli("pipeline", "run", job),
                   f"{work / name}: is a symbolic link; refusing to follow it")
    assert t.read_text() == "precious\n"


def test_planted_stage_directory_link(tmp_path):
    job, work = pairs_job(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    stage_dir = load_pipeline(str(job)).stages[0].output
    stage_dir.parent.mkdir(parents=True)
    stage_dir.symlink_to(outside, target_is_directory=True)
    for extra in (["--dry-run"], []):
        one_error_line(cli("pipeline", "run", job, *extra),
                       f"{job}: stages.pairs", f"{stage_dir}: is a symbolic link")
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------- item 6: job files

def test_metrics_not_a_metrics_file_refused_at_dry_run(tmp_path, policy_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi", "reference_answer": "1"}\n')
    job = tmp_path / "job.toml"
    job.write_text(f'workdir = "{tmp_path / "w"}"\n[stages.eval]\nkind = "eval"\n'
                   f'policy = "{policy_dir}"\nprompts = "{prompts}"\n'
                   'weights = { exact_match = 1.0 }\nmetrics = ["/etc/passwd"]\n')
    one_error_line(cli("pipeline", "run", job, "--dry-run"),
                   f"{job}: stages.eval.metrics: /etc/passwd: neither a metrics.jsonl file")


@pytest.mark.parametrize("stage, says", [
    ('kind = "score"\ngenerations = "inputs.gens"\nweights = { reward_modle = 1.0 }',
     "stages.s: weights.reward_modle: unknown component"),
    ('kind = "train"\nalgorithm = "dpo"\ndata = "inputs.gens"\npolicy = "{policy}"\nlr = -1.0',
     "stages.s: lr: must be > 0"),
])
def test_pipeline_error_names_job_and_stage(tmp_path, policy_dir, stage, says):
    job = tmp_path / "job.toml"
    job.write_text(f'workdir = "{tmp_path / "w"}"\n[inputs]\ngens = "{gens(tmp_path / "g", 1)}"\n'
                   f'[stages.s]\n{stage.replace("{policy}", str(policy_dir))}\n')
    one_error_line(cli("pipeline", "run", job, "--dry-run"), f"{job}: {says}")


def test_writer_refuses_a_planted_bookkeeping_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "pairs"
    out.mkdir()
    os.symlink(outside, out / ".offline-rlhf")
    one_error_line(cli("pairs", "--generations", gens(tmp_path / "g", 1), "--output", out),
                   f"{out}/.offline-rlhf: is a symbolic link")
    assert list(outside.iterdir()) == []


def test_planted_shard_link_refused(tmp_path):
    ds = gens(tmp_path / "gens", chunks=2)
    outside = tmp_path / "outside.parquet"
    shard(ds, 1).rename(outside)
    shard(ds, 1).symlink_to(outside)          # same bytes, but not inside the dataset
    one_error_line(cli("inspect", ds), f"{shard(ds, 1)}: is a symbolic link")


def test_overwrite_of_a_run_directory_removes_only_that_commands_output(tmp_path):
    """`eval --overwrite` / `rest --overwrite`: an output holding the command's marker file
    (or an empty one) is removed; another directory, a file or a planted link is refused
    in one line and left as it was."""
    import os

    from offline_rlhf.errors import InputError
    from offline_rlhf.storage import remove_run_output
    ours = tmp_path / "ours"
    (ours / "grow-0").mkdir(parents=True)
    (ours / "config.json").write_text("{}")
    remove_run_output(ours, "config.json", "rest")
    assert not ours.exists()
    remove_run_output(tmp_path / "absent", "config.json", "rest")     # nothing there: fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="replaces an earlier rest output only"):
        remove_run_output(other, "config.json", "rest")
    link = tmp_path / "link"
    os.symlink(ours.parent / "other", link)
    with pytest.raises(InputError, match="symbolic link"):
        remove_run_output(link, "keep.txt", "rest")
    assert (other / "keep.txt").read_text() == "mine"
