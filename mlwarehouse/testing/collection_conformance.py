"""The collections conformance suite: users' documents and listeners (models attached to data) on any backend set.

A test module subclasses :class:`CollectionTests` and supplies a ``wh`` fixture: a fresh, empty warehouse (see
``tests/test_collections_backends.py``). Every backend set must pass every test here, with the same results: a
backend that cannot is a bug, not a skip.

The listeners' tests and models are in :mod:`mlwarehouse.testing.listener_conformance` (inherited here).
"""

from __future__ import annotations

import numpy as np
import pytest

from mlwarehouse.collections.documents import fold_of
from mlwarehouse.errors import DuplicateKey, InvalidDocument, QueryError
from mlwarehouse.testing.listener_conformance import ListenerTests

__all__ = ["CollectionTests", "Point", "encode_point", "decode_point", "decode_broken"]

class CollectionTests(ListenerTests):
    """Behaviour every (index, blob store) pair must show for collections (and, inherited, listeners), through
    the public API."""

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
