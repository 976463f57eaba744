"""Streams: order, determinism, resume, partitions, infinite mode, transforms and empty selections."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mlwarehouse.datasets.items import ItemDatasets
from mlwarehouse.datasets.shardmemory import MEMORY, DecodedShards
from mlwarehouse.datasets.stream import TransformError
from mlwarehouse.errors import IntegrityError, QueryError

N = 1000


@pytest.fixture
def ds(wh):
    x = np.arange(N, dtype=np.int64).repeat(64).reshape(N, 64)  # row i holds i: checks data follows labels
    return ItemDatasets(wh.project("p")).from_arrays("s", {"x": x, "label": np.arange(N)}, shard_bytes=1 << 16)


def labels(stream) -> list[int]:
    out = []
    for batch in stream:
        assert (batch["x"][:, 0] == batch["label"]).all() and (batch["x"] == batch["x"][:, :1]).all()
        out.extend(batch["label"].tolist())
    return out


def planned_labels(stream, epoch: int = 0) -> list[int]:
    """The labels of the plan's order (labels are insertion numbers, shards are in insertion order)."""
    counts = [d["count"] for d in stream.dataset.project.find("item_shards", stream.dataset._scope(),
                                                               sort=[("_id", 1)])]
    plan = stream.plan(epoch)
    return (np.concatenate([[0], np.cumsum(counts)[:-1]])[plan.shard] + plan.row).tolist()


def test_every_item_once_shuffled_and_deterministic(ds):
    assert ds.doc["shards"] >= 5
    a = labels(ds.stream(batch_size=64, seed=3))
    assert sorted(a) == list(range(N)) and a != list(range(N))
    assert a == labels(ds.stream(batch_size=64, seed=3))
    plan = planned_labels(ds.stream(batch_size=17, seed=3))
    assert plan == planned_labels(ds.stream(batch_size=64, seed=3))  # the plan depends on (seed, epoch) only
    b = [batch["label"].tolist() for batch in ds.stream(batch_size=17, seed=3)]
    assert [sorted(x) for x in b] == [sorted(plan[i:i + 17]) for i in range(0, N, 17)]  # a batch: its slice
    assert a != labels(ds.stream(batch_size=64, seed=4))
    two = labels(ds.stream(batch_size=64, seed=3, epochs=2))
    assert two[:N] == a and sorted(two[N:]) == list(range(N)) and two[N:] != a
    assert labels(ds.stream(batch_size=100, shuffle=False)) == list(range(N))


def test_partitions_split_without_repeats(ds):
    parts = [labels(ds.stream(batch_size=32, seed=1, partition=(i, 8))) for i in range(8)]
    assert sorted(sum(parts, [])) == list(range(N))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_resume_mid_epoch_yields_exactly_the_rest(ds):
    stream = ds.stream(batch_size=50, seed=9, epochs=2)
    full = labels(ds.stream(batch_size=50, seed=9, epochs=2))
    seen = []
    for i, batch in enumerate(stream):
        seen.extend(batch["label"].tolist())
        if i == 26:  # inside the second epoch
            break
    state = stream.state()
    assert state["epoch"] == 1 and state["position"] == 350
    ds.refresh()
    rest = labels(ds.stream(batch_size=50, seed=9, epochs=2, state=state))
    assert seen + rest == full
    with pytest.raises(QueryError, match="seed"):
        ds.stream(seed=1, state=state)


def test_where_selects_and_empty_selection_ends(ds):
    got = labels(ds.stream({"label": {"$lt": 100}}, batch_size=30))
    assert sorted(got) == list(range(100))
    assert labels(ds.stream({"label": -1})) == []
    assert labels(ds.stream({"label": -1}, epochs=None)) == []  # finished version: nothing can come


def test_infinite_stream_sees_appended_items(wh):
    items = ItemDatasets(wh.project("p"))
    ds = items.create("live")
    ds.append({"x": np.zeros((20, 4), np.float32), "label": np.zeros(20, np.int64)})
    seen = []
    for batch in ds.stream(batch_size=8, epochs=None, poll=0.05):
        seen.extend(batch["label"].tolist())
        if len(seen) == 16:
            ds.append({"x": np.ones((5, 4), np.float32), "label": np.ones(5, np.int64)})
        if 1 in seen:
            break
        assert len(seen) < 200
    assert seen.count(1) >= 1


