"""A whole shard in memory, verified by the blob store: its columns decoded once, on demand or eagerly.

Fixed-shape array columns decode to one ``(n, *shape)`` numpy view. A column's blocks decompress in parallel, in
parts queued on the prefetch threads at the rank of the shard's request
(:func:`mlwarehouse.datasets.prefetch.run_ranked`; the calling thread helps), each run of compressed blocks in one
call (zstd releases the GIL; each frame's recorded size is checked first), straight into its place in the column, a
buffer recycled from shards nobody holds any more (:mod:`mlwarehouse.datasets.recycled`). A column of blocks
stored as they are is a view of the shard's bytes: of the page cache, when a trusted local folder mapped the file
(:meth:`Shard.in_memory` copies such columns out once the shard is served again). The format itself (building,
headers, range reads) is :mod:`mlwarehouse.datasets.shards`.
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mlwarehouse.codecs import decompress_into
from mlwarehouse.codecs.compression import frame_content_size
from mlwarehouse.datasets.prefetch import run_ranked
from mlwarehouse.datasets.recycled import RECYCLED
from mlwarehouse.datasets.shards import (
    _PREFIX,
    BLOCK,
    _block_raw_len,
    _corrupt,
    _FieldLayout,
    _parse_header,
    decode_value,
)
from mlwarehouse.errors import CodecError

__all__ = ["Shard", "DECODE_THREADS"]


class Shard:
    """A whole shard in memory (already verified by the blob store, whose hash covers the header checksums: only
    the layout is checked); columns decoded once, on demand or eagerly.

    Decoded arrays are read-only: a shard may be shared (see :class:`mlwarehouse.datasets.stream.ShardReader`'s memory
    cache), so nobody may change its values in place.
    """

    def __init__(self, data: bytes | memoryview, *, owned: bool = False):
        self.data = memoryview(data)
        self._owned = owned  # columns stored as they are are copied out of ``data``, not views of it
        self.header = _parse_header(bytes(self.data[:_PREFIX.size]), self._read, checksums=False)
        self._columns: dict[str, Any] = {}
        self._decoded_bytes = 0  # bytes decompressed into buffers of their own (beyond ``data``)
        self._lock = threading.Lock()  # a shard may be shared by threads: each column is decoded once

    def _read(self, start: int, length: int) -> memoryview:
        if start + length > len(self.data):
            raise _corrupt("truncated")
        return self.data[start:start + length]

    @property
    def n(self) -> int:
        return self.header.n

    @property
    def nbytes(self) -> int:
        """Memory this shard holds: its stored bytes plus the columns it decompressed."""
        return len(self.data) + self._decoded_bytes

    def raw(self, field: str) -> memoryview:
        """The field's raw column bytes: a view of the shard when stored as is, else decompressed (on each call:
        :meth:`column` keeps what it decodes), its blocks in parallel when there are several."""
        layout = self.header.fields[field]
        k = len(layout.flags)
        body = self._read(layout.payload, int(layout.block_offsets[k]))
        if not layout.flags.any():
            if not self._owned or len(body) != layout.raw:  # a wrong length is refused by the caller
                return body
            view = memoryview(RECYCLED.take(layout.raw))
            view[:] = body
            return view
        view = memoryview(RECYCLED.take(layout.raw))  # not zero-filled: every block is written over
        offsets = layout.block_offsets.tolist()
        flags = layout.flags.tolist()

        def blocks(first: int) -> None:
            """Blocks ``first`` to ``first + step``: each run of compressed ones decompressed in one call."""
            b, end = first, min(first + step, k)
            while b < end:
                c = b + 1
                while c < end and flags[c] == flags[b]:
                    c += 1
                lo, hi = offsets[b], offsets[c]
                dest = view[b * BLOCK:min(c * BLOCK, layout.raw)]
                if flags[b]:
                    _check_frames(body, offsets, b, c, layout, field)
                    _decompress_into(body[lo:hi], dest)
                elif hi - lo != len(dest):
                    raise _corrupt(f"stored blocks of field {field!r} hold {hi - lo} bytes, not {len(dest)}")
                else:
                    dest[:] = body[lo:hi]
                b = c

        if k < 4:
            step = k
            blocks(0)
        else:  # every job ends before the first error is raised: none writes into a column given up
            step = -(-k // (2 * DECODE_THREADS))
            starts = range(0, k, step)
            for error in run_ranked([(functools.partial(_run_caught, blocks), first) for first in starts],
                                    DECODE_THREADS):
                if error is not None:
                    raise error
        return view

    @property
    def mapped(self) -> bool:
        """Whether some decoded column is a view of a mapped file (a shard of a local folder whose blocks are
        stored as they are)."""
        return not self._owned and isinstance(self.data.obj, mmap.mmap) and any(
            not self.header.fields[name].flags.any() for name in self._columns)

    def in_memory(self) -> "Shard":
        """This shard with the columns it decoded in memory of their own, for a shard served again from the memory
        cache: a mapped shard's columns stored as they are are copied into recycled buffers, one per column (the
        others, decompressed, are kept). A random gather from the page cache crosses a page-table entry per
        4 KiB page: warm MNIST-like epochs ran at 0.70x a raw gather from views of the mapping, 0.71x from one
        copy of the whole shard, 1.03x from a buffer per column (2 cores)."""
        if not self.mapped:
            return self
        copy = Shard(self.data, owned=True)
        for name, column in self._columns.items():
            layout = self.header.fields[name]
            if layout.flags.any():  # decompressed: refers to nothing of the mapping
                copy._columns[name] = column
                copy._decoded_bytes += _held(layout, False)
            else:
                copy.column(name)
        return copy

    def decode(self, fields: Sequence[str] | None = None) -> "Shard":
        """Decode ``fields`` (all when None) now: run in a prefetch thread, so the consumer finds them ready."""
        for name in fields if fields is not None else list(self.header.fields):
            self.column(name)
        return self

    def decoded(self, fields: Sequence[str] | None = None) -> bool:
        """True when ``fields`` (all when None) are decoded already."""
        return all(name in self._columns for name in (fields if fields is not None else self.header.fields))

    def column(self, field: str) -> Any:
        """``(n, *shape)`` read-only array for a fixed-shape array field, else a list of per-item values."""
        column = self._columns.get(field)
        if column is not None:
            return column
        with self._lock:
            if field not in self._columns:
                self._columns[field] = self._decode_column(field)
        return self._columns[field]

    def _decode_column(self, field: str) -> Any:
        if field not in self.header.fields:
            raise CodecError(f"this shard has no field {field!r} (it has {sorted(self.header.fields)})")
        layout = self.header.fields[field]
        raw = self.raw(field)
        spec = layout.spec
        if len(raw) != layout.raw:
            raise _corrupt(f"field {field!r} holds {len(raw)} bytes, its header says {layout.raw}")
        if spec.kind == "array" and spec.shape is not None:
            column = np.frombuffer(raw, np.dtype(spec.dtype)).reshape(self.n, *spec.shape)
            column.flags.writeable = False
        else:
            offs = layout.offsets
            column = []
            for i in range(self.n):
                shape = layout.shapes[i] if layout.shapes else None
                value = decode_value(spec, raw[offs[i]:offs[i + 1]], shape)
                if isinstance(value, np.ndarray):
                    value.flags.writeable = False
                column.append(value)
        self._decoded_bytes += _held(layout, self._owned)
        return column


def _held(layout: _FieldLayout, owned: bool) -> int:
    """Bytes a decoded column holds beyond the shard's own: its decompressed (or, ``owned``, copied) buffer, and
    the copies that bytes and JSON values are."""
    held = layout.raw if owned or layout.flags.any() else 0  # in a buffer of its own
    if layout.spec.kind in ("bytes", "json"):
        held += int(layout.offsets[-1]) * (2 if layout.spec.kind == "json" else 1)
    return held


def _run_caught(fn: Callable[[int], None], arg: int) -> BaseException | None:
    try:
        fn(arg)
    except Exception as exc:  # handed back: raised by the caller once every block is done
        return exc
    return None


#: threads that decompress a column's blocks (one per core, at most 8); a column is cut into twice as many parts
DECODE_THREADS = max(2, min(8, os.cpu_count() or 2))


def _check_frames(body: memoryview, offsets: list[int], b: int, c: int, layout: _FieldLayout, field: str) -> None:
    """Blocks ``b`` to ``c`` (compressed) are zstd frames that each record their block's raw size (zstd then
    checks what it decodes against it): a run decompressed in one call is cut where its blocks are."""
    for i in range(b, c):
        try:
            size = frame_content_size(body[offsets[i]:offsets[i + 1]])
        except CodecError as exc:
            raise _corrupt(f"block {i} of field {field!r} does not decompress ({exc})") from None
        if size < 0:
            raise _corrupt(f"block {i} of field {field!r} does not decompress (its zstd frame records no size)")
        if size != _block_raw_len(layout, i):
            raise _corrupt(f"block {i} of field {field!r} records {size} raw bytes, not {_block_raw_len(layout, i)}")


def _decompress_into(data: memoryview, dest: memoryview) -> None:
    """A run of compressed blocks (one zstd frame each) decompressed into its place in the column; a run that
    does not decompress to exactly its recorded size is a corrupted shard."""
    try:
        decompress_into(data, dest, frames=True)
    except CodecError as exc:
        raise _corrupt(f"a block does not decompress ({exc})") from None
