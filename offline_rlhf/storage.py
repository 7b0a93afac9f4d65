"""Storage primitives of the shard store: atomic file writes on local paths and fsspec URLs.

Every file whose presence means something (a shard, its entry, a manifest, an eval's
``results.json``, a train summary) is written under a temporary name that no reader or
glob matches (``.NAME.<id>.tmp``), fsynced and renamed; on object stores it is one PUT.
A kill at any moment leaves the previous state or the whole new file, never a part.

Inside a dataset or a workdir no local file is opened through a symbolic link
(``O_NOFOLLOW``, :func:`open_nofollow`): a link planted where a lock, log, manifest,
entry or shard goes is refused in one line and its target is left untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from . import digests
from .errors import InputError

# Bytes hashed per read when a staged file is committed.
HASH_BLOCK = 8 << 20


def planted_link(path) -> InputError:
    return InputError(f"{path}: is a symbolic link; refusing to follow it (remove the link)")


def open_nofollow(path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` in one line (the link's
    target is never opened, so never truncated or appended to)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EEXIST and os.path.islink(path)):
            raise planted_link(path) from None
        raise


def refuse_link(path) -> None:
    """Refuse ``path`` when it is a symbolic link (a directory planted as a link, say)."""
    if os.path.islink(path):
        raise planted_link(path)


def remove_run_output(path, marker: str, command: str) -> None:
    """``--overwrite`` of a command whose output is a directory of its own (``eval``,
    ``rest``): remove ``path`` so that the command starts afresh. Only an empty directory
    or one holding ``marker`` (the file that command writes first or last) is removed;
    a link, a file or another directory is refused in one line."""
    import shutil
    refuse_link(path)
    if not os.path.exists(path):
        return
    if not os.path.isdir(path) or (os.listdir(path) and not os.path.exists(os.path.join(path, marker))):
        raise InputError(f"{path}: --overwrite replaces an earlier {command} output only (a "
                         f"directory holding {marker}), and this is not one; remove it yourself "
                         "or write elsewhere")
    shutil.rmtree(path)


def append_line(path, line: str) -> None:
    """Append one line to a local log file, never through a symbolic link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _fsync(fd: int) -> None:
    # A seam of its own so that crash tests can stop a writer exactly here.
    os.fsync(fd)


