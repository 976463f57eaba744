"""Crafted stored documents: whatever a tree and its blobs hold, loading raises only WarehouseError subclasses.

The trees are what an attacker can put into a shared index or an archive: markers with wrong types or arity, deep
nesting past the recursion limit, blob references with bogus keys, sizes, codecs and compression metadata, and
blobs whose bytes lie (zstd frames without a content size, bad .npy headers, JSON blobs that refer to themselves).
"""

from __future__ import annotations

import io
import json
import sys
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlwarehouse.codecs import unpacking
from mlwarehouse.codecs.values import MAX_DEPTH, pack, unpack
from mlwarehouse.errors import CodecError, IntegrityError, WarehouseError

_ALLOC_BOUND = 64 << 20  # bytes one load of a crafted tree may allocate at its peak


def _npy(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr)
    return out.getvalue()


def _frames() -> list[bytes]:
    unsized = zstandard.ZstdCompressor(write_content_size=False)
    sized = zstandard.ZstdCompressor()
    return [unsized.compress(b"\0" * 4096), sized.compress(b"\0" * 4096), unsized.compress(b'{"a": 1}'),
            sized.compress(b"[1, 2, 3]")]


#: the bytes a crafted blob reference can point at, by key
BLOBS: dict[str, bytes] = {
    "empty": b"",
    "text": b"hello",
    "json": b'{"a": [1, {"_tuple": 3}]}',
    "json-self": b'{"_blob": "json-self", "codec": "json"}',
    "json-loop-a": b'[{"_blob": "json-loop-b", "codec": "json"}]',
    "json-loop-b": b'[{"_blob": "json-loop-a", "codec": "json"}]',
    "json-deep": b"[" * 100_000 + b"]" * 100_000,
    "json-bad": b"\xff\xfe{not json",
    "npy": _npy(np.arange(6, dtype=np.float32)),
    "npy-lies": _npy(np.arange(6, dtype=np.float32)).replace(b"(6,)", b"(9999999999,)"),
    "npy-object": b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }" + b" " * 60,
    **{f"zstd-{i}": frame for i, frame in enumerate(_frames())},
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=8))
keys = st.one_of(st.sampled_from(sorted(BLOBS)), st.just("missing"), scalars, st.lists(st.integers(), max_size=2))
sizes = st.one_of(st.none(), st.integers(-5, 2**62), scalars, st.sampled_from([len(b) for b in BLOBS.values()]))
codecs = st.one_of(st.sampled_from(["json", "npy", "bytes", "tensor", "safetensors", "pickle", "nope"]), scalars)
metas = st.fixed_dictionaries({}, optional={
    "z": st.one_of(st.just("zstd"), scalars), "raw": st.one_of(st.integers(-5, 2**62), scalars),
    "scalar": st.booleans(), "type": scalars, "dtype": st.one_of(scalars, st.just("float32")),
    "shape": st.one_of(scalars, st.lists(st.integers(-3, 2**40), max_size=3))})


def _ref(parts) -> dict:
    key, size, codec, meta = parts
    ref = {"_blob": key, "codec": codec, **meta}
    if size is not None:
        ref["size"] = size
    return ref


blob_refs = st.tuples(keys, sizes, codecs, metas).map(_ref)


def _markers(children):
    return st.one_of(
        st.builds(lambda v: {"_tuple": v}, st.one_of(children, scalars)),
        st.builds(lambda v: {"_dict": v}, st.one_of(children, scalars,
                                                   st.lists(st.lists(children, max_size=3), max_size=3))),
        st.builds(lambda v: {"_float": v}, st.one_of(scalars, st.sampled_from(["nan", "-inf", "+inf", "x", ""]))),
        st.builds(lambda v, w: {"_tuple": v, "_float": w}, children, scalars),
        st.dictionaries(st.sampled_from(["_blob", "_tuple", "_dict", "_float", "a"]), children, max_size=3),
    )


trees = st.recursive(
    st.one_of(scalars, blob_refs),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=4), children, max_size=4),
                               _markers(children), blob_refs),
    max_leaves=20)


def _get(key: str) -> bytes:
    from mlwarehouse.errors import NotFound
    try:
        return BLOBS[key]
    except KeyError:
        raise NotFound(f"no blob {key}") from None


