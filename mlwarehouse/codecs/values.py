"""Pack any Python value into a JSON tree whose large leaves are blob references, and back, exactly.

The tree is what a document stores; blobs hold the bytes. Dicts with str keys, lists, str, int, bool, None and
finite floats stay inline. Markers keep the rest exact:

- ``{"_tuple": [...]}``             a tuple
- ``{"_dict": [[k, v], ...]}``      a dict with non-str keys (JSON scalars only) or keys that collide with a marker
- ``{"_float": "nan"}``             NaN and infinities (not valid JSON, refused by PostgreSQL and others)
- ``{"_blob": key, "codec": ..., "size": n, ...meta}``   a leaf stored as a blob by a codec
  (:mod:`mlwarehouse.codecs`): arrays, tensors, bytes, user types, and JSON subtrees (or strings, or integers
  beyond 64 bits) whose dump exceeds ``inline_limit``; such a JSON blob holds an already packed subtree

numpy bool/integer/float scalars become Python scalars (so the index can compare them); other numpy scalars are
leaves. Subclasses of dict, list and tuple (OrderedDict, namedtuple) are stored as their base type. Anything else
goes to a registered codec, or to pickle when ``allow_pickle=True``; otherwise CodecError names the type and the
path inside the value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from mlwarehouse.codecs import compress, decode_leaf, encode_leaf
from mlwarehouse.errors import CodecError, IntegrityError, PickleNotAllowed

__all__ = ["pack", "unpack", "blob_keys", "MARKERS"]

MARKERS = frozenset({"_blob", "_tuple", "_dict", "_float"})
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1
_NUMBERS = frozenset({int, float, bool})
_KEY_TYPES = (str, int, float, bool, type(None), np.bool_, np.integer, np.floating)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def pack(value: Any, put: Callable[[Any], str], *, allow_pickle: bool = False, inline_limit: int = 16384,
         compress_blobs: bool = True) -> Any:
    """Return a JSON tree for ``value``; every blob-worthy leaf is stored with ``put(bytes) -> key``.

    ``put`` is called once per distinct leaf object (the same array twice in ``value`` is stored once).
    """
    return _Packer(put, allow_pickle, inline_limit, compress_blobs).pack(value, "value")


def unpack(tree: Any, get: Callable[[str], bytes], *, allow_pickle: bool = False, writable: bool = False) -> Any:
    """Rebuild the value that :func:`pack` turned into ``tree``, reading blobs with ``get(key) -> bytes``.

    numpy arrays are zero-copy views over the blob bytes and read-only, unless ``writable=True``.
    """
    return _Unpacker(get, allow_pickle, writable).unpack(tree)


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
    def __init__(self, put: Callable[[Any], str], allow_pickle: bool, inline_limit: int, compress_blobs: bool):
        self.put = put
        self.allow_pickle = allow_pickle
        self.inline_limit = inline_limit
        self.compress = compress_blobs
        self.blobs = 0                     # blob references made so far
        self.seen: dict[int, dict] = {}    # id(leaf) -> its reference
        self.alive: list[Any] = []         # keeps leaves alive so their ids are not reused during this pack

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
        out = [self.pack(x, f"{path}.{i}") for i, x in enumerate(v)]
        return self._maybe_blob(out, before)

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
            return self._maybe_blob({k: self.pack(x, f"{path}.{k}") for k, x in d.items()}, before)
        pairs = []
        for k, x in d.items():
            if not isinstance(k, _KEY_TYPES):
                if self.allow_pickle:
                    return self._leaf(d, path)
                raise PickleNotAllowed(
                    f"{path}: dict key {k!r} of type {type(k).__qualname__} is not a JSON scalar; "
                    f"pass allow_pickle=True (trusted data only) to pickle this dict")
            pairs.append([self.pack(k, path), self.pack(x, f"{path}[{k!r}]")])
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

    def _leaf(self, v: Any, path: str) -> dict:
        ref = self.seen.get(id(v))
        if ref is not None:
            return dict(ref)
        try:
            data, meta = encode_leaf(v, allow_pickle=self.allow_pickle, compress_payload=self.compress)
        except CodecError as exc:
            raise type(exc)(f"{path}: {exc}") from exc
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
    def __init__(self, get: Callable[[str], bytes], allow_pickle: bool, writable: bool):
        self.get = get
        self.allow_pickle = allow_pickle
        self.writable = writable
        self.fetched: dict[str, Any] = {}

    def unpack(self, t: Any) -> Any:
        ty = type(t)
        if ty is list:
            return [self.unpack(x) for x in t]
        if ty is not dict:
            return t
        if "_blob" in t:
            return self._blob(t)
        if "_tuple" in t:
            return tuple(self.unpack(t["_tuple"]))
        if "_dict" in t:
            return {k: v for k, v in self.unpack(t["_dict"])}
        if "_float" in t:
            return float(t["_float"])
        return {k: self.unpack(v) for k, v in t.items()}

    def _blob(self, ref: dict) -> Any:
        key = ref["_blob"]
        data = self.fetched.get(key)
        if data is None:
            data = self.fetched[key] = self.get(key)
        size = ref.get("size")
        if size is not None and len(data) != size:
            raise IntegrityError(f"blob {key} holds {len(data)} bytes, its reference says {size}")
        meta = {k: v for k, v in ref.items() if k not in ("_blob", "size")}
        value = decode_leaf(data, meta, allow_pickle=self.allow_pickle, writable=self.writable)
        return self.unpack(value) if meta.get("codec") == "json" else value
