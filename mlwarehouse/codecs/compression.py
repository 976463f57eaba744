"""zstd compression of blob payloads: when it pays (:func:`compress`, probing large payloads first), and undoing it
without trusting the recorded size (:func:`decompress`, :func:`decompress_into`, :func:`max_decompressed`).

A payload of 4 KiB or more is compressed at level 1 when that saves at least 10%; the reference's meta then holds
``"z": "zstd"`` and ``"raw"`` (the size before compression). The codecs (:mod:`mlwarehouse.codecs.registry`)
call these; so do the streams of :mod:`mlwarehouse.codecs.streaming`.
"""

from __future__ import annotations

import threading

import zstandard

from mlwarehouse.errors import CodecError

__all__ = ["COMPRESS_MIN", "COMPRESS_LEVEL", "COMPRESS_MIN_SAVING", "compress", "worth_compressing",
           "max_decompressed", "decompress", "decompress_into", "frame_content_size", "zstd_pair"]

Buffer = bytes | bytearray | memoryview
COMPRESS_MIN = 4096
COMPRESS_LEVEL = 1  # measured: faster than 3 and as small or smaller on array data
COMPRESS_MIN_SAVING = 0.10
_SAMPLE = 1 << 18  # bytes per probe when deciding whether a large payload is worth compressing
_PROBE_FROM = 1 << 18  # payloads above this are probed before a full attempt

_tls = threading.local()


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    pair = getattr(_tls, "zstd", None)
    if pair is None:
        pair = _tls.zstd = (zstandard.ZstdCompressor(level=COMPRESS_LEVEL), zstandard.ZstdDecompressor())
    return pair


def compress(data: Buffer) -> tuple[Buffer, dict]:
    """zstd-compress ``data`` when it is at least 4 KiB and shrinks by 10% or more; returns (payload, meta)."""
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if size < COMPRESS_MIN:
        return data, {}
    cctx = _zstd()[0]
    view = memoryview(data).cast("B")
    if not worth_compressing(cctx, view):
        return data, {}
    packed = cctx.compress(view)
    if len(packed) > (1 - COMPRESS_MIN_SAVING) * size:
        return data, {}
    return packed, {"z": "zstd", "raw": size}


def worth_compressing(cctx: zstandard.ZstdCompressor, view: memoryview) -> bool:
    """Whether a full attempt at compressing ``view`` may pay: above 256 KiB, three slices are probed first, so
    incompressible gigabytes cost milliseconds."""
    size = len(view)
    if size <= _PROBE_FROM:
        return True
    sample = min(_SAMPLE, size // 16)
    probes = [view[i:i + sample] for i in (0, size // 2, size - sample)]
    return sum(len(cctx.compress(p)) for p in probes) <= (1 - COMPRESS_MIN_SAVING) * 3 * sample


#: zstd writes blocks of at most 128 KiB of output, each behind a 3-byte header: no frame expands more
_ZSTD_BLOCK_MAX, _ZSTD_BLOCK_HEADER = 128 << 10, 3


def max_decompressed(compressed: int) -> int:
    """The most bytes any zstd data of ``compressed`` bytes can decompress to (one full block per block header
    that fits): a claimed size above it is a lie, refused before anything is allocated."""
    return (compressed // _ZSTD_BLOCK_HEADER + 1) * _ZSTD_BLOCK_MAX


def decompress(data: Buffer, meta: dict) -> bytearray:
    """Undo :func:`compress` into a fresh (writable) buffer of the recorded raw size.

    Nothing is allocated before the claim is checked: it must not exceed what the bytes can hold
    (:func:`max_decompressed`) and must equal the frame's content size when the frame records one; a frame
    without one (another writer's) is streamed, its output capped at the claim."""
    if meta.get("z") != "zstd":
        raise CodecError(f"unknown compression {meta.get('z')!r}")
    raw = meta.get("raw")
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise CodecError(f"compressed blob meta lacks its raw size: {meta!r}")
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    try:
        framed = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"cannot decompress a zstd payload of {size} bytes: {exc}") from exc
    if framed >= 0 and framed != raw:  # checked before allocating what the metadata claims
        raise CodecError(f"compressed blob meta says {raw} bytes, its zstd frame says {framed}")
    if raw > max_decompressed(size):
        raise CodecError(f"compressed blob meta says {raw} bytes: more than {size} bytes of zstd can hold")
    if framed < 0:
        return _decompress_capped(data, raw)
    out = bytearray(raw)
    decompress_into(data, memoryview(out))
    return out


def _decompress_capped(data: Buffer, raw: int) -> bytearray:
    """Stream a frame of unknown content size, holding at most ``raw`` + 1 bytes of its output."""
    out = bytearray()
    try:
        reader = _zstd()[1].stream_reader(data, read_size=1 << 20)
        while len(out) <= raw:
            chunk = reader.read(min(1 << 20, raw + 1 - len(out)))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError as exc:
        raise CodecError(f"cannot decompress a zstd payload of {len(data)} bytes: {exc}") from exc
    if len(out) != raw:
        raise CodecError(f"zstd payload does not hold the recorded {raw} bytes")
    return out


def frame_content_size(data: Buffer) -> int:
    """The content size that the zstd frame at the start of ``data`` records (-1: it records none)."""
    try:
        return zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"not a zstd frame ({exc})") from None


def decompress_into(data: Buffer, dest: memoryview, *, frames: bool = False) -> None:
    """zstd-decompress ``data`` straight into ``dest``, which it must fill exactly (one copy, GIL released);
    ``frames``: ``data`` is several frames end to end, decompressed in one call (one return to Python for all of
    them: on a busy interpreter each return waits for the GIL)."""
    try:
        reader = _zstd()[1].stream_reader(data, read_size=1 << 20, read_across_frames=frames)
        filled = 0
        while filled < len(dest):
            n = reader.readinto(dest[filled:])
            if n == 0:
                break
            filled += n
        extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise CodecError(f"cannot decompress a zstd payload of {len(data)} bytes: {exc}") from exc
    if filled != len(dest) or extra:
        raise CodecError(f"zstd payload does not hold the recorded {len(dest)} bytes")


zstd_pair = _zstd  # this thread's (compressor, decompressor)
