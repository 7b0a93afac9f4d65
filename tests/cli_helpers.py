"""Running ``offline-rlhf`` as a user does (a subprocess) and checking the one-line error contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Progress bars, library deprecation notices and Python warnings off, as in a batch job:
# what is left on stderr is ours.
QUIET = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
# bitsandbytes logs this on import on CPUs with AVX512-BF16 (an optional kernel is not
# installed); it is not about the command's input.
LIBRARY_NOISE = ("Failed to load CPU gemm_4bit_forward",)


def cli(*args, script: str | None = None, env: dict | None = None, timeout: int = 600,
        **kw) -> subprocess.CompletedProcess:
    """``offline-rlhf ARGS`` (or ``python SCRIPT ARGS``, a wrapper around ``cli.main``)."""
    head = [sys.executable, script] if script else [sys.executable, "-m", "offline_rlhf.cli"]
    return subprocess.run(head + [str(a) for a in args], capture_output=True, text=True,
                          env={**os.environ, **QUIET, **(env or {})}, timeout=timeout, **kw)


def popen(*args, script: str | None = None, env: dict | None = None) -> subprocess.Popen:
    head = [sys.executable, script] if script else [sys.executable, "-m", "offline_rlhf.cli"]
    return subprocess.Popen(head + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **QUIET, **(env or {})})


def one_error_line(out: subprocess.CompletedProcess, *parts: str) -> str:
    """Assert exit status 2 and exactly one line on stderr, containing every part."""
    lines = [x for x in out.stderr.splitlines() if not x.startswith(LIBRARY_NOISE)]
    assert out.returncode == 2, f"exit {out.returncode}: {out.stderr[-3000:]}"
    assert len(lines) == 1, out.stderr[-3000:]
    line = lines[0]
    assert line.startswith("offline-rlhf ") and ": error: " in line, line
    for part in parts:
        assert part in line, f"{part!r} not in {line!r}"
    return line


# generate -> score (rules) -> pairs: a job small enough to run often
SMALL_JOB = """
name = "small"
workdir = "{work}"
[inputs]
policy = "{policy}"
prompts = "{prompts}"
[stages.generate]
kind = "generate"
prompts = "inputs.prompts"
policy = "inputs.policy"
num_samples = 2
max_new_tokens = 4
chunk_prompts = 4
[stages.score]
kind = "score"
generations = "stages.generate"
weights = {{ exact_match = 1.0, length_penalty = 0.1 }}
[stages.pairs]
kind = "pairs"
generations = "stages.score"
"""
