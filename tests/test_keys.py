"""Content keys (two clean runs of one job agree) and keys unique across a whole dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli_helpers import SMALL_JOB, cli, one_error_line
from conftest import generation_table

from offline_rlhf.errors import InputError
from offline_rlhf.pipeline import load_pipeline, run_pipeline
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.toy import copy_prompts


def test_two_clean_runs_agree_on_every_key(tmp_path, policy_dir):
    prompts = tmp_path / "prompts"
    with ShardWriter(str(prompts), "prompts") as w:
        w.write(0, copy_prompts(8))
        w.finish(total_chunks=1)
    runs = []
    for name in ("a", "b"):
        f = tmp_path / f"{name}.toml"
        f.write_text(SMALL_JOB.format(work=tmp_path / name, policy=policy_dir, prompts=prompts))
        # on CPU: bit-identical rows from two runs are a CPU promise (GPU kernels need
        # not be deterministic)
        p = load_pipeline(str(f), ["stages.generate.device=cpu"])
        run_pipeline(p)
        runs.append(p)
    a, b = runs
    assert [s.key for s in a.stages] == [s.key for s in b.stages]
    for sa, sb in zip(a.stages, b.stages):
        da, db = open_dataset(str(sa.output)), open_dataset(str(sb.output))
        assert da.fingerprint == db.fingerprint, sa.name          # the content key
        assert da.config_hash == db.config_hash, sa.name          # downstream of content keys
        if sa.name == "generate":   # ... although the files differ: rows made at other times
            assert [e["sha256"] for e in da.shards] != [e["sha256"] for e in db.shards]
            assert da.read(columns=["created_at"]) != db.read(columns=["created_at"])
    # the outputs as inputs of another job: the same content gives the same stage keys
    keys = []
    for run in runs:
        f = tmp_path / f"rescore-{len(keys)}.toml"
        f.write_text(f'workdir = "{tmp_path / "r"}"\n[inputs]\ngenerations = "{run.stages[0].output}"\n'
                     '[stages.score]\nkind = "score"\ngenerations = "inputs.generations"\n'
                     'weights = { length_penalty = 1.0 }\n')
        keys.append(load_pipeline(str(f)).stages[0].key)
    assert keys[0] == keys[1]
    # inspect shows the content key
    out = cli("inspect", a.stages[1].output, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["content_key"] == open_dataset(str(b.stages[1].output)).fingerprint
    text = cli("inspect", a.stages[1].output).stdout
    assert re.search(rf"^content key +{open_dataset(str(a.stages[1].output)).fingerprint}$", text, re.M)


def _with_duplicates(path: Path, forge: str | None = None) -> None:
    """Chunks 0 and 1 share keys (rows 6, 7 of chunk 0 are rows 0, 1 of chunk 1)."""
    w = ShardWriter(str(path), "generations")
    w.write(0, generation_table(8))
    w.write(1, generation_table(8, start=6))
    with pytest.raises(InputError) as e:
        w.finish(total_chunks=2)
    assert str(e.value) == (f"{path}/part-000001.parquet, row 0, column 'sample_index': duplicate "
                            f"key (prompt_id, sample_index) = (p00001, 2), first at "
                            f"{path}/part-000000.parquet row 6")
    assert not open_dataset(str(path)).complete
    if forge:   # marked complete anyway, as another tool (or an older version) would
        meta = path / ".offline-rlhf"
        manifest = json.loads((meta / "manifest.json").read_text())
        (meta / "manifest.json").write_text(json.dumps({**manifest, "complete": True}))
        if forge == "another tool":
            for entry in (meta / "shards").glob("*.json"):
                e = json.loads(entry.read_text())
                e.pop("key_hashes")
                entry.write_text(json.dumps(e))


def test_duplicate_key_across_chunks_refused_at_finish(tmp_path):
    _with_duplicates(tmp_path / "ds")
    with pytest.raises(InputError, match="incomplete"):
        open_dataset(str(tmp_path / "ds"), require_complete=True)


@pytest.mark.parametrize("forge", ["older version", "another tool"])
def test_score_and_inspect_refuse_a_dataset_with_duplicates(tmp_path, forge):
    ds = tmp_path / "ds"
    _with_duplicates(ds, forge)
    where = f"{ds}/part-000001.parquet, row 0, column 'sample_index': duplicate key"
    one_error_line(cli("inspect", ds), where)
    one_error_line(cli("score", "--generations", ds, "--output", tmp_path / "s",
                       "--weights", "length_penalty=1"), where)
    assert not (tmp_path / "s" / "part-000000.parquet").exists()


def test_generate_refuses_repeated_prompt_ids(tmp_path, policy_dir):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt_id": pid, "prompt": f"prompt {i}"}) + "\n"
                         for i, pid in enumerate(["a", "b", "c", "b"])))
    args = ["--policy", policy_dir, "--num-samples", 2, "--max-new-tokens", 2, "--chunk-prompts", 1]
    one_error_line(cli("generate", "--prompts", f, "--output", tmp_path / "g", *args),
                   f"{f}, row 3, column 'prompt_id': duplicate key (prompt_id)")
    # a prompts dataset split in chunks, marked complete by another tool
    ds = tmp_path / "prompts"
    w = ShardWriter(str(ds), "prompts")
    table = copy_prompts(4)
    w.write(0, table.slice(0, 2))
    w.write(1, table.slice(1, 3))
    with pytest.raises(InputError, match="duplicate key"):
        w.finish(total_chunks=2)
    manifest = json.loads((ds / ".offline-rlhf" / "manifest.json").read_text())
    (ds / ".offline-rlhf" / "manifest.json").write_text(json.dumps({**manifest, "complete": True}))
    one_error_line(cli("generate", "--prompts", ds, "--output", tmp_path / "g2", *args),
                   f"{ds}/part-000001.parquet, row 0, column 'prompt_id': duplicate key (prompt_id)")


def test_keys_checked_from_entries_not_data(tmp_path, monkeypatch):
    """finish() reads no shard to find duplicates: the entries' key hashes suffice."""
    w = ShardWriter(str(tmp_path / "ds"), "generations")
    for c in range(4):
        w.write(c, generation_table(8, start=8 * c))
    reads = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda *a, **kw: reads.append(a) or real(*a, **kw))
    assert w.finish(total_chunks=4)["complete"] and reads == []
