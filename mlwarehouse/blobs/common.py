"""What the blob backends share, written once: the fan-out layout, verification of whole blobs, and the hashing
reader that streamed puts use to learn a file's key while they copy it. (The range check is the protocol's own:
:func:`mlwarehouse.blobs.base.check_range`, applied by ``BlobStore.get_range`` for every backend.)"""

from __future__ import annotations

import hashlib
import io
from typing import BinaryIO

from mlwarehouse.blobs.base import blob_key, check_key
from mlwarehouse.errors import IntegrityError

__all__ = ["CHUNK", "STALE_TMP_S", "fanout", "fanout_key", "is_fanout_dir", "verified",
           "HashingReader", "copy_hashed"]

#: bytes per read when a file is streamed into a store
CHUNK = 8 << 20
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


def copy_hashed(source: BinaryIO, sink: BinaryIO | None = None) -> tuple[str, int]:
    """Read ``source`` to its end a chunk at a time, writing each chunk to ``sink`` if given; ``(key, size)``."""
    reader = HashingReader(source)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while n := reader.readinto(view):
        if sink is not None:
            sink.write(view[:n])
    return reader.hexdigest(), reader.size
