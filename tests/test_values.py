"""pack/unpack: exact round trips through a real blob store, markers, blob references, refusals."""

from __future__ import annotations

import collections
import datetime as dt
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.codecs import register_codec, unregister_codec
from mlwarehouse.codecs.values import blob_keys, pack, unpack
from mlwarehouse.errors import CodecError, IntegrityError, NotFound, PickleNotAllowed


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return FileBlobStore(tmp_path_factory.mktemp("blobs"), fsync=False)


def same(a, b) -> bool:
    """Exact equality: types, dtypes, shapes, tuple vs list, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def roundtrip(value, store, **kwargs):
    allow = kwargs.pop("allow_pickle", False)
    tree = pack(value, store.put, allow_pickle=allow, **kwargs)
    json.dumps(tree, allow_nan=False)  # the tree is strict JSON, ready for any index backend
    return unpack(tree, store.get, allow_pickle=allow), tree


dtypes = st.one_of(hnp.boolean_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(),
                   hnp.floating_dtypes(), hnp.complex_number_dtypes(), hnp.datetime64_dtypes(),
                   hnp.byte_string_dtypes(max_len=4), hnp.unicode_string_dtypes(max_len=4))
arrays = dtypes.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                    st.binary(max_size=8))
json_keys = st.one_of(st.text(max_size=6), st.sampled_from(["_blob", "_tuple", "_dict", "_float"]))
scalar_keys = st.one_of(st.integers(-5, 5), st.booleans(), st.none(), st.text(max_size=3))
values = st.recursive(
    st.one_of(scalars, arrays),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(json_keys, inner, max_size=4),
        st.dictionaries(scalar_keys, inner, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=values)
def test_roundtrip_is_exact(store, value):
    out, tree = roundtrip(value, store)
    assert same(out, value)
    for key in blob_keys(tree):
        assert store.exists(key)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=values)
def test_small_inline_limit_moves_json_to_blobs_and_back(store, value):
    out, _ = roundtrip({"v": value, "pad": list(range(50))}, store, inline_limit=64)
    assert same(out, {"v": value, "pad": list(range(50))})


def test_tree_shape(store):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = pack({"x": arr, "t": (1, "a"), 3: None}, store.put)
    pairs = dict((k, v) for k, v in tree["_dict"])
    ref = pairs["x"]
    assert ref["codec"] == "npy" and ref["size"] == len(store.get(ref["_blob"]))
    assert pairs["t"] == {"_tuple": [1, "a"]} and pairs[3] is None
    assert blob_keys(tree) == {ref["_blob"]}


def test_markers_and_special_floats(store):
    value = {"_blob": "not a key", "_tuple": [1], "n": float("nan"), "i": (float("inf"), -math.inf)}
    out, tree = roundtrip(value, store)
    assert same(out, value)
    assert blob_keys(tree) == set()


def test_numpy_scalars_become_python_scalars(store):
    tree = pack({"a": np.float32(0.5), "b": np.int64(7), "c": np.bool_(True), "d": np.str_("s"),
                 "e": np.uint64(2**64 - 1)}, store.put)
    assert tree["a"] == 0.5 and type(tree["a"]) is float
    assert tree["b"] == 7 and tree["c"] is True and type(tree["d"]) is str
    assert unpack(tree["e"], store.get) == 2**64 - 1  # beyond int64: a JSON blob, not an inline int


def test_large_json_goes_to_a_blob(store):
    history = [0.5 * i for i in range(5000)]
    value = {"loss": history, "names": ["x" * 10] * 3000, "nested": [(i, str(i)) for i in range(2000)],
             "text": "y" * 20_000, "small": [1, 2, 3]}
    out, tree = roundtrip(value, store)
    assert same(out, value)
    assert all(tree[k]["codec"] == "json" for k in ("loss", "names", "nested", "text"))
    assert tree["small"] == [1, 2, 3]
    assert len(blob_keys(tree)) == 4
    assert len(json.dumps(tree)) < 2000


def test_containers_with_blobs_stay_visible(store):
    arrays = [np.full(3, i) for i in range(3000)]
    tree = pack(arrays, store.put)
    assert isinstance(tree, list) and len(blob_keys(tree)) == 3000  # never hidden inside a JSON blob
    assert same(unpack(tree, store.get), arrays)


def test_put_called_once_per_distinct_leaf(store):
    calls = []

    def put(data):
        calls.append(len(data))
        return store.put(data)

    arr = np.random.default_rng(0).random(1000)
    tree = pack({"a": arr, "b": arr, "c": [arr, (arr,)], "d": arr.copy()}, put)
    assert len(calls) == 2
    out = unpack(tree, store.get)
    assert all(np.array_equal(out[k], arr) for k in ("a", "b", "d"))


def test_tensors_bytes_and_state_dicts(store):
    value = {"w": torch.randn(3, dtype=torch.bfloat16), "raw": b"\x00" * 10, "ba": bytearray(b"z"),
             "sd": collections.OrderedDict(a=torch.ones(2))}
    out, tree = roundtrip(value, store)
    assert tree["w"]["dtype"] == "bfloat16"
    assert same(out["w"], value["w"]) and out["raw"] == value["raw"] and type(out["ba"]) is bytearray
    assert type(out["sd"]) is dict and torch.equal(out["sd"]["a"], torch.ones(2))  # subclass stored as dict


def test_unsupported_type_names_type_and_path(store):
    with pytest.raises(CodecError) as err:
        pack({"runs": [{"when": dt.date(2024, 1, 1)}]}, store.put)
    assert "value.runs.0.when" in str(err.value) and "date" in str(err.value)


def test_non_scalar_keys_need_pickle(store):
    value = {(1, 2): "pair"}
    with pytest.raises(PickleNotAllowed, match=r"value: dict key \(1, 2\)"):
        pack(value, store.put)
    out, tree = roundtrip(value, store, allow_pickle=True)
    assert out == value and tree["codec"] == "pickle"


def test_pickle_refused_on_unpack(store):
    tree = pack({"f": {1, 2}}, store.put, allow_pickle=True)
    with pytest.raises(PickleNotAllowed, match="builtins.set"):
        unpack(tree, store.get)
    assert unpack(tree, store.get, allow_pickle=True) == {"f": {1, 2}}


def test_user_codec_through_pack(store):
    register_codec("complex", complex, lambda c: (b"", {"re": c.real, "im": c.imag}),
                   lambda data, meta: complex(meta["re"], meta["im"]))
    try:
        out, tree = roundtrip([1 + 2j], store)
        assert out == [1 + 2j] and tree[0]["codec"] == "complex"
    finally:
        unregister_codec("complex")


def test_writable_arrays(store):
    tree = pack(np.arange(4.0), store.put)
    assert not unpack(tree, store.get).flags.writeable
    arr = unpack(tree, store.get, writable=True)
    arr[0] = 9.0
    assert unpack(tree, store.get)[0] == 0.0


def test_missing_and_mismatched_blobs(store):
    tree = pack(np.arange(3), store.put)
    with pytest.raises(IntegrityError, match="reference says"):
        unpack({**tree, "size": tree["size"] + 1}, store.get)
    with pytest.raises(NotFound):
        unpack({**tree, "_blob": "0" * 64}, store.get)


def test_blob_keys_walks_any_document():
    doc = {"a": [{"_blob": "k1", "codec": "npy"}, {"b": {"_blob": "k2"}}], "c": {"_tuple": [{"_blob": "k3"}]},
           "d": "plain", "e": [1, {"x": None}]}
    assert blob_keys(doc) == {"k1", "k2", "k3"}
    assert blob_keys(None) == set()
