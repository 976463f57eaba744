"""Datasets: save any array/tuple/dict of arrays with fields, versions, top-by-sort, find, delete with blobs."""

from __future__ import annotations

import numpy as np
import pytest

from mlwarehouse import DuplicateKey, InvalidDocument, NotFound, PickleNotAllowed, QueryError


def test_round_trip_of_structures(wh):
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.array([1, 0, 1], dtype=np.int64)
    wh.datasets.save((X, y), "toy", description="tiny", tags=["a", "b"], source="test", rows=3)
    X2, y2 = wh.datasets.load("toy")
    assert np.array_equal(X2, X) and X2.dtype == np.float32 and np.array_equal(y2, y)
    nested = {"train": (X, y), "meta": {"classes": ["neg", "pos"], "n": 3}, "raw": b"\x00\x01"}
    wh.datasets.save(nested, "nested")
    back = wh.datasets.load("nested")
    assert isinstance(back["train"], tuple) and np.array_equal(back["train"][0], X)
    assert back["meta"] == {"classes": ["neg", "pos"], "n": 3} and back["raw"] == b"\x00\x01"
    record = wh.datasets.get("toy")
    assert record.description == "tiny" and record.tags == ["a", "b"] and record.rows == 3
    assert record.project == "default" and record.time.endswith("Z") and len(record.id) == 26


def test_versions_top_by_sort_and_find(wh):
    for i in range(3):
        wh.datasets.save(np.full(4, i), "d", quality=10 - i)
    assert [r.version for r in wh.datasets.find("d")] == [3, 2, 1]  # newest first
    assert wh.datasets.load("d")[0] == 2
    assert wh.datasets.load("d", sort=[("quality", -1)])[0] == 0
    assert wh.datasets.load("d", version=2)[0] == 1
    assert [r.version for r in wh.datasets.find(where={"quality": {"$lte": 9}})] == [3, 2]
    wh.datasets.save(np.zeros(1), "d", version="gold")
    assert wh.datasets.get("d", version="gold").version == "gold"
    with pytest.raises(DuplicateKey, match="immutable"):
        wh.datasets.save(np.ones(1), "d", version="gold")
    assert wh.datasets.names() == ["d"]


def test_projects_are_isolated(wh):
    wh.project("a").datasets.save(np.zeros(2), "x")
    with pytest.raises(NotFound, match="project 'b'"):
        wh.project("b").datasets.load("x")
    assert wh.projects() == ["a"]


def test_delete_removes_blobs_only_used_by_deleted_versions(wh):
    shared = np.arange(1000, dtype=np.float64)
    own = np.random.default_rng(0).random(1000)
    wh.datasets.save((shared, own), "one")
    wh.datasets.save((shared,), "two")
    before = {b.key for b in wh.blobs.list()}
    assert len(before) == 2
    assert wh.datasets.delete("one") == 1
    after = {b.key for b in wh.blobs.list()}
    assert len(after) == 1  # `own` is gone; `shared` is still used by "two"
    assert np.array_equal(wh.datasets.load("two")[0], shared)
    assert wh.datasets.delete("two") == 1
    assert list(wh.blobs.list()) == []
    assert wh.datasets.delete("two") == 0


def test_bad_input_is_typed_and_writes_nothing(wh):
    with pytest.raises(NotFound, match="no dataset 'missing'"):
        wh.datasets.load("missing")
    with pytest.raises(PickleNotAllowed, match="allow_pickle"):
        wh.datasets.save({"f": object()}, "objs")
    with pytest.raises(InvalidDocument, match="reserved"):
        wh.datasets.save(np.zeros(1), "x", _id="mine")
    with pytest.raises(InvalidDocument, match="cannot be stored"):
        wh.datasets.save(np.zeros(1), "x", when={1, 2})
    with pytest.raises(InvalidDocument):
        wh.datasets.save(np.zeros(1), "")
    with pytest.raises(QueryError):
        wh.datasets.find(where={"name": {"$bogus": 1}})
    assert wh.datasets.find() == []
    assert wh.index.count("datasets", {}) == 0


def test_pickle_only_when_allowed(wh):
    class Thing:
        pass
    value = {"thing": [1, 2, 3]}
    wh.datasets.save(value, "plain")
    obj = {1, 2, 3}
    wh.datasets.save(obj, "a-set", allow_pickle=True)
    with pytest.raises(PickleNotAllowed):
        wh.datasets.load("a-set")
    assert wh.datasets.load("a-set", allow_pickle=True) == obj


def test_item_datasets_are_listed_and_loaded_as_datasets(wh):
    wh.items.from_arrays("points", {"x": np.arange(10.0).reshape(5, 2), "label": np.arange(5)})
    record = wh.datasets.get("points")
    assert record.kind == "items" and record.version == 1
    items = wh.datasets.load("points")
    assert items.count() == 5 and items.count({"label": {"$gte": 3}}) == 2
    batch = next(iter(items.stream(batch_size=5, shuffle=False)))
    assert np.array_equal(batch["x"], np.arange(10.0).reshape(5, 2))


def test_a_version_collision_retries_with_its_blobs_rewritten(wh, monkeypatch):
    from mlwarehouse.datasets import versions
    wh.datasets.save(np.zeros(3), "d")
    real, calls = versions.next_version, []

    def racing(project, name):  # another process takes version 1 between our look and our insert
        calls.append(name)
        return 1 if len(calls) == 1 else real(project, name)
    monkeypatch.setattr(versions, "next_version", racing)
    rec = wh.datasets.save(np.arange(1000.0), "d")
    assert rec.doc["version"] == 2 and len(calls) == 2
    assert all(wh.blobs.exists(k) for k in rec.doc["_blobs"])
    assert wh.datasets.get("d", version=2).load()[999] == 999.0


def test_whole_and_item_versions_share_one_allocator(wh, monkeypatch):
    from mlwarehouse.datasets import versions
    wh.datasets.save(np.zeros(3), "mixed")
    ds = wh.items.create("mixed")
    assert ds.version == 2 and wh.datasets.save(np.ones(2), "mixed").version == 3
    wh.datasets.save(np.ones(2), "mixed", version="gold")  # a string version does not count for the next integer
    for write in (lambda: wh.datasets.save(np.zeros(1), "mixed", version=2),
                  lambda: wh.items.create("mixed", version=3)):
        with pytest.raises(DuplicateKey, match="version .* already exists .*versions are immutable"):
            write()
    real, calls = versions.next_version, []

    def racing(project, name):  # another writer takes version 3 between our look and our insert
        calls.append(name)
        return 3 if len(calls) == 1 else real(project, name)
    monkeypatch.setattr(versions, "next_version", racing)
    assert wh.items.create("mixed").version == 4 and len(calls) == 2
    monkeypatch.setattr(versions, "next_version", lambda project, name: 1)
    with pytest.raises(DuplicateKey, match="too many concurrent creates"):
        wh.items.create("mixed")


def test_load_writable_gives_arrays_that_own_their_memory(wh):
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    wh.datasets.save((X, X[:, 0]), "w")
    viewed, _ = wh.datasets.load("w")
    assert not viewed.flags.writeable  # zero-copy views of the verified bytes
    owned, column = wh.datasets.load("w", writable=True)
    assert owned.flags.writeable and column.flags.writeable
    owned[0, 0] = 99.0  # writing it changes neither the store nor a later load
    np.testing.assert_array_equal(wh.datasets.load("w")[0], X)
