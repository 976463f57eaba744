"""The shard format: many items' fields packed into one immutable blob of a few MB, readable whole or by range.

A shard is ``MAGIC | u32 header length | u32 header crc32 | u32 tables crc32 | header JSON | tables | payloads``
(the first four make the fixed prefix). Each field is one column: the raw bytes of every item's value, end to
end, cut into blocks of ``BLOCK`` raw bytes; each block is stored zstd compressed when that saves 10%
(:func:`mlwarehouse.codecs.compress`), or as is (JPEG, PNG and other already compressed bytes are never tried).
Per field, the tables hold the items' raw offsets (int64, n + 1), their crc32 checksums (uint32, n) and the
blocks' stored offsets (int64, k + 1) and flags (uint8, k).

A whole shard comes from the blob store verified by its sha256; a range read (one item of a remote shard) checks
the header's crc32 (which covers its length too) and the tables' crc32 before using them, then the item's crc32
(blocks need none of their own: the item's covers every byte it is cut from). Whatever does not check out, and any
header that does not parse or describes an impossible layout (a crafted shard with valid checksums), is an
:class:`IntegrityError`. Shards of format 1 (``MLWSHRD1``: the same without the two checksums) still read whole;
their range reads are not trusted (``ShardHeader.verified`` is False) and readers fetch them whole instead.
A whole shard read into memory is decoded by :class:`mlwarehouse.datasets.wholeshard.Shard`.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlwarehouse.codecs import compress, decompress
from mlwarehouse.codecs.registry import max_decompressed
from mlwarehouse.errors import CodecError, IntegrityError

__all__ = ["MAGIC", "BLOCK", "FieldSpec", "build_shard", "ShardHeader", "read_header", "read_item",
           "decode_value", "is_precompressed"]

MAGIC = b"MLWSHRD2"     # format 2: header and tables checksummed
MAGIC_V1 = b"MLWSHRD1"  # format 1: no checksums (read, never written)
BLOCK = 256 << 10
_PREFIX = struct.Struct("<8sIII")  # magic, header length, crc32 of (length, header), crc32 of tables
_PREFIX_V1 = struct.Struct("<8sI")
_KINDS = ("array", "bytes", "json")
#: what parsing or laying out a damaged header can raise: all of it means a corrupted shard
_PARSE_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, MemoryError,
                 RecursionError, SyntaxError)
#: the dtypes a shard records: ``numpy.dtype.str`` of plain arrays (numpy parses other strings with ast)
_DTYPE = re.compile(r"[<>|=][a-zA-Z][0-9]{1,10}(\[[0-9a-zA-Z]{1,8}\])?")
#: leading bytes of formats that are already compressed: stored as they are
_COMPRESSED_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"\x28\xb5\x2f\xfd", b"\x1f\x8b", b"PK\x03\x04",
                     b"BZh", b"\xfd7zXZ", b"\x00\x00\x00\x0cjP")


def is_precompressed(data: bytes | memoryview) -> bool:
    """True for JPEG, PNG, GIF, WebP, zstd, gzip, zip, bzip2, xz and JPEG 2000 payloads."""
    head = bytes(data[:12])
    return any(head.startswith(m) for m in _COMPRESSED_MAGIC)


@dataclass(frozen=True)
class FieldSpec:
    """One field of a shard: ``kind`` "array" (dtype, shape per item or None when it varies), "bytes" or "json"
    (scalar fields that are not numbers: strings, lists of tags, None)."""

    kind: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def from_json(cls, doc: dict) -> "FieldSpec":
        shape = doc.get("shape")
        return cls(doc["kind"], doc.get("dtype"), None if shape is None else tuple(shape))


def build_shard(columns: dict[str, Sequence[Any]], specs: dict[str, FieldSpec], *, tag: str | None = None,
                compress_blocks: bool = True) -> bytes:
    """Pack ``columns`` (field -> one value per item: a numpy array or bytes) into shard bytes; ``tag`` (kept in
    the header) makes the bytes, and so the content address, of this shard its own. ``compress_blocks=False``
    stores every block as it is (a dataset in a local folder: see :mod:`mlwarehouse.datasets.items`)."""
    n = len(next(iter(columns.values()))) if columns else 0
    header: dict[str, Any] = {"n": n, "fields": {}}
    if tag is not None:
        header["tag"] = tag
    tables: list[bytes] = []
    tables_crc = 0
    payloads: list[bytes | memoryview] = []
    table_at = payload_at = 0
    for name, values in columns.items():
        spec = specs[name]
        if isinstance(values, np.ndarray):  # a fixed-shape column: one buffer, sliced
            raw = _byte_view(values)
            step = values.itemsize * (int(np.prod(values.shape[1:])) if values.ndim > 1 else 1)
            offsets = np.arange(n + 1, dtype=np.int64) * step
            parts = [raw[i * step:(i + 1) * step] for i in range(n)]
        else:
            parts = [_raw(v) for v in values]
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(np.fromiter((len(p) for p in parts), np.int64, n), out=offsets[1:])
            raw = b"".join(parts)
        crcs = np.fromiter((zlib.crc32(p) for p in parts), np.uint32, n)
        try_compress = compress_blocks and not (spec.kind == "bytes" and n and is_precompressed(parts[0]))
        stored_offsets, flags, stored = [0], [], []
        for start in range(0, len(raw), BLOCK):
            block = memoryview(raw)[start:start + BLOCK]
            data, meta = compress(block) if try_compress else (block, {})
            stored.append(data)
            flags.append(1 if meta else 0)
            stored_offsets.append(stored_offsets[-1] + len(data))
        field: dict[str, Any] = {**spec.to_json(), "raw": len(raw), "blocks": len(flags)}
        if spec.kind == "array" and spec.shape is None:
            field["shapes"] = [list(np.shape(v)) for v in values]
        parts_t = [offsets.tobytes(), crcs.tobytes(), np.asarray(stored_offsets, np.int64).tobytes(),
                   np.asarray(flags, np.uint8).tobytes()]
        field["table"] = table_at
        table_at += sum(len(t) for t in parts_t)
        tables.extend(parts_t)
        for t in parts_t:
            tables_crc = zlib.crc32(t, tables_crc)
        field["payload"] = payload_at
        payload_at += stored_offsets[-1]
        payloads.extend(stored)
        header["fields"][name] = field
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(MAGIC, len(head), _head_crc(len(head), head), tables_crc)
    return b"".join([prefix, head, *tables, *payloads])


def _head_crc(length: int, head: bytes) -> int:
    """crc32 of the header's length and bytes: a flipped length fails it as surely as a flipped byte."""
    return zlib.crc32(head, zlib.crc32(length.to_bytes(4, "little")))