def _load(tree, **kw):
    """unpack ``tree``: only WarehouseError may escape, and the peak allocation stays bounded."""
    tracemalloc.start()
    try:
        unpack(tree, _get, **kw)
    except WarehouseError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < _ALLOC_BOUND, f"loading a crafted tree allocated {peak} bytes"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.booleans())
def test_crafted_trees_raise_only_warehouse_errors(tree, writable):
    _load(tree, writable=writable)


def _nested(depth: int, make) -> object:
    tree: object = 1
    for _ in range(depth):
        tree = make(tree)
    return tree


@pytest.mark.parametrize("make", [lambda t: [t], lambda t: {"a": t}, lambda t: {"_tuple": [t]},
                                  lambda t: {"_dict": [["k", t]]}],
                         ids=["list", "dict", "tuple", "dict-marker"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, sys.getrecursionlimit() + 10, 50_000])
def test_deep_nesting_is_a_codec_error(make, depth):
    with pytest.raises(CodecError, match="nested deeper"):
        unpack(_nested(depth, make), _get)


def test_nesting_within_the_limit_round_trips():
    tree = pack(_nested(MAX_DEPTH - 1, lambda t: [t]), lambda data: pytest.fail("no blob expected"))
    assert unpack(tree, _get) == _nested(MAX_DEPTH - 1, lambda t: [t])
    with pytest.raises(CodecError, match="nested deeper"):
        pack(_nested(MAX_DEPTH + 1, lambda t: {"a": t}), lambda data: "k")


def test_a_json_blob_that_refers_to_itself_is_refused():
    with pytest.raises(IntegrityError, match="refers to itself"):
        unpack({"_blob": "json-self", "codec": "json"}, _get)
    with pytest.raises(IntegrityError, match="refers to itself"):
        unpack({"_blob": "json-loop-a", "codec": "json"}, _get)


def test_json_blobs_that_repeat_each_other_cannot_multiply(monkeypatch):
    monkeypatch.setattr(unpacking, "MAX_JSON_BYTES", 1 << 20)
    leaf = json.dumps(list(range(2000))).encode()
    blobs = {"leaf": leaf, "mid": json.dumps([{"_blob": "leaf", "codec": "json"}] * 100).encode()}
    tree = [{"_blob": "mid", "codec": "json"}] * 100  # 10,000 copies of 10 KB
    with pytest.raises(CodecError, match="decode to more than"):
        unpack(tree, blobs.__getitem__)


@pytest.mark.parametrize("raw", [6 << 30, 2**62, True, -1, "7", None])
def test_a_lying_raw_size_is_refused_before_allocating(raw):
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 100)
    ref = {"_blob": "k", "codec": "bytes", "size": len(frame), "z": "zstd", "raw": raw}
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            unpack(ref, {"k": frame}.__getitem__)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < _ALLOC_BOUND


@pytest.mark.parametrize("tree", [
    {"_tuple": 3}, {"_tuple": {"a": 1}}, {"_dict": 5}, {"_dict": [[1]]}, {"_dict": [[1, 2, 3]]},
    {"_dict": [[[1], 2]]}, {"_dict": [["a", 1], 7]}, {"_float": 1.5}, {"_float": "x"}, {"_float": ["nan"]},
    {"_float": "--inf"}, {"_tuple": [1], "extra": 2}, {"_blob": [1]}, {"_blob": None}, {"_blob": "text", "size": "5"},
    {"_blob": "text", "size": -1}, {"_blob": "text", "codec": ["npy"]}, {"_blob": "text", "codec": "bytes", "size": 4},
])
def test_each_malformed_marker_is_a_typed_error(tree):
    with pytest.raises(WarehouseError):
        unpack(tree, _get)


def test_valid_markers_still_load():
    tree = {"t": {"_tuple": [1, {"_float": "nan"}]}, "d": {"_dict": [[1, "one"], [None, {"_float": "-inf"}]]},
            "b": {"_blob": "text", "codec": "bytes", "size": 5}}
    out = unpack(tree, _get)
    assert out["t"][0] == 1 and out["t"][1] != out["t"][1]
    assert out["d"] == {1: "one", None: float("-inf")} and bytes(out["b"]) == b"hello"