def test_infinite_stream_waits_for_first_items(wh):
    ds = ItemDatasets(wh.project("p")).create("empty-now")
    timer = threading.Timer(0.3, lambda: ItemDatasets(wh.project("p")).get("empty-now").append(
        [{"v": np.zeros(3), "label": 5}]))
    timer.start()
    t0 = time.monotonic()
    batch = next(iter(ds.stream(epochs=None, poll=0.05)))
    assert batch["label"].tolist() == [5] and time.monotonic() - t0 < 5
    timer.join()


def test_transform_and_its_errors(ds):
    def double(item):
        return {"x": item["x"] * 2, "label": item["label"]}
    batch = next(iter(ds.stream(batch_size=10, transform=double)))
    assert (batch["x"][:, 0] == 2 * batch["label"]).all()

    def fail_on_7(item):
        if item["label"] == 7:
            raise ValueError("bad pixel")
        return item
    with pytest.raises(TransformError, match="bad pixel") as info:
        labels(ds.stream(batch_size=10, transform=fail_on_7))
    assert ds.item(info.value.item_id)["label"] == 7
    assert isinstance(info.value.__cause__, ValueError)


def test_bad_options(ds):
    with pytest.raises(QueryError):
        ds.stream(batch_size=0)
    with pytest.raises(QueryError):
        ds.stream(partition=(2, 2))
    with pytest.raises(QueryError, match="no field"):
        ds.stream(fields=["nope"])
    assert set(next(iter(ds.stream(fields=["label"])))) == {"label"}


def test_stream_through_s3_with_a_bounded_cache(s3_server, tmp_path):
    from mlwarehouse.blobs.s3 import S3BlobStore
    from mlwarehouse.datasets.shardcache import ShardCache
    from mlwarehouse.index.sqlite import SQLiteIndex
    from mlwarehouse.warehouse import Warehouse
    store = S3BlobStore(s3_server["uri"].replace("s3://mlw-test", "s3://mlw-test/stream-test"),
                        access_key=s3_server["access_key"], secret_key=s3_server["secret_key"])
    with Warehouse(SQLiteIndex(tmp_path / "i.sqlite"), store) as wh:
        x = np.arange(300, dtype=np.int64).repeat(64).reshape(300, 64)
        ds = ItemDatasets(wh.project("p")).from_arrays("s3", {"x": x, "label": np.arange(300)}, shard_bytes=1 << 16)
        cache = ShardCache(tmp_path / "cache", max_bytes=100_000)
        assert sorted(labels(ds.stream(batch_size=32, cache=cache, memory=0))) == list(range(300))
        assert 0 < cache.used_bytes() <= 100_000 and cache.stats.misses == ds.doc["shards"]
        assert sorted(labels(ds.stream(batch_size=32, cache=cache, seed=2, memory=0))) == list(range(300))
        assert cache.stats.hits >= 1 and cache.used_bytes() <= 100_000
        assert ds.find({"label": 123})[0].load()["x"][0] == 123  # a range read from S3, checksum verified


class _CountingBlobs:
    """Delegates to a blob store and counts whole-blob reads."""

    def __init__(self, blobs):
        self.blobs, self.gets = blobs, 0

    def get(self, key):
        self.gets += 1
        return self.blobs.get(key)

    def __getattr__(self, name):
        return getattr(self.blobs, name)


