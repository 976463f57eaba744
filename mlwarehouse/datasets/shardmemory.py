"""A bounded in-memory cache of verified, decoded shards, shared by every reader of a process.

Shards are content-addressed, so a key names the same bytes in every blob store and every dataset version: two
versions that share shards, or two handles on one dataset, share their cached copies and one bound. Only shards
that were fetched and checked against their sha256 enter the cache; later epochs then read them without fetching,
hashing or decompressing again. The bound holds per process (each DataLoader worker process has its own copy).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from mlwarehouse.errors import QueryError

if TYPE_CHECKING:
    from mlwarehouse.datasets.wholeshard import Shard

__all__ = ["DecodedShards", "MEMORY", "MEMORY_BYTES"]

#: default bound of the process-wide cache of decoded shards
MEMORY_BYTES = 1 << 30


class DecodedShards:
    """Least recently used shards, at most ``max_bytes`` of them (their stored bytes plus decoded columns)."""

    def __init__(self, max_bytes: int = MEMORY_BYTES):
        self._check(max_bytes)
        self.max_bytes = max_bytes
        self._shards: OrderedDict[str, tuple[Shard, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @staticmethod
    def _check(max_bytes) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise QueryError(f"a shard memory bound must be an integer >= 0, not {max_bytes!r}")

    @property
    def used_bytes(self) -> int:
        """Bytes held now (never more than ``max_bytes``)."""
        return self._used

    def __len__(self) -> int:
        return len(self._shards)

    def get(self, key: str) -> Shard | None:
        with self._lock:
            entry = self._shards.get(key)
            if entry is None:
                return None
            self._shards.move_to_end(key)
            return entry[0]

    def put(self, key: str, shard: Shard) -> None:
        """Keep ``shard`` (again, when it decoded more columns since), evicting the least recently used."""
        with self._lock:
            size = shard.nbytes  # read under the lock: another thread may have decoded more columns meanwhile
            old = self._shards.pop(key, None)
            if old is not None:
                self._used -= old[1]
            if size <= self.max_bytes:
                self._evict(size)
                self._shards[key] = (shard, size)
                self._used += size

    def resize(self, max_bytes: int) -> None:
        """Change the bound, dropping the least recently used shards that no longer fit (0 empties it). Their
        decoded columns go back to :data:`mlwarehouse.datasets.recycled.RECYCLED` once nothing else holds them,
        which keeps at most 256 MiB for the next decodes (``RECYCLED.clear()`` lets those go too)."""
        self._check(max_bytes)
        with self._lock:
            self.max_bytes = max_bytes
            self._evict(0)

    def _evict(self, incoming: int) -> None:
        while self._shards and self._used + incoming > self.max_bytes:
            _, (_, size) = self._shards.popitem(last=False)
            self._used -= size


#: the process-wide cache every reader uses unless given its own
MEMORY = DecodedShards()
