"""Large buffers handed back once nothing refers to them, so decoding a shard again writes into memory already
faulted in.

A fresh buffer of many MB costs the kernel one fault and one zeroed page per 4 KB as it is first written: for an
MNIST-like epoch decoded again (a dataset larger than the memory cache, or the cache emptied), more time than the
zstd decode itself. Each buffer taken here is an array whose base is a *lease*; every view, reshape or slice of it
keeps the lease alive, and when the last one is gone the lease gives the memory back to the pool, which hands it to
the next :meth:`RecycledBuffers.take` of a size it fits. Nothing is reused while anything still refers to it, so a
caller never sees its values change. The pool keeps at most ``max_free`` bytes that nobody uses; beyond that the
oldest are let go to the allocator (and so to the kernel).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

__all__ = ["RecycledBuffers", "RECYCLED", "RECYCLE_FROM"]

#: buffers smaller than this come from numpy's allocator, which keeps small blocks itself
RECYCLE_FROM = 1 << 20
_GRAIN = 1 << 20  # capacities are whole MiB: shards' columns of slightly different sizes share blocks


class _Lease:
    """The owner of one taken buffer, as numpy sees it (``__array_interface__`` over the pool's block): arrays
    made from it, and their views, keep it as their base; its end gives the block back."""

    __slots__ = ("block", "pool", "__array_interface__", "__weakref__")

    def __init__(self, block: np.ndarray, nbytes: int, pool: RecycledBuffers):
        self.block, self.pool = block, pool
        self.__array_interface__ = {"data": (block.ctypes.data, False), "shape": (nbytes,), "typestr": "|u1",
                                    "version": 3}

    def __del__(self):
        try:
            self.pool._give_back(self.block)
        except Exception:  # interpreter shutdown: the block is simply freed
            pass


class RecycledBuffers:
    """Writable, uninitialised byte buffers of at least :data:`RECYCLE_FROM` bytes, recycled once unreferenced."""

    def __init__(self, max_free: int = 256 << 20):
        self.max_free = max_free
        self._free: list[np.ndarray] = []  # blocks nobody uses, oldest first
        self._free_bytes = 0
        self._lock = threading.RLock()
        self._busy = False  # inside a critical section: a lease ended by a collection there drops its block
        self.reused = 0  # takes served from a free block (for tests and benchmarks)

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def take(self, nbytes: int) -> np.ndarray:
        """A 1-D uint8 array of ``nbytes`` that nothing else refers to; its bytes are whatever was there."""
        if nbytes < RECYCLE_FROM:
            return np.empty(nbytes, np.uint8)
        block = self._fitting(nbytes)
        if block is None:
            block = np.empty(-(-nbytes // _GRAIN) * _GRAIN, np.uint8)
        return np.asarray(_Lease(block, nbytes, self))

    @contextmanager
    def _alone(self) -> Iterator[bool]:
        """The pool's critical section; yields False, entering nothing, on a thread already inside it (a lease
        ended by a collection there)."""
        with self._lock:  # reentrant: a lease may end in a collection on this very thread
            if self._busy:
                yield False
                return
            self._busy = True
            try:
                yield True
            finally:
                self._busy = False

    def _fitting(self, nbytes: int) -> np.ndarray | None:
        """The smallest free block of ``nbytes`` or more that wastes at most a quarter of itself, taken out."""
        with self._alone() as inside:
            if not inside:
                return None
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.nbytes <= nbytes + nbytes // 4 + _GRAIN]
            if not fits:
                return None
            block = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
            self._free_bytes -= block.nbytes
            self.reused += 1
            return block

    def _give_back(self, block: np.ndarray) -> None:
        with self._alone() as inside:
            if not inside or block.nbytes > self.max_free:
                return  # the block is freed like any array
            self._free.append(block)
            self._free_bytes += block.nbytes
            while self._free_bytes > self.max_free:
                self._free_bytes -= self._free.pop(0).nbytes

    def clear(self) -> None:
        """Let every free block go."""
        with self._alone():
            self._free.clear()
            self._free_bytes = 0

    def _after_fork(self) -> None:
        self._lock, self._busy = threading.RLock(), False


#: the process's pool, which shard decoding takes its columns from
RECYCLED = RecycledBuffers()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=RECYCLED._after_fork)
