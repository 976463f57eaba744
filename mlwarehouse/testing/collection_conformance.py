"""The collections conformance suite: users' documents and listeners (models attached to data) on any backend set.

A test module subclasses :class:`CollectionTests` and supplies a ``wh`` fixture: a fresh, empty warehouse (see
``tests/test_collections_backends.py``). Every backend set must pass every test here, with the same results: a
backend that cannot is a bug, not a skip.

The listeners' models are the top-level functions of this module (a listener's callable is stored by import path,
so a worker can import it); :data:`CALLS` counts their calls, so a test can tell a recomputation from a reuse.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlwarehouse import schema
from mlwarehouse.collections import ListenerError
from mlwarehouse.collections.documents import fold_of
from mlwarehouse.collections.worker import ListenerWorker
from mlwarehouse.errors import DuplicateKey, InvalidDocument, NotFound, QueryError

__all__ = ["CollectionTests", "CALLS", "double", "plus_one", "lengths", "broken", "norm"]

#: calls of each listener model of this module, by function name (reset by the tests that read it)
CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


def double(x):
    """A listener model: twice its input."""
    _count("double")
    return x * 2


def plus_one(x):
    """A listener model over another listener's output."""
    _count("plus_one")
    return x + 1


def lengths(x):
    """A listener model returning JSON."""
    _count("lengths")
    return {"n": len(x), "upper": str(x).upper()}


def norm(x):
    """A listener model returning an array (an embedding-like output)."""
    _count("norm")
    x = np.asarray(x, dtype=np.float32)
    return x / max(float(np.linalg.norm(x)), 1e-9)


def broken(x):
    """A listener model that always raises."""
    _count("broken")
    raise ValueError(f"broken model cannot take {x!r}")


