"""Unpacking: a stored tree, which may have been crafted, rebuilt into its value, its blobs read ahead on the blob
pool and verified, large compressed arrays decoded as they stream in. The entry point is
:func:`mlwarehouse.codecs.values.unpack`."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from mlwarehouse.blobs.base import BlobStore, pool, workers
from mlwarehouse.blobs.common import can_stream, open_verifying, read_buffer
from mlwarehouse.codecs import decode_leaf
from mlwarehouse.codecs.streaming import decode_compressed, streams
from mlwarehouse.codecs.treeformat import (
    CONTAINERS,
    MAX_DEPTH,
    REFERENCE_FIELDS,
    SPECIAL_FLOATS,
    STORED_KEYS,
    ZSTD_MAX_RATIO,
    Decoder,
    short,
    too_deep,
)
from mlwarehouse.errors import CodecError, IntegrityError

__all__ = ["Unpacker", "buffer_store", "MAX_JSON_BYTES"]

#: a bound on the JSON that one unpack decodes from blobs (JSON blobs that repeat each other cannot multiply)
MAX_JSON_BYTES = 1 << 30


class Unpacker:
    """Rebuilds a value from a stored tree, which may have been crafted: every malformed marker, blob reference or
    nesting past :data:`MAX_DEPTH` is a CodecError (IntegrityError for bytes that disagree with their reference),
    never a raw Python error, and no claimed size is allocated before it is checked against the bytes."""

    def __init__(self, get: Callable[[str], bytes], allow_pickle: bool, writable: bool, decode: Decoder | None = None):
        self.get = get
        # a store's own get: read through get_buffer (owned buffers), in parallel; a decode hook gets get's bytes
        self.store = buffer_store(get) if decode is None else None
        self.ahead: dict[str, Future] = {}   # key -> its read in flight
        #: key -> (the reference's meta, its streamed decode in flight): large compressed arrays
        self.decoding: dict[str, tuple[dict, Future]] = {}
        self.streaming = can_stream(self.store)
        self.queue: list[tuple[str, int | None, dict]] = []  # blobs to read ahead, in the order unpack meets them
        self.allow_pickle = allow_pickle
        self.writable = writable
        self.decode = decode
        self.fetched: dict[str, Any] = {}  # uncompressed blobs read so far (their arrays are views of them anyway)
        self.opening: set[str] = set()  # JSON blobs being unpacked now: one that refers to itself is refused
        self.json_bytes = 0             # decoded JSON blob bytes so far, bounded by MAX_JSON_BYTES

    # -- reading blobs ahead ----------------------------------------------------------------------------------

    def prefetch(self, tree: Any) -> None:
        """Queue the tree's blob references (JSON blobs aside: they are opened where met) for reading ahead."""
        refs, seen, stack = [], set(), [tree]
        while stack:
            node = stack.pop()
            if type(node) is dict:
                if "_blob" in node:
                    key, size = node["_blob"], node.get("size")
                    if type(key) is str and node.get("codec") != "json" and key not in seen:
                        seen.add(key)
                        refs.append((key, size if type(size) is int and size >= 0 else None, node))
                    continue
                stack.extend(reversed(list(node.values())))
            elif type(node) is list:
                stack.extend(reversed(node))
        if len(refs) > 1:
            self.queue = refs[::-1]
            self._top_up()

    def _top_up(self) -> None:
        while self.queue and len(self.ahead) + len(self.decoding) < 2 * workers():
            key, size, ref = self.queue.pop()
            if key in self.ahead or key in self.decoding or key in self.fetched:
                continue
            if self._streams(ref, size):
                meta = {k: v for k, v in ref.items() if k not in REFERENCE_FIELDS}
                self.decoding[key] = (meta, pool().submit(self._decode_streamed, key, size, meta))
            else:
                self.ahead[key] = pool().submit(read_buffer, self.store, key, size, xxh3=ref.get("xxh3"))

    def _streams(self, meta: dict, size: Any) -> bool:
        """Whether this blob is decoded as it is read (a large compressed array: no copy of the blob is held)."""
        return self.streaming and streams(meta, size)

    def _decode_streamed(self, key: str, size: int, meta: dict) -> Any:
        with open_verifying(self.store, key, size) as reader:
            value = decode_compressed(reader, meta, writable=self.writable)
        return self._decode(self.store.get_buffer(key, size), meta) if value is None else value

    def _streamed(self, key: str, size: int, meta: dict) -> Any:
        entry = self.decoding.get(key)
        if entry is None or entry[0] != meta:  # not read ahead, or read ahead as another reference to it says
            return self._decode_streamed(key, size, meta)
        del self.decoding[key]
        try:
            return entry[1].result()
        finally:
            self._top_up()

    def _read(self, key: str, size: int | None, xxh3: Any = None) -> Any:
        if self.store is None:
            return self.get(key)
        future = self.ahead.pop(key, None)
        if future is None:
            return read_buffer(self.store, key, size, xxh3=xxh3)
        try:
            return future.result()
        finally:
            self._top_up()

    def close(self) -> None:
        """Stop reading ahead: reads not started are cancelled, those running are waited for."""
        self.queue = []
        futures = list(self.ahead.values()) + [future for _, future in self.decoding.values()]
        for future in futures:
            future.cancel()
        for future in futures:
            if not future.cancelled():
                future.exception()
        self.ahead, self.decoding = {}, {}

    def unpack(self, t: Any, depth: int = 0) -> Any:
        ty = type(t)
        if ty is not list and ty is not dict:
            return t
        if depth >= MAX_DEPTH:
            raise too_deep()
        inner, unpack = depth + 1, self.unpack
        if ty is list:
            return [x if type(x) not in CONTAINERS else unpack(x, inner) for x in t]
        if "_blob" in t:
            return self._blob(t, depth)
        if "_bin" in t:
            return self._inline(t)
        if "_tuple" not in t and "_dict" not in t and "_float" not in t:
            return {k: v if type(v) not in CONTAINERS else unpack(v, inner) for k, v in t.items()}
        if len(t) != 1:
            raise CodecError(f"a stored marker must stand alone, not with the keys {sorted(map(str, t))[:8]}")
        if "_tuple" in t:
            items = self.unpack(t["_tuple"], depth + 1)  # a list, or a JSON blob that holds one
            if type(items) is not list:
                raise CodecError(f"_tuple marker holds {type(items).__name__}, not a list")
            return tuple(items)
        if "_dict" in t:
            return self._dict(t["_dict"], depth)
        text = t["_float"]
        if type(text) is not str or (text[1:] if text[:1] in ("+", "-") else text).lower() not in SPECIAL_FLOATS:
            raise CodecError(f"_float marker holds {short(text)}, not 'nan', 'inf' or '-inf'")
        return float(text)

    def _dict(self, pairs: Any, depth: int) -> dict:
        if type(pairs) is not list:
            raise CodecError(f"_dict marker holds {type(pairs).__name__}, not a list of [key, value] pairs")
        out = {}
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise CodecError(f"_dict marker holds {short(pair)}, not a [key, value] pair")
            key = self.unpack(pair[0], depth + 1)
            if type(key) not in STORED_KEYS:
                raise CodecError(f"_dict marker holds a key of type {type(key).__name__}, not a JSON scalar")
            out[key] = self.unpack(pair[1], depth + 1)
        return out

    def _blob(self, ref: dict, depth: int) -> Any:
        key, size = ref["_blob"], ref.get("size")
        if type(key) is not str:
            raise CodecError(f"blob reference names {short(key)}, not a blob key")
        if size is not None and (type(size) is not int or size < 0):
            raise CodecError(f"blob reference to {key} has a bad size {short(size)}")
        meta = {k: v for k, v in ref.items() if k not in REFERENCE_FIELDS}
        codec = meta.get("codec")
        if codec == "json" and key in self.opening:
            raise IntegrityError(f"JSON blob {key} refers to itself")
        if self._streams(meta, size):
            return self._streamed(key, size, meta)
        data = self.fetched.get(key)
        if data is None:
            data = self._read(key, size, ref.get("xxh3"))
            if not meta.get("z"):  # kept for repeats; compressed bytes are dead once decoded, so never held on
                self.fetched[key] = data
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if size is not None and n != size:
            raise IntegrityError(f"blob {key} holds {n} bytes, its reference says {size}")
        decoded = n
        if meta.get("z"):
            decoded = meta.get("raw")
            if type(decoded) is not int or decoded < 0 or decoded > max(n, 1) * ZSTD_MAX_RATIO:
                raise CodecError(f"compressed blob {key} of {n} bytes claims an impossible raw size "
                                 f"{short(decoded)}")
        if codec == "json":
            self.json_bytes += decoded
            if self.json_bytes > MAX_JSON_BYTES:
                raise CodecError(f"the JSON blobs of this value decode to more than {MAX_JSON_BYTES} bytes")
        value = self._decode(data, meta)
        if key in self.fetched and isinstance(data, memoryview) and not data.readonly:
            # the first value may own this buffer now (a tensor over it): repeats decode a read-only view (copied)
            self.fetched[key] = data.toreadonly()
        if codec != "json":
            return value
        self.opening.add(key)
        try:
            return self.unpack(value, depth + 1)
        finally:
            self.opening.discard(key)


    def _inline(self, ref: dict) -> Any:
        text = ref["_bin"]
        if type(text) is not str:
            raise CodecError(f"an inline leaf holds {short(text)}, not base64 text")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise CodecError("an inline leaf holds text that is not base64") from None
        meta = {k: v for k, v in ref.items() if k != "_bin"}
        if meta.get("codec") == "json":
            raise CodecError("an inline leaf cannot hold JSON")
        if meta.get("z"):
            raw = meta.get("raw")
            if type(raw) is not int or raw < 0 or raw > max(len(data), 1) * ZSTD_MAX_RATIO:
                raise CodecError(f"a compressed inline leaf of {len(data)} bytes claims an impossible raw size "
                                 f"{short(raw)}")
        return self._decode(bytearray(data) if self.writable else data, meta)

    def _decode(self, data: Any, meta: dict) -> Any:
        if self.decode is not None:
            return self.decode(data, meta)
        return decode_leaf(data, meta, allow_pickle=self.allow_pickle, writable=self.writable)


def buffer_store(get: Callable) -> BlobStore | None:
    """The blob store whose ``get`` this is, if its ``get_buffer`` reads the same bytes (a subclass that overrides
    ``get`` alone, to add a check or a count, keeps being read through its ``get``)."""
    owner = getattr(get, "__self__", None)
    if not isinstance(owner, BlobStore) or getattr(get, "__name__", "") != "get":
        return None
    mro = type(owner).__mro__
    get_from = next(c for c in mro if "get" in c.__dict__)
    buffer_from = next(c for c in mro if "get_buffer" in c.__dict__)
    if buffer_from is not BlobStore and get_from is not buffer_from and issubclass(get_from, buffer_from):
        return None
    return owner
