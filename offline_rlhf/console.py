"""The console: log level, quiet mode, progress that suits a terminal and a log file,
and each warning printed once, on one line.

:func:`setup` is called once by the CLI (``--quiet``, ``--log-level``). :func:`status`
prints a one-line account of a phase (not with ``--quiet``). :func:`progress` is the one
progress bar of the package (stages, the training loop, the reference pass):

- on a terminal, a tqdm bar redrawn in place;
- when stderr is not a terminal (cron, CI, ``2> log``), plain lines: one every
  ``OFFLINE_RLHF_PROGRESS_SECONDS`` seconds (default 30) and one at the end, never a
  ``\\r`` redraw; each with the elapsed time, one throughput (of the bar's unit, or of
  what the caller counts with ``count_rate``, e.g. tokens) and the time left (ETA, from
  the rate of the bar's unit so far);
- nothing with ``--quiet`` or ``TQDM_DISABLE=1``.

Libraries stay quiet unless asked: transformers' per-load bars ("Loading weights",
"Writing model shards") are off and library loggers (transformers, accelerate, peft,
bitsandbytes, ...) show errors only, except at ``--log-level info`` or ``debug``.
Python warnings print as ``warning: MESSAGE``, each distinct message once; deprecation
warnings raised by a library's own calls (not ours) only at info or debug.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

LEVELS = ("debug", "info", "warning", "error")
LIBRARIES = ("transformers", "accelerate", "peft", "bitsandbytes", "datasets",
             "huggingface_hub", "torch", "urllib3", "filelock", "matplotlib")
PROGRESS_SECONDS_ENV = "OFFLINE_RLHF_PROGRESS_SECONDS"
log = logging.getLogger("offline_rlhf")
_state = {"quiet": False, "verbose": False}
_shown: set[str] = set()


def setup(level: str = "warning", quiet: bool = False) -> None:
    """Configure logging, library verbosity, progress bars and warnings for this process."""
    if level not in LEVELS:
        from .errors import InputError
        raise InputError(f"--log-level: must be one of {', '.join(LEVELS)}, got {level!r}")
    ours = getattr(logging, level.upper())
    _state.update(quiet=quiet, verbose=ours <= logging.INFO)
    libraries = ours if ours <= logging.INFO else logging.ERROR
    log.handlers[:] = [_StderrHandler()]
    log.setLevel(ours)
    log.propagate = False
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(libraries)
    bars = ours <= logging.DEBUG and not quiet
    # transformers reads these when it is imported; set them first, then the live state
    os.environ["TRANSFORMERS_VERBOSITY"] = logging.getLevelName(libraries).lower()
    if not bars:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules and not bars:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging
        tf_logging.set_verbosity(libraries)
        (tf_logging.enable_progress_bar if bars else tf_logging.disable_progress_bar)()
    warnings.showwarning = _show_warning


class _StderrHandler(logging.Handler):
    """``level: message`` on whatever sys.stderr is when the record is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    ours = f"{os.sep}offline_rlhf{os.sep}" in str(filename)
    if text in _shown or (not ours and issubclass(category, (DeprecationWarning, FutureWarning))
                          and not _state["verbose"]):
        return   # a library's own use of deprecated APIs is library chatter
    _shown.add(text)
    print(f"warning: {text}", file=file or sys.stderr)


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time it is seen in this process."""
    if message not in _shown:
        _shown.add(message)
        log.warning(message)


def status(message: str) -> None:
    """A one-line account of what a long phase is doing or chose (a budget, a reused
    cache), to stderr; nothing with ``--quiet``. Warnings go through :func:`warn_once`."""
    if not _state["quiet"]:
        print(message, file=sys.stderr, flush=True)


def _disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off")


def progress(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A progress bar with tqdm's ``update``, ``set_postfix`` and ``close`` (see the module doc)."""
    if not enabled or _state["quiet"] or _disabled_by_env():
        return _Silent()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=1.0,
                    dynamic_ncols=True, disable=False)
    seconds = float(os.environ.get(PROGRESS_SECONDS_ENV, "30"))
    return _Lines(total, desc, unit, initial, seconds)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def count_rate(self, n: int, unit: str) -> None:
        pass

    def close(self) -> None:
        pass


def _rate(x: float) -> str:
    """A throughput: ``31007``, ``12.5``, ``0.0417``."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def duration(seconds: float) -> str:
    """``45 s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _Lines:
    """Progress as plain lines on stderr: every ``seconds`` and once at the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int, seconds: float):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.start_n, self.seconds, self.postfix = initial, seconds, {}
        self.t0 = self.last = time.perf_counter()
        self.closed = False
        self.rated, self.rate_unit = 0, None

    def count_rate(self, n: int, unit: str) -> None:
        """Show the throughput in ``unit`` (counted here) instead of the bar's unit."""
        self.rated += n
        self.rate_unit = unit

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.seconds:
            self.last = now
            self._line(now)

    def _line(self, now: float, end: str = "", closing: bool = False) -> None:
        dt = max(now - self.t0, 1e-9)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.start_n) / dt
        shown = f"{_rate(self.rated / dt)} {self.rate_unit}/s" if self.rate_unit else \
            f"{_rate(rate)} {self.unit}/s"
        left = self.total - self.n
        eta = f", ETA {duration(left / rate)}" if left > 0 and rate > 0 and not closing else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}{end}, {duration(dt)}, "
              f"{shown}{eta}{extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.perf_counter(), " done" if self.n >= self.total else "", closing=True)
