"""Packing: a value walked into a JSON tree, its leaves encoded, hashed ahead in parallel and stored as blobs (or
kept inline). :func:`mlwarehouse.codecs.values.pack` is the entry point."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xxhash

from mlwarehouse.blobs.base import current_batch, workers
from mlwarehouse.codecs import compress, encode_leaf
from mlwarehouse.codecs.treeformat import (
    CHECKSUM_FROM,
    INT_MAX,
    INT_MIN,
    KEY_TYPES,
    MARKERS,
    MAX_DEPTH,
    NUMBERS,
    Encoder,
    dumps,
    is_leaf,
)
from mlwarehouse.errors import CodecError, PickleNotAllowed

__all__ = ["Packer", "AHEAD_BYTES"]

#: payload bytes that packing encodes ahead of storing them (to hash them in parallel)
AHEAD_BYTES = 256 << 20


class Packer:
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
            return v if len(v) <= self.inline_limit else self._json_blob(dumps(v))
        if v is None or t is bool:
            return v
        if t is int:
            return v if INT_MIN <= v <= INT_MAX else self._json_blob(dumps(v))
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
            if kinds <= NUMBERS or kinds == {str}:
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
            if not is_leaf(x) or id(x) in self.seen or id(x) in self.ready:
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
        elif int in kinds and (min(v) < INT_MIN or max(v) > INT_MAX):
            return None
        try:
            text = dumps(v)
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
                if not isinstance(k, KEY_TYPES):
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
        text = dumps(out)
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
        ref = {"_blob": key, "codec": meta.pop("codec"), "size": size, **meta}
        if size >= CHECKSUM_FROM:
            ref["xxh3"] = xxhash.xxh3_64_hexdigest(data)
        return ref