def _byte_view(array: np.ndarray) -> memoryview:
    """The array's bytes, flat (also for arrays with a zero in their shape, which memoryview cannot cast)."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _raw(value: Any) -> bytes | memoryview:
    if isinstance(value, np.ndarray):
        return _byte_view(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass
class _FieldLayout:
    spec: FieldSpec
    offsets: np.ndarray      # raw offsets of items, n + 1
    crcs: np.ndarray         # crc32 of items' raw bytes
    block_offsets: np.ndarray  # stored offsets of blocks (relative to payload start), k + 1
    flags: np.ndarray        # 1 where a block is zstd compressed
    raw: int
    payload: int             # absolute offset of the field's first block in the shard
    shapes: list | None


@dataclass
class ShardHeader:
    """The parsed header and tables of a shard: enough to locate and verify any item's bytes."""

    n: int
    fields: dict[str, _FieldLayout]
    size: int  # bytes of prefix + header + tables
    version: int = 2

    @property
    def verified(self) -> bool:
        """True when the header and tables were checked against their checksums (format 2): range reads of its
        items can be trusted. A format-1 header is only as good as the bytes it was read from."""
        return self.version >= 2


def _corrupt(what: str) -> IntegrityError:
    return IntegrityError(f"shard is corrupted or not a shard: {what}")


