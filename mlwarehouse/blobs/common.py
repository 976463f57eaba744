"""What the blob backends share, written once: the fan-out layout, verification of whole blobs, fresh buffers to
read blobs into, the hashing reader that streamed puts use to learn a file's key while they copy it, and the
verifying reader through which a decoder streams a blob it must not trust before its end. (The range check is the
protocol's own: :func:`mlwarehouse.blobs.base.check_range`, applied by ``BlobStore.get_range`` for every
backend.)"""

from __future__ import annotations

import hashlib
import inspect
import io
import mmap
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from mlwarehouse.blobs.base import BlobStore, blob_key, check_key
from mlwarehouse.errors import BackendError, IntegrityError

__all__ = ["CHUNK", "READ_CHUNK", "STALE_TMP_S", "fanout", "fanout_key", "is_fanout_dir", "verified",
           "fresh_buffer", "is_xxh3", "read_buffer", "HashingReader", "VerifyingReader", "can_stream",
           "open_verifying", "copy_hashed"]

#: bytes per read when a file is streamed into a store
CHUNK = 8 << 20
#: bytes per read when a blob is read into memory and hashed: small enough that the hash finds the chunk still in
#: the CPU's cache, large enough that the reads cost little
READ_CHUNK = 1 << 20
#: buffers from this size on are anonymous mappings of their own (see :func:`fresh_buffer`); numpy's allocator,
#: below it, asks for no huge pages and reuses freed memory
_MAP_FROM = 4 << 20
#: a temporary file or upload older than this (seconds) was left by a crashed writer
STALE_TMP_S = 3600
_HEX = frozenset("0123456789abcdef")


def fanout(key: str) -> str:
    """``ab/cd/<key>``: where a blob lives in a fanned-out tree (256 x 256 folders keep each one small)."""
    check_key(key)
    return f"{key[:2]}/{key[2:4]}/{key}"


def is_fanout_dir(name: str) -> bool:
    """Whether ``name`` can be one level of the fan-out (two hex digits)."""
    return len(name) == 2 and _HEX.issuperset(name)


def fanout_key(top: str, sub: str, name: str) -> str | None:
    """The key that ``top/sub/name`` holds, or None for anything else (temporary files, other programs' files)."""
    if (is_fanout_dir(top) and is_fanout_dir(sub) and len(name) == 64 and name.startswith(top + sub)
            and _HEX.issuperset(name)):
        return name
    return None


def verified(key: str, data: bytes, where: str) -> bytes:
    """``data`` if it hashes to ``key``, else IntegrityError naming ``where`` it came from (never bad bytes)."""
    actual = blob_key(data)
    if actual != key:
        raise IntegrityError(f"blob {key} is corrupted: {where} hashes to {actual} ({len(data)} bytes read)")
    return data