class Store:
    """File operations on a dataset root, local or any fsspec filesystem."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def display(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def refuse_links(self, *rels: str) -> None:
        """Refuse folders or files of the dataset that are symbolic links (local only)."""
        if self.local:
            for rel in rels:
                refuse_link(self.path(rel))

    def size(self, rel: str) -> int:
        if not self.local:
            return self.fs.size(self.path(rel))
        st = os.lstat(self.path(rel))
        if stat.S_ISLNK(st.st_mode):
            raise planted_link(self.display(rel))
        return st.st_size

    def sizes(self, rel: str = "") -> dict[str, int]:
        """Sizes of the plain files in a folder, by name, from one listing (links left out)."""
        target = self.path(rel) if rel else self.root
        if not self.fs.exists(target):
            return {}
        out = {}
        for info in self.fs.ls(target, detail=True):
            if info.get("type") == "file" and not info.get("islink"):
                out[info["name"].rstrip("/").rsplit("/", 1)[-1]] = info["size"]
        return out

    def read_bytes(self, rel: str) -> bytes:
        if not self.local:
            return self.fs.cat_file(self.path(rel))
        with self.open_read(rel) as f:
            return f.read()

    def open_read(self, rel: str):
        """A binary file object of ``rel`` for reading (locally: never through a link)."""
        if not self.local:
            return self.fs.open(self.path(rel), "rb")
        return os.fdopen(open_nofollow(self.path(rel)), "rb")

    def listdir(self, rel: str = "") -> list[str]:
        target = self.path(rel) if rel else self.root
        if not self.fs.exists(target):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(target, detail=False))

    def stale_tmp(self, folders: tuple[str, ...] = ("",)) -> set[str]:
        """Temporary files present now (left by killed writers), as relative paths.

        Listed once when a writer opens: a stale temporary file of a chunk can only come
        from a run that died before, while files that appear later belong to live
        workers writing other chunks."""
        return {f"{folder}/{n}" if folder else n for folder in folders
                for n in self.listdir(folder) if n.startswith(".") and n.endswith(".tmp")}

    def remove_stale_tmp(self, rel: str, stale: set[str]) -> None:
        """Delete the stale temporary files of ``rel`` (this chunk only)."""
        folder, _, name = rel.rpartition("/")
        prefix = f"{folder}/.{name}." if folder else f".{name}."
        for other in [t for t in stale if t.startswith(prefix)]:
            self.fs.rm_file(self.path(other))
            stale.discard(other)

    def write_atomic(self, rel: str, data: bytes) -> None:
        staged = Staged(self, rel)
        try:
            staged.write(data)
        except BaseException:
            staged.abort()
            raise
        staged.commit()

    @contextlib.contextmanager
    def lock(self, rel: str):
        """Exclusive lock on file ``rel`` (local filesystems; a no-op elsewhere)."""
        if not self.local:
            yield
            return
        import fcntl
        os.makedirs(self.path(rel).rpartition("/")[0], exist_ok=True)
        fd = open_nofollow(self.path(rel), os.O_WRONLY | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # closing drops the lock


class Staged:
    """A file written under a temporary name; :meth:`commit` hashes it and makes it
    visible at its final name (fsync + rename locally, one PUT elsewhere).

    ``sink`` is an Arrow output stream, so pyarrow encodes Parquet straight into it
    from C++; the sha256 is taken at commit time from the page cache, and for Parquet
    (``parquet=True``) the content hash in the same pass (see ``digests.py``).
    """

    def __init__(self, store: Store, rel: str, parquet: bool = False):
        self.store, self.final, self.parquet = store, store.path(rel), parquet
        self.size, self.sha256, self.content_hash = 0, None, None
        if store.local:
            folder, _, name = self.final.rpartition("/")
            os.makedirs(folder, exist_ok=True)
            self.tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
            self.sink = pa.OSFile(self.tmp, "wb")
        else:
            self.tmp, self.sink = None, pa.BufferOutputStream()

    def write(self, data) -> None:
        self.sink.write(data)

    def _content_hasher(self, source, size: int):
        if not self.parquet:
            return None
        return digests.RangeHasher(digests.content_ranges(pq.read_metadata(source), size))

    def commit(self) -> None:
        h = hashlib.sha256()
        try:
            if self.tmp is None:
                data = self.sink.getvalue()
                h.update(memoryview(data))
                self.size = data.size
                content = self._content_hasher(pa.BufferReader(data), data.size)
                if content is not None:
                    content.update(memoryview(data))
                self.store.fs.makedirs(self.final.rsplit("/", 1)[0], exist_ok=True)
                self.store.fs.pipe_file(self.final, data.to_pybytes())
            else:
                self.sink.close()
                content = self._content_hasher(self.tmp, os.path.getsize(self.tmp))
                with open(self.tmp, "rb") as f:
                    while block := f.read(HASH_BLOCK):
                        h.update(block)
                        if content is not None:
                            content.update(block)
                        self.size += len(block)
                    _fsync(f.fileno())
                os.replace(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise
        self.sha256 = h.hexdigest()
        self.content_hash = content.hexdigest() if content is not None else None
        if self.tmp is not None:
            dir_fd = os.open(self.final.rpartition("/")[0], os.O_RDONLY)
            try:
                _fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError, pa.ArrowException):
            if not self.sink.closed:
                self.sink.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


@contextlib.contextmanager
def storage_errors(where: str):
    """A failed write (disk full, quota, read-only or vanished storage) as one line
    naming the file; what was committed before stays, and a rerun resumes."""
    try:
        yield
    except InputError:
        raise
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"{where}: cannot write ({why}); it was not committed and earlier "
                         "work is kept: fix the storage and rerun to resume") from None


def write_file_atomic(path, data: bytes | str) -> None:
    """Write a file whose presence means "done" (eval results, a train summary, a
    report): under a temporary name, fsynced and renamed (one PUT on object stores),
    the same write as every shard's. A kill leaves the previous state or the whole
    file, never a part; stale temporaries of the same file (killed writers) go first.
    One writer per file: the pipeline's workdir lock sees to that."""
    folder, _, name = str(path).rstrip("/").rpartition("/")
    store = Store(folder or ".")
    with storage_errors(str(path)):
        if store.local:
            store.remove_stale_tmp(name, store.stale_tmp(("",)))
        store.write_atomic(name, data.encode() if isinstance(data, str) else data)


def write_json_atomic(path, obj) -> None:
    """:func:`write_file_atomic` of ``obj`` as indented JSON."""
    write_file_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def read_json_file(path) -> dict | None:
    """A done file's JSON object, or None when it is missing, empty or not a JSON
    object (a file cut short by a kill under older versions counts as not done)."""
    try:
        with fsspec.open(str(path), "rb") as f:
            obj = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
