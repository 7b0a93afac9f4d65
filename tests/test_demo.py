"""The README's main command, ``offline-rlhf demo``, at three seeds. Its own file: the
longest tests of the suite, which tests/conftest.py (LONG_FILES) starts first."""

import json
import re
import subprocess
import sys

import pytest
from conftest import cpu_env


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_main_command_raises_held_out_reward(tmp_path, seed):
    """The README's main command: the nightly loop on the embedded default, at three seeds
    (each seeds the start model, the prompt split, sampling, training and evaluation).
    Every seed must learn by a margin (held-out gain >= 0.20, win rate >= 60%), not by one
    machine's figures. Its output, captured to files as cron would (not a terminal), has
    no progress redraws and no transformers loading bars. (Also `demo --config FILE`.)"""
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(f"workdir: {tmp_path / 'd'}\nseed: {seed}\n")
    # on CPU (the demo is made for it): the start model's KL to itself is 0 only where
    # sampling and the reference pass compute alike, in float32
    env = {k: v for k, v in cpu_env().items()   # what the CLI does by itself, not inherited
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE")}
    with open(tmp_path / "out.txt", "w") as stdout, open(tmp_path / "err.txt", "w") as stderr:
        rc = subprocess.run([sys.executable, "-m", "offline_rlhf.cli", "demo", "--config", str(cfg)],
                            stdout=stdout, stderr=stderr, text=True, timeout=900, env=env).returncode
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert rc == 0, err[-3000:]
    root = tmp_path / "d" / f"seed-{seed}"
    results = json.loads(next((root / "pipeline" / "stages").glob("eval-*/results.json")).read_text())
    b, p = results["baseline"], results["policy"]
    assert p["reward_mean"] >= b["reward_mean"] + 0.20, (b["reward_mean"], p["reward_mean"])
    assert results["win_rate"] >= 0.60
    start = json.loads((root / "models" / "start" / "demo_start.json").read_text())
    assert start["seed"] == seed and start["informative"] >= 0.3
    pairs = re.search(r"DPO trained on (\d+) pairs", out)    # one per informative prompt
    assert pairs and int(pairs.group(1)) == round(start["informative"] * 300) >= 90
    assert "before (start)" in out and "report:" in out
    assert (root / "models" / "start" / "model.safetensors").exists()
    for noise in ("\r", "Loading weights", "Writing model shards", "it/s]"):
        assert noise not in out + err, noise
    assert "generate: 300/300 prompts (100%) done" in err        # progress as plain lines
    # KL on samples from each model, never negative: the start model's to itself is 0
    assert 0 <= b["kl_to_reference"] < 1e-6 and p["kl_to_reference"] > 0 and p["kl_stderr"] > 0
    assert "KL to the start model (nats)         0.000 ± 0.000" in out
