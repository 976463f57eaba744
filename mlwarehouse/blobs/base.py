"""The blob protocol: immutable, content-addressed bytes, verified on every read.

A blob's key is the lowercase hex sha256 of its stored bytes. ``put`` is idempotent and durable when it
returns (invariant 1: blobs first, index second); putting bytes that already exist refreshes their modification
time, so garbage collection's grace period protects a blob that a writer is about to reference again.
``get`` checks the hash and raises IntegrityError rather than return bad bytes. Backends: a local directory
(:mod:`.files`), S3-compatible stores (:mod:`.s3`), GridFS (:mod:`.gridfs`); :mod:`.cache` puts a bounded
local read cache in front of any of them, and :mod:`.common` holds the helpers they share.

The public surface is deliberate: ``put``, ``put_file``, ``get``, ``get_buffer``, ``get_range``, ``exists``,
``stat``, ``delete``, ``list``, ``close``, plus the attributes ``name`` and ``mtime_resolution``. Backends implement
the abstract methods and may override ``get_buffer`` and the private hooks ``_put_stream`` and ``_read_range``, and
offer ``_open_stream`` (the local store does): a blob's raw bytes as a file object, which
:func:`mlwarehouse.blobs.common.open_verifying` hashes as a decoder streams them.

Batches: inside ``with put_batch():`` (entered by :func:`mlwarehouse.codecs.values.pack` around one value, so
around one checkpoint) a backend may return from ``put`` as soon as it knows the key and finish the write in the
background; the batch's exit waits for every such write and makes it durable, and raises the first error. So a
value is durable when the block ends, not after each put: invariant 1 holds as long as the document is written
after the block, which is how :meth:`mlwarehouse.warehouse.Project.pack` is built. Keys that
:meth:`PutBatch.prehash` computed in parallel are taken from the batch by :func:`blob_key` instead of hashing twice.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = ["BlobStore", "BlobInfo", "PutBatch", "blob_key", "check_key", "check_range", "current_batch",
           "pool", "put_batch", "workers"]


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch, the last put or touch


def blob_key(data: bytes | memoryview) -> str:
    """The content address of ``data`` (taken from the current batch when it hashed this very object already)."""
    batch = _batch.get()
    if batch is not None:
        known = batch.keys.get(id(data))
        if known is not None and known[0] is data:
            return known[1]
    return hashlib.sha256(data).hexdigest()


# -- background work: pools per process, shared by batched puts and parallel reads ------------------------------

_pools: dict[str, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def workers() -> int:
    """Threads that hash or read at once: hashlib and file reads release the GIL, so each can use a core."""
    return max(2, min(8, os.cpu_count() or 2))


def pool(kind: str = "cpu") -> ThreadPoolExecutor:
    """The process's pool for blob work: ``"cpu"`` (hashing, reading) or ``"io"`` (writes that end in an fsync,
    kept apart so that hashing never queues behind a slow disk), :func:`workers` threads each: more writers than
    cores only contend in the kernel's page-cache copies (a first 1 GiB checkpoint on 2 cores: 4 writers 1.0-1.26 s
    and 1.0-1.6 s of CPU, 2 writers 0.80-1.04 s and 1.03-1.14 s). Made on first use, and again in a forked child,
    whose copy has no threads."""
    with _pool_lock:
        executor = _pools.get(kind)
        if executor is None:
            size = workers()
            executor = _pools[kind] = ThreadPoolExecutor(size, thread_name_prefix=f"mlw-blobs-{kind}")
        return executor


def _forget_pools() -> None:
    global _pool_lock
    _pools.clear()
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _nbytes(data: Any) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class PutBatch:
    """Puts of one thread inside :func:`put_batch`: background writes, the work to do once they are all done, and
    keys hashed ahead of time. Writes in flight hold at most :attr:`MAX_PENDING` bytes that no caller owns."""

    MAX_PENDING = 512 << 20

    def __init__(self) -> None:
        self.keys: dict[int, tuple[Any, str]] = {}   # id(buffer) -> (buffer, its key), see prehash
        self._jobs: list[Future] = []
        self._held: deque[tuple[Future, int]] = deque()  # jobs whose bytes count against MAX_PENDING
        self._pending = 0
        self._claimed: set[tuple[int, str]] = set()

    def claim(self, store: object, key: str) -> bool:
        """True the first time ``store`` asks about ``key`` in this batch: a second put of the same bytes leaves
        the write to the first one (durable by the batch's end all the same)."""
        mark = (id(store), key)
        if mark in self._claimed:
            return False
        self._claimed.add(mark)
        return True

    def defer(self, job: Callable[..., Iterable[tuple[Callable[[Any], Any], Any]] | None], *args: Any,
              size: int = 0) -> None:
        """Run ``job(*args)`` in the background; it returns the ``(function, argument)`` pairs to call once every
        job is done (folders to fsync...), which are called once each, in parallel. ``size`` is what the job holds
        in memory: past :attr:`MAX_PENDING` the oldest jobs are waited for first."""
        while self._held and self._pending + size > self.MAX_PENDING:
            future, held = self._held.popleft()
            future.exception()  # waits; an error is raised at the end, with the others
            self._pending -= held
        future = pool("io").submit(job, *args)
        self._pending += size
        self._held.append((future, size))
        self._jobs.append(future)

    def prehash(self, buffers: list[Any]) -> None:
        """Hash ``buffers`` in parallel (a payload of 1 MiB or more each) and remember their keys for
        :func:`blob_key`; each buffer is held by the batch until it ends."""
        big = [b for b in buffers if id(b) not in self.keys and _nbytes(b) >= 1 << 20]
        if len(big) < 2:
            return
        for buffer, key in zip(big, pool().map(lambda b: hashlib.sha256(b).hexdigest(), big)):
            self.keys[id(buffer)] = (buffer, key)

    def _finish(self, raise_errors: bool) -> None:
        """Wait for every job, then run the end work of the jobs that succeeded; the first error is raised."""
        error: BaseException | None = None
        todo: dict[tuple[Any, Any], None] = {}
        for future in self._jobs:
            exc = future.exception()
            if exc is not None:
                error = error or exc
            else:
                todo.update(dict.fromkeys(future.result() or ()))
        self._jobs, self._held, self._pending, self.keys = [], deque(), 0, {}
        if error is None and todo:
            results = [pool("io").submit(fn, arg) for fn, arg in todo]
            for result in results:
                exc = result.exception()
                error = error or exc
        if error is not None and raise_errors:
            raise error


_batch: contextvars.ContextVar[PutBatch | None] = contextvars.ContextVar("mlw_put_batch", default=None)


def current_batch() -> PutBatch | None:
    """The batch that this thread's puts belong to now, if any."""
    return _batch.get()


@contextmanager
def put_batch() -> Iterator[PutBatch]:
    """Puts inside the block may finish in the background; they are all durable when it ends without an error (the
    first failure of any is raised then). On an error inside the block the writes are still waited for (nothing
    keeps running behind the caller) and their failures dropped: at most unreferenced blobs are left."""
    batch = PutBatch()
    token = _batch.set(batch)
    try:
        yield batch
    except BaseException:
        _batch.reset(token)
        batch._finish(raise_errors=False)
        raise
    _batch.reset(token)
    batch._finish(raise_errors=True)


def check_key(key: str) -> str:
    """Validate a key (64 lowercase hex digits) so that it can never name a path outside the store."""
    from mlwarehouse.errors import NotFound
    if not isinstance(key, str) or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise NotFound(f"not a blob key: {key!r}")
    return key


def _check_size(key: str, actual: int, claimed: int | None) -> None:
    if claimed is not None and actual != claimed:
        from mlwarehouse.errors import IntegrityError
        raise IntegrityError(f"blob {key} holds {actual} bytes, its reference says {claimed}")


def check_range(start: int, length: int) -> None:
    """Refuse a negative ``start`` or ``length`` before any storage is touched: QueryError, a malformed request."""
    if start < 0 or length < 0:
        from mlwarehouse.errors import QueryError
        raise QueryError(f"get_range needs start >= 0 and length >= 0, got {start} and {length}")


class BlobStore(ABC):
    """Abstract blob backend. Safe to share between threads; many processes may use one store at once."""

    name: str = "abstract"
    #: how coarse modification times are (S3 stamps whole seconds); blob release allows for it
    mtime_resolution: float = 0.0
    #: whether the blobs are files on this machine's disks (read at memory speed from the page cache)
    local_files: bool = False

    @abstractmethod
    def put(self, data: bytes | memoryview) -> str:
        """Store ``data`` (idempotent) and return its key once it is durable."""

    def put_file(self, source: str | os.PathLike | BinaryIO) -> tuple[str, int]:
        """Store a file (a path or a binary file object) by streaming it; returns ``(key, size)``."""
        if isinstance(source, (str, os.PathLike)):
            try:
                with open(source, "rb") as f:
                    return self._put_stream(f)
            except FileNotFoundError as exc:
                from mlwarehouse.errors import NotFound
                raise NotFound(f"no file to store at {source}") from exc
        return self._put_stream(source)

    def _put_stream(self, source: BinaryIO) -> tuple[str, int]:
        """Note for implementers: stream ``source`` into the store without holding it all in memory; this
        default reads it whole."""
        data = source.read()
        return self.put(data), len(data)

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole blob, verified against its key. NotFound if missing, IntegrityError if corrupted."""

    def get_buffer(self, key: str, size: int | None = None, *, allocate: Callable[[int], Any] | None = None,
                   xxh3: str | None = None, mapped: bool = False) -> bytes | memoryview:
        """``get``, for a caller that decodes the bytes zero-copy: a backend that can read into memory of its own
        returns a *writable* buffer that nothing else refers to (tensors then take it over as it is), others the
        read-only bytes of ``get``. ``size``, when given, is what the caller's reference claims: a blob of another
        size is an IntegrityError, raised before a backend allocates anything for it. ``allocate(length)``, when
        given, makes that buffer (a caller that recycles its buffers); backends that read ``get``'s bytes ignore
        it. ``xxh3`` is a checksum (hex) the index recorded beside the key: a store that trusts its own bytes (a
        local folder, see :mod:`mlwarehouse.blobs.files`) may check it instead of the sha256; others ignore it.
        ``mapped``: a read-only view is as good as a buffer of the caller's own (a store of trusted local files may
        then map the file instead of copying it); others ignore it."""
        data = self.get(key)
        _check_size(key, _nbytes(data), size)
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer at the end of the blob, none past it); not verifiable on its
        own: callers carry their own checksums. QueryError for a negative ``start`` or ``length``."""
        check_range(start, length)
        return self._read_range(key, start, length)

    def _read_range(self, key: str, start: int, length: int) -> bytes:
        """Note for implementers: the range is already checked; read only the bytes asked for, and raise
        NotFound for a missing blob even when ``length`` is 0. This default fetches (and verifies) it whole."""
        return self.get(key)[start:start + length]

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def stat(self, key: str) -> BlobInfo:
        """Size and modification time; NotFound if missing."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the blob; False if it was not there."""

    @abstractmethod
    def list(self) -> Iterator[BlobInfo]:
        """Every blob in the store (for garbage collection)."""

    def close(self) -> None:
        """Release connections."""
