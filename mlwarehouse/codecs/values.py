"""Pack any Python value into a JSON tree whose large leaves are blob references, and back, exactly.

The tree is what a document stores; blobs hold the bytes. Dicts with str keys, lists, str, int, bool, None and
finite floats stay inline. Markers keep the rest exact:

- ``{"_tuple": [...]}``             a tuple
- ``{"_dict": [[k, v], ...]}``      a dict with non-str keys (JSON scalars only) or keys that collide with a marker
- ``{"_float": "nan"}``             NaN and infinities (not valid JSON, refused by PostgreSQL and others)
- ``{"_blob": key, "codec": ..., "size": n, ...meta}``   a leaf stored as a blob by a codec
  (:mod:`mlwarehouse.codecs`): arrays, tensors, bytes, user types, and JSON subtrees (or strings, or integers
  beyond 64 bits) whose dump exceeds ``inline_limit``; such a JSON blob holds an already packed subtree
- ``{"_bin": base64, "codec": ..., ...meta}``   a codec's payload of at most ``inline_bytes`` kept in the
  document itself (off by default; user collections keep small tensors and embeddings inline this way)

``encode(value)`` may encode a leaf before the registry is asked (``(payload, meta)`` with ``meta["codec"]``, or
None to pass), and ``decode(payload, meta)`` replaces :func:`~mlwarehouse.codecs.decode_leaf` when reading: the
hooks through which a collection's own data types are written and read.

numpy bool/integer/float scalars become Python scalars (so the index can compare them); other numpy scalars are
leaves. Subclasses of dict, list and tuple (OrderedDict, namedtuple) are stored as their base type. Anything else
goes to a registered codec, or to pickle when ``allow_pickle=True``; otherwise CodecError names the type and the
path inside the value.

Speed (a checkpoint is one ``pack``): packing runs inside a put batch (:func:`mlwarehouse.blobs.base.put_batch`),
so a store may write in the background while the next leaves are encoded, and the payloads of a list's or dict's
next few leaves are hashed in parallel; every blob is durable when ``pack`` returns. When ``get`` is a blob
store's own ``get``, ``unpack`` reads the blobs a tree refers to a few at a time on the blob pool through
``get_buffer`` (verified as read) and decodes tensors and arrays straight over the buffers read, without a copy;
a large compressed array or tensor in a local store is decompressed as it is read, straight into its own memory
(:mod:`mlwarehouse.codecs.streaming`), and returned once the whole blob is verified.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from mlwarehouse.blobs.base import BlobStore, current_batch, pool, put_batch, workers
from mlwarehouse.blobs.common import can_stream, open_verifying
from mlwarehouse.codecs import compress, decode_leaf, encode_leaf
from mlwarehouse.codecs.streaming import decode_compressed, streams
from mlwarehouse.errors import CodecError, IntegrityError, PickleNotAllowed

__all__ = ["pack", "unpack", "blob_keys", "MARKERS"]

MARKERS = frozenset({"_blob", "_bin", "_tuple", "_dict", "_float"})
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1
_NUMBERS = frozenset({int, float, bool})
_KEY_TYPES = (str, int, float, bool, type(None), np.bool_, np.integer, np.floating)
_CONTAINERS = frozenset({list, dict})
_STORED_KEYS = frozenset({str, int, float, bool, type(None)})
_SPECIAL_FLOATS = frozenset({"nan", "inf", "infinity"})
_INLINE = frozenset({str, int, float, bool, type(None)})
#: payload bytes that packing encodes ahead of storing them (to hash them in parallel)
AHEAD_BYTES = 256 << 20
#: containers nested deeper than this are refused by pack and unpack (a crafted document cannot exhaust the stack)
MAX_DEPTH = 200
#: a bound on the JSON that one unpack decodes from blobs (JSON blobs that repeat each other cannot multiply)
MAX_JSON_BYTES = 1 << 30
#: zstd output per input byte is below this (an RLE block: 4 bytes for 128 KiB), so a larger claim is a lie
_ZSTD_MAX_RATIO = 1 << 16


def _is_leaf(v: Any) -> bool:
    """Whether ``pack`` stores ``v`` through a codec (rather than as JSON or a container)."""
    return type(v) not in _INLINE and not isinstance(v, (dict, list, tuple, np.generic))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


Encoder = Callable[[Any], "tuple[Any, dict] | None"]
Decoder = Callable[[Any, dict], Any]


def pack(value: Any, put: Callable[[Any], str], *, allow_pickle: bool = False, inline_limit: int = 16384,
         compress_blobs: bool = True, inline_bytes: int = 0, encode: Encoder | None = None) -> Any:
    """Return a JSON tree for ``value``; every blob-worthy leaf is stored with ``put(bytes) -> key``.

    ``put`` is called once per distinct leaf object (the same array twice in ``value`` is stored once); leaves
    whose stored payload is at most ``inline_bytes`` stay in the tree as ``_bin`` markers instead.
    """
    with put_batch():
        return _Packer(put, allow_pickle, inline_limit, compress_blobs, inline_bytes, encode).pack(value, "value")


def unpack(tree: Any, get: Callable[[str], bytes], *, allow_pickle: bool = False, writable: bool = False,
           decode: Decoder | None = None) -> Any:
    """Rebuild the value that :func:`pack` turned into ``tree``, reading blobs with ``get(key) -> bytes``.

    numpy arrays are zero-copy views over the blob bytes and read-only, unless ``writable=True``.
    """
    unpacker = _Unpacker(get, allow_pickle, writable, decode)
    try:
        if unpacker.store is not None:
            unpacker.prefetch(tree)
        return unpacker.unpack(tree)
    except RecursionError:  # the caller's own stack was nearly full
        raise _too_deep() from None
    finally:
        unpacker.close()


def blob_keys(tree: Any) -> set[str]:
    """Every blob key that a document (or any JSON tree) refers to."""
    keys: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            key = node.get("_blob")
            if isinstance(key, str):
                keys.add(key)
            else:
                stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)
    return keys


class _Packer:
    def __init__(self, put: Callable[[Any], str], allow_pickle: bool, inline_limit: int, compress_blobs: bool,
                 inline_bytes: int = 0, encode: Encoder | None = None):
        self.put = put
        self.allow_pickle = allow_pickle
        self.inline_limit = inline_limit
        self.compress = compress_blobs
        self.inline_bytes = inline_bytes
        self.encode = encode
        self.blobs = 0                     # blob references made so far
        self.depth = 0                     # containers open around the value being packed
        self.seen: dict[int, dict] = {}    # id(leaf) -> its reference
        self.alive: list[Any] = []         # keeps leaves alive so their ids are not reused during this pack
        self.ready: dict[int, tuple[Any, Any, dict]] = {}  # id(leaf) -> (leaf, payload, meta) encoded ahead

    def pack(self, v: Any, path: str) -> Any:
        t = type(v)
        if t is str:
            return v if len(v) <= self.inline_limit else self._json_blob(_dumps(v))
        if v is None or t is bool:
            return v
        if t is int:
            return v if _INT_MIN <= v <= _INT_MAX else self._json_blob(_dumps(v))
        if t is float:
            return v if math.isfinite(v) else {"_float": repr(v)}
        if isinstance(v, dict):
            return self._pack_dict(v, path)
        if isinstance(v, list):
            return self._pack_list(v, path)
        if isinstance(v, tuple):
            return {"_tuple": self._pack_list(v, path)}
        if isinstance(v, np.generic):
            if isinstance(v, np.bool_):
                return bool(v)
            if isinstance(v, np.integer):
                return self.pack(int(v), path)
            if isinstance(v, (np.float16, np.float32, np.float64)):
                return self.pack(float(v), path)
            if isinstance(v, np.str_):
                return self.pack(str(v), path)
        return self._leaf(v, path)

    def _pack_list(self, v: list | tuple, path: str) -> Any:
        if v:
            kinds = set(map(type, v))
            if kinds <= _NUMBERS or kinds == {str}:
                fast = self._fast_list(v, kinds)
                if fast is not None:
                    return fast
        before = self.blobs
        self._enter(path)
        try:
            out = self._pack_items(v, [f"{path}.{i}" for i in range(len(v))])
        finally:
            self.depth -= 1
        return self._maybe_blob(out, before)

    def _pack_items(self, items: Sequence, paths: Sequence[str]) -> list:
        """``pack`` of each item; in a put batch, the leaves a few items ahead are encoded and hashed in parallel."""
        if len(items) < 2 or current_batch() is None:
            return [self.pack(x, p) for x, p in zip(items, paths)]
        out, until = [], 0
        for i, (x, p) in enumerate(zip(items, paths)):
            if i >= until:
                until = self._ahead(items, i)
            out.append(self.pack(x, p))
        return out

    def _ahead(self, items: Sequence, start: int) -> int:
        """Encode the leaves among ``items[start:]`` ahead of packing them, up to :data:`AHEAD_BYTES` of payload
        or a few per worker, and hash their payloads in parallel (the put batch remembers the keys). A leaf that
        fails to encode here is left for ``_leaf``, which raises with its path."""
        batch, budget, count, end = current_batch(), AHEAD_BYTES, 0, start
        payloads = []
        while end < len(items) and count < 2 * workers() and budget > 0:
            x = items[end]
            end += 1
            if not _is_leaf(x) or id(x) in self.seen or id(x) in self.ready:
                continue
            try:
                data, meta = self._encode(x)
            except CodecError:
                continue
            self.ready[id(x)] = (x, data, meta)
            payloads.append(data)
            count += 1
            budget -= data.nbytes if isinstance(data, memoryview) else len(data)
        batch.prehash(payloads)
        return end

    def _enter(self, path: str) -> None:
        """One container level deeper: refused past MAX_DEPTH, so whatever pack stores, unpack can read."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.depth -= 1
            raise CodecError(f"{path}: nested deeper than {MAX_DEPTH} levels")

    def _fast_list(self, v: list | tuple, kinds: set) -> Any:
        """A list of plain numbers or strings, checked with C-speed passes; None if the slow path is needed."""
        if str in kinds:
            if max(map(len, v)) > self.inline_limit:
                return None
        elif int in kinds and (min(v) < _INT_MIN or max(v) > _INT_MAX):
            return None
        try:
            text = _dumps(v)
        except ValueError:  # NaN or infinity
            return None
        return self._json_blob(text) if len(text) > self.inline_limit else list(v)

    def _pack_dict(self, d: dict, path: str) -> Any:
        before = self.blobs
        if all(type(k) is str for k in d) and MARKERS.isdisjoint(d):
            self._enter(path)
            try:
                out = dict(zip(d, self._pack_items(list(d.values()), [f"{path}.{k}" for k in d])))
            finally:
                self.depth -= 1
            return self._maybe_blob(out, before)
        pairs = []
        self._enter(path)
        try:
            for k, x in d.items():
                if not isinstance(k, _KEY_TYPES):
                    if self.allow_pickle:
                        return self._leaf(d, path)
                    raise PickleNotAllowed(
                        f"{path}: dict key {k!r} of type {type(k).__qualname__} is not a JSON scalar; "
                        f"pass allow_pickle=True (trusted data only) to pickle this dict")
                pairs.append([self.pack(k, path), self.pack(x, f"{path}[{k!r}]")])
        finally:
            self.depth -= 1
        return self._maybe_blob({"_dict": pairs}, before)

    def _maybe_blob(self, out: Any, before: int) -> Any:
        if self.blobs != before:  # blob references stay visible in the document (for gc)
            return out
        text = _dumps(out)
        return self._json_blob(text) if len(text) > self.inline_limit else out

    def _json_blob(self, text: str) -> dict:
        data = text.encode()
        meta: dict = {"codec": "json"}
        if self.compress:
            data, zmeta = compress(data)
            meta.update(zmeta)
        return self._store(data, meta)

    def _encode(self, v: Any) -> tuple[Any, dict]:
        out = None if self.encode is None else self.encode(v)
        if out is None:
            return encode_leaf(v, allow_pickle=self.allow_pickle, compress_payload=self.compress)
        data, meta = out
        if self.compress:
            data, zmeta = compress(data)
            meta = {**meta, **zmeta}
        return data, meta

    def _leaf(self, v: Any, path: str) -> dict:
        ref = self.seen.get(id(v))
        if ref is not None:
            return dict(ref)
        ready = self.ready.pop(id(v), None)
        if ready is not None and ready[0] is v:
            data, meta = ready[1], ready[2]
        else:
            try:
                data, meta = self._encode(v)
            except CodecError as exc:
                raise type(exc)(f"{path}: {exc}") from exc
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size <= self.inline_bytes:
            return {"_bin": base64.b64encode(data).decode("ascii"), **meta}
        ref = self._store(data, meta)
        self.seen[id(v)] = ref
        self.alive.append(v)
        return dict(ref)

    def _store(self, data: Any, meta: dict) -> dict:
        key = self.put(data)
        self.blobs += 1
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        return {"_blob": key, "codec": meta.pop("codec"), "size": size, **meta}