def _out(doc: dict, key: str, name: str):
    """The output of listener ``name`` for ``key`` in a read document (None if it has none)."""
    node = doc.get("_outputs")
    for part in [*key.split("."), name]:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class CollectionTests:
    """Behaviour every (index, blob store) pair must show for collections and listeners, through the public API."""

    @pytest.fixture
    def wh(self):  # pragma: no cover - supplied by subclasses
        raise NotImplementedError

    @pytest.fixture(autouse=True)
    def _calls(self):
        CALLS.clear()
        yield
        CALLS.clear()

    # -- inserting ---------------------------------------------------------------------------------------------
    def test_insert_one_and_many_return_ids_in_order(self, wh):
        c = wh.collection("things")
        first = c.insert_one({"v": 0})
        assert isinstance(first.inserted_id, str) and first.inserted_id
        mine = c.insert_one({"_id": "mine", "v": 1})
        assert mine.inserted_id == "mine"
        result = c.insert_many(({"v": i} for i in range(2, 12)), chunk_size=3)  # a generator, four chunks
        assert len(result.inserted_ids) == 10 and len(set(result.inserted_ids)) == 10
        assert [c.find_one({"_id": i})["v"] for i in result.inserted_ids] == list(range(2, 12))
        assert c.count_documents() == 12 and c.estimated_document_count() == 12
        assert c.find_one({"_id": "mine"}) == {"_id": "mine", "v": 1, "_fold": c.find_one({"_id": "mine"})["_fold"]}
        assert "things" in wh.project().catalog.names()
        with pytest.raises(InvalidDocument):
            c.insert_many({"v": 1})  # one document, not an iterable of them
        with pytest.raises(InvalidDocument):
            c.insert_one(["not", "a", "dict"])
        with pytest.raises(InvalidDocument):
            c.insert_one({"_id": 7})

    def test_duplicate_ids_write_nothing_of_their_chunk(self, wh):
        c = wh.collection("dups")
        c.insert_many([{"_id": "a", "v": 1}, {"_id": "b", "v": 2}])
        with pytest.raises(DuplicateKey):
            c.insert_many([{"_id": "c"}, {"_id": "a", "v": 99}])
        with pytest.raises(DuplicateKey):
            c.insert_many([{"_id": "d"}, {"_id": "d"}])  # twice among the new documents
        with pytest.raises(DuplicateKey):
            c.insert_one({"_id": "b"})
        assert sorted(d["_id"] for d in c.find()) == ["a", "b"]
        assert c.find_one({"_id": "a"})["v"] == 1
        # chunked: the chunks before the bad one stay, nothing of the bad one is written, and the error says so
        with pytest.raises(DuplicateKey, match="2 documents were inserted"):
            c.insert_many([{"_id": "e"}, {"_id": "f"}, {"_id": "g"}, {"_id": "b"}], chunk_size=2)
        assert sorted(d["_id"] for d in c.find()) == ["a", "b", "e", "f"]

    # -- reading -----------------------------------------------------------------------------------------------
    def _shop(self, wh):
        c = wh.collection("shop")
        c.insert_many([
            {"_id": f"p{i}", "name": f"item {i}", "price": float(10 * i), "kind": "ab"[i % 2], "tags": ["t", str(i)],
             "stock": {"n": i, "where": "north" if i < 3 else "south"}} for i in range(6)])
        return c

    def test_find_filter_projection_sort_limit_skip(self, wh):
        c = self._shop(wh)
        assert [d["_id"] for d in c.find({"price": {"$gte": 20}, "kind": "a"})] == ["p2", "p4"]
        assert [d["_id"] for d in c.find({"stock.where": "north", "tags": "1"})] == ["p1"]
        assert [d["_id"] for d in c.find({"$or": [{"price": {"$lt": 5}}, {"kind": "b", "price": {"$gt": 40}}]})] \
            == ["p0", "p5"]
        assert c.find_one({"_id": "p3"}, {"name": 1}) == {"_id": "p3", "name": "item 3"}
        assert c.find_one({"_id": "p3"}, {"name": 1, "_id": 0}) == {"name": "item 3"}
        assert c.find_one({"_id": "p3"}, ["stock.n"]) == {"_id": "p3", "stock": {"n": 3}}
        excluded = c.find_one({"_id": "p3"}, {"tags": 0, "stock": 0})
        assert set(excluded) == {"_id", "name", "price", "kind", "_fold"}
        assert [d["_id"] for d in c.find(sort=[("price", -1)], limit=2)] == ["p5", "p4"]
        assert [d["_id"] for d in c.find(sort=[("kind", 1), ("price", -1)], skip=1, limit=3)] == ["p2", "p0", "p5"]
        chained = c.find({"price": {"$gt": 0}}).sort("price", -1).skip(1).limit(2)
        assert [d["price"] for d in chained] == [40.0, 30.0]
        assert len(c.find().limit(4).to_list()) == 4
        assert c.find_one({"kind": "b"}, sort=[("price", -1)])["_id"] == "p5"
        assert c.find_one({"price": {"$gt": 1000}}) is None
        assert c.count_documents({"kind": "a"}) == 3 and c.count_documents({"nope": 1}) == 0
        assert sorted(c.distinct("kind")) == ["a", "b"]
        assert sorted(c.distinct("stock.where", {"price": {"$lt": 35}})) == ["north", "south"]
        assert sorted(c.distinct("tags")) == ["0", "1", "2", "3", "4", "5", "t"]  # array elements, as MongoDB
        with pytest.raises(QueryError):
            c.find({"price": {"$bogus": 1}})
        with pytest.raises(QueryError):
            c.find({}, "name")

    def test_reads_hide_the_warehouse_fields_unless_projected(self, wh):
        c = wh.collection("hidden")
        c.insert_one({"_id": "x", "v": 1})
        doc = c.find_one({"_id": "x"})
        assert set(doc) == {"_id", "v", "_fold"}
        shown = c.find_one({"_id": "x"}, {"_rev": 1, "v": 1})
        assert isinstance(shown["_rev"], str) and shown["v"] == 1

    # -- updating ----------------------------------------------------------------------------------------------
    def test_update_operators_and_counts(self, wh):
        c = self._shop(wh)
        r = c.update_one({"_id": "p1"}, {"$set": {"name": "renamed", "stock.n": 100}, "$inc": {"price": 5},
                                         "$push": {"tags": "new"}, "$unset": {"kind": ""}})
        assert (r.matched_count, r.modified_count, r.upserted_id) == (1, 1, None)
        doc = c.find_one({"_id": "p1"})
        assert doc["name"] == "renamed" and doc["price"] == 15.0 and doc["stock"] == {"n": 100, "where": "north"}
        assert doc["tags"] == ["t", "1", "new"] and "kind" not in doc
        r = c.update_many({"kind": "a"}, {"$inc": {"stock.n": 1}})
        assert (r.matched_count, r.modified_count) == (3, 3)
        assert [d["stock"]["n"] for d in c.find({"kind": "a"})] == [1, 3, 5]
        r = c.update_many({"kind": "b"}, {"$set": {"kind": "b"}})  # nothing changes
        assert (r.matched_count, r.modified_count) == (2, 0)
        r = c.update_one({"kind": "b"}, {"$set": {"flag": True}})  # the first match only
        assert (r.matched_count, r.modified_count) == (1, 1) and c.count_documents({"flag": True}) == 1
        r = c.update_one({"_id": "none"}, {"$set": {"v": 1}})
        assert (r.matched_count, r.modified_count, r.upserted_id) == (0, 0, None)
        with pytest.raises(QueryError):
            c.update_one({"_id": "p1"}, {"$bogus": {"v": 1}})
        with pytest.raises((QueryError, InvalidDocument)):
            c.update_one({"_id": "p1"}, {"name": "no operator"})
        assert c.find_one({"_id": "p1"})["name"] == "renamed"

    def test_upserts_and_replace(self, wh):
        c = wh.collection("up")
        r = c.update_one({"_id": "u1"}, {"$set": {"v": 1}, "$inc": {"n": 2}}, upsert=True)
        assert (r.matched_count, r.modified_count, r.upserted_id) == (0, 0, "u1")
        assert {k: v for k, v in c.find_one({"_id": "u1"}).items() if k != "_fold"} == {"_id": "u1", "v": 1, "n": 2}
        r = c.update_one({"_id": "u1"}, {"$inc": {"n": 1}}, upsert=True)
        assert (r.matched_count, r.upserted_id) == (1, None) and c.find_one({"_id": "u1"})["n"] == 3
        r = c.update_many({"kind": "k"}, {"$set": {"v": 5}}, upsert=True)
        assert r.upserted_id and c.find_one({"_id": r.upserted_id})["kind"] == "k"
        fold = c.find_one({"_id": "u1"})["_fold"]
        r = c.replace_one({"_id": "u1"}, {"w": [1, 2]})
        assert (r.matched_count, r.modified_count) == (1, 1)
        assert c.find_one({"_id": "u1"}) == {"_id": "u1", "w": [1, 2], "_fold": fold}
        r = c.replace_one({"_id": "u2"}, {"w": 0}, upsert=True)
        assert r.upserted_id == "u2" and c.find_one({"_id": "u2"})["w"] == 0
        assert c.replace_one({"_id": "nope"}, {"w": 1}).matched_count == 0
        with pytest.raises(InvalidDocument):
            c.replace_one({"_id": "u1"}, {"$set": {"w": 1}})
        with pytest.raises(InvalidDocument):
            c.replace_one({"_id": "u1"}, {"_id": "changed", "w": 1})
        assert c.replace_one({"_id": "u1"}, {"_id": "u1", "w": [1, 2]}).matched_count == 1  # the same _id is fine
        assert c.count_documents() == 3

    # -- deleting ----------------------------------------------------------------------------------------------
    def test_delete_one_and_many(self, wh):
        c = self._shop(wh)
        assert c.delete_one({"kind": "a"}).deleted_count == 1
        assert c.find_one({"_id": "p0"}) is None and c.count_documents() == 5
        assert c.delete_many({"price": {"$gte": 30}}).deleted_count == 3
        assert sorted(d["_id"] for d in c.find()) == ["p1", "p2"]
        assert c.delete_one({"_id": "none"}).deleted_count == 0
        assert c.delete_many({}).deleted_count == 2 and c.count_documents() == 0

    # -- values ------------------------------------------------------------------------------------------------
    def test_values_round_trip_with_dtype_and_shape(self, wh):
        torch = pytest.importorskip("torch")
        c = wh.collection("values")
        doc = {
            "_id": "v",
            "small": np.arange(6, dtype=np.int16).reshape(2, 3),
            "big": np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32),
            "tensor": torch.arange(12, dtype=torch.float64).reshape(3, 4),
            "big_tensor": torch.ones(40, 30, dtype=torch.bfloat16),
            "bytes": b"\x00\x01 raw bytes",
            "big_bytes": bytes(range(256)) * 40,
            "nested": {"a": [1, 2.5, None, True, "s"], "b": {"c": {"d": "deep", "e": -3}}, "empty": {}, "list": []},
            "tuple": (1, "two"),
            "nan": float("nan"),
            "unicode": "préférence ✓",
            "big_int": 2 ** 70,
        }
        c.insert_one(doc)
        got = c.find_one({"_id": "v"})
        for name in ("small", "big"):
            assert isinstance(got[name], np.ndarray) and got[name].dtype == doc[name].dtype
            assert got[name].shape == doc[name].shape and np.array_equal(got[name], doc[name])
        for name in ("tensor", "big_tensor"):
            assert isinstance(got[name], torch.Tensor) and got[name].dtype == doc[name].dtype
            assert got[name].shape == doc[name].shape and torch.equal(got[name], doc[name])
        assert got["bytes"] == doc["bytes"] and got["big_bytes"] == doc["big_bytes"]
        assert got["nested"] == doc["nested"] and got["tuple"] == (1, "two") and np.isnan(got["nan"])
        assert got["unicode"] == doc["unicode"] and got["big_int"] == 2 ** 70
        # scalars stay inline: filters and sorts reach them, nested ones too
        assert c.count_documents({"nested.b.c.d": "deep", "nested.a": 2.5}) == 1
        # values set by an update round-trip the same way
        c.update_one({"_id": "v"}, {"$set": {"nested.b.arr": np.eye(3, dtype=np.float16)}})
        arr = c.find_one({"_id": "v"})["nested"]["b"]["arr"]
        assert arr.dtype == np.float16 and np.array_equal(arr, np.eye(3))

    def test_large_values_are_blobs_released_with_their_document(self, wh):
        c = wh.collection("blobby")
        rng = np.random.default_rng(1)
        a, b, d = (rng.standard_normal(4000) for _ in range(3))
        c.insert_many([{"_id": "a", "x": a}, {"_id": "b", "x": b}, {"_id": "d", "x": d}])

        def keys(doc_id):
            return set(c.find_one({"_id": doc_id}, {"_blobs": 1}).get("_blobs") or ())

        ka, kb, kd = keys("a"), keys("b"), keys("d")
        assert len(ka) == len(kb) == len(kd) == 1 and all(wh.blobs.exists(k) for k in ka | kb | kd)
        assert np.array_equal(c.find_one({"_id": "a"})["x"], a)
        c.delete_one({"_id": "a"})  # deleted: its blob goes
        assert not any(wh.blobs.exists(k) for k in ka)
        c.update_one({"_id": "b"}, {"$set": {"x": "small now"}})  # overwritten: its blob goes
        assert not any(wh.blobs.exists(k) for k in kb) and keys("b") == set()
        c.replace_one({"_id": "d"}, {"y": 1})  # replaced: its blob goes
        assert not any(wh.blobs.exists(k) for k in kd)
        # a blob two documents share stays until the last one is deleted
        shared = rng.standard_normal(4000)
        c.insert_many([{"_id": "s1", "x": shared}, {"_id": "s2", "x": shared.copy()}])
        ks = keys("s1")
        assert ks == keys("s2")
        c.delete_one({"_id": "s1"})
        assert all(wh.blobs.exists(k) for k in ks) and np.array_equal(c.find_one({"_id": "s2"})["x"], shared)
        c.delete_many({})
        assert not any(wh.blobs.exists(k) for k in ks)
        assert list(wh.blobs.list()) == []

    # -- folds -------------------------------------------------------------------------------------------------
    def test_folds_are_deterministic_from_the_id(self, wh):
        c = wh.collection("folded")
        c.valid_fraction = 0.5
        ids = [f"doc-{i}" for i in range(200)]
        c.insert_many({"_id": i} for i in ids)
        folds = {d["_id"]: d["_fold"] for d in c.find({}, {"_fold": 1})}
        assert folds == {i: fold_of(i, 0.5) for i in ids}  # the same on every backend and run
        assert 65 < list(folds.values()).count("valid") < 135
        again = wh.collection("folded_again")
        again.valid_fraction = 0.5
        again.insert_many({"_id": i, "v": 1} for i in ids)
        assert {d["_id"]: d["_fold"] for d in again.find()} == folds
        assert c.count_documents({"_fold": "valid"}) == list(folds.values()).count("valid")
        default = wh.collection("default_fold")
        default.insert_many({"_id": i} for i in ids)
        assert default.count_documents({"_fold": "valid"}) < 30  # 5% by default
        c.insert_one({"_id": "chosen", "_fold": "valid"})
        assert c.find_one({"_id": "chosen"})["_fold"] == "valid"
        with pytest.raises(InvalidDocument):
            c.insert_one({"_fold": "test"})
        with pytest.raises(InvalidDocument):
            c.valid_fraction = 1.5

    # -- listeners ---------------------------------------------------------------------------------------------
    def test_listener_backfills_computes_on_insert_and_on_update_of_its_key(self, wh):
        c = wh.collection("numbers")
        c.insert_many([{"_id": f"n{i}", "x": i, "y": "keep"} for i in range(5)])
        listener = c.attach("twice", double, key="x")
        assert listener.name == "twice" and [x.name for x in c.listeners()] == ["twice"]
        assert c.listener("twice").key == "x" and CALLS["double"] == 5
        assert {d["_id"]: _out(d, "x", "twice") for d in c.find()} == {f"n{i}": 2 * i for i in range(5)}
        assert c.progress("twice") == {"done": 5, "pending": 0, "failed": 0, "skipped": 0}
        c.insert_one({"_id": "n9", "x": 9})
        assert _out(c.find_one({"_id": "n9"}), "x", "twice") == 18 and CALLS["double"] == 6
        c.update_one({"_id": "n1"}, {"$set": {"y": "other field"}})
        c.update_many({}, {"$set": {"z": 1}})
        assert CALLS["double"] == 6  # the key did not change: no call
        assert _out(c.find_one({"_id": "n1"}), "x", "twice") == 2
        c.update_one({"_id": "n1"}, {"$inc": {"x": 10}})
        assert CALLS["double"] == 7 and _out(c.find_one({"_id": "n1"}), "x", "twice") == 22
        c.replace_one({"_id": "n2"}, {"x": 100})
        assert CALLS["double"] == 8 and _out(c.find_one({"_id": "n2"}), "x", "twice") == 200
        # an output is queryable, sortable and projectable, and the listener's state by projection
        assert [d["_id"] for d in c.find({"_outputs.x.twice": {"$gte": 100}})] == ["n2"]
        assert [d["_id"] for d in c.find(sort=[("_outputs.x.twice", -1)], limit=3)] == ["n2", "n1", "n9"]
        assert c.find_one({"_id": "n4"}, {"_outputs.x.twice": 1}) == {"_id": "n4", "_outputs": {"x": {"twice": 8}}}
        state = c.find_one({"_id": "n1"}, {"_listeners": 1})["_listeners"]["twice"]
        assert state["status"] == "done" and state["model"] == {"target": f"{__name__}:double"}
        c.update_one({"_id": "n3"}, {"$unset": {"x": ""}})  # the key is gone: no output, skipped
        assert "_outputs" not in c.find_one({"_id": "n3"})
        assert c.progress("twice") == {"done": 5, "pending": 0, "failed": 0, "skipped": 1}
        with pytest.raises(DuplicateKey):
            c.attach("twice", double, key="y")
        with pytest.raises(NotFound):
            c.listener("nope")

    def test_listener_outputs_of_any_type_and_documents_lacking_the_key(self, wh):
        c = wh.collection("texts")
        c.insert_many([{"_id": "t1", "s": "ab", "v": [3.0, 4.0]}, {"_id": "t2", "other": 1}])
        c.attach("meta", lengths, key="s")
        c.attach("unit", norm, key="v")
        t1, t2 = c.find_one({"_id": "t1"}), c.find_one({"_id": "t2"})
        assert _out(t1, "s", "meta") == {"n": 2, "upper": "AB"}
        unit = _out(t1, "v", "unit")
        assert isinstance(unit, np.ndarray) and unit.dtype == np.float32 and np.allclose(unit, [0.6, 0.8])
        assert "_outputs" not in t2
        assert c.progress("meta")["skipped"] == 1 and c.progress("unit")["skipped"] == 1

    def test_delete_and_detach_remove_outputs(self, wh):
        c = wh.collection("detaching")
        rng = np.random.default_rng(2)
        c.insert_many([{"_id": f"d{i}", "v": rng.standard_normal(1000), "x": i} for i in range(4)])
        c.attach("unit", norm, key="v")  # outputs large enough to be blobs
        c.attach("twice", double, key="x")
        out_keys = set(c.find_one({"_id": "d0"}, {"_blobs": 1})["_blobs"])
        assert len(out_keys) == 2  # the input and the output
        c.delete_one({"_id": "d0"})
        assert not any(wh.blobs.exists(k) for k in out_keys)
        assert c.count_documents({"_outputs.x.twice": {"$exists": True}}) == 3
        old_keys = set(c.find_one({"_id": "d1"}, {"_blobs": 1})["_blobs"])
        c.update_one({"_id": "d1"}, {"$set": {"v": rng.standard_normal(1000)}})  # a new input and a new output
        new_keys = set(c.find_one({"_id": "d1"}, {"_blobs": 1})["_blobs"])
        assert len(new_keys) == 2 and not new_keys & old_keys and not any(wh.blobs.exists(k) for k in old_keys)
        before = {k for d in c.find({}, {"_blobs": 1}) for k in d["_blobs"]}  # inputs and outputs
        assert c.detach("unit") == 3
        assert [x.name for x in c.listeners()] == ["twice"]
        left = {k for d in c.find({}, {"_blobs": 1}) for k in d["_blobs"]}
        assert len(before) == 6 and len(left) == 3 and all(wh.blobs.exists(k) for k in left)
        assert not any(wh.blobs.exists(k) for k in before - left)  # the outputs' blobs went
        for doc in c.find({}, {"_listeners": 1, "_outputs": 1}):
            assert set(doc["_outputs"]) == {"x"} and set(doc["_listeners"]) == {"twice"}
        c.insert_one({"_id": "d9", "v": rng.standard_normal(1000), "x": 9})
        assert set(c.find_one({"_id": "d9"})["_outputs"]) == {"x"}  # a detached listener computes no more
        assert c.detach("twice") == 4
        assert all("_outputs" not in d and "_listeners" not in d for d in c.find({}, {"_listeners": 1, "x": 1,
                                                                                   "_outputs": 1}))
        with pytest.raises(NotFound):
            c.detach("twice")
        c.attach("unit", norm, key="v")
        c.drop()  # documents, listeners, the catalog entry and every blob go
        assert c.count_documents() == 0 and c.listeners() == [] and "detaching" not in wh.project().catalog.names()
        assert list(wh.blobs.list()) == []

    def test_dependency_chain_detach_refused_and_forced(self, wh):
        c = wh.collection("chain")
        c.insert_many([{"_id": f"c{i}", "x": i} for i in range(3)])
        c.attach("a", double, key="x")
        c.attach("b", plus_one, key="_outputs.x.a")
        assert c.listener("b").upstream == ("a",)
        assert {d["_id"]: _out(d, "_outputs.x.a", "b") for d in c.find()} == {"c0": 1, "c1": 3, "c2": 5}
        c.insert_one({"_id": "c3", "x": 3})
        doc = c.find_one({"_id": "c3"})
        assert _out(doc, "x", "a") == 6 and _out(doc, "_outputs.x.a", "b") == 7
        c.update_one({"_id": "c0"}, {"$set": {"x": 50}})  # a, then b, recomputed in order
        doc = c.find_one({"_id": "c0"})
        assert _out(doc, "x", "a") == 100 and _out(doc, "_outputs.x.a", "b") == 101
        assert CALLS == {"double": 5, "plus_one": 5}
        assert c.progress("b") == {"done": 4, "pending": 0, "failed": 0, "skipped": 0}
        with pytest.raises(QueryError, match="'b'"):
            c.detach("a")
        assert {x.name for x in c.listeners()} == {"a", "b"} and _out(c.find_one({"_id": "c1"}), "x", "a") == 2
        assert c.detach("a", force=True) == 8
        assert c.listeners() == [] and c.count_documents({"_outputs": {"$exists": True}}) == 0
        assert c.count_documents({"_listeners": {"$exists": True}}) == 0

    def test_where_filter(self, wh):
        c = wh.collection("filtered")
        c.insert_many([{"_id": f"w{i}", "x": i, "kind": "ab"[i % 2]} for i in range(4)])
        c.attach("only_a", double, key="x", where={"kind": "a"})
        assert CALLS["double"] == 2
        assert {d["_id"]: _out(d, "x", "only_a") for d in c.find()} == {"w0": 0, "w1": None, "w2": 4, "w3": None}
        assert c.progress("only_a") == {"done": 2, "pending": 0, "failed": 0, "skipped": 2}
        c.insert_many([{"_id": "w4", "x": 4, "kind": "a"}, {"_id": "w5", "x": 5, "kind": "b"}])
        assert CALLS["double"] == 3 and _out(c.find_one({"_id": "w4"}), "x", "only_a") == 8
        c.update_one({"_id": "w2"}, {"$set": {"kind": "b"}})  # stops matching: its output goes
        assert "_outputs" not in c.find_one({"_id": "w2"}) and CALLS["double"] == 3
        c.update_one({"_id": "w1"}, {"$set": {"kind": "a"}})  # starts matching: computed
        assert _out(c.find_one({"_id": "w1"}), "x", "only_a") == 2 and CALLS["double"] == 4
        assert c.progress("only_a") == {"done": 3, "pending": 0, "failed": 0, "skipped": 3}

    def test_inline_model_that_raises_inserts_nothing(self, wh):
        c = wh.collection("fragile")
        c.attach("bad", broken, key="x")
        with pytest.raises(ListenerError, match="broken model"):
            c.insert_many([{"_id": "f1", "x": 1}, {"_id": "f2", "x": 2}])
        assert c.count_documents() == 0
        with pytest.raises(ListenerError):
            c.insert_one({"x": 3})
        assert c.count_documents() == 0
        c.insert_one({"_id": "no_key", "y": 1})  # the model is not called: skipped
        assert c.progress("bad") == {"done": 0, "pending": 0, "failed": 0, "skipped": 1}
        with pytest.raises(ListenerError):  # an update that gives it an input: marked failed, and raised
            c.update_one({"_id": "no_key"}, {"$set": {"x": 1}})
        assert c.find_one({"_id": "no_key"})["x"] == 1
        assert c.find_one({"_id": "no_key"}, {"_listeners": 1})["_listeners"]["bad"]["status"] == "failed"

    def test_worker_listeners_compute_what_inline_ones_do(self, wh):
        c = wh.collection("queued")
        c.insert_many([{"_id": f"q{i}", "x": i, "v": [float(i), 1.0]} for i in range(5)])
        c.attach("inline", double, key="x")
        c.attach("worked", double, key="x", compute="workers", batch_size=2)
        c.attach("unit", norm, key="v", compute="workers")
        assert c.progress("worked") == {"done": 0, "pending": 5, "failed": 0, "skipped": 0}
        assert wh.tasks.has_unfinished(schema.LISTENER_TASK)
        c.insert_one({"_id": "q9", "x": 9, "v": [0.0, 2.0]})
        assert _out(c.find_one({"_id": "q9"}), "x", "worked") is None
        assert ListenerWorker(wh.project(), once=True).run() >= 4
        docs = list(c.find())
        assert len(docs) == 6
        for doc in docs:
            assert _out(doc, "x", "worked") == _out(doc, "x", "inline") == doc["x"] * 2
            assert np.allclose(_out(doc, "v", "unit"), norm(doc["v"]))
        assert c.progress("worked") == {"done": 6, "pending": 0, "failed": 0, "skipped": 0}
        assert not wh.tasks.has_unfinished(schema.LISTENER_TASK)
        calls = CALLS["double"]
        c.update_one({"_id": "q1"}, {"$set": {"x": 7}})
        c.update_one({"_id": "q2"}, {"$set": {"other": 1}})
        assert _out(c.find_one({"_id": "q1"}), "x", "inline") == 14  # inline now, the worker's after a run
        ListenerWorker(wh.project(), once=True).run()
        assert _out(c.find_one({"_id": "q1"}), "x", "worked") == 14 and CALLS["double"] == calls + 2
        assert c.detach("worked") == 6

    def test_a_chain_across_workers_and_inline_listeners(self, wh):
        c = wh.collection("mixed_chain")
        c.attach("a", double, key="x", compute="workers")
        c.attach("b", plus_one, key="_outputs.x.a")  # inline, after a worker's output
        c.attach("c", plus_one, key="_outputs._outputs.x.a.b", compute="workers")
        c.insert_many([{"_id": f"m{i}", "x": i} for i in range(3)])
        assert c.progress("b")["pending"] == 3  # waiting for a
        ListenerWorker(wh.project(), once=True).run()
        expect = {f"m{i}": (2 * i, 2 * i + 1, 2 * i + 2) for i in range(3)}
        got = {d["_id"]: (_out(d, "x", "a"), _out(d, "_outputs.x.a", "b"), _out(d, "_outputs._outputs.x.a.b", "c"))
               for d in c.find()}
        assert got == expect
        c.update_one({"_id": "m1"}, {"$set": {"x": 10}})
        ListenerWorker(wh.project(), once=True).run()
        doc = c.find_one({"_id": "m1"})
        assert (_out(doc, "x", "a"), _out(doc, "_outputs.x.a", "b"), _out(doc, "_outputs._outputs.x.a.b", "c")) \
            == (20, 21, 22)
        assert [c.progress(n)["done"] for n in "abc"] == [3, 3, 3]
        assert CALLS == {"double": 4, "plus_one": 8}

    def test_torch_module_listeners_inline_and_on_workers(self, wh):
        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 2)
        c = wh.collection("embedded")
        c.insert_many([{"_id": f"t{i}", "v": torch.full((4,), float(i))} for i in range(3)])
        c.attach("lin", net, key="v")
        c.attach("lin_w", net, key="v", compute="workers", batch_size=2)
        assert sorted(r.name for r in wh.models.find()) == ["embedded.lin", "embedded.lin_w"]
        c.insert_one({"_id": "t9", "v": np.ones(4, dtype=np.float32)})  # an array: given to the module as a tensor
        ListenerWorker(wh.project(), once=True).run()
        with torch.no_grad():
            for doc in c.find():
                v = doc["v"]
                want = net(v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)))
                for name in ("lin", "lin_w"):
                    assert isinstance(_out(doc, "v", name), torch.Tensor)
                    assert torch.allclose(_out(doc, "v", name), want, atol=1e-6), (doc["_id"], name)
        assert c.detach("lin") == 4 and [r.name for r in wh.models.find()] == ["embedded.lin_w"]

    def test_worker_model_that_raises_marks_documents_failed(self, wh):
        c = wh.collection("failing")
        c.insert_many([{"_id": f"e{i}", "x": i} for i in range(3)] + [{"_id": "e_none", "y": 0}])
        c.attach("bad", broken, key="x", compute="workers")
        ListenerWorker(wh.project(), once=True).run()
        assert c.progress("bad") == {"done": 0, "pending": 0, "failed": 3, "skipped": 1}
        failed = list(c.find({"_listeners.bad.status": "failed"}, {"_listeners": 1}))
        assert [d["_id"] for d in failed] == ["e0", "e1", "e2"]
        for doc in failed:
            state = doc["_listeners"]["bad"]
            assert state["status"] == "failed"
            assert "Traceback" in state["error"] and "broken model cannot take" in state["error"]
        assert c.count_documents({"_outputs": {"$exists": True}}) == 0 and c.count_documents() == 4
        tasks = wh.tasks.find(schema.LISTENER_TASK)
        assert tasks and {t.status for t in tasks} == {"failed"}
        assert "broken model cannot take" in tasks[0].doc["error"]
        # a retry puts them back to pending; they fail again, and nothing else changed
        assert c.retry("bad") == 3
        ListenerWorker(wh.project(), once=True).run()
        assert c.progress("bad")["failed"] == 3 and CALLS["broken"] == 2  # once a batch: a batch fails whole


# -- a user data type, by import path (for the data-type tests) ----------------------------------------------------

class Point:
    """A user's own value type: stored by :func:`encode_point`, read back by :func:`decode_point`."""

    def __init__(self, x: float, y: float):
        self.x, self.y = float(x), float(y)

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y})"


def encode_point(point: Point) -> bytes:
    return np.array([point.x, point.y], dtype="<f8").tobytes()


def decode_point(data: bytes) -> Point:
    x, y = np.frombuffer(data, dtype="<f8")
    return Point(x, y)


def decode_broken(data: bytes):
    """A decoder that cannot read what was stored."""
    raise ValueError(f"cannot read {len(data)} bytes")