def fresh_buffer(length: int) -> memoryview:
    """A writable buffer of ``length`` bytes that nothing else refers to, for a blob to be read over whole (arrays
    and tensors then take it over as it is); not zero-filled by us.

    Large ones are anonymous mappings, faulted in (zeroed by the kernel) as the read fills them, on the reading
    thread with the GIL released. Not numpy's allocator there: from 4 MiB on it asks for huge pages, which the
    kernel may first compact memory for (seconds of system time for a checkpoint); nor ``MAP_POPULATE``, which
    faults everything in at once but holds the GIL meanwhile, stalling the other readers. Smaller ones come from
    numpy's allocator (which reuses freed memory)."""
    if length >= _MAP_FROM and hasattr(mmap, "MAP_ANONYMOUS"):
        try:
            return memoryview(mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        except OSError:  # out of address space or a mapping limit: the ordinary allocator says so in its own way
            pass
    return memoryview(np.empty(length, np.uint8)).cast("B")


def is_xxh3(value: Any) -> bool:
    """Whether ``value`` (read from the index: untrusted) is an xxh3 checksum: 16 lowercase hex digits."""
    return type(value) is str and len(value) == 16 and _HEX.issuperset(value)


def read_buffer(store: BlobStore, key: str, size: int | None = None, *,
                allocate: Callable[[int], Any] | None = None, xxh3: str | None = None,
                mapped: bool = False) -> bytes | memoryview:
    """``store.get_buffer(key, size)``, read into ``allocate(length)`` where the store's ``get_buffer`` takes an
    allocator, checked against ``xxh3`` where it takes a checksum (a store that trusts its bytes checks that
    instead of the sha256), and mapped read-only where it takes ``mapped`` and can; a subclass may override
    ``get_buffer`` with an older signature, without some of these, and a wrapper that has only ``get`` is read
    through it."""
    cls = type(store)
    if cls not in _BUFFER_OPTIONS:
        method = getattr(cls, "get_buffer", None)
        _BUFFER_OPTIONS[cls] = None if method is None else \
            frozenset(("allocate", "xxh3", "mapped")) & inspect.signature(method).parameters.keys()
    takes = _BUFFER_OPTIONS[cls]
    if takes is None:
        return store.get(key)
    options = {"allocate": allocate, "xxh3": xxh3, "mapped": mapped or None}
    return store.get_buffer(key, size, **{name: options[name] for name in takes if options[name] is not None})


#: per store class, the options of ``read_buffer`` that its ``get_buffer`` takes (None: it has no ``get_buffer``)
_BUFFER_OPTIONS: dict[type, frozenset | None] = {}


class HashingReader(io.RawIOBase):
    """A read-only, non-seekable view of a binary file object that hashes and counts what passes through.

    Reads are filled to the size asked unless the source ends (GridFS and multipart uploads take a short read
    for the end of the file), and work on sources that can only ``read`` (no ``readinto``).
    """

    def __init__(self, source: BinaryIO):
        super().__init__()
        self.source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        into = getattr(self.source, "readinto", None)
        while got < len(view):
            if into is not None:
                n = into(view[got:]) or 0
            else:
                chunk = self.source.read(len(view) - got)
                n = len(chunk)
                view[got:got + n] = chunk
            if not n:
                break
            got += n
        self.digest.update(view[:got])
        self.size += got
        return got

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        parts, got = [], 0
        while got < n:
            chunk = self.source.read(n - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.digest.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        """The key of what was read so far."""
        return self.digest.hexdigest()


class VerifyingReader(io.RawIOBase):
    """The bytes of blob ``key`` streamed from an untrusted ``source``, hashed as they pass and never more than
    ``size`` of them. What was read is not to be trusted (nor handed to a caller) until :meth:`verify` returns: it
    reads what the consumer left, and raises IntegrityError unless exactly ``size`` bytes that hash to ``key`` came.
    A decoder that streams a blob (decompressing it straight into an array) thus needs no copy of the blob itself.
    """

    def __init__(self, source: BinaryIO, key: str, size: int, where: str):
        super().__init__()
        self.source, self.key, self.size, self.where = source, key, size, where
        self.digest = hashlib.sha256()
        self.got = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")[:self.size - self.got]
        if not len(view):
            return 0
        try:
            n = self.source.readinto(view) or 0
        except OSError as exc:
            raise BackendError(f"cannot read blob {self.key} from {self.where}: {exc}") from exc
        self.digest.update(view[:n])
        self.got += n
        return n

    def read(self, n: int | None = -1) -> bytes:
        """Up to ``n`` bytes (a chunk when ``n`` is None or negative), read and hashed once, without a copy."""
        n = min(READ_CHUNK if n is None or n < 0 else n, self.size - self.got)
        if n <= 0:
            return b""
        try:
            data = self.source.read(n) or b""
        except OSError as exc:
            raise BackendError(f"cannot read blob {self.key} from {self.where}: {exc}") from exc
        self.digest.update(data)
        self.got += len(data)
        return data

    def verify(self) -> None:
        """Read the rest, then IntegrityError unless the blob came whole, unchanged, and hashing to its key."""
        scratch = memoryview(bytearray(min(READ_CHUNK, max(self.size - self.got, 1))))
        while self.got < self.size and self.readinto(scratch):
            pass
        try:
            extra = self.source.read(1) if self.got == self.size else b""
        except OSError as exc:
            raise BackendError(f"cannot read blob {self.key} from {self.where}: {exc}") from exc
        if self.got != self.size or extra:
            raise IntegrityError(f"blob {self.key} is corrupted: {self.where} changed size while read "
                                 f"({self.got} of {self.size} bytes)")
        if self.digest.hexdigest() != self.key:
            raise IntegrityError(f"blob {self.key} is corrupted: {self.where} hashes to {self.digest.hexdigest()}")

    def close(self) -> None:
        try:
            self.source.close()
        finally:
            super().close()


def can_stream(store: BlobStore | None) -> bool:
    """Whether :func:`open_verifying` can stream blobs of ``store``: a local store (others read whole blobs), unless
    a subclass changed how it reads (its own ``get_buffer`` without an ``_open_stream`` of its own)."""
    if store is None or not callable(getattr(store, "_open_stream", None)):
        return False
    mro = type(store).__mro__
    streams_from = next(c for c in mro if "_open_stream" in c.__dict__)
    buffers_from = next(c for c in mro if "get_buffer" in c.__dict__)
    return issubclass(streams_from, buffers_from)


def open_verifying(store: BlobStore, key: str, size: int) -> VerifyingReader:
    """A :class:`VerifyingReader` of blob ``key`` of ``size`` bytes from a store that :func:`can_stream`
    (IntegrityError before any read if the blob holds another size)."""
    source, where = store._open_stream(key, size)
    return VerifyingReader(source, key, size, where)


def copy_hashed(source: BinaryIO, sink: BinaryIO | None = None) -> tuple[str, int]:
    """Read ``source`` to its end a chunk at a time, writing each chunk to ``sink`` if given; ``(key, size)``."""
    reader = HashingReader(source)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while n := reader.readinto(view):
        if sink is not None:
            sink.write(view[:n])
    return reader.hexdigest(), reader.size