def _parse_header(prefix: bytes, read: Callable[[int, int], bytes], checksums: bool = True) -> ShardHeader:
    """The header and tables, checked against their checksums unless ``checksums`` is False (a whole shard that
    its sha256 verified: it covers every byte), then checked to describe a possible layout."""
    magic = bytes(prefix[:8])
    if magic == MAGIC and len(prefix) >= _PREFIX.size:
        version, (_, head_len, head_crc, tables_crc) = 2, _PREFIX.unpack_from(prefix)
    elif magic == MAGIC_V1 and len(prefix) >= _PREFIX_V1.size:
        version, (_, head_len), head_crc, tables_crc = 1, _PREFIX_V1.unpack_from(prefix), None, None
    else:
        raise _corrupt("too short" if len(prefix) < _PREFIX_V1.size else f"bad magic {magic!r}")
    head_at = _PREFIX.size if version == 2 else _PREFIX_V1.size
    head = bytes(read(head_at, head_len))
    if len(head) != head_len:
        raise _corrupt("truncated header")
    if checksums and head_crc is not None and _head_crc(head_len, head) != head_crc:
        raise _corrupt("the header fails its checksum")
    try:
        doc = json.loads(head)
        n, fields_doc = doc["n"], doc["fields"]
        if not (_count(n) and isinstance(fields_doc, dict) and all(isinstance(f, dict) for f in fields_doc.values())):
            raise ValueError("no item count or field table")
        table_len = sum(_table_len(n, f["blocks"]) for f in fields_doc.values())
    except _PARSE_ERRORS as exc:
        raise _corrupt(f"unreadable header ({type(exc).__name__}: {exc})") from None
    tables_at = head_at + head_len
    tables = bytes(read(tables_at, table_len))
    if len(tables) != table_len:
        raise _corrupt("truncated tables")
    if checksums and tables_crc is not None and zlib.crc32(tables) != tables_crc:
        raise _corrupt("the tables fail their checksum")
    payload_at = tables_at + table_len
    try:
        fields = {name: _field_layout(name, f, tables, n, payload_at) for name, f in fields_doc.items()}
    except _PARSE_ERRORS as exc:
        raise _corrupt(f"impossible layout ({type(exc).__name__}: {exc})") from None
    return ShardHeader(n, fields, payload_at, version)


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _table_len(n: int, blocks: Any) -> int:
    if not _count(blocks):
        raise ValueError(f"block count {blocks!r}")
    return (n + 1) * 8 + n * 4 + (blocks + 1) * 8 + blocks


