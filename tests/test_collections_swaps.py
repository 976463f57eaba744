"""Batched compare-and-set on every backend set: the index's ``swap_many``, and the listener outputs written
through it (one batch per model batch) keeping their guarantees when other writes come between the read and the
write: a changed input is never given the old input's output, a deleted document never gets one, and a write to
another field is no reason to recompute."""

from __future__ import annotations

import functools

import pytest

from mlwarehouse.collections import listeners as engine
from mlwarehouse.collections import outputs
from mlwarehouse.collections.documents import digest, get_path
from mlwarehouse.errors import InvalidDocument, QueryError
from mlwarehouse.index.base import Index
from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.listener_conformance import CALLS
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

PROJECT = "swaps"
TABLE = "swap_docs"


class SwapTests:
    """What ``swap_many`` and the batched listener writes do on any backend set (``wh`` fixture)."""

    @pytest.fixture
    def index(self, wh):
        wh.index.ensure_collection(TABLE, scalar_fields=["_rev"])
        wh.index.insert_many(TABLE, [{"_id": k, "_rev": "r1", "v": k, "old": True} for k in ("a", "b", "c")])
        return wh.index

    @pytest.fixture(params=["backend", "default"])
    def swap(self, request, index):
        """The backend's ``swap_many``, and the protocol's default loop run on the same backend."""
        return index.swap_many if request.param == "backend" else functools.partial(Index.swap_many, index)

    def test_replaces_only_the_documents_whose_revision_still_matches(self, index, swap):
        new = [{"_id": k, "_rev": "r2", "v": k.upper()} for k in ("a", "b", "c", "gone")]
        assert swap(TABLE, new, ["r1", "stale", "r1", "r1"]) == ["a", "c"]
        stored = {d["_id"]: d for d in index.find(TABLE)}
        assert stored["a"] == {"_id": "a", "_rev": "r2", "v": "A"}  # replaced whole: "old" is gone
        assert stored["b"] == {"_id": "b", "_rev": "r1", "v": "b", "old": True}
        assert stored["c"] == {"_id": "c", "_rev": "r2", "v": "C"}
        assert "gone" not in stored  # a missing document is not inserted

    def test_a_document_named_twice_is_compared_with_the_first_replacement(self, index, swap):
        first, second = {"_id": "a", "_rev": "r2", "v": 1}, {"_id": "a", "_rev": "r3", "v": 2}
        assert swap(TABLE, [first, second], ["r1", "r2"]) == ["a", "a"]
        assert index.find_one(TABLE, {"_id": "a"}) == second
        assert swap(TABLE, [{"_id": "b", "_rev": "r2"}, {"_id": "b", "_rev": "r3"}], ["r1", "r1"]) == ["b"]
        assert index.find_one(TABLE, {"_id": "b"}) == {"_id": "b", "_rev": "r2"}

    def test_none_expects_the_field_missing(self, index, swap):
        index.insert_one(TABLE, {"_id": "bare", "v": 0})
        assert swap(TABLE, [{"_id": "bare", "_rev": "r1"}, {"_id": "a", "_rev": "r9"}], [None, None]) \
            == ["bare"]
        assert index.find_one(TABLE, {"_id": "bare"}) == {"_id": "bare", "_rev": "r1"}

    def test_a_bad_document_writes_nothing_of_the_batch(self, index, swap):
        with pytest.raises(InvalidDocument):
            swap(TABLE, [{"_id": "a", "_rev": "r2"}, {"_id": "b", "_rev": "r2", "x": float("nan")}],
                            ["r1", "r1"])
        assert {d["_rev"] for d in index.find(TABLE)} == {"r1"}
        with pytest.raises(QueryError):
            swap(TABLE, [{"_id": "a", "_rev": "r2"}], [])
        with pytest.raises(QueryError):
            swap(TABLE, [{"_id": "a", "_rev": "r2"}], ["r1"], field="_id")
        assert swap("swap_never_made", [{"_id": "a", "_rev": "r2"}], ["r1"]) == []

    def test_batched_outputs_keep_their_guarantees_under_writes_in_between(self, wh):
        c = wh.collection("batched")
        c.insert_many([{"_id": f"d{i}", "x": i, "tag": "t"} for i in range(6)] + [{"_id": "no_x", "y": 1}])
        c.attach("twice", "mlwarehouse.testing.listener_conformance:double", key="x", compute="workers",
                 batch_size=4)
        listener = c.listener("twice")
        docs = list(c.table.find({}, sort=[("_id", 1)]))  # what a worker read, before the writes below
        c.update_one({"_id": "d0"}, {"$set": {"x": 100}})  # a new input: its old output must not be stored
        c.update_one({"_id": "d1"}, {"$set": {"tag": "u"}})  # another field: written again, not recomputed
        c.delete_one({"_id": "d2"})  # deleted: no orphan output
        calls = CALLS.get("double", 0)
        outcome = outputs.process(c, listener, docs, trusted=True)
        assert CALLS["double"] - calls == 6  # each read input once (d0's new one is left pending)
        assert outcome.written == 5 and outcome.failed == 0  # d1, d3, d4, d5 and no_x (skipped)
        stored = {d["_id"]: d for d in c.table.find({})}
        assert "d2" not in stored
        d0 = stored["d0"]
        assert (d0.get("_listeners") or {}).get("twice", {}).get("status") not in engine.SETTLED
        assert "_outputs" not in d0
        for k in ("d1", "d3", "d4", "d5"):
            doc = stored[k]
            state = doc["_listeners"]["twice"]
            assert state["status"] == "done" and state["input"] == digest(get_path(doc, "x"))
            assert c.unpack(doc["_outputs"]["x"]["twice"]) == 2 * c.unpack(doc["x"])
        assert stored["d1"]["tag"] == "u"
        assert stored["no_x"]["_listeners"]["twice"]["status"] == "skipped"
        assert c.progress("twice") == {"done": 4, "failed": 0, "skipped": 1, "pending": 1}
        outputs.catch_up(c, "twice", trusted=True)
        assert c.find_one({"_id": "d0"})["_outputs"]["x"]["twice"] == 200


class TestSQLiteAndFiles(SwapTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)


class TestPostgresAndS3(SwapTests):
    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestMongoAndGridFS(SwapTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)
