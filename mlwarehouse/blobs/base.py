"""The blob protocol: immutable, content-addressed bytes, verified on every read.

A blob's key is the lowercase hex sha256 of its stored bytes. ``put`` is idempotent and durable when it
returns (invariant 1: blobs first, index second); putting bytes that already exist refreshes their modification
time, so garbage collection's grace period protects a blob that a writer is about to reference again.
``get`` checks the hash and raises IntegrityError rather than return bad bytes. Backends: a local directory
(:mod:`.files`), S3-compatible stores (:mod:`.s3`), GridFS (:mod:`.gridfs`); :mod:`.cache` puts a bounded
local read cache in front of any of them, and :mod:`.common` holds the helpers they share.

The public surface is deliberate: ``put``, ``put_file``, ``get``, ``get_range``, ``exists``, ``stat``,
``delete``, ``list``, ``close``, plus the attributes ``name`` and ``mtime_resolution``. Backends implement the
abstract methods and may override the private hooks ``_put_stream`` and ``_read_range``.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["BlobStore", "BlobInfo", "blob_key", "check_key", "check_range"]


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch, the last put or touch


def blob_key(data: bytes | memoryview) -> str:
    """The content address of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_key(key: str) -> str:
    """Validate a key (64 lowercase hex digits) so that it can never name a path outside the store."""
    from mlwarehouse.errors import NotFound
    if not isinstance(key, str) or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise NotFound(f"not a blob key: {key!r}")
    return key


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
