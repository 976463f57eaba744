"""The index protocol's conformance suite: every index backend's tests subclass :class:`IndexTests`.

A subclass supplies two fixtures: ``index`` (a fresh, empty index, closed after the test) and ``reopen`` (a
zero-argument callable, usable in a forked child, that opens another handle on the same index). Everything here
is backend-neutral; SQL plans, raw SQL and driver-error mapping are tested in each backend's own module.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
from collections import OrderedDict

import pytest

from mlwarehouse.errors import DuplicateKey, InvalidDocument, QueryError
from mlwarehouse.query import sort_docs

__all__ = ["IndexTests", "docs"]


def docs(n, **extra):
    return ({"_id": f"d{i:04d}", "i": i, "even": i % 2 == 0, **extra} for i in range(n))


def _claim_all(reopen, worker, queue):
    ix = reopen()
    claimed = []
    while True:
        doc = ix.find_one_and_update("tasks", {"status": "pending"},
                                     {"$set": {"status": "running", "worker": worker}}, sort=[("_id", 1)])
        if doc is None:
            break
        claimed.append(doc["_id"])
    ix.close()
    queue.put((worker, claimed))


def _write_a_lot(reopen, worker, queue):
    ix = reopen()
    try:
        for chunk in range(10):
            ix.insert_many("logs", ({"_id": f"{worker}-{chunk}-{i}", "w": worker} for i in range(50)))
            ix.update_many("logs", {"w": worker}, {"$inc": {"n": 1}})
        queue.put((worker, "ok"))
    except Exception as exc:  # reported to the parent, which fails the test
        queue.put((worker, repr(exc)))
    finally:
        ix.close()


def _increment(reopen, times, queue):
    ix = reopen()
    try:
        for _ in range(times):
            assert ix.find_one_and_update("counters", {"_id": "c"}, {"$inc": {"n": 1}}) is not None
        queue.put("ok")
    except BaseException as exc:
        queue.put(repr(exc))
    finally:
        ix.close()


def _run_processes(target, args_list, timeout=120):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, queue)) for args in args_list]
    for p in procs:
        p.start()
    results = [queue.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


class IndexTests:
    """Protocol tests; subclasses provide the ``index`` and ``reopen`` fixtures."""

    def test_crud_roundtrip(self, index):
        ix = index
        ix.ensure_collection("runs", scalar_fields=["name"])
        assert ix.insert_many("runs", docs(25, name="r")) == 25
        assert ix.collections() == ["runs"]
        assert ix.count("runs") == 25 and ix.count("runs", {"even": True}) == 13
        got = list(ix.find("runs", {"i": {"$gte": 10}}, sort=[("i", -1)], skip=2, limit=3, projection={"i": 1}))
        assert got == [{"_id": "d0022", "i": 22}, {"_id": "d0021", "i": 21}, {"_id": "d0020", "i": 20}]
        assert ix.find_one("runs", {"i": 7})["_id"] == "d0007"
        assert ix.find_one("runs", {"i": 99}) is None
        assert ix.update_many("runs", {"even": False}, {"$inc": {"seen": 1}, "$push": {"log": "x"}}) == 12
        assert ix.find_one("runs", {"_id": "d0003"})["log"] == ["x"]
        assert ix.replace_one("runs", {"_id": "d0003", "i": 3, "name": "new"}) is True
        assert ix.find_one("runs", {"_id": "d0003"}) == {"_id": "d0003", "i": 3, "name": "new"}
        assert ix.replace_one("runs", {"_id": "nope", "i": 0}) is False
        assert ix.replace_one("runs", {"_id": "nope", "i": 0}, upsert=True) is True
        deleted = ix.delete_many("runs", {"i": {"$lt": 2}})
        assert sorted(d["_id"] for d in deleted) == ["d0000", "d0001", "nope"]
        assert ix.count("runs") == 23
        assert ix.distinct("runs", "even") == [False, True]
        assert list(ix.find("runs", limit=0)) == []

    def test_missing_collection_is_empty(self, index):
        ix = index
        assert list(ix.find("ghost")) == [] and ix.count("ghost") == 0 and ix.delete_many("ghost", {}) == []
        assert ix.update_many("ghost", {}, {"$set": {"a": 1}}) == 0
        assert ix.find_one_and_update("ghost", {}, {"$set": {"a": 1}}) is None
        with pytest.raises(QueryError):  # a bad query is reported even where nothing could match
            list(ix.find("ghost", {"$where": "1"}))

    def test_find_one_and_update_returns_updated_doc_in_sort_order(self, index):
        ix = index
        ix.insert_many("tasks", ({"_id": f"t{i}", "status": "pending", "prio": i % 3} for i in range(6)))
        got = ix.find_one_and_update("tasks", {"status": "pending"}, {"$set": {"status": "running"}},
                                     sort=[("prio", -1)])
        assert got == {"_id": "t2", "status": "running", "prio": 2}
        assert ix.count("tasks", {"status": "running"}) == 1

    def test_duplicate_key_leaves_the_chunk_unwritten(self, index):
        ix = index
        ix.insert_many("c", docs(3))
        batch = [{"_id": "new1"}, {"_id": "d0001"}, {"_id": "new2"}]
        with pytest.raises(DuplicateKey, match="d0001"):
            ix.insert_many("c", batch)
        assert ix.count("c") == 3 and ix.find_one("c", {"_id": "new1"}) is None
        with pytest.raises(DuplicateKey, match="twice"):
            ix.insert_many("c", [{"_id": "z"}, {"_id": "z"}])
        # chunks before the failing one stay written
        with pytest.raises(DuplicateKey):
            ix.insert_many("c", [{"_id": "ok1"}, {"_id": "ok2"}, {"_id": "d0000"}], chunk_size=2)
        assert ix.count("c") == 5

    def test_invalid_documents_are_refused_before_writing(self, index):
        ix = index
        for bad, fragment in [({"_id": "x", "a": float("nan")}, "a"), ({"_id": "x", "a": {"b.c": 1}}, "b.c"),
                              ({"_id": "x", "s": "\udc80"}, "surrogate"), ({"_id": "x", "t": {1, 2}}, "set"),
                              ({"i": 1}, "_id"), ({"_id": "x", "n": 2**64}, "64")]:
            with pytest.raises(InvalidDocument, match=fragment):
                ix.insert_many("c", [{"_id": "fine"}, bad])
        assert ix.count("c") == 0
        ix.insert_one("c", {"_id": "x", "n": 2**63 - 1})
        with pytest.raises(InvalidDocument):
            ix.update_many("c", {}, {"$inc": {"n": 1}})  # overflow: rolled back
        assert ix.find_one("c")["n"] == 2**63 - 1

    def test_scalar_fields_are_enforced(self, index):
        ix = index
        ix.ensure_collection("m", scalar_fields=["name", "cfg.kind"])
        ix.insert_one("m", {"_id": "a", "name": "mlp", "cfg": {"kind": "x"}})
        for bad in [{"_id": "b", "name": ["mlp"]}, {"_id": "b", "cfg": {"kind": {"k": 1}}}]:
            with pytest.raises(InvalidDocument, match="scalar"):
                ix.insert_one("m", bad)
        with pytest.raises(InvalidDocument, match="scalar"):
            ix.update_many("m", {}, {"$set": {"name": [1]}})
        for bad in [{"_id": "b", "name": OrderedDict(k=1)}, {"_id": "b", "cfg": {"kind": OrderedDict(k=1)}}]:
            with pytest.raises(InvalidDocument, match="scalar"):  # a dict subclass is an object too
                ix.insert_many("m", [bad])
        with pytest.raises(InvalidDocument, match="scalar"):
            ix.replace_one("m", {"_id": "a", "name": ["mlp"]}, upsert=True)
        ix.insert_one("m", {"_id": "c", "tags": [1]})
        with pytest.raises(InvalidDocument, match="'c'"):
            ix.ensure_collection("m", scalar_fields=["tags"])
        assert ix.count("m", {"name": "mlp"}) == 1 and ix.count("m", {"name": None}) == 1
        with pytest.raises(QueryError, match="not the string"):
            ix.ensure_collection("m", scalar_fields="name")

    def test_index_serves_best_model_query(self, index):
        ix = index
        ix.ensure_collection("models", scalar_fields=["name"])
        ix.insert_many("models", ({"_id": f"m{i:04d}", "name": ["mlp", "cnn"][i % 2], "acc": (i * 37 % 101) / 100}
                                  for i in range(400)))
        ix.create_index("models", [("name", 1), ("acc", -1)])
        ix.create_index("models", [("name", 1), ("acc", -1)])  # idempotent
        assert len(ix.indexes("models")) == 1
        assert [tuple(k) for k in ix.indexes("models")[0]["keys"]] == [("name", 1), ("acc", -1)]
        best = ix.find_one("models", {"name": "mlp", "acc": {"$gt": 0.5}}, sort=[("acc", -1)])
        assert best["acc"] == max(d["acc"] for d in ix.find("models", {"name": "mlp"}))

    def test_unique_index(self, index):
        ix = index
        ix.create_index("u", [("key", 1)], unique=True)
        ix.insert_one("u", {"_id": "a", "key": "k"})
        with pytest.raises(DuplicateKey):
            ix.insert_one("u", {"_id": "b", "key": "k"})

    def test_bad_names_and_arguments(self, index):
        ix = index
        for bad in ["Runs", "1x", "a-b", "x; drop table mlw_meta", "", None]:
            with pytest.raises(QueryError, match="invalid collection name .*lowercase letters, digits and '_'"):
                ix.ensure_collection(bad)
            with pytest.raises(QueryError, match="invalid collection name"):
                ix.count(bad)
        for limit, skip, what in [(-1, 0, "limit"), (True, 0, "limit"), (2**63, 0, "limit"), (None, -1, "skip"),
                                  (1, 1.0, "skip")]:
            with pytest.raises(QueryError, match=f"{what} must be an integer from 0 to 2\\*\\*63 - 1"):
                list(ix.find("c", {}, limit=limit, skip=skip))
        with pytest.raises(QueryError):
            list(ix.find("c", {}, sort="a"))
        with pytest.raises(QueryError):
            ix.create_index("c", [("a'); drop table x;--", 1)])
        with pytest.raises(QueryError, match="at least one"):
            ix.create_index("c", [])

    def test_documents_come_back_exactly_as_written(self, index):
        """Key order, int versus float, large and negative-zero numbers, unicode: all survive the round trip."""
        ix = index
        doc = {"_id": "a", "z": 1, "a": {"y": [1.0, 1, -0.0], "b": None}, "big": 1e20, "i": 2**63 - 1,
               "f": 0.30000000000000004, "s": "é😀\"\\\n", "t": True}
        ix.insert_one("c", doc)
        got = ix.find_one("c")
        assert got == doc and list(got) == list(doc) and list(got["a"]) == ["y", "b"]
        assert [type(v) for v in got["a"]["y"]] == [float, int, float] and str(got["a"]["y"][2]) == "-0.0"
        assert type(got["big"]) is float and got["i"] == 2**63 - 1

    def test_values_compare_like_the_reference(self, index):
        ix = index
        ix.insert_many("c", [{"_id": "o1", "v": {"a": 1, "b": 2}}, {"_id": "o2", "v": {"b": 2, "a": 1}},
                             {"_id": "n1", "v": 2**62}, {"_id": "n2", "v": float(2**62)}, {"_id": "n3", "v": 0.1},
                             {"_id": "n4", "v": 2**53 + 1}, {"_id": "s1", "v": "b\n"}, {"_id": "s2", "v": "É"},
                             {"_id": "a1", "v": [1, [2]]}, {"_id": "a2", "v": [1.0]}, {"_id": "b1", "v": False}])

        def ids(f, **kw):
            return [d["_id"] for d in ix.find("c", f, **kw)]
        assert ids({"v": {"a": 1, "b": 2}}) == ["o1"]  # objects are equal by their JSON text: key order matters
        assert ids({"v": 2**62}) == ["n1", "n2"] and ids({"v": float(2**62)}) == ["n1", "n2"]
        assert ids({"v": {"$gt": 2**53}}) == ["n1", "n2", "n4"] and ids({"v": {"$gt": 2**62 - 1}}) == ["n1", "n2"]
        assert ids({"v": 0.1}) == ["n3"] and ids({"v": {"$lt": 0.1}}) == []
        assert ids({"v": [1]}) == [] and ids({"v": [1.0]}) == ["a2"] and ids({"v": 1}) == ["a1", "a2"]
        assert ids({"v": [2]}) == ["a1"] and ids({"v": 2}) == []
        assert ids({"v": {"$regex": "b$"}}) == ["s1"]  # $ also matches before a final newline, as in Python
        assert ids({"v": {"$regex": "^b.$"}}) == [] and ids({"v": {"$regex": "^b.$", "$options": "s"}}) == ["s1"]
        assert ids({"v": {"$regex": "é", "$options": "i"}}) == ["s2"]
        assert ids({"v": {"$regex": re.compile(r"\bb")}}) == ["s1"]
        assert ids({"v": {"$gte": False}}) == ["b1"]
        order = ["n3", "n4", "n1", "n2", "s1", "s2", "o1", "o2", "a1", "a2", "b1"]
        assert order == [d["_id"] for d in sort_docs(ix.find("c"), [("v", 1)])]  # the reference agrees
        assert ids({}, sort=[("v", 1)]) == order
        assert ids({}, sort=[("v", -1)]) == ["b1", "a2", "a1", "o2", "o1", "s2", "s1", "n1", "n2", "n4", "n3"]
        assert ids({"v.0": 1}) == ["a1", "a2"] and ids({"v.-1": {"$exists": True}}) == []
        assert ids({"v.01": {"$exists": True}}) == []

    def test_values_reads_columns_typed_like_documents(self, index):
        docs = [{"_id": "a", "run": "r", "step": 2, "loss": 0.5, "ok": True, "tags": ["x"], "m": {"k": 1}},
                {"_id": "b", "run": "r", "step": 1, "loss": 1, "ok": False, "name": "s"},
                {"_id": "c", "run": "q", "step": 0, "loss": None},
                {"_id": "d", "run": "r", "step": 3, "shape": [4, 5]}]
        index.insert_many("logs", docs)
        assert index.values("logs", {"run": "r"}, ["step", "loss"], sort=[("step", 1)]) == [
            (1, 1), (2, 0.5), (3, None)]
        rows = index.values("logs", {"run": "r"}, ["ok", "tags", "m.k", "name", "shape.1"], sort=[("step", -1)])
        assert rows == [(None, None, None, None, 5), (True, ["x"], 1, None, None), (False, None, None, "s", None)]
        assert type(rows[1][0]) is bool and type(rows[2][0]) is bool
        assert index.values("logs", {"run": "r"}, ["step"], sort=[("step", 1)], limit=2) == [(1,), (2,)]
        assert index.values("nothing", {}, ["a"]) == []
        with pytest.raises(QueryError):
            index.values("logs", {}, ["bad path!"])

    def test_threads_share_an_index(self, index):
        ix = index

        def work(k):
            ix.insert_many("c", ({"_id": f"{k}-{i}", "k": k} for i in range(50)))
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ix.count("c") == 200

    @pytest.mark.slow
    def test_find_one_and_update_is_atomic_across_processes(self, index, reopen):
        index.insert_many("tasks", ({"_id": f"t{i:04d}", "status": "pending"} for i in range(300)))
        results = dict(_run_processes(_claim_all, [(reopen, w) for w in range(4)], timeout=60))
        claimed = [i for r in results.values() for i in r]
        assert len(claimed) == len(set(claimed)) == 300
        assert index.count("tasks", {"status": "running"}) == 300
        for w, r in results.items():
            assert all(index.find_one("tasks", {"_id": i})["worker"] == w for i in r[:5])

    @pytest.mark.slow
    def test_find_one_and_update_on_one_document_never_misses_it(self, index, reopen):
        index.insert_one("counters", {"_id": "c", "n": 0})
        assert _run_processes(_increment, [(reopen, 50)] * 4) == ["ok"] * 4
        assert index.find_one("counters")["n"] == 200

    @pytest.mark.slow
    def test_eight_concurrent_writers(self, index, reopen):
        index.ensure_collection("logs")
        outcomes = dict(_run_processes(_write_a_lot, [(reopen, w) for w in range(8)]))
        assert outcomes == {w: "ok" for w in range(8)}
        assert index.count("logs") == 8 * 500
        assert index.count("logs", {"n": {"$gte": 1}}) == 8 * 500
