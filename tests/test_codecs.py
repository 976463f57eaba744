"""Leaf codecs: exact round trips, no pickle unless allowed, user codecs, compression decisions."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import pickle
import struct
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
import torch
import zstandard

from mlwarehouse import codecs
from mlwarehouse.codecs import decode_leaf, encode_leaf, register_codec, unregister_codec
from mlwarehouse.errors import CodecError, PickleNotAllowed


def roundtrip(value, **kwargs):
    allow = kwargs.pop("allow_pickle", False)
    data, meta = encode_leaf(value, allow_pickle=allow)
    json.dumps(meta)  # meta must be JSON for the blob reference
    return decode_leaf(data, meta, allow_pickle=allow, **kwargs), meta


def assert_same_array(a, b):
    assert type(a) is type(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fcmM")


ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(3.5),                                   # 0-d
    np.zeros((0, 5), dtype=np.int16),               # empty
    np.asfortranarray(np.arange(6).reshape(2, 3)),
    np.arange(20)[::3],                             # not contiguous
    np.array([1, 2, 3], dtype=">u4"),               # big-endian
    np.array(["ab", "ĉd"]),
    np.array([b"x", b"yz"]),
    np.array([True, False]),
    np.array([1 + 2j, np.nan], dtype=np.complex64),
    np.array(["2024-01-02", "NaT"], dtype="datetime64[s]"),
    np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
    np.full(10_000, 7, dtype=np.uint8),             # compressible
]


@pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: f"{a.dtype}-{a.shape}")
def test_npy_roundtrip(arr):
    out, meta = roundtrip(arr)
    assert meta["codec"] == "npy"
    assert_same_array(out, arr)
    fortran_only = arr.flags.f_contiguous and not arr.flags.c_contiguous
    assert out.flags.f_contiguous if fortran_only else out.flags.c_contiguous


def test_npy_scalars_keep_their_dtype():
    for value in (np.complex128(1 - 1j), np.float16(0.5), np.datetime64("2020-01-01"), np.int8(-3)):
        out, _ = roundtrip(value)
        assert type(out) is type(value) and out == value


@pytest.mark.parametrize("payload", [np.arange(100.0), np.zeros(100_000)], ids=["raw", "compressed"])
def test_arrays_are_read_only_views_unless_writable(payload):
    data, meta = encode_leaf(payload)
    assert ("z" in meta) == (payload.size == 100_000)
    frozen = decode_leaf(bytes(data), meta)
    assert not frozen.flags.writeable
    with pytest.raises(ValueError):
        frozen[0] = 1
    thawed = decode_leaf(bytes(data), meta, writable=True)
    thawed[0] = 1
    assert thawed[0] == 1


def test_npy_decode_is_zero_copy_over_writable_buffers():
    data, meta = encode_leaf(np.arange(10.0), compress_payload=False)
    buf = bytearray(data)
    arr = decode_leaf(buf, meta, writable=True)
    arr[0] = 42.0
    assert decode_leaf(buf, meta)[0] == 42.0


def test_object_arrays_need_pickle_both_ways():
    arr = np.array([{"a": 1}, None], dtype=object)
    with pytest.raises(PickleNotAllowed, match="object"):
        encode_leaf(arr)
    out, meta = roundtrip(arr, allow_pickle=True)
    assert meta["codec"] == "pickle" and out.tolist() == arr.tolist()
    data, meta = encode_leaf(arr, allow_pickle=True)
    with pytest.raises(PickleNotAllowed, match="allow_pickle=True"):
        decode_leaf(data, meta)


def test_npy_refuses_object_payloads_and_garbage():
    data, meta = encode_leaf(np.arange(3), compress_payload=False)
    with pytest.raises(CodecError, match="magic"):
        decode_leaf(b"garbage payload", meta)
    with pytest.raises(CodecError, match="data bytes"):
        decode_leaf(bytes(data)[:-1], meta)
    buf = io.BytesIO()
    np.save(buf, np.array([1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(CodecError, match="never unpickles"):
        decode_leaf(buf.getvalue(), {"codec": "npy"})


@pytest.mark.parametrize("t", [
    torch.randn(4, 3, dtype=torch.bfloat16),
    torch.randn(5).to(torch.float8_e4m3fn),
    torch.tensor(2.5, dtype=torch.float16),
    torch.zeros(0, 3),
    torch.tensor([True, False]),
    torch.randn(3, dtype=torch.complex64),
    torch.arange(12).reshape(3, 4).t(),  # not contiguous
    torch.randn(2, 2, dtype=torch.complex64).conj(),
])
def test_tensor_roundtrip(t):
    out, meta = roundtrip(t)
    assert meta["codec"] == "tensor"
    assert isinstance(out, torch.Tensor) and out.dtype == t.dtype and out.shape == t.shape
    bits = lambda x: x.resolve_conj().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731 (exact, NaN too)
    assert torch.equal(bits(out), bits(t))
    out[...] = 0  # tensors are writable: the decoder copies out of read-only buffers


def test_tensor_keeps_requires_grad():
    out, _ = roundtrip(torch.nn.Parameter(torch.ones(2)))
    assert out.requires_grad and torch.equal(out.detach(), torch.ones(2))


def test_sparse_tensors_fall_back_to_pickle_only_when_allowed():
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(PickleNotAllowed):
        encode_leaf(sparse)
    out, meta = roundtrip(sparse, allow_pickle=True)
    assert meta["codec"] == "pickle" and torch.equal(out.to_dense(), torch.eye(3))


def test_safetensors_state_dicts_keep_kind_and_order():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    sd = model.state_dict()
    out, meta = roundtrip(sd)
    assert meta == {"codec": "safetensors", "kind": "torch"}
    assert list(out) == list(sd)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    arrays = {"z": np.arange(3, dtype=np.int64), "a": np.ones((2, 2), np.float16), "m": np.array(1.0)}
    out, meta = roundtrip(arrays)
    assert meta["kind"] == "numpy" and list(out) == ["z", "a", "m"]
    for k in arrays:
        assert_same_array(out[k], arrays[k])


def test_safetensors_handles_tied_weights():
    w = torch.randn(3, 3)
    out, _ = roundtrip({"enc.weight": w, "dec.weight": w})
    assert torch.equal(out["enc.weight"], w) and torch.equal(out["dec.weight"], w)


def test_mixed_dicts_are_not_safetensors():
    _, meta = roundtrip({"a": 1, "b": [1, 2]})
    assert meta["codec"] == "json"
    with pytest.raises(PickleNotAllowed):
        encode_leaf({"a": np.arange(2), "b": torch.ones(1)})


def test_bytes_and_json():
    for value in (b"\x00\x01", bytearray(b"ab"), b""):
        out, meta = roundtrip(value)
        assert meta["codec"] == "bytes" and type(out) is type(value) and out == value
    out, _ = roundtrip(memoryview(b"view"))
    assert out == b"view"
    doc = {"a": [1, 2.5, None, True, "é"], "b": {"c": []}}
    out, meta = roundtrip(doc)
    assert meta["codec"] == "json" and out == doc


def test_unknown_types_need_pickle_and_the_message_says_so():
    when = dt.datetime(2024, 5, 1, 12, 0)
    with pytest.raises(PickleNotAllowed) as err:
        encode_leaf(when)
    assert "datetime" in str(err.value) and "allow_pickle=True" in str(err.value)
    out, meta = roundtrip(when, allow_pickle=True)
    assert out == when and meta["type"] == "datetime.datetime"


def test_pickle_refused_on_decode_without_allow_pickle():
    data = pickle.dumps(Fraction(1, 3))
    with pytest.raises(PickleNotAllowed, match="fractions.Fraction"):
        decode_leaf(data, {"codec": "pickle", "type": "fractions.Fraction"})
    assert decode_leaf(data, {"codec": "pickle"}, allow_pickle=True) == Fraction(1, 3)


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


@pytest.fixture
def point_codec():
    register_codec("point", Point, lambda p: (f"{p.x},{p.y}".encode(), {"v": 1}),
                   lambda data, meta: Point(*map(float, bytes(data).split(b","))))
    yield
    unregister_codec("point")


def test_user_codec_roundtrip(point_codec):
    out, meta = roundtrip(Point(1.5, -2))
    assert meta == {"codec": "point", "v": 1}
    assert isinstance(out, Point) and (out.x, out.y) == (1.5, -2.0)
    assert codecs.codec_names()[0] == "point"


def test_user_codec_with_predicate_beats_builtins():
    register_codec("tiny", lambda v: isinstance(v, np.ndarray) and v.size == 1,
                   lambda a: a.tobytes(), lambda data, meta: np.frombuffer(bytes(data), np.float64))
    try:
        _, meta = roundtrip(np.array([1.0]))
        assert meta["codec"] == "tiny"
        _, meta = roundtrip(np.array([1.0, 2.0]))
        assert meta["codec"] == "npy"
    finally:
        unregister_codec("tiny")


def test_registry_errors(point_codec):
    with pytest.raises(CodecError, match="already registered"):
        register_codec("point", Point, bytes, bytes)
    with pytest.raises(CodecError, match="unknown codec 'nope'"):
        decode_leaf(b"", {"codec": "nope"})
    with pytest.raises(CodecError, match="no codec named"):
        unregister_codec("nope")
    register_codec("badmeta", complex, lambda c: (b"", {"codec": "x"}), lambda d, m: 0)
    try:
        with pytest.raises(CodecError, match="bad meta"):
            encode_leaf(1j)
    finally:
        unregister_codec("badmeta")


def test_compression_skipped_for_random_bytes_and_small_payloads():
    data, meta = encode_leaf(os.urandom(200_000))
    assert "z" not in meta and len(data) == 200_000
    data, meta = encode_leaf(b"a" * 4000)
    assert "z" not in meta
    big_random = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    _, meta = encode_leaf(big_random)  # probed, not compressed
    assert "z" not in meta


def test_compression_applied_when_it_pays():
    value = b"abcd" * 10_000
    data, meta = encode_leaf(value)
    assert meta["z"] == "zstd" and meta["raw"] == 40_000 and len(data) < 4000
    assert decode_leaf(data, meta) == value
    with pytest.raises(CodecError, match="raw size"):
        decode_leaf(data, {"codec": "bytes", "z": "zstd"})
    with pytest.raises(CodecError):
        decode_leaf(bytes(data)[:-3], meta)
    with pytest.raises(CodecError, match="compression"):
        decode_leaf(data, {**meta, "z": "lz4"})


def test_array_subclasses_are_not_silently_plain_arrays():
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    with pytest.raises(PickleNotAllowed, match="MaskedArray"):
        encode_leaf(masked)


def test_a_raw_size_that_disagrees_with_the_zstd_frame_is_refused_before_allocating():
    data, meta = codecs.compress(np.zeros(100_000, np.uint8).tobytes())
    assert meta["raw"] == 100_000
    for lie in (10, 1 << 46):
        with pytest.raises(CodecError, match="zstd frame says 100000"):
            codecs.decompress(data, {**meta, "raw": lie})


def test_a_frame_without_content_size_never_allocates_what_the_reference_claims():
    blob = zstandard.ZstdCompressor(write_content_size=False).compress(b"x")
    assert zstandard.frame_content_size(blob) == -1 and len(blob) < 16
    tracemalloc.start()
    try:
        for claim in (6 << 30, 1 << 46):  # over what the bytes can hold: refused before any allocation
            with pytest.raises(CodecError, match="can hold"):
                codecs.decompress(blob, {"z": "zstd", "raw": claim})
            with pytest.raises(CodecError):
                decode_leaf(blob, {"codec": "bytes", "z": "zstd", "raw": claim})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    big = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 3_000_000)
    tracemalloc.start()
    try:  # a claim within the bound but above the frame's real size: streamed, capped, refused
        with pytest.raises(CodecError, match="does not hold"):
            codecs.decompress(big, {"z": "zstd", "raw": codecs.registry.max_decompressed(len(big))})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000 + (4 << 20)
    assert codecs.decompress(big, {"z": "zstd", "raw": 3_000_000}) == b"\0" * 3_000_000
    for lie in (2_999_999, 3_000_001):
        with pytest.raises(CodecError, match="does not hold"):
            codecs.decompress(big, {"z": "zstd", "raw": lie})


def test_a_frame_that_claims_more_than_zstd_can_expand_is_refused():
    data, meta = codecs.compress(np.zeros(1 << 20, np.uint8).tobytes())
    assert meta["raw"] <= codecs.registry.max_decompressed(len(data))  # real data is always within the bound
    forged = zstandard_frame_with_size(6 << 30)  # the frame and the reference agree on 6 GiB: both lie
    with pytest.raises(CodecError, match="can hold"):
        codecs.decompress(forged, {"z": "zstd", "raw": 6 << 30})


def zstandard_frame_with_size(size: int) -> bytes:
    """A 13-byte zstd frame whose header claims ``size`` bytes (single segment, 8-byte content size)."""
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", size)