def test_memory_cache_is_bounded_and_spares_later_epochs_the_fetch(ds, monkeypatch):
    memory = DecodedShards(1 << 30)
    counting = _CountingBlobs(ds.project.blobs)
    monkeypatch.setattr(ds.project.warehouse, "blobs", counting)
    assert sorted(labels(ds.stream(batch_size=64, seed=5, memory=memory))) == list(range(N))
    assert counting.gets == ds.doc["shards"] == len(memory) and memory.used_bytes > 0
    assert sorted(labels(ds.stream(batch_size=64, seed=6, epochs=2, memory=memory))) == sorted(list(range(N)) * 2)
    assert counting.gets == ds.doc["shards"]  # later epochs: decoded shards from memory, no fetch, no hashing
    bound = memory.used_bytes // 3
    memory.resize(bound)
    assert 0 < memory.used_bytes <= bound
    assert sorted(labels(ds.stream(batch_size=64, seed=7, memory=memory))) == list(range(N))
    assert memory.used_bytes <= bound and counting.gets > ds.doc["shards"]
    gets = counting.gets
    assert sorted(labels(ds.stream(batch_size=64, seed=7, memory=0))) == list(range(N))  # none: every shard fetched
    assert counting.gets == gets + ds.doc["shards"]
    memory.resize(0)
    assert memory.used_bytes == 0 and len(memory) == 0
    with pytest.raises(QueryError):
        memory.resize(-1)
    with pytest.raises(QueryError):
        ds.stream(memory=-5)


def test_versions_share_the_process_wide_memory_cache(ds):
    MEMORY.resize(0)
    MEMORY.resize(1 << 30)
    list(ds.stream(batch_size=100))
    held = len(MEMORY)
    assert held == ds.doc["shards"]
    v2 = ds.new_version(exclude={"label": {"$lt": 10}})
    v2.finish()
    assert sorted(labels(v2.stream(batch_size=100))) == list(range(10, N))
    assert len(MEMORY) == held  # its shards are the same blobs: cached once, read from memory


def test_cached_values_are_read_only(ds):
    def mutate(item):
        item["x"][0] = -1  # would change the cached shard for every later reader
        return item
    with pytest.raises(TransformError, match="read-only"):
        next(iter(ds.stream(batch_size=4, transform=mutate)))
    batch = next(iter(ds.stream(batch_size=4, seed=2)))
    batch["x"][:] = -1  # batches are the caller's own arrays
    assert sorted(labels(ds.stream(batch_size=64, seed=2))) == list(range(N))


def test_an_index_row_beyond_its_shard_is_an_integrity_error(ds):
    assert ds.project.update("items", ds._scope({"label": 7}), {"$set": {"row": 10**6}}) == 1
    with pytest.raises(IntegrityError, match="row 1000000"):
        list(ds.stream(where={"label": {"$lt": 20}}, batch_size=8))


def test_values_are_the_callers_own_and_mixed_appends_stack(wh):
    ds = ItemDatasets(wh.project("p")).create("mixed")
    ds.append([{"tags": ["a"], "label": 1, "empty": np.zeros((2, 0))} for _ in range(5)])
    ds.append([{"tags": ["b"], "label": 2.5, "empty": np.zeros((2, 0))} for _ in range(5)])
    ds.finish()
    for batch in ds.stream(batch_size=10, memory=DecodedShards(1 << 20), epochs=2):
        assert sorted(batch["label"].tolist()) == [1] * 5 + [2.5] * 5 and batch["label"].dtype == np.float64
        assert batch["empty"].shape == (10, 2, 0)
        assert sorted(t[0] for t in batch["tags"]) == ["a"] * 5 + ["b"] * 5  # unchanged by the last epoch
        for tags in batch["tags"]:
            tags.append("mine")  # the caller's own list: the cached shard keeps its own


def test_drop_last_holds_after_resuming_with_another_batch_size(ds):
    stream = ds.stream(batch_size=64, seed=1, drop_last=True)
    it = iter(stream)
    first = [next(it)["label"].tolist() for _ in range(3)]
    rest = [b["label"].tolist() for b in ds.stream(batch_size=30, seed=1, drop_last=True, state=stream.state())]
    assert all(len(b) == 30 for b in rest) and len(rest) == (N - 3 * 64) // 30
    assert not set(sum(first, [])) & set(sum(rest, []))


def test_negative_rows_and_bad_numbers_are_refused(ds):
    for bad in ({"seed": -1}, {"epoch": -2}, {"batch_size": True}, {"batch_size": 0}):
        with pytest.raises(QueryError):
            ds.stream(**bad)
    ds.project.update("items", ds._scope({"label": 3}), {"$set": {"row": -1}})
    with pytest.raises(IntegrityError, match="row -1"):
        list(ds.stream(where={"label": {"$lt": 10}}))
