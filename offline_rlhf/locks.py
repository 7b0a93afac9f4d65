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

A lock file is opened with ``O_NOFOLLOW``: a symbolic link planted where it goes is
refused in one line, and its target is never truncated.
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
from .storage import open_nofollow

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
    the lock (taken over), or None. :meth:`release` clears the record and unlocks;
    with ``remove`` it deletes the file first (for locks taken once, like a chunk's),
    which is safe because :meth:`acquire` checks that the file it locked is still the
    one at ``path``.
    """

    def __init__(self, path: str | os.PathLike, record: dict | None = None, remove: bool = False):
        self.path = Path(path)
        self.record = record or holder_record()
        self.remove = remove
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

    def _locked_fd(self, wait: bool, message: str | None, hint: str) -> int:
        """An open descriptor of ``path``, flocked; refused while a live process holds it."""
        while True:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)   # a planted link: refused
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
                with contextlib.suppress(FileNotFoundError):
                    if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                        return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder removed the file as we locked it: take the new one

    def acquire(self, wait: bool = False, message: str | None = None, hint: str = "") -> dict | None:
        """Take the lock. If a live process holds it, raise :class:`InputError`
        (``message: held by <holder><hint>``), or with ``wait`` block until it is free."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._locked_fd(wait, message, hint)
        try:
            previous = read_holder(self.path, tries=1)  # ours now: nobody is writing it
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.record).encode(), 0)   # informative: no fsync
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
            if self.remove:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            else:
                os.ftruncate(fd, 0)  # a clean exit leaves no holder record behind
        finally:
            os.close(fd)  # closing drops the flock

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()


def is_held(path: str | os.PathLike) -> bool:
    """Whether a live process holds the lock on ``path`` (probed with a shared lock)."""
    try:
        fd = open_nofollow(path)
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


# Claims on a dataset's chunks: a worker slot (chunks c % N == i) or a single chunk.
SLOT = re.compile(r"(\d+)-of-(\d+)\.lock")
CHUNK = re.compile(r"part-(\d+)\.lock")


def claim_name(worker: int, num_workers: int | None) -> str:
    """The lock file of a slot (``i-of-N.lock``) or, with ``num_workers`` None, of chunk
    ``worker`` alone (``part-000003.lock``)."""
    return f"part-{worker:06d}.lock" if num_workers is None else f"{worker}-of-{num_workers}.lock"


def _what(name: str) -> str:
    if m := SLOT.fullmatch(name):
        return f"worker {m[1]} of {m[2]}"
    return f"chunk {int(CHUNK.fullmatch(name)[1])}"


def _overlap(name: str, worker: int, num_workers: int | None) -> bool:
    """Whether the claim in file ``name`` covers a chunk of ours (slot or single chunk)."""
    if m := SLOT.fullmatch(name):
        j, m_workers = int(m[1]), int(m[2])
        if num_workers is None:
            return worker % m_workers == j
        g = math.gcd(num_workers, m_workers)
        return worker % g == j % g
    if m := CHUNK.fullmatch(name):
        return int(m[1]) == worker if num_workers is None else int(m[1]) % num_workers == worker
    return False


def claim(folder: str, worker: int, num_workers: int | None, busy: str) -> FileLock:
    """Claim slot ``worker`` of ``num_workers`` (or, with ``num_workers`` None, chunk
    ``worker`` alone) of a dataset whose claims live in ``folder``. Refused, naming the
    holder, while a live process claims the same or overlapping chunks (slots overlap
    when ``i % g == j % g``, ``g = gcd(N, M)``); ``busy`` starts the error."""
    mine = claim_name(worker, num_workers)
    lock = FileLock(f"{folder}/{mine}", holder_record(claim=_what(mine)),
                    remove=num_workers is None)   # a chunk's lock goes with its write
    hint = ("; wait for it to finish (a killed writer's claim is freed when it dies), "
            "or give each writer its own --worker i --num-workers N")
    lock.acquire(message=f"{busy} ({_what(mine)})", hint=hint)
    try:
        for name in sorted(os.listdir(folder)):   # the few slots, and chunks claimed alone
            if name != mine and _overlap(name, worker, num_workers) and is_held(f"{folder}/{name}"):
                raise InputError(f"{busy} ({_what(name)}, overlapping {_what(mine)}): held by "
                                 f"{describe(read_holder(f'{folder}/{name}'))}{hint}")
    except BaseException:
        lock.release()
        raise
    return lock
