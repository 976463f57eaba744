"""A local disk cache of recently read shards, bounded in bytes and safe for many processes at once.

One folder holds one file per shard, named by its key. Inserts and evictions run under one file lock
(:mod:`filelock`), and room is made *before* a shard is written, so the folder never holds more than ``max_bytes``
of shards, whatever the number of processes. Reads take no lock: a file is only ever renamed into place whole,
and an evicted file that a reader has open stays readable (POSIX). Every hit is checked against its key; a
damaged copy is dropped and fetched again. No shared memory is used, so nothing can leak when a process dies.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from mlwarehouse.blobs.base import blob_key, check_key
from mlwarehouse.errors import ConfigError

__all__ = ["ShardCache", "CacheStats"]

_LOCK, _TMP = ".lock", ".tmp-"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evicted: int = 0


class ShardCache:
    """``get(key, fetch)`` returns the shard's bytes from the cache, or fetches and keeps them."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = 10 << 30):
        if max_bytes <= 0:
            raise ConfigError(f"a shard cache needs max_bytes > 0, not {max_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = FileLock(str(self.root / _LOCK))
        self._local = threading.Lock()
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return f"ShardCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    def get(self, key: str, fetch: Callable[[str], bytes]) -> bytes:
        """The shard ``key``: a verified local copy, else ``fetch(key)`` (which must verify) kept for next time."""
        path = self.root / check_key(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None:
            if blob_key(data) == key:
                try:
                    os.utime(path)  # recently used: evicted last
                except OSError:
                    pass
                with self._local:
                    self.stats.hits += 1
                return data
            path.unlink(missing_ok=True)  # a damaged copy: the store has the truth
        data = fetch(key)
        with self._local:
            self.stats.misses += 1
        self.put(key, data)
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Keep ``data`` (False when it alone is larger than the bound)."""
        if len(data) > self.max_bytes:
            return False
        path = self.root / check_key(key)
        with self._lock:
            if path.exists():
                return True
            self._make_room(len(data))
            tmp = self.root / f"{_TMP}{key}-{os.getpid()}-{threading.get_ident()}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
        return True

    def entries(self) -> list[os.stat_result | tuple]:
        """``(mtime, size, path)`` of every cached shard."""
        out = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, entry.path))
        return out

    def used_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _sweep_temporary(self) -> None:
        """Remove temporary files (held under the lock, so any found are a killed writer's leftovers)."""
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name.startswith(_TMP):
                    Path(entry.path).unlink(missing_ok=True)

    def _make_room(self, incoming: int) -> None:
        self._sweep_temporary()
        entries = sorted(self.entries())
        used = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if used + incoming <= self.max_bytes:
                break
            try:
                os.unlink(path)
                self.stats.evicted += 1
            except FileNotFoundError:
                pass
            used -= size

    def clear(self) -> None:
        with self._lock:
            self._sweep_temporary()
            for _, _, path in self.entries():
                Path(path).unlink(missing_ok=True)
