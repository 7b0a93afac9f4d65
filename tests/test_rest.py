import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest
from conftest import generation_rows

from offline_rlhf.errors import InputError
from offline_rlhf.filters import SampleFilter, select
from offline_rlhf.rest import RestConfig, improve_filter, load_rest_config
from offline_rlhf.schemas import load_schema
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.toy import copy_prompts


def hand_made(tmp_path):
    """Prompt p: rewards 0.1 .. 1.0 (10 samples); prompt q: 0.0, 0.5, 0.5 (duplicate text), 2.0."""
    rows = []
    for k in range(10):
        rows.append(dict(generation_rows(1, start=k)[0], prompt_id="p", sample_index=k,
                         response=f"p{k}", reward=(k + 1) / 10))
    for k, (text, r) in enumerate([("q0", 0.0), ("q1", 0.5), ("q1", 0.5), ("q3", 2.0)]):
        rows.append(dict(generation_rows(1, start=20 + k)[0], prompt_id="q", sample_index=k,
                         response=text, reward=r))
    with ShardWriter(str(tmp_path / "scored"), "generations") as w:
        w.write(0, pa.Table.from_pylist(rows, schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    return open_dataset(str(tmp_path / "scored")).read().to_pylist()


def kept_texts(rows, cfg, i):
    kept, _ = select(rows, SampleFilter(**improve_filter(cfg, i)))
    return sorted(rows[j]["response"] for j in kept)


def base_cfg(**kw):
    return RestConfig(policy="m", prompts="p", output="o", **kw)


def test_absolute_thresholds_rise_and_cap(tmp_path):
    rows = hand_made(tmp_path)
    cfg = base_cfg(thresholds=[0.5, 0.8, 0.95], lrs=[1, 1, 1])
    assert kept_texts(rows, cfg, 0) == ["p4", "p5", "p6", "p7", "p8", "p9", "q1", "q3"]
    assert kept_texts(rows, cfg, 1) == ["p7", "p8", "p9", "q3"]
    assert kept_texts(rows, cfg, 2) == ["p9", "q3"]
    capped = base_cfg(thresholds=[0.5, 0.8, 0.95], lrs=[1, 1, 1], max_per_prompt=2)
    assert kept_texts(rows, capped, 0) == ["p8", "p9", "q1", "q3"]   # best first


def test_percentile_thresholds_as_in_the_paper(tmp_path):
    rows = hand_made(tmp_path)
    cfg = base_cfg(threshold_mode="percentile", thresholds=[0.7, 0.8, 0.9], lrs=[1, 1, 1])
    # p: 70th percentile of 0.1..1.0 is 0.73 -> 0.8, 0.9, 1.0; q (0, .5, .5, 2): 0.65 -> q3
    assert kept_texts(rows, cfg, 0) == ["p7", "p8", "p9", "q3"]
    # 90th: p -> 0.91 -> 1.0 only; q -> 1.55 -> q3
    assert kept_texts(rows, cfg, 2) == ["p9", "q3"]


def test_config_checks():
    with pytest.raises(InputError, match="thresholds: 2 given, improve_steps is 3"):
        base_cfg(thresholds=[0.1, 0.2])
    with pytest.raises(InputError, match="threshold_mode"):
        base_cfg(threshold_mode="relative")


def test_killed_rest_resumes_without_regenerating(tmp_path, policy_dir):
    for name, t in (("train", copy_prompts(24)), ("test", copy_prompts(24, split="test").slice(0, 8))):
        with ShardWriter(str(tmp_path / name), "prompts") as w:
            w.write(0, t)
            w.finish(total_chunks=1)
    job = tmp_path / "rest.toml"
    job.write_text(f'''
policy = "{policy_dir}"
prompts = "{tmp_path / 'train'}"
eval_prompts = "{tmp_path / 'test'}"
output = "{tmp_path / 'run'}"
grows = 2
improve_steps = 2
thresholds = [-6.0, -5.0]
lrs = [1e-3, 5e-4]
num_samples = 4
max_new_tokens = 6
steps_per_improve = 20
batch_size = 8
micro_batch_size = 8
gradient_checkpointing = true
weights = {{ length_penalty = 1.0 }}
''')
    cli = [sys.executable, "-m", "offline_rlhf.cli", "rest", "--config", str(job)]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "run").glob("grow-1-*/generations/.offline-rlhf/manifest.json")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (grow0,) = list((tmp_path / "run").glob("grow-0-*"))
    shards = sorted((grow0 / "generations").glob("*.parquet")) + sorted((grow0 / "scored").glob("*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    assert not (tmp_path / "run" / "report.md").exists()
    out = subprocess.run(cli + ["seed=0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in shards} == before      # grow 0 was not regenerated
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["grows"]) == 2 and all(len(g["improves"]) == 2 for g in report["grows"])
    assert report["grows"][1]["policy"] == report["grows"][0]["improves"][-1]["model"]
    assert (tmp_path / "run" / "grow-0-rewards.png").stat().st_size > 1000
    # issue 27: KL to the base after every improve step (2 samples per held-out prompt by
    # default) and the training curves, in the report and the printed lines
    steps = [s for g in report["grows"] for s in g["improves"]]
    assert all(s["kl"] >= 0 and s["kl_stderr"] >= 0 for s in steps)
    assert "KL to base" in out.stdout
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| KL to base (± s.e.) |" in md and f"{steps[-1]['kl']:.4g} ±" in md
    assert (tmp_path / "run" / "training.png").stat().st_size > 1000
    assert load_rest_config(str(job)).grows == 2
