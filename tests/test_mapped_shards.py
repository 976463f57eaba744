"""Shards of a trusted local folder: blocks stored as they are (``compression="auto"``), read mapped and checked
whole, columns zero-copy views of the page cache on a cold read and copied into buffers of their own when the
memory cache serves the shard again; every other store, and an explicit choice, compresses as before."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from mlwarehouse.blobs.cache import CachedBlobStore
from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.datasets.items import ItemDatasets
from mlwarehouse.datasets.shardmemory import DecodedShards
from mlwarehouse.datasets.shardwriter import compresses
from mlwarehouse.datasets.wholeshard import Shard
from mlwarehouse.errors import IntegrityError, InvalidDocument

N = 3000  # 3000 x 1 KiB images: shards of about 1.5 MiB, above the size from which reads map


def _columns():
    labels = np.arange(N)
    x = np.zeros((N, 32, 32), np.uint8)
    x[:, 8:24, 8:24] = (labels[:, None, None] + np.arange(16)[None, :, None] + np.arange(16)) % 251
    return {"x": x, "label": labels}


@pytest.fixture
def items(tmp_path):
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path / "wh")
    yield ItemDatasets(wh.project("p"))
    wh.close()


def _shards(ds):
    return [d["shard"] for d in ds.project.find("item_shards", ds._scope(), sort=[("_id", 1)])]


def _flags(ds, key):
    shard = Shard(ds.project.blobs.get(key))
    return {name: layout.flags.tolist() for name, layout in shard.header.fields.items()}


def test_a_local_folder_stores_blocks_as_they_are_and_an_explicit_choice_is_kept(items):
    cols = _columns()
    auto = items.from_arrays("auto", cols, shard_bytes=3 << 20)
    zstd = items.from_arrays("zstd", cols, shard_bytes=3 << 20, compression="zstd")
    assert auto.doc["compression"] == "auto" and zstd.doc["compression"] == "zstd"
    assert all(not any(f) for key in _shards(auto) for f in _flags(auto, key).values())
    assert all(all(f) for key in _shards(zstd) for f in _flags(zstd, key).values())
    assert sum(d["blob"]["size"] for d in items.project.find("item_shards", zstd._scope())) < \
        sum(d["blob"]["size"] for d in items.project.find("item_shards", auto._scope())) / 2
    again = zstd.new_version()  # a new version appends as its source was recorded
    again.append({"x": cols["x"][:1500], "label": cols["label"][:1500]})
    assert again.doc["compression"] == "zstd" and all(all(f) for f in _flags(again, _shards(again)[-1]).values())
    with pytest.raises(InvalidDocument, match="compression must be one of auto, zstd, none"):
        items.create("bad", compression="lz4")


def test_auto_compresses_for_every_store_but_a_trusted_local_folder(tmp_path):
    trusted, untrusted = FileBlobStore(tmp_path / "a", trusted=True), FileBlobStore(tmp_path / "b", trusted=False)
    cached = CachedBlobStore(FileBlobStore(tmp_path / "c"), tmp_path / "cache")  # a remote store's local copies
    assert not compresses("auto", trusted)
    assert compresses("auto", untrusted) and compresses("auto", cached)
    assert compresses("zstd", trusted) and not compresses("none", untrusted)


def test_a_trusted_folder_maps_large_blobs_read_only_and_checks_them(tmp_path):
    import xxhash
    data = os.urandom(2 << 20)
    check = xxhash.xxh3_64_hexdigest(data)
    trusted, untrusted = FileBlobStore(tmp_path / "a", trusted=True), FileBlobStore(tmp_path / "b", trusted=False)
    key = trusted.put(data)
    untrusted.put(data)
    view = trusted.get_buffer(key, xxh3=check, mapped=True)
    assert isinstance(view.obj, mmap.mmap) and view.readonly and view == data
    assert not isinstance(trusted.get_buffer(key, xxh3=check).obj, mmap.mmap)  # only when asked
    assert not isinstance(untrusted.get_buffer(key, mapped=True).obj, mmap.mmap)  # never untrusted
    small = trusted.put(data[:1000])
    assert not isinstance(trusted.get_buffer(small, mapped=True).obj, mmap.mmap)  # under 1 MiB: read
    path = trusted._path(key)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 1
    os.chmod(path, 0o644)
    path.write_bytes(bytes(damaged))
    with pytest.raises(IntegrityError, match="has xxh3"):
        trusted.get_buffer(key, xxh3=check, mapped=True)
    with pytest.raises(IntegrityError, match="hashes to"):
        trusted.get_buffer(key, mapped=True)  # no checksum recorded: its sha256


def test_a_cold_read_is_views_of_the_mapping_and_a_second_one_owns_its_columns(items):
    cols = _columns()
    ds = items.from_arrays("m", cols, shard_bytes=3 << 20)
    memory = DecodedShards(1 << 30)
    got = np.concatenate([b["label"] for b in ds.stream(batch_size=100, seed=1, memory=memory)])
    assert sorted(got.tolist()) == list(range(N))
    held = [shard for shard, _ in memory._shards.values()]
    assert held and all(shard.mapped for shard in held)
    for shard in held:  # zero-copy: the column is the mapped file's bytes
        assert isinstance(shard.data.obj, mmap.mmap)
        assert np.shares_memory(shard.column("x"), np.frombuffer(shard.data, np.uint8))
    for b in ds.stream(batch_size=100, seed=2, memory=memory):
        np.testing.assert_array_equal(b["x"], cols["x"][b["label"]])
    again = [shard for shard, _ in memory._shards.values()]
    assert all(not shard.mapped for shard in again) and not any(a is b for a in again for b in held)
    for shard, size in memory._shards.values():
        assert not np.shares_memory(shard.column("x"), np.frombuffer(shard.data, np.uint8))
        assert size == len(shard.data) + sum(f.raw for f in shard.header.fields.values())  # the copies count
    for b in ds.stream(batch_size=100, seed=3, memory=memory):  # served as they are from now on
        np.testing.assert_array_equal(b["x"], cols["x"][b["label"]])
    assert all(a is b for a, b in zip(again, (s for s, _ in memory._shards.values())))


def test_a_mapped_shard_outlives_the_removal_of_its_file(items):
    cols = _columns()
    ds = items.from_arrays("gone", cols, shard_bytes=3 << 20)
    docs = list(ds.project.find("item_shards", ds._scope(), sort=[("_id", 1)]))
    views = [ds.project.blobs.get_buffer(d["shard"], xxh3=d["xxh3"], mapped=True) for d in docs]
    assert all(isinstance(v.obj, mmap.mmap) for v in views)
    for d in docs:  # as a garbage collection would: unlinked, never changed in place
        os.unlink(ds.project.blobs._path(d["shard"]))
    x = np.concatenate([Shard(v).column("x") for v in views])
    np.testing.assert_array_equal(x, cols["x"])


def test_a_zstd_dataset_maps_its_compressed_bytes_and_decompresses_into_buffers(items):
    cols = _columns()
    ds = items.from_arrays("z", cols, shard_bytes=3 << 20, compression="zstd")
    memory = DecodedShards(1 << 30)
    for b in ds.stream(batch_size=100, seed=1, memory=memory):
        np.testing.assert_array_equal(b["x"], cols["x"][b["label"]])
    for shard, _ in memory._shards.values():
        assert not shard.mapped and shard.in_memory() is shard  # nothing to copy: no column is a view
        assert not np.shares_memory(shard.column("x"), np.frombuffer(shard.data, np.uint8))
