"""The fast stream paths: batches precomputed per epoch, warm epochs without threads or fetches, blocks decoded in
parallel, and every byte still verified (a flipped bit anywhere in a stored shard is an IntegrityError)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from mlwarehouse.datasets.items import ItemDatasets
from mlwarehouse.datasets.shardmemory import DecodedShards
from mlwarehouse.datasets.shards import BLOCK, FieldSpec, build_shard
from mlwarehouse.datasets.stream import batch_order
from mlwarehouse.datasets.wholeshard import Shard
from mlwarehouse.errors import IntegrityError

N = 1200


def _pixels(labels: np.ndarray) -> np.ndarray:
    """Images that say which item they are (and compress: blank borders)."""
    x = np.zeros((len(labels), 24, 24), np.uint8)
    x[:, 6:18, 6:18] = ((labels[:, None] * 7 + np.arange(144)) % 251).reshape(-1, 12, 12)
    return x


@pytest.fixture(params=["auto", "zstd"])
def ds(wh, request):
    """Many small shards; ``k`` is an int in the first append and a float in the second; ``tags`` are JSON and
    ``r`` ragged arrays, so every gather path runs; blocks stored as they are (read mapped) or compressed."""
    items = ItemDatasets(wh.project("p"))
    d = items.create("fast", shard_bytes=1 << 16, compression=request.param)
    for lo, hi, kind in ((0, N // 2, int), (N // 2, N, float)):
        labels = np.arange(lo, hi)
        d.append([{"x": x, "label": int(i), "k": kind(i), "tags": [str(i)], "r": np.arange(i % 4, dtype=np.float32)}
                  for i, x in zip(labels, _pixels(labels))])
    return d.finish()


def _expected(stream, epoch: int) -> list[list[int]]:
    """The labels of each batch of ``epoch`` worked out from the plan alone: the partition's slice of the planned
    order, each batch grouped by shard (:func:`batch_order`)."""
    label_of = {(d["shard"], d["row"]): d["label"] for d in stream.dataset.project.find(
        "items", stream.dataset._scope(), projection={"shard": 1, "row": 1, "label": 1})}
    shard, row = stream._partition(stream.plan(epoch))
    keys = stream.plan(epoch).keys
    labels = np.array([label_of[(keys[s], r)] for s, r in zip(shard.tolist(), row.tolist())], np.int64)
    labels = labels[batch_order(shard, stream.batch_size)]
    return [labels[a:a + stream.batch_size].tolist() for a in range(0, len(labels), stream.batch_size)]


def _check(batch: dict) -> list[int]:
    labels = batch["label"].tolist()
    np.testing.assert_array_equal(batch["x"], _pixels(np.asarray(labels)))
    assert batch["k"].tolist() == labels  # ints from the first append, floats from the second: converted
    assert batch["k"].dtype == (np.float64 if max(labels) >= N // 2 else np.int64)
    assert batch["tags"] == [[str(i)] for i in labels]
    assert [r.tolist() for r in batch["r"]] == [list(range(i % 4)) for i in labels]
    return labels


@pytest.mark.parametrize("options", [
    {"batch_size": 64},
    {"batch_size": 1},
    {"batch_size": 1000, "partition": (1, 3)},
    {"batch_size": 50, "window": 1, "drop_last": True},
    {"batch_size": 77, "shuffle": False, "prefetch": 1, "threads": 1},
])
def test_batches_are_the_planned_items_cold_and_warm(ds, options):
    assert ds.doc["shards"] >= 10
    memory = DecodedShards(1 << 30)
    held = []
    for epochs in (2, 1):  # cold (every shard fetched), then warm (every shard from memory)
        stream = ds.stream(seed=5, epochs=epochs, memory=memory, **options)
        got = [_check(b) for b in stream]
        want = sum((_expected(stream, e) for e in range(epochs)), [])
        assert got == want
        held.append(len(memory))
    assert held[0] == held[1] and 0 < held[0] <= ds.doc["shards"]
    assert held[0] == ds.doc["shards"] or "partition" in options


def test_resuming_and_where_keep_the_order(ds):
    full = [_check(b) for b in ds.stream(batch_size=40, seed=2, epochs=2)]
    stream = ds.stream(batch_size=40, seed=2, epochs=2)
    head = []
    for batch in stream:
        head.append(_check(batch))
        if len(head) == 37:  # inside the second epoch
            break
    rest = [_check(b) for b in ds.stream(batch_size=40, seed=2, epochs=2, state=stream.state())]
    assert head + rest == full
    where = ds.stream({"label": {"$gte": 1000}}, batch_size=16, seed=1, select=lambda i: True)
    assert [_check(b) for b in where] == _expected(where, 0)
    assert sorted(sum(_expected(where, 0), [])) == list(range(1000, N))


class _CountingBlobs:
    def __init__(self, blobs):
        self.blobs, self.gets = blobs, 0

    def get(self, key):
        self.gets += 1
        return self.blobs.get(key)

    def __getattr__(self, name):
        return getattr(self.blobs, name)


def test_warm_epochs_start_no_thread_and_fetch_nothing(ds, monkeypatch):
    counting = _CountingBlobs(ds.project.blobs)
    monkeypatch.setattr(ds.project.warehouse, "blobs", counting)
    memory = DecodedShards(1 << 30)
    list(ds.stream(batch_size=64, memory=memory, fields=["x", "label"]))
    assert counting.gets == ds.doc["shards"]
    for fields in (["x", "label"], ["label"]):  # decoded columns serve any subset
        before, started = set(threading.enumerate()), set()
        for batch in ds.stream(batch_size=64, seed=9, epochs=2, memory=memory, fields=fields):
            started |= set(threading.enumerate()) - before
            assert set(batch) == set(fields)
        assert not any(t.name.startswith("mlw-prefetch") for t in started)
    assert counting.gets == ds.doc["shards"]
    # a field not decoded yet: decoded by a prefetch thread (from memory: no fetch), then kept
    assert sum(len(b["label"]) for b in ds.stream(batch_size=64, memory=memory, fields=["tags", "label"])) == N
    assert counting.gets == ds.doc["shards"]


def _big_columns(n: int = 6000):
    labels = np.arange(n)
    return {"x": _pixels(labels), "label": labels}, {
        "x": FieldSpec("array", "|u1", (24, 24)), "label": FieldSpec("array", "<i8", ())}


def test_blocks_decode_in_parallel_and_a_broken_block_is_an_integrity_error():
    columns, specs = _big_columns()
    data = build_shard(columns, specs)
    shard = Shard(data)
    layout = shard.header.fields["x"]
    assert len(layout.flags) >= 8 and layout.flags.all()  # several compressed blocks: decoded by the pool
    np.testing.assert_array_equal(shard.column("x"), columns["x"])
    for b in (0, len(layout.flags) // 2, len(layout.flags) - 1):
        lo = layout.payload + int(layout.block_offsets[b])
        hi = layout.payload + int(layout.block_offsets[b + 1])
        for garble in (lambda blk: bytes(len(blk)), lambda blk: blk[:4] + bytes(len(blk) - 4)):
            bad = data[:lo] + garble(data[lo:hi]) + data[hi:]
            with pytest.raises(IntegrityError, match="does not decompress"):
                Shard(bad).decode()
    assert layout.raw > 4 * BLOCK


def test_a_forked_child_decodes_with_its_own_pool():
    columns, specs = _big_columns()
    data = build_shard(columns, specs)
    Shard(data).decode()  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: the parent's threads are not here
        try:
            ok = np.array_equal(Shard(data).column("x"), columns["x"])
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_flipped_bit_anywhere_in_a_stored_shard_fails_the_stream(wh):
    items = ItemDatasets(wh.project("p"))
    columns, _ = _big_columns(3000)
    ds = items.from_arrays("flip", columns, shard_bytes=1 << 30)
    key = wh.project("p").find("item_shards", ds._scope())[0]["shard"]
    path = wh.blobs._path(key)
    good = path.read_bytes()
    header = Shard(good).header
    x = header.fields["x"]
    spots = [0, 9, 20, header.size - 1, header.size, x.payload + 1, len(good) // 2, len(good) - 1]
    spots += np.random.default_rng(0).integers(0, len(good), 8).tolist()
    path.chmod(0o644)
    for at in spots:
        bad = bytearray(good)
        bad[at] ^= 1 << (at % 8)
        path.write_bytes(bytes(bad))
        with pytest.raises(IntegrityError):
            list(ds.stream(batch_size=256, memory=0))
    path.write_bytes(good)
    assert sum(len(b["label"]) for b in ds.stream(batch_size=256, memory=0)) == 3000
