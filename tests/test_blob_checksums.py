"""Large blobs carry their xxh3 checksum in their reference: a local folder (trusted) checks it on load instead
of the sha256, an untrusted folder and remote stores check the sha256; damage is an IntegrityError either way, and
a reference whose checksum is not one never weakens the check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash

from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.codecs.treeformat import CHECKSUM_FROM
from mlwarehouse.codecs.values import pack, unpack
from mlwarehouse.errors import IntegrityError
from mlwarehouse.testing.blob_conformance import flip_a_bit


@pytest.fixture
def store(tmp_path):
    return FileBlobStore(tmp_path / "blobs", fsync=False)


def _weights() -> dict:
    g = np.random.default_rng(0)
    return {"big": g.standard_normal(CHECKSUM_FROM // 4 + 10).astype(np.float32),  # stored as it is: no gain
            "tensor": torch.from_numpy(g.standard_normal(CHECKSUM_FROM // 2).astype(np.float32)),
            "small": g.standard_normal(1000).astype(np.float32)}


def _refs(tree) -> dict:
    out, stack = {}, [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "_blob" in node:
                out[node["_blob"]] = node
            else:
                stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_large_blobs_record_their_xxh3_and_small_ones_do_not(store):
    tree = pack(_weights(), store.put)
    refs = _refs(tree)
    large = [r for r in refs.values() if r["size"] >= CHECKSUM_FROM]
    assert len(large) == 2 and all(r["xxh3"] == xxhash.xxh3_64_hexdigest(store.get(r["_blob"])) for r in large)
    assert all("xxh3" not in r for r in refs.values() if r["size"] < CHECKSUM_FROM)
    assert _same(_weights(), unpack(tree, store.get))


def test_a_trusted_folder_checks_the_reference_and_an_untrusted_one_the_sha256(store):
    tree = pack(_weights(), store.put)
    for ref in _refs(tree).values():
        if "xxh3" in ref:
            ref["xxh3"] = "0" * 16  # a checksum the bytes do not have: only the xxh3 path can notice
    with pytest.raises(IntegrityError, match="xxh3"):
        unpack(tree, store.get)
    store.trusted = False
    assert _same(_weights(), unpack(tree, store.get))


@pytest.mark.parametrize("trusted, says", [(True, "xxh3"), (False, "hashes to")])
def test_damaged_bytes_are_refused_whichever_check_reads_them(store, trusted, says):
    tree = pack(_weights(), store.put)
    store.trusted = trusted
    flip_a_bit(store, next(r["_blob"] for r in _refs(tree).values() if "xxh3" in r))
    with pytest.raises(IntegrityError, match=says):
        unpack(tree, store.get)


@pytest.mark.parametrize("recorded", [12345, "ABCDEF0123456789", "0123", None, {"x": 1}])
def test_a_reference_whose_checksum_is_not_one_is_read_by_its_sha256(store, recorded):
    tree = pack(_weights(), store.put)
    ref = next(r for r in _refs(tree).values() if "xxh3" in r)
    ref["xxh3"] = recorded
    assert _same(_weights(), unpack(tree, store.get))
    flip_a_bit(store, ref["_blob"])
    with pytest.raises(IntegrityError, match="hashes to"):
        unpack(tree, store.get)


def test_decoders_never_see_the_checksum(store):
    seen = []

    def decode(data, meta):
        seen.append(dict(meta))
        return bytes(data)

    tree = pack({"b": np.zeros(CHECKSUM_FROM, np.uint8).tobytes() + b"x"}, store.put, compress_blobs=False)
    assert "xxh3" in next(iter(_refs(tree).values()))
    unpack(tree, store.get, decode=decode)
    assert seen and all("xxh3" not in m and "size" not in m for m in seen)


def test_a_model_checkpoint_loads_through_the_checksum_and_refuses_damage(wh):
    weights = {"w": torch.randn(600, 600), "b": torch.randn(600)}  # 1.4 MB: one blob with a checksum
    wh.models.checkpoint(weights, epoch=1, name="ck")
    loaded = wh.models.load("ck", checkpoints=True)
    assert torch.equal(loaded["w"], weights["w"]) and torch.equal(loaded["b"], weights["b"])
    doc = wh.project().find_one("models", {"name": "ck"})
    big = [r for r in _refs(doc).values() if r.get("size", 0) >= CHECKSUM_FROM]
    assert big and all(r["xxh3"] == xxhash.xxh3_64_hexdigest(wh.blobs.get(r["_blob"])) for r in big)
    flip_a_bit(wh.blobs, big[0]["_blob"])
    with pytest.raises(IntegrityError, match="xxh3"):
        wh.models.load("ck", checkpoints=True)
