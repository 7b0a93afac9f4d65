"""Exclusive locks on local files: one ``pipeline run`` per workdir, one writer per chunk.

A lock is ``flock(2)`` on a small file that also records its holder (host, pid, start
time, command). The kernel drops a flock when its holder dies, however it dies
(SIGKILL included), so a lock is never stale: a run killed while holding it leaves a
file whose holder record names a dead process, and the next run simply takes the lock
and says whose it was. A holder that exits normally clears the record first.

NFS: Linux maps ``flock`` onto NFS byte-range locks (NLM for v3, built in for v4), so
a lock taken on one client is seen by the others; if the holder's machine dies, the
server frees its locks when the client's lease expires (about 90 s for NFSv4). A
filesystem without lock support is refused with a one-line error. Object stores have
no locks at all: dataset writers there go unlocked (see ``ShardWriter.claim``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path

from .errors import InputError
from .lineage import utc_now

# Errors that mean "this filesystem cannot lock", as opposed to "someone holds it".
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def holder_record(**extra) -> dict:
    """Who is taking a lock: host, pid, start time, command line."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started_at": utc_now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300], **extra}


def describe(holder: dict | None) -> str:
    """One phrase naming a holder: ``pid 123 on host h since 2026-01-01T00:00:00+00:00``."""
    if not holder:
        return "another process (no holder record)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"since {holder.get('started_at', '?')}")


def read_holder(path: str | os.PathLike, tries: int = 3) -> dict | None:
    """The holder record in a lock file (None when empty, missing or unreadable)."""
    for attempt in range(tries):  # a new holder may be between truncating and writing
        if attempt:
            time.sleep(0.02)
        try:
            text = Path(path).read_text()
        except OSError:
            return None
        if text.strip():
            with contextlib.suppress(ValueError):
                record = json.loads(text)
                return record if isinstance(record, dict) else None
    return None


class FileLock:
    """An exclusive flock on ``path`` with a holder record inside.

    :meth:`acquire` returns the record of a previous holder that died while holding
    the lock (taken over), or None. :meth:`release` clears the record and unlocks.
    """

    def __init__(self, path: str | os.PathLike, record: dict | None = None):
        self.path = Path(path)
        self.record = record or holder_record()
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _try(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in NO_LOCKS:
                raise InputError(f"{self.path}: this filesystem does not support file locks "
                                 f"({e.strerror}); use a local or lock-capable filesystem") from None
            raise

    def acquire(self, wait: bool = False, message: str | None = None, hint: str = "") -> dict | None:
        """Take the lock. If a live process holds it, raise :class:`InputError`
        (``message: held by <holder><hint>``), or with ``wait`` block until it is free."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            got = self._try(fd)
            for _ in range(3):  # a probe (is_held) holds a shared lock for a moment
                if got:
                    break
                time.sleep(0.05)
                got = self._try(fd)
            if not got and wait:
                print(f"waiting for {self.path}: held by {describe(read_holder(self.path))}",
                      file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
                got = True
            if not got:
                raise InputError(f"{message or f'{self.path}: locked'}: held by "
                                 f"{describe(read_holder(self.path))}{hint}")
            previous = read_holder(self.path, tries=1)  # ours now: nobody is writing it
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.record).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return previous

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder record behind
        finally:
            os.close(fd)  # closing drops the flock

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()


def is_held(path: str | os.PathLike) -> bool:
    """Whether a live process holds the lock on ``path`` (probed with a shared lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def claim_slot(folder: str, worker: int, num_workers: int, busy: str) -> FileLock:
    """Lock worker slot ``worker`` of ``num_workers`` (the chunks ``c % N == i``) in
    ``folder``; refused while a live process holds this slot or any slot whose chunks
    overlap it (``i % g == j % g`` with ``g = gcd(N, M)``). ``busy`` starts the error."""
    mine = f"{worker}-of-{num_workers}.lock"
    lock = FileLock(f"{folder}/{mine}", holder_record(worker=worker, num_workers=num_workers))
    hint = ("; wait for it to finish (a killed writer's claim is freed when it dies), "
            "or give each writer its own --worker i --num-workers N")
    lock.acquire(message=f"{busy} (worker {worker} of {num_workers})", hint=hint)
    try:
        for name in sorted(os.listdir(folder)):
            m = re.fullmatch(r"(\d+)-of-(\d+)\.lock", name)
            if not m or name == mine:
                continue
            other, others = int(m[1]), int(m[2])
            g = math.gcd(num_workers, others)
            if other % g == worker % g and is_held(f"{folder}/{name}"):
                raise InputError(f"{busy} (worker {other} of {others}, whose chunks overlap "
                                 f"worker {worker} of {num_workers}): held by "
                                 f"{describe(read_holder(f'{folder}/{name}'))}{hint}")
    except BaseException:
        lock.release()
        raise
    return lock
