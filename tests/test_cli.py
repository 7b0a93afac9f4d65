import json
import subprocess
import sys

import pyarrow as pa
import pytest
from conftest import generation_table

from offline_rlhf.cli import main
from offline_rlhf.shards import ShardWriter


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "offline_rlhf.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("inspect", "validate", "import-prompts", "tiny-model", "demo"):
        assert cmd in out.stdout


def test_inspect_prints_table(tmp_path, capsys):
    w = ShardWriter(str(tmp_path / "ds"), "generations", lineage={"policy_fingerprint": "abc"},
                    config_hash="h123")
    table = generation_table(16)
    w.write(0, table.slice(0, 8), stats={"prompts_skipped": 1})
    w.write(1, table.slice(8), stats={"prompts_skipped": 2})
    w.finish(total_chunks=2)
    assert main(["inspect", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "generations 1.2.0" in out and "complete" in out and "h123" in out
    assert "lineage.policy_fingerprint  abc" in out.replace("   ", "  ")
    assert "count.prompts_skipped" in out
    assert main(["inspect", "--json", str(tmp_path / "ds")]) == 0
    summary = json.loads(capsys.readouterr().out)
    rewards = table.column("reward").to_pylist()
    assert summary["rows"] == 16 and summary["shards"] == 2
    assert summary["counts"]["prompts_skipped"] == 3 and summary["counts"]["prompts"] == 4
    assert summary["reward_stats"]["reward"]["mean"] == pytest.approx(sum(rewards) / 16)
    assert summary["reward_stats"]["reward"]["max"] == max(rewards)
    em = [c[0]["value"] for c in table.column("reward_components").to_pylist()]
    assert summary["reward_stats"]["component:exact_match"]["mean"] == pytest.approx(sum(em) / 16)


def test_bad_input_is_one_line_exit_2(tmp_path):
    out = run_cli("inspect", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "not an offline-rlhf dataset" in out.stderr
    debug = run_cli("--debug", "inspect", str(tmp_path / "missing"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_inspect_names_corrupt_shard(tmp_path):
    with ShardWriter(str(tmp_path / "ds"), "generations") as w:
        w.write(0, generation_table(8))
    shard = tmp_path / "ds" / "part-000000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    out = run_cli("inspect", str(tmp_path / "ds"))
    assert out.returncode == 2 and f"{shard}: sha256 mismatch" in out.stderr


def test_validate_command(tmp_path):
    good = tmp_path / "g.parquet"
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["hi"]}), good)
    assert run_cli("validate", str(good), "--schema", "prompts").returncode == 0
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt_id": "a", "prompt": "x"}\n{"prompt_id": "a", "prompt": "y"}\n')
    out = run_cli("validate", str(bad), "--schema", "prompts")
    assert out.returncode == 2
    assert f"{bad}, row 1, column 'prompt_id': duplicate key" in out.stderr


def test_tiny_model_command(tmp_path):
    out = run_cli("tiny-model", str(tmp_path / "m"), "--kind", "reward", "--hidden", "32")
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and len(cfg["id2label"]) == 1
    assert (tmp_path / "m" / "model.safetensors").exists()
