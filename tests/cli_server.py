"""A fork server for the CLI tests: ``offline-rlhf ARGS`` without paying for Python's start-up.

Every ``offline-rlhf`` command imports torch and transformers (about 5 s of CPU on the CI
machine), and the suite runs the CLI a few hundred times. This process imports them once,
then forks a child per command: the child is a fresh process as far as the command can tell
(its own argv, environment, working directory, stdin from /dev/null, stdout and stderr to
files, exit status), but it starts with the libraries already imported.

What a child cannot see is import-time behaviour: warnings printed while importing, or
environment variables read only at import (PYTHONWARNINGS, OMP_NUM_THREADS,
CUDA_VISIBLE_DEVICES). ``cli_helpers.cli`` sends such calls to a real subprocess instead,
and so does any test that asks for one (``fresh=True``).

Protocol (one JSON object a line): request ``{"args", "env", "cwd", "stdout", "stderr"}``;
replies ``{"pid": N}`` once forked, then ``{"status": CODE, "cpu": SECONDS}`` (negative
code: killed by that signal; CPU seconds the child used) when the child ends; ``{"refuse": WHY}`` where forking is not safe (a CUDA context
exists, or another Python thread runs), and the caller runs a subprocess.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading


def _preload():
    from offline_rlhf import cli
    cli.build_parser(required=True)   # imports every command's module (torch, transformers)
    import transformers  # noqa: F401
    return cli


def _unsafe() -> str | None:
    """Why a fork now would not give the child a sound process, or None."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "a CUDA context exists"
    if threading.active_count() > 1:   # (native helper threads of jemalloc and torch are
        return f"{threading.active_count()} Python threads"   # fork-safe: atfork handlers)
    return None


def _child(cli, req: dict) -> int:
    """Run one command in this (forked) process; its exit status."""
    code = 1
    try:
        os.setpgid(0, 0)   # its own group: a timeout kills the command and its children
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(out, fd)
            os.close(out)
        sys.argv = [cli.__file__, *req["args"]]
        try:
            code = cli.main(req["args"])
        except SystemExit as e:   # argparse: --help, --version, usage errors
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:   # an uncaught error prints its traceback, as Python would
        import traceback
        traceback.print_exc()
        code = 1
    return code if isinstance(code, int) else 1


def _exit(code: int) -> None:
    """End the child as Python's own exit does (threads joined, atexit handlers run, streams
    flushed), without tearing down every module: with torch imported that teardown costs
    seconds, touching (and so copying) every page the server shares with the child."""
    import atexit
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def serve() -> None:
    cli = _preload()
    gc.freeze()   # the cyclic collector in a child leaves the server's objects alone
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        why = _unsafe()
        if why:
            print(json.dumps({"refuse": why}), flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            _exit(_child(cli, req))
        print(json.dumps({"pid": pid}), flush=True)
        _, status, usage = os.wait4(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status),
                          "cpu": usage.ru_utime + usage.ru_stime}), flush=True)


if __name__ == "__main__":
    serve()
