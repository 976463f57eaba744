"""Large arrays and tensors compressed and decompressed as streams, so neither side holds a second full copy.

Saving (:func:`mlwarehouse.codecs.registry.encode_npy_compressed`, where the ``npy`` codec is chosen): an ``.npy`` payload is its header followed by the array's memory; when the
array is large and a probe says zstd pays, the header and then the array's own memory, a chunk at a time, go
through one streaming compressor (the frame records the content size), so what is held beyond the array is the
compressed output alone, never an ``.npy`` copy of the array.

Loading (:func:`decode_compressed`): a compressed ``npy`` or ``tensor`` blob is read through a
:class:`~mlwarehouse.blobs.common.VerifyingReader` (which hashes every byte as it passes) into a streaming
decompressor that writes straight into the memory of the array or tensor returned; nothing is returned before the
whole blob has been checked against its key. The allocation guard is the one of
:func:`~mlwarehouse.codecs.registry.decompress`: the raw size claimed must fit what the compressed bytes can hold
and equal the frame's content size; a frame without one (another writer's) is not streamed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zstandard

from mlwarehouse.blobs.common import READ_CHUNK, VerifyingReader, fresh_buffer
from mlwarehouse.codecs import registry
from mlwarehouse.errors import CodecError

__all__ = ["STREAM_FROM", "decode_compressed", "streams"]

#: payloads (raw on save, compressed on load) from this size on are streamed; smaller ones are not worth it
STREAM_FROM = registry.STREAM_FROM
_STREAMED_CODECS = ("npy", "tensor")
#: a frame header is at most 18 bytes: read ahead of the frame to check its content size
_FRAME_HEADER_MAX = 18


# -- loading ---------------------------------------------------------------------------------------------------

def streams(meta: dict, size: int | None) -> bool:
    """Whether a blob reference's payload is decoded with :func:`decode_compressed` (a large compressed array)."""
    return (meta.get("z") == "zstd" and meta.get("codec") in _STREAMED_CODECS and type(size) is int
            and size >= STREAM_FROM and not meta.get("scalar"))


def decode_compressed(reader: VerifyingReader, meta: dict, *, writable: bool = False) -> Any:
    """The array or tensor of a compressed ``npy``/``tensor`` blob streamed by ``reader``, decompressed into its
    own memory and returned once the blob is verified; None, having read only the frame's header, when the frame
    does not record its content size (the caller reads the blob whole). A payload that does not decode is an
    IntegrityError when the blob does not match its key either (the bytes were damaged), else a CodecError."""
    try:
        value = _decode(reader, meta, writable)
        if value is None:
            return None
    except (CodecError, zstandard.ZstdError) as exc:
        reader.verify()  # damaged bytes are the real cause: said as such
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"cannot decompress a zstd payload of {reader.size} bytes: {exc}") from exc
    reader.verify()
    return value


def _decode(reader: VerifyingReader, meta: dict, writable: bool) -> Any:
    raw = meta.get("raw")
    if type(raw) is not int or raw < 0:
        raise CodecError(f"compressed blob meta lacks its raw size: {meta!r}")
    if raw > registry.max_decompressed(reader.size):
        raise CodecError(f"compressed blob meta says {raw} bytes: more than {reader.size} bytes of zstd can hold")
    head = _read_exactly(reader, min(_FRAME_HEADER_MAX, reader.size))
    framed = zstandard.frame_content_size(bytes(head))
    if framed < 0:
        return None  # another writer's frame: decompressed the capped way, from the whole blob
    if framed != raw:  # checked before allocating what the metadata claims
        raise CodecError(f"compressed blob meta says {raw} bytes, its zstd frame says {framed}")
    z = registry._zstd()[1].stream_reader(_Prefixed(head, reader), read_size=READ_CHUNK)
    if meta.get("codec") == "tensor":
        dest = fresh_buffer(raw)
        _fill(z, dest)
        return registry._tensor_decode(dest, meta)
    start = bytes(_read_exactly(z, min(12, raw)))
    if len(start) < 10 or start[:6] != np.lib.format.MAGIC_PREFIX:
        raise CodecError("not an .npy payload (bad magic)")
    hlen = registry.npy_header_length(start)
    if hlen > raw:
        raise CodecError(f".npy header of {hlen} bytes in a payload of {raw}")
    head_bytes = start[:hlen] + bytes(_read_exactly(z, max(hlen - len(start), 0)))
    shape, fortran, dtype = registry.npy_layout(head_bytes)
    count = math.prod(shape)
    if raw - hlen != count * dtype.itemsize:
        raise CodecError(f".npy payload holds {raw - hlen} data bytes, expected {count * dtype.itemsize} "
                         f"for shape {shape} and dtype {dtype}")
    body = fresh_buffer(raw - hlen)
    body_start = len(start) - hlen  # bytes of data already read with the header (an empty header tail)
    if body_start > 0:
        body[:body_start] = start[hlen:]
    _fill(z, body[max(body_start, 0):])
    arr = np.frombuffer(body, dtype=dtype, count=count) if count else np.empty(0, dtype)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    return registry._finish_array(arr, {"_writable": writable})


def _read_exactly(source: Any, n: int) -> bytearray:
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        k = source.readinto(view[got:])
        if not k:
            break
        got += k
    del view
    return out[:got] if got < n else out


def _fill(z: Any, dest: memoryview) -> None:
    """Decompress exactly ``len(dest)`` bytes into ``dest``; CodecError if the frame holds more or less."""
    filled = 0
    while filled < len(dest):
        n = z.readinto(dest[filled:])
        if not n:
            break
        filled += n
    if filled != len(dest) or z.read(1):
        raise CodecError(f"zstd payload does not hold the recorded {len(dest)} bytes")


class _Prefixed:
    """``head`` (already read from ``rest``), then the rest of ``rest``: what the decompressor reads."""

    def __init__(self, head: bytes | bytearray, rest: VerifyingReader):
        self.head, self.rest = memoryview(bytes(head)), rest

    def read(self, n: int = -1) -> bytes:
        if not len(self.head):
            return self.rest.read(n if n >= 0 else READ_CHUNK)
        n = len(self.head) if n < 0 else n
        out, self.head = bytes(self.head[:n]), self.head[n:]
        return out
