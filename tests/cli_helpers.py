"""Running ``offline-rlhf`` as a user does (a process of its own) and checking the one-line
error contract."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Progress bars, library deprecation notices and Python warnings off, as in a batch job:
# what is left on stderr is ours.
QUIET = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
# bitsandbytes logs this on import on CPUs with AVX512-BF16 (an optional kernel is not
# installed); it is not about the command's input.
LIBRARY_NOISE = ("Failed to load CPU gemm_4bit_forward",)


# Read by Python or torch when a process starts or imports them: a call that sets one runs
# in a real subprocess, since a forked child (cli_server.py) would keep the server's value.
IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "CUDA_", "TORCH", "TRANSFORMERS_VERBOSITY", "HF_HOME")


def cli(*args, script: str | None = None, env: dict | None = None, timeout: int = 600,
        fresh: bool = False, **kw) -> subprocess.CompletedProcess:
    """``offline-rlhf ARGS`` (or ``python SCRIPT ARGS``, a wrapper around ``cli.main``).

    The command runs in a process of its own: a child forked from a server that has torch and
    transformers imported already (see cli_server.py), or a new Python process where the call
    needs one (``fresh``, a ``script``, an environment read at start-up, or ``OFFLINE_RLHF_TEST_FRESH=1``
    for the whole run)."""
    args = [str(a) for a in args]
    full_env = {**os.environ, **QUIET, **(env or {})}
    if not (fresh or script or set(kw) - {"cwd"} or _import_time(env)):
        done = _SERVER.run(args, full_env, kw.get("cwd"), timeout)
        if done is not None:
            return done
    head = [sys.executable, script] if script else [sys.executable, "-m", "offline_rlhf.cli"]
    return subprocess.run(head + args, capture_output=True, text=True, env=full_env,
                          timeout=timeout, **kw)


def _import_time(env: dict | None) -> bool:
    return any(k.startswith(IMPORT_TIME_ENV) for k in env or {})


class _ForkServer:
    """The client side of cli_server.py: one server per test process, started on first use,
    used by one call at a time (a concurrent call runs a subprocess)."""

    def __init__(self):
        self.proc = None
        self.lock = threading.Lock()
        self.disabled = os.environ.get("OFFLINE_RLHF_TEST_FRESH", "") not in ("", "0")
        self.cpu_seconds = 0.0   # used by the commands it ran (conftest's CPU report reads it)

    def _start(self) -> None:
        env = {**os.environ, **QUIET}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_server.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=str(ROOT))
        if "ready" not in self._reply():
            raise RuntimeError("cli_server.py did not start")
        atexit.register(self.proc.kill)

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"cli_server.py exited ({self.proc.poll()})")
        return json.loads(line)

    def run(self, args, env, cwd, timeout) -> subprocess.CompletedProcess | None:
        if self.disabled or not self.lock.acquire(blocking=False):
            return None
        try:
            if self.proc is None:
                self._start()
            with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
                out, err = Path(tmp, "out"), Path(tmp, "err")
                self.proc.stdin.write(json.dumps({"args": args, "env": env, "cwd": str(cwd or os.getcwd()),
                                                  "stdout": str(out), "stderr": str(err)}) + "\n")
                self.proc.stdin.flush()
                reply = self._reply()
                if "refuse" in reply:
                    self.disabled = True
                    return None
                status = self._wait(reply["pid"], args, timeout)
                read = lambda p: p.read_text(errors="backslashreplace") if p.exists() else ""  # noqa: E731
                return subprocess.CompletedProcess(["offline-rlhf", *args], status, read(out), read(err))
        finally:
            self.lock.release()

    def _wait(self, pid: int, args, timeout: float) -> int:
        fired = threading.Event()
        timer = threading.Timer(timeout, lambda: (fired.set(), _kill_group(pid)))
        timer.start()
        try:
            reply = self._reply()
        finally:
            timer.cancel()
        self.cpu_seconds += reply.get("cpu", 0.0)
        status = reply["status"]
        if fired.is_set():
            raise subprocess.TimeoutExpired(["offline-rlhf", *args], timeout)
        return status


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_SERVER = _ForkServer()


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
