"""Recycled decode buffers: reused only once nothing refers to them, bounded, and used by shard reads."""

import gc

import numpy as np
import pytest

from mlwarehouse.blobs.common import read_buffer
from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.datasets.recycled import RECYCLE_FROM, RecycledBuffers
from mlwarehouse.testing.blob_conformance import flip_a_bit

MB = 1 << 20


def test_a_buffer_comes_back_only_once_its_last_view_is_gone():
    pool = RecycledBuffers()
    a = pool.take(3 * MB)
    address = a.ctypes.data
    view = a[10:20].view(np.uint16).reshape(5)  # views of views keep the lease
    as_bytes = memoryview(a)
    del a
    other = pool.take(3 * MB)  # the first is still referred to: a new block
    assert pool.free_bytes == 0 and other.ctypes.data != address
    del view
    assert pool.free_bytes == 0
    del as_bytes
    assert pool.free_bytes == 3 * MB
    again = pool.take(3 * MB)
    assert again.ctypes.data == address and pool.reused == 1 and pool.free_bytes == 0
    del other
    assert pool.free_bytes == 3 * MB
    assert again.flags.writeable and again.nbytes == 3 * MB


def test_values_held_by_a_caller_never_change_while_buffers_are_reused():
    pool = RecycledBuffers()
    kept = pool.take(2 * MB)
    kept[:] = 7
    column = np.frombuffer(memoryview(kept), np.uint8)  # how a shard's column refers to its buffer
    del kept
    for fill in range(5):
        other = pool.take(2 * MB)
        other[:] = fill
        del other
    assert (column == 7).all()


def test_sizes_fit_loosely_and_small_buffers_are_not_pooled():
    pool = RecycledBuffers()
    big = pool.take(16 * MB + 5)
    del big
    assert pool.free_bytes == 17 * MB  # capacities are whole MiB
    assert pool.take(2 * MB).base is not None and pool.reused == 0  # too small to use a 17 MiB block
    reused = pool.take(15 * MB)  # within a quarter: takes it
    assert pool.reused == 1 and reused.nbytes == 15 * MB
    small = pool.take(RECYCLE_FROM - 1)
    assert small.flags.owndata  # numpy's own allocator


def test_free_bytes_are_bounded_oldest_let_go_first():
    pool = RecycledBuffers(max_free=5 * MB)
    first, second, third = pool.take(2 * MB), pool.take(2 * MB), pool.take(2 * MB)
    addresses = [b.ctypes.data for b in (first, second, third)]
    del first, second, third
    gc.collect()
    assert pool.free_bytes == 4 * MB
    left = {pool.take(2 * MB).ctypes.data, pool.take(2 * MB).ctypes.data}
    assert left == set(addresses[1:])
    huge = RecycledBuffers(max_free=MB).take(2 * MB)
    del huge  # larger than the bound: simply freed


def test_a_lease_ended_inside_the_pool_drops_its_block_without_deadlock():
    pool = RecycledBuffers()
    held = pool.take(2 * MB)
    pool._busy = True  # as inside take's critical section, where a collection may end a lease
    del held
    pool._busy = False
    assert pool.free_bytes == 0


@pytest.fixture
def store(tmp_path):
    return FileBlobStore(tmp_path / "blobs", fsync=False)


def test_read_buffer_reads_into_the_callers_buffer_and_still_verifies(store, tmp_path):
    from mlwarehouse.errors import IntegrityError
    data = np.arange(3 * MB, dtype=np.uint8).tobytes()
    key = store.put(data)
    pool = RecycledBuffers()
    got = read_buffer(store, key, allocate=pool.take)
    assert bytes(got) == data and isinstance(got, memoryview) and got.obj is not None
    del got
    assert pool.free_bytes == 3 * MB
    flip_a_bit(store, key)
    with pytest.raises(IntegrityError):
        read_buffer(store, key, allocate=pool.take)


def test_read_buffer_works_with_stores_of_the_older_signature_and_duck_stores(store):
    key = store.put(b"x" * 100)

    class Older(FileBlobStore):
        def get_buffer(self, key, size=None):
            self.called = True
            return super().get_buffer(key, size)

    older = Older(store.root, fsync=False)
    assert bytes(read_buffer(older, key, allocate=RecycledBuffers().take)) == b"x" * 100 and older.called

    class OnlyGet:
        def get(self, key):
            return store.get(key)

    assert read_buffer(OnlyGet(), key, allocate=RecycledBuffers().take) == b"x" * 100


def _shards_alive() -> int:
    from mlwarehouse.datasets.wholeshard import Shard
    gc.collect()
    return sum(isinstance(o, Shard) for o in gc.get_objects())


def test_a_stream_without_a_memory_cache_keeps_no_shard_alive_and_decodes_into_recycled_buffers(wh):
    from mlwarehouse.datasets.items import ItemDatasets
    from mlwarehouse.datasets.recycled import RECYCLED
    n = 6000
    x = np.random.default_rng(0).integers(0, 4, (n, 28, 28), np.uint8)  # compresses: decoded into buffers
    ds = ItemDatasets(wh.project("p")).from_arrays("r", {"x": x, "label": np.arange(n)}, shard_bytes=1600 << 10,
                                                      compression="zstd")
    assert ds.doc["shards"] >= 3
    kept = []

    def keep(item):  # a transform sees read-only views of the decoded shard: one kept here outlives it
        if not kept:
            kept.append((item["label"], item["x"]))
        return item

    others = _shards_alive()  # other tests' shards in the process's memory cache, which these streams skip
    list(ds.stream(batch_size=500, seed=1, memory=0, transform=keep))
    assert _shards_alive() == others  # the prefetch threads let go of the last shards they decoded
    before = RECYCLED.reused
    for seed in (2, 3):
        got = np.concatenate([b["label"] for b in ds.stream(batch_size=500, seed=seed, memory=0, threads=2)])
        assert sorted(got.tolist()) == list(range(n))
        assert _shards_alive() == others
    assert RECYCLED.reused > before  # later decodes wrote into buffers the earlier shards gave back
    label, view = kept[0]
    assert not view.flags.writeable and np.array_equal(view, x[label])  # never written over while held
    for b in ds.stream(batch_size=500, seed=4, memory=0):
        assert np.array_equal(b["x"], x[b["label"]])
