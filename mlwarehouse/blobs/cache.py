"""A bounded local read cache in front of any blob store: ``CachedBlobStore(S3BlobStore(...), "/local/cache")``.

Blobs read whole are kept as files in a local folder, in the layout of :mod:`.files` (written to a temporary
file and renamed, so a reader sees all of a copy or nothing). Copies are content-addressed, so never stale; a
blob that another process deletes from the inner store may still be served from a copy until it is evicted.

Integrity: every whole read from a copy is checked against its key, and a damaged copy is dropped and the blob
fetched again, never returned. A ranged read is served from a copy only once this process has verified that
copy whole and the file is unchanged since (same inode, size and modification time); otherwise it is verified
first, or the range is read from the inner store.

Bound: copies never take more than ``max_bytes`` together, whatever the number of processes sharing the folder.
Inserts, evictions and drops run under one file lock (``.lock``) and keep a shared byte count (``.used``); room is
made before a copy is written, evicting the least recently used copies (a hit refreshes a copy's modification
time) down to 80% of the bound, so eviction, which recounts the files, stays rare. A blob larger than a quarter
of the bound is not kept. Reads take no lock: an evicted file that a reader has open stays readable (POSIX).

Writes, ``exists``, ``stat``, ``list`` and ``delete`` go to the inner store (a delete drops the copy first).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock

from mlwarehouse.blobs.base import BlobInfo, BlobStore, blob_key, check_key
from mlwarehouse.blobs.common import fanout
from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.errors import BackendError, ConfigError

__all__ = ["CachedBlobStore", "DEFAULT_CACHE_BYTES"]

DEFAULT_CACHE_BYTES = 1 << 30
_LOCK, _USED = ".lock", ".used"
_MAX_VERIFIED = 1 << 16  # remembered verified copies per process (forgotten all at once beyond this)


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class CachedBlobStore(BlobStore):
    """``inner`` with a local copy of the blobs read whole, in ``root``, at most ``max_bytes``; see the module."""

    def __init__(self, inner: BlobStore, root: str | os.PathLike, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes <= 0:
            raise ConfigError(f"a blob read cache needs max_bytes > 0, not {max_bytes}")
        self.inner = inner
        self.copies = FileBlobStore(root, fsync=False)  # a cache: losing it in a crash only costs a fetch
        self.root = self.copies.root
        self.max_bytes = max_bytes
        self.name = inner.name
        self.mtime_resolution = inner.mtime_resolution
        self._pid = 0  # the process whose locks _lock and _local are (set on first use)
        self._verified: dict[str, tuple] = {}

    def __repr__(self) -> str:
        return f"CachedBlobStore({self.inner!r}, {str(self.root)!r}, max_bytes={self.max_bytes})"

    def __getattr__(self, name: str):
        """The inner store's public attributes (``bucket``, ``prefix``, ``endpoint``...), as before the wrapper."""
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(inner, name)

    def _path(self, key: str) -> Path:
        return self.root / fanout(key)

    @contextmanager
    def _exclusive(self):
        """Hold the folder: one thread of one process at a time (threads queue on a lock rather than poll the
        file lock; a forked child makes its own, since locks its parent's threads held are not its to release)."""
        if self._pid != os.getpid():
            self._local, self._lock = threading.Lock(), FileLock(str(self.root / _LOCK))
            self._pid = os.getpid()
        with self._local, self._lock:
            yield

    # -- reads: the copy if it is sound, else the inner store ---------------------------------------------------

    def get(self, key: str) -> bytes:
        data = self._copy(key)
        if data is None:
            data = self.inner.get(key)  # verified by the inner store
            self._keep(key, data)
        return data

    def _copy(self, key: str) -> bytes | None:
        """The verified local copy of ``key`` (marked recently used), or None."""
        path = self._path(key)
        try:
            os.utime(path)  # recently used: evicted last
            with open(path, "rb") as f:
                return self._whole(key, f)
        except OSError:  # no copy (or an unreadable one): the inner store has the truth
            return None

    def _read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                if self._verified.get(key) == _identity(os.fstat(f.fileno())):
                    return os.pread(f.fileno(), length, start) if length else b""
                data = self._whole(key, f)
        except OSError:
            data = None
        if data is None:
            return self.inner.get_range(key, start, length)
        return data[start:start + length]

    def _whole(self, key: str, f: BinaryIO) -> bytes | None:
        """The copy open in ``f``, read whole: remembered as verified if it hashes to ``key``, else dropped (None)."""
        st = os.fstat(f.fileno())
        data = f.read()
        if blob_key(data) != key:
            self._drop(key)
            return None
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()
        self._verified[key] = _identity(st)
        return data

    # -- the bounded folder -----------------------------------------------------------------------------------

    def _keep(self, key: str, data: bytes) -> None:
        """Copy a blob just read into the folder, making room first; a failure only costs the copy (warned)."""
        if len(data) > self.max_bytes // 4:  # one big blob must not flush everything else
            return
        try:
            with self._exclusive():
                if self._path(key).exists():  # another process kept it meanwhile
                    return
                used = self._used()
                if used + len(data) > self.max_bytes:
                    used = self._evict(int(self.max_bytes * 0.8) - len(data))
                # counted first: a writer killed before its copy lands leaves the count high (the next eviction
                # recounts), never low; the bytes were verified by the inner store, so they are not hashed again
                self._count(used + len(data))
                self.copies._put_keyed(key, data)
        except (BackendError, OSError) as exc:
            warnings.warn(f"the blob read cache in {self.root} cannot keep blob {key}: {exc}", stacklevel=3)

    def _drop(self, key: str) -> None:
        """Remove the copy of ``key`` if there is one (damaged, or its blob deleted); errors are ignored."""
        self._verified.pop(key, None)
        try:
            with self._exclusive():
                size = self._path(key).stat().st_size
                used = self._used()
                if self.copies.delete(key):
                    self._count(max(0, used - size))
        except (BackendError, OSError):  # FileNotFoundError included: nothing to drop
            pass

    def _used(self) -> int:
        """Bytes the copies take (the shared count; recounted from the files if it is missing or garbled)."""
        try:
            return int((self.root / _USED).read_text())
        except (OSError, ValueError):
            return self._recount()

    def _recount(self) -> int:
        used = self.used_bytes()
        self._count(used)
        return used

    def _count(self, used: int) -> None:
        (self.root / _USED).write_text(str(used))

    def _evict(self, target: int) -> int:
        """Remove least recently used copies until at most ``target`` bytes remain; the bytes that remain."""
        infos = sorted(self.copies.list(), key=lambda i: i.mtime)
        used = sum(i.size for i in infos)
        for info in infos:
            if used <= target:
                break
            if self.copies.delete(info.key):
                used -= info.size
        self._count(used)
        return used

    def used_bytes(self) -> int:
        """Bytes the copies take now, counted from the files."""
        return sum(info.size for info in self.copies.list())

    # -- everything else is the inner store's -------------------------------------------------------------------

    def put(self, data: bytes | memoryview) -> str:
        return self.inner.put(data)

    def put_file(self, source: str | os.PathLike | BinaryIO) -> tuple[str, int]:
        return self.inner.put_file(source)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def stat(self, key: str) -> BlobInfo:
        return self.inner.stat(key)

    def delete(self, key: str) -> bool:
        check_key(key)  # a bad key is refused before anything is touched
        self._drop(key)
        return self.inner.delete(key)

    def list(self) -> Iterator[BlobInfo]:
        return self.inner.list()

    def close(self) -> None:
        self.inner.close()