def _field_layout(name: str, f: dict, tables: bytes, n: int, payload_at: int) -> _FieldLayout:
    """One field's layout, checked to be possible (so reads never index out of it): raises a parsing error."""
    spec = FieldSpec.from_json(f)
    at, k, raw, payload, shapes = f["table"], f["blocks"], f["raw"], f["payload"], f.get("shapes")
    if not isinstance(name, str) or spec.kind not in _KINDS or not (_count(at) and _count(raw) and _count(payload)):
        raise ValueError(f"field {name!r}: bad kind, table, raw or payload")
    if at + _table_len(n, k) > len(tables) or k != -(-raw // BLOCK):
        raise ValueError(f"field {name!r}: table out of range or {k} blocks for {raw} bytes")
    offsets = np.frombuffer(tables, np.int64, n + 1, at)
    crcs = np.frombuffer(tables, np.uint32, n, at + (n + 1) * 8)
    at += (n + 1) * 8 + n * 4
    block_offsets = np.frombuffer(tables, np.int64, k + 1, at)
    flags = np.frombuffer(tables, np.uint8, k, at + (k + 1) * 8)
    if offsets[0] != 0 or offsets[n] != raw or (offsets[1:] < offsets[:-1]).any():
        raise ValueError(f"field {name!r}: item offsets out of order")
    stored = block_offsets[1:] - block_offsets[:-1]
    sizes = np.minimum(BLOCK, raw - np.arange(k, dtype=np.int64) * BLOCK)
    plain = flags == 0
    if (block_offsets[0] != 0 or (stored < 0).any() or (flags > 1).any() or (stored[plain] != sizes[plain]).any()
            or (sizes[~plain] > max_decompressed(stored[~plain])).any()):
        raise ValueError(f"field {name!r}: block offsets, sizes or flags that cannot be")
    if spec.kind == "array":
        dtype = np.dtype(spec.dtype) if isinstance(spec.dtype, str) and _DTYPE.fullmatch(spec.dtype) else None
        if dtype is None or dtype.hasobject or not dtype.itemsize:
            raise ValueError(f"field {name!r}: dtype {spec.dtype!r}")
        if spec.shape is None:
            if not isinstance(shapes, list) or len(shapes) != n:
                raise ValueError(f"field {name!r}: shapes of {n} items")
        elif not all(_count(d) for d in spec.shape) or raw != n * dtype.itemsize * math.prod(spec.shape):
            raise ValueError(f"field {name!r}: shape {spec.shape} does not hold {raw} bytes")
    return _FieldLayout(spec, offsets, crcs, block_offsets, flags, raw, payload_at + payload, shapes)


def read_header(get_range: Callable[[int, int], bytes], guess: int = 64 << 10) -> ShardHeader:
    """Parse a shard's header with range reads (one, usually): for random access to remote shards."""
    first = get_range(0, guess)

    def read(start: int, length: int) -> bytes:
        if start + length <= len(first):
            return first[start:start + length]
        return get_range(start, length)
    return _parse_header(first, read)


def _decode_block(data: bytes | memoryview, compressed: bool, raw_len: int) -> bytes | bytearray | memoryview:
    if not compressed:
        return data
    try:
        return decompress(data, {"z": "zstd", "raw": raw_len})
    except CodecError as exc:
        raise _corrupt(f"a block does not decompress ({exc})") from None


def _block_raw_len(layout: _FieldLayout, b: int) -> int:
    return min(BLOCK, layout.raw - b * BLOCK)


def read_item(header: ShardHeader, get_range: Callable[[int, int], bytes], field: str, row: int) -> memoryview:
    """One item's raw bytes of ``field``, read by range and verified against its crc32."""
    layout = header.fields[field]
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < header.n:
        raise IntegrityError(f"row {row!r} is not in this shard of {header.n} items: the item's document and its "
                             f"shard disagree")
    start, end = int(layout.offsets[row]), int(layout.offsets[row + 1])
    if start == end:
        return memoryview(b"")
    first, last = start // BLOCK, (end - 1) // BLOCK
    at = layout.payload + int(layout.block_offsets[first])
    length = int(layout.block_offsets[last + 1] - layout.block_offsets[first])
    data = get_range(at, length)
    if len(data) != length:
        raise _corrupt(f"truncated: item {row} of field {field!r} lies past the end")
    pieces = []
    for b in range(first, last + 1):
        lo = int(layout.block_offsets[b] - layout.block_offsets[first])
        hi = int(layout.block_offsets[b + 1] - layout.block_offsets[first])
        pieces.append(_decode_block(memoryview(data)[lo:hi], bool(layout.flags[b]), _block_raw_len(layout, b)))
    raw = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    item = memoryview(raw)[start - first * BLOCK:end - first * BLOCK]
    if zlib.crc32(item) != int(layout.crcs[row]):
        raise IntegrityError(f"item {row} of field {field!r} fails its checksum: the shard is corrupted")
    return item


def decode_value(spec: FieldSpec, raw: memoryview, shape: Sequence[int] | None = None) -> Any:
    """Turn one item's raw bytes back into its value (a read-only array view, or bytes); bytes that do not decode
    as the header says (a crafted shard) are an IntegrityError."""
    if spec.kind == "bytes":
        return bytes(raw)
    try:
        if spec.kind == "json":
            return json.loads(bytes(raw))
        shape = tuple(shape if shape is not None else spec.shape)
        if not all(_count(d) for d in shape):
            raise ValueError(f"shape {shape}")
        return np.frombuffer(raw, np.dtype(spec.dtype)).reshape(shape)
    except _PARSE_ERRORS as exc:
        raise _corrupt(f"an item does not decode as its field says ({type(exc).__name__}: {exc})") from None
