"""Every bad input of issue 14 (5), from the CLI as a user runs it: exit status 2, one
line on stderr naming the file (and row and column where they exist), nothing partial
left looking complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import cli, one_error_line
from conftest import generation_rows

from offline_rlhf.schemas import load_schema
from offline_rlhf.shards import ShardWriter, is_complete, open_dataset


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def model_copy(src, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def forge_dataset(path: Path, table: pa.Table) -> None:
    """A complete dataset written by another tool: shard, entry and manifest in our
    format, without our checks (and without content or key hashes)."""
    (path / ".offline-rlhf" / "shards").mkdir(parents=True)
    pq.write_table(table, path / "part-000000.parquet")
    data = (path / "part-000000.parquet").read_bytes()
    entry = {"name": "part-000000.parquet", "chunk": 0, "rows": table.num_rows, "stats": {},
             "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / ".offline-rlhf" / "shards" / "part-000000.json").write_text(json.dumps(entry))
    (path / ".offline-rlhf" / "manifest.json").write_text(json.dumps({
        "format": "offline-rlhf-dataset", "format_version": 1, "schema": "generations",
        "schema_version": load_schema("generations").version, "lineage": {},
        "config_hash": None, "complete": True}))


# --------------------------------------------------------------- tracebacks (exit 1) before

def test_message_content_not_text(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]},
                                     {"messages": [{"role": "user", "content": 5}]}])
    out = cli("import-prompts", f, tmp_path / "out")
    one_error_line(out, f"{f}, row 1, column 'messages': messages[0].content must be text, got int 5")
    assert not (tmp_path / "out").exists()


def test_workdir_not_a_string(tmp_path, policy_dir):
    f = write(tmp_path / "job.toml", f'workdir = 5\n[stages.g]\nkind = "generate"\n'
              f'prompts = "{tmp_path / "p.jsonl"}"\npolicy = "{policy_dir}"\n')
    jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    for extra in (["--dry-run"], []):
        one_error_line(cli("pipeline", "run", f, *extra), f"{f}: workdir: expected a non-empty "
                       "string, got int 5")


def test_inspect_no_verify_corrupt_shard(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(20)])
    assert cli("import-prompts", f, tmp_path / "ds").returncode == 0
    shard = tmp_path / "ds" / "part-000000.parquet"
    data = bytearray(shard.read_bytes())
    data[4:-8] = b"A" * (len(data) - 12)          # same size: only the hash would notice
    shard.write_bytes(bytes(data))
    one_error_line(cli("inspect", tmp_path / "ds", "--no-verify"), f"{shard}: cannot read shard")
    one_error_line(cli("inspect", tmp_path / "ds"), f"{shard}: sha256 mismatch")


def test_pickle_weights_beside_a_decoy_safetensors(tmp_path, policy_dir):
    m = model_copy(policy_dir, tmp_path / "m")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    (m / "x.safetensors").write_bytes(b"decoy")
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = cli("generate", "--prompts", f, "--output", tmp_path / "g", "--policy", m)
    one_error_line(out, f"{m}: only pickle weights (pytorch_model.bin) for the policy")
    assert not is_complete(str(tmp_path / "g"))


def test_disk_full_during_generate(tmp_path, policy_dir):
    """ENOSPC when shard 1 is flushed (the storage layer's fsync seam raises it):
    one line naming the shard; shard 0 stays, nothing else is committed or left
    behind, and the rerun (space freed) completes to the same content as a clean run."""
    script = write(tmp_path / "full.py", """
import errno, os, sys
from offline_rlhf import cli, storage
real = storage._fsync
def full(fd):
    if ".part-000001.parquet." in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(fd)
storage._fsync = full
sys.exit(cli.main(sys.argv[1:]))
""")
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt number {i}"} for i in range(6)])
    # on CPU: the content key is compared across processes (GPU kernels need not be
    # deterministic)
    args = ["generate", "--prompts", f, "--policy", policy_dir, "--chunk-prompts", "2",
            "--num-samples", "2", "--max-new-tokens", "3", "--device", "cpu"]
    g = tmp_path / "g"
    out = cli(*args, "--output", g, script=str(script))
    one_error_line(out, f"{g}/part-000001.parquet: cannot write (No space left on device)")
    assert not open_dataset(str(g)).complete
    assert [e["name"] for e in open_dataset(str(g)).shards] == ["part-000000.parquet"]
    assert not [p for p in g.rglob("*") if p.name.endswith(".tmp") or "000001" in p.name]
    assert cli(*args, "--output", g).returncode == 0
    assert cli(*args, "--output", tmp_path / "clean").returncode == 0
    done = open_dataset(str(g), require_complete=True)
    assert done.fingerprint == open_dataset(str(tmp_path / "clean")).fingerprint


def test_remote_code_refused_in_one_line(tmp_path, policy_dir):
    m = model_copy(policy_dir, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(model_type="customlm", auto_map={"AutoConfig": "custom.Config",
                                                 "AutoModelForCausalLM": "custom.Model"})
    (m / "config.json").write_text(json.dumps(cfg))
    ran = tmp_path / "REMOTE_CODE_RAN"
    (m / "custom.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = cli("generate", "--prompts", f, "--output", tmp_path / "g", "--policy", m)
    one_error_line(out, f"{m}: this model needs its own Python code to load",
                   "pass --trust-remote-code only for a directory you trust")
    job = write(tmp_path / "job.toml", f'workdir = "{tmp_path / "w"}"\n[stages.g]\n'
                f'kind = "generate"\nprompts = "{f}"\npolicy = "{m}"\n')
    one_error_line(cli("pipeline", "run", job, "--dry-run"), "stages.g.policy", "own Python code")
    assert not ran.exists() and not is_complete(str(tmp_path / "g"))


def test_sandboxed_chat_template_refused_in_one_line(tmp_path, policy_dir):
    m = model_copy(policy_dir, tmp_path / "m")
    (m / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "plain"},
                                     {"messages": [{"role": "user", "content": "hi"}]}])
    out = cli("generate", "--prompts", f, "--output", tmp_path / "g", "--policy", m)
    one_error_line(out, f"{f}, row 1, column 'messages': the chat template of {m} was refused",
                   "SecurityError")
    assert not (tmp_path / "g").exists()


def test_pickled_optimizer_state_refused_in_one_line(tmp_path, policy_dir):
    import torch

    from offline_rlhf.train.sft import SFTTrainConfig, train_sft
    data = jsonl(tmp_path / "sft.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(8)])
    common = dict(data=str(data), output=str(tmp_path / "out"), policy=str(policy_dir),
                  batch_size=2, micro_batch_size=2, save_steps=2, report_to="none")
    train_sft(SFTTrainConfig(max_steps=4, **common))
    shutil.rmtree(tmp_path / "out" / "final")      # as if killed: the same command resumes
    (tmp_path / "out" / "train_summary.json").unlink()
    ckpt = tmp_path / "out" / "checkpoints" / "step-0000002"
    ran = tmp_path / "PICKLE_RAN"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))
    torch.save({"state": Payload()}, ckpt / "optimizer.pt")
    out = cli("train", "sft", "--data", data, "--output", tmp_path / "out", "--policy", policy_dir,
              "--batch-size", 2, "--micro-batch-size", 2, "--save-steps", 2, "--max-steps", 4,
              "--report-to", "none")
    one_error_line(out, f"{ckpt / 'optimizer.pt'}: refused: the file holds pickled objects")
    assert not ran.exists()


# --------------------------------------------------------------- late failures before

def _job(tmp_path, policy, rm, eval_extra="") -> Path:
    jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    return write(tmp_path / "job.toml", f"""
workdir = "{tmp_path / 'w'}"
[stages.gen]
kind = "generate"
prompts = "{tmp_path / 'p.jsonl'}"
policy = "{policy}"
[stages.score]
kind = "score"
generations = "stages.gen"
reward_model = "{rm}"
[stages.ev]
kind = "eval"
policy = "{policy}"
prompts = "{tmp_path / 'p.jsonl'}"
weights = {{ length_penalty = 1.0 }}
{eval_extra}
""")


def test_two_label_reward_model_refused_by_dry_run(tmp_path, policy_dir, reward_dir):
    rm = model_copy(reward_dir, tmp_path / "rm2")
    cfg = json.loads((rm / "config.json").read_text())
    cfg.update(num_labels=2, id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
    (rm / "config.json").write_text(json.dumps(cfg))
    job = _job(tmp_path, policy_dir, rm)
    for extra in (["--dry-run"], []):
        one_error_line(cli("pipeline", "run", job, *extra),
                       f"{job}: stages.score.reward_model: {rm}: reward model has 2 labels")
    assert not (tmp_path / "w" / "stages").exists()   # nothing generated first


def test_missing_metrics_path_refused_by_dry_run(tmp_path, policy_dir, reward_dir):
    missing = tmp_path / "runs" / "metrics.jsonl"
    job = _job(tmp_path, policy_dir, reward_dir, f'metrics = ["{missing}"]')
    one_error_line(cli("pipeline", "run", job, "--dry-run"),
                   f"{job}: stages.ev.metrics: path not found: {missing}")
    out = cli("eval", "--policy", policy_dir, "--prompts", tmp_path / "p.jsonl", "--output",
              tmp_path / "ev", "--weights", "length_penalty=1", "--metrics", missing)
    one_error_line(out, f"metrics: {missing}: neither a metrics.jsonl file nor a training output")
    assert not (tmp_path / "ev" / "policy").exists()   # refused before generating


# --------------------------------------------------------------- silent acceptance before

def test_nan_reward_in_another_tools_dataset(tmp_path):
    rows = generation_rows(8)
    rows[5]["reward"] = float("nan")
    forge_dataset(tmp_path / "gen", pa.Table.from_pylist(rows, schema=load_schema("generations").arrow))
    out = cli("pairs", "--generations", tmp_path / "gen", "--output", tmp_path / "pairs")
    one_error_line(out, f"{tmp_path / 'gen'}/part-000000.parquet, row 5, column 'reward': "
                   "reward is nan (not finite)")
    assert not is_complete(str(tmp_path / "pairs"))
    # the sample filters (ReST, rejection sampling) refuse it too, rather than keep it
    from offline_rlhf.errors import InputError
    from offline_rlhf.filters import SampleFilter, select
    with pytest.raises(InputError, match=r"^row 5: reward is nan \(not finite\)$"):
        select(rows, SampleFilter(threshold=0.0))


def test_digit_strings_are_not_numbers(tmp_path):
    row = {"prompt_id": "a", "prompt": "p", "sample_index": 0, "response": "r",
           "response_token_ids": [1], "finish_reason": "eos"}
    f = jsonl(tmp_path / "g.jsonl", [{**row, "sample_index": "3"}])
    one_error_line(cli("validate", f, "--schema", "generations"),
                   f"{f}, row 0, column 'sample_index': expected int32, got text: '3'")
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c",
                                      "score_chosen": 1.0, "score_rejected": 0.0},
                                     {"prompt": "a", "chosen": "b", "rejected": "d",
                                      "score_chosen": "5", "score_rejected": 0.0}])
    one_error_line(cli("import-pairs", f, tmp_path / "pairs"),
                   f"{f}, row 1, column 'score_chosen': expected a number, got str '5'")
    assert not is_complete(str(tmp_path / "pairs"))


def test_imported_reference_logps_are_kept_and_checked(tmp_path):
    good = {"prompt": "a", "chosen": "b", "rejected": "c",
            "chosen_ref_logps_sum": -1.5, "rejected_ref_logps_sum": -2.5}
    f = jsonl(tmp_path / "ok.jsonl", [good])
    assert cli("import-pairs", f, tmp_path / "ok").returncode == 0
    t = open_dataset(str(tmp_path / "ok")).read().to_pylist()[0]
    assert (t["chosen_ref_logps_sum"], t["rejected_ref_logps_sum"]) == (-1.5, -2.5)
    f = jsonl(tmp_path / "bad.jsonl", [good, {**good, "chosen": "d", "chosen_ref_logps_sum": 0.5}])
    one_error_line(cli("import-pairs", f, tmp_path / "bad"),
                   f"{f}, row 1, column 'chosen_ref_logps_sum': positive log-probability")
    assert not is_complete(str(tmp_path / "bad"))


def test_jsonl_type_errors_name_row_and_column(tmp_path):
    base = {"prompt_id": "a", "prompt": "p", "response": "r", "response_token_ids": [1],
            "finish_reason": "eos"}
    f = jsonl(tmp_path / "g.jsonl", [{**base, "sample_index": 0, "reward": 1.0},
                                     {**base, "sample_index": 1, "reward": 0.5},
                                     {**base, "sample_index": 2, "reward": "high"}])
    one_error_line(cli("validate", f, "--schema", "generations"),
                   f"{f}, row 2, column 'reward': text, but a number in row 0")
    f = jsonl(tmp_path / "c.jsonl", [{**base, "sample_index": 0,
                                      "reward_components": [{"name": "x", "value": 1.0}]},
                                     {**base, "sample_index": 1,
                                      "reward_components": [{"name": "x", "value": [1]}]}])
    one_error_line(cli("validate", f, "--schema", "generations"),
                   f"{f}, row 1, column 'reward_components': a list at [].value, but a number in row 0")


def test_stale_manifest_temp_is_swept(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(3)])
    assert cli("import-prompts", f, tmp_path / "ds", "--chunk-rows", "2").returncode == 0
    meta = tmp_path / "ds" / ".offline-rlhf"
    stale = meta / ".manifest.json.0123456789ab.tmp"
    stale.write_text('{"complete": tru')   # a kill between writing and renaming
    os.utime(stale)
    with ShardWriter(str(tmp_path / "ds"), "prompts", lineage={"source": str(f)}) as w:  # a rerun
        w.finish(total_chunks=2)
    assert not stale.exists() and not list(meta.glob(".*.tmp"))
    assert open_dataset(str(tmp_path / "ds"), require_complete=True).num_rows == 3


@pytest.mark.parametrize("name", ["../../escaped", "/abs/stage", "a.b", "x y"])
def test_stage_names_are_plain_names(tmp_path, policy_dir, name):
    jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    job = write(tmp_path / "job.toml", f'workdir = "{tmp_path / "w"}"\n[stages."{name}"]\n'
                f'kind = "generate"\nprompts = "{tmp_path / "p.jsonl"}"\npolicy = "{policy_dir}"\n')
    for extra in ([], [f"workdir={tmp_path / 'forced'}"]):
        one_error_line(cli("pipeline", "run", job, *extra),
                       f"{job}: stages.{name}: a stage name is letters, digits, '-' and '_' only")
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and p.name in ("escaped", "stages")]