class _Unpacker:
    """Rebuilds a value from a stored tree, which may have been crafted: every malformed marker, blob reference or
    nesting past :data:`MAX_DEPTH` is a CodecError (IntegrityError for bytes that disagree with their reference),
    never a raw Python error, and no claimed size is allocated before it is checked against the bytes."""

    def __init__(self, get: Callable[[str], bytes], allow_pickle: bool, writable: bool, decode: Decoder | None = None):
        self.get = get
        # a store's own get: read through get_buffer (owned buffers), in parallel; a decode hook gets get's bytes
        self.store = _buffer_store(get) if decode is None else None
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
                meta = {k: v for k, v in ref.items() if k not in ("_blob", "size")}
                self.decoding[key] = (meta, pool().submit(self._decode_streamed, key, size, meta))
            else:
                self.ahead[key] = pool().submit(self.store.get_buffer, key, size)

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

    def _read(self, key: str, size: int | None) -> Any:
        if self.store is None:
            return self.get(key)
        future = self.ahead.pop(key, None)
        if future is None:
            return self.store.get_buffer(key, size)
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
            raise _too_deep()
        inner, unpack = depth + 1, self.unpack
        if ty is list:
            return [x if type(x) not in _CONTAINERS else unpack(x, inner) for x in t]
        if "_blob" in t:
            return self._blob(t, depth)
        if "_bin" in t:
            return self._inline(t)
        if "_tuple" not in t and "_dict" not in t and "_float" not in t:
            return {k: v if type(v) not in _CONTAINERS else unpack(v, inner) for k, v in t.items()}
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
        if type(text) is not str or (text[1:] if text[:1] in ("+", "-") else text).lower() not in _SPECIAL_FLOATS:
            raise CodecError(f"_float marker holds {_short(text)}, not 'nan', 'inf' or '-inf'")
        return float(text)

    def _dict(self, pairs: Any, depth: int) -> dict:
        if type(pairs) is not list:
            raise CodecError(f"_dict marker holds {type(pairs).__name__}, not a list of [key, value] pairs")
        out = {}
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise CodecError(f"_dict marker holds {_short(pair)}, not a [key, value] pair")
            key = self.unpack(pair[0], depth + 1)
            if type(key) not in _STORED_KEYS:
                raise CodecError(f"_dict marker holds a key of type {type(key).__name__}, not a JSON scalar")
            out[key] = self.unpack(pair[1], depth + 1)
        return out

    def _blob(self, ref: dict, depth: int) -> Any:
        key, size = ref["_blob"], ref.get("size")
        if type(key) is not str:
            raise CodecError(f"blob reference names {_short(key)}, not a blob key")
        if size is not None and (type(size) is not int or size < 0):
            raise CodecError(f"blob reference to {key} has a bad size {_short(size)}")
        meta = {k: v for k, v in ref.items() if k not in ("_blob", "size")}
        codec = meta.get("codec")
        if codec == "json" and key in self.opening:
            raise IntegrityError(f"JSON blob {key} refers to itself")
        if self._streams(meta, size):
            return self._streamed(key, size, meta)
        data = self.fetched.get(key)
        if data is None:
            data = self._read(key, size)
            if not meta.get("z"):  # kept for repeats; compressed bytes are dead once decoded, so never held on
                self.fetched[key] = data
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if size is not None and n != size:
            raise IntegrityError(f"blob {key} holds {n} bytes, its reference says {size}")
        decoded = n
        if meta.get("z"):
            decoded = meta.get("raw")
            if type(decoded) is not int or decoded < 0 or decoded > max(n, 1) * _ZSTD_MAX_RATIO:
                raise CodecError(f"compressed blob {key} of {n} bytes claims an impossible raw size "
                                 f"{_short(decoded)}")
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
            raise CodecError(f"an inline leaf holds {_short(text)}, not base64 text")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise CodecError("an inline leaf holds text that is not base64") from None
        meta = {k: v for k, v in ref.items() if k != "_bin"}
        if meta.get("codec") == "json":
            raise CodecError("an inline leaf cannot hold JSON")
        if meta.get("z"):
            raw = meta.get("raw")
            if type(raw) is not int or raw < 0 or raw > max(len(data), 1) * _ZSTD_MAX_RATIO:
                raise CodecError(f"a compressed inline leaf of {len(data)} bytes claims an impossible raw size "
                                 f"{_short(raw)}")
        return self._decode(bytearray(data) if self.writable else data, meta)

    def _decode(self, data: Any, meta: dict) -> Any:
        if self.decode is not None:
            return self.decode(data, meta)
        return decode_leaf(data, meta, allow_pickle=self.allow_pickle, writable=self.writable)


def _buffer_store(get: Callable) -> BlobStore | None:
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


def _too_deep() -> CodecError:
    return CodecError(f"a stored value is nested deeper than {MAX_DEPTH} levels")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
