"""The SQLite index backend: CRUD, atomicity, scalar fields, indexes, raw SQL and error mapping."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest

from mlwarehouse.errors import BackendError, DuplicateKey, InvalidDocument, QueryError
from mlwarehouse.index.sqlite import SQLiteIndex


@pytest.fixture
def ix(tmp_path):
    index = SQLiteIndex(tmp_path / "index.sqlite")
    yield index
    index.close()


def docs(n, **extra):
    return ({"_id": f"d{i:04d}", "i": i, "even": i % 2 == 0, **extra} for i in range(n))


def test_crud_roundtrip(ix):
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


def test_missing_collection_is_empty(ix):
    assert list(ix.find("ghost")) == [] and ix.count("ghost") == 0 and ix.delete_many("ghost", {}) == []
    assert ix.update_many("ghost", {}, {"$set": {"a": 1}}) == 0
    assert ix.find_one_and_update("ghost", {}, {"$set": {"a": 1}}) is None
    with pytest.raises(QueryError):  # a bad query is reported even where nothing could match
        list(ix.find("ghost", {"$where": "1"}))


def test_find_one_and_update_returns_updated_doc_in_sort_order(ix):
    ix.insert_many("tasks", ({"_id": f"t{i}", "status": "pending", "prio": i % 3} for i in range(6)))
    got = ix.find_one_and_update("tasks", {"status": "pending"}, {"$set": {"status": "running"}},
                                 sort=[("prio", -1)])
    assert got == {"_id": "t2", "status": "running", "prio": 2}
    assert ix.count("tasks", {"status": "running"}) == 1


def test_duplicate_key_leaves_the_chunk_unwritten(ix):
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


def test_invalid_documents_are_refused_before_writing(ix):
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


def test_scalar_fields_are_enforced(ix):
    ix.ensure_collection("m", scalar_fields=["name", "cfg.kind"])
    ix.insert_one("m", {"_id": "a", "name": "mlp", "cfg": {"kind": "x"}})
    for bad in [{"_id": "b", "name": ["mlp"]}, {"_id": "b", "cfg": {"kind": {"k": 1}}}]:
        with pytest.raises(InvalidDocument, match="scalar"):
            ix.insert_one("m", bad)
    with pytest.raises(InvalidDocument, match="scalar"):
        ix.update_many("m", {}, {"$set": {"name": [1]}})
    ix.insert_one("m", {"_id": "c", "tags": [1]})
    with pytest.raises(InvalidDocument, match="'c'"):
        ix.ensure_collection("m", scalar_fields=["tags"])
    assert ix.count("m", {"name": "mlp"}) == 1 and ix.count("m", {"name": None}) == 1


def test_index_serves_best_model_query(ix):
    ix.ensure_collection("models", scalar_fields=["name"])
    ix.insert_many("models", ({"_id": f"m{i:04d}", "name": ["mlp", "cnn"][i % 2], "acc": (i * 37 % 101) / 100}
                              for i in range(400)))
    ix.create_index("models", [("name", 1), ("acc", -1)])
    ix.create_index("models", [("name", 1), ("acc", -1)])  # idempotent
    assert len(ix.indexes("models")) == 1
    best = ix.find_one("models", {"name": "mlp", "acc": {"$gt": 0.5}}, sort=[("acc", -1)])
    assert best["acc"] == max(d["acc"] for d in ix.find("models", {"name": "mlp"}))
    from mlwarehouse.sql import Compiler
    c = Compiler(scalar_fields=["name"])
    where, order = c.where({"name": "mlp", "acc": {"$gt": 0.5}}), c.order_by([("acc", -1)])
    plan = ix.sql(f"EXPLAIN QUERY PLAN SELECT doc FROM c_models WHERE {where} ORDER BY {order} LIMIT 1", c.params)
    text = " ".join(str(r["detail"]) for r in plan)
    assert "USING INDEX ix_models_" in text and "TEMP B-TREE" not in text


def test_unique_index(ix):
    ix.create_index("u", [("key", 1)], unique=True)
    ix.insert_one("u", {"_id": "a", "key": "k"})
    with pytest.raises(DuplicateKey):
        ix.insert_one("u", {"_id": "b", "key": "k"})


def test_sql_is_read_only(ix):
    ix.insert_many("c", docs(5))
    ix.create_view("evens", "SELECT id, json_extract(doc, '$.i') AS i FROM c_c WHERE json_extract(doc, '$.even')")
    assert ix.sql("SELECT i FROM evens ORDER BY i") == [{"i": 0}, {"i": 2}, {"i": 4}]
    assert ix.sql("SELECT count(*) AS n FROM c_c WHERE json_extract(doc, '$.i') > ?", [2]) == [{"n": 2}]
    for statement in ["DELETE FROM c_c", "DROP TABLE c_c", "UPDATE c_c SET doc = '{}'", "PRAGMA query_only = 0",
                      "ATTACH DATABASE 'x.db' AS x", "INSERT INTO c_c VALUES ('q', '{}')"]:
        with pytest.raises(QueryError):
            ix.sql(statement)
    assert ix.count("c") == 5
    ix.insert_one("c", {"_id": "after"})  # writes still work after a refused statement
    with pytest.raises(QueryError):
        ix.create_view("Bad Name", "SELECT 1")


def test_bad_names_and_arguments(ix):
    for bad in ["Runs", "1x", "a-b", "x; drop table mlw_meta", ""]:
        with pytest.raises(QueryError):
            ix.ensure_collection(bad)
    with pytest.raises(QueryError):
        list(ix.find("c", {}, limit=-1))
    with pytest.raises(QueryError):
        list(ix.find("c", {}, sort="a"))
    with pytest.raises(QueryError):
        ix.create_index("c", [("a'); drop table x;--", 1)])


def test_locked_database_maps_to_backend_error(tmp_path):
    path = tmp_path / "locked.sqlite"
    ix = SQLiteIndex(path, timeout=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BackendError, match="locked"):
            ix.insert_one("c", {"_id": "x"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    ix.insert_one("c", {"_id": "x"})
    ix.close()
    with pytest.raises(BackendError, match="closed"):
        ix.count("c")


def test_threads_share_an_index(ix):
    def work(k):
        ix.insert_many("c", ({"_id": f"{k}-{i}", "k": k} for i in range(50)))
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ix.count("c") == 200


def test_memory_index():
    with SQLiteIndex(":memory:") as ix:
        ix.insert_many("c", docs(3))
        assert [d["i"] for d in ix.find("c", sort=[("i", -1)])] == [2, 1, 0]


def _claim_all(path, worker, queue):
    ix = SQLiteIndex(path)
    claimed = []
    while True:
        doc = ix.find_one_and_update("tasks", {"status": "pending"},
                                     {"$set": {"status": "running", "worker": worker}}, sort=[("_id", 1)])
        if doc is None:
            break
        claimed.append(doc["_id"])
    ix.close()
    queue.put((worker, claimed))


@pytest.mark.slow
def test_find_one_and_update_is_atomic_across_processes(tmp_path):
    path = tmp_path / "tasks.sqlite"
    with SQLiteIndex(path) as ix:
        ix.insert_many("tasks", ({"_id": f"t{i:04d}", "status": "pending"} for i in range(300)))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(path, w, queue)) for w in range(4)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    claimed = [i for r in results.values() for i in r]
    assert len(claimed) == len(set(claimed)) == 300
    with SQLiteIndex(path) as ix:
        assert ix.count("tasks", {"status": "running"}) == 300
        for w, r in results.items():
            assert all(ix.find_one("tasks", {"_id": i})["worker"] == w for i in r[:5])


def _write_a_lot(path, worker, queue):
    ix = SQLiteIndex(path)
    try:
        for chunk in range(10):
            ix.insert_many("logs", ({"_id": f"{worker}-{chunk}-{i}", "w": worker} for i in range(50)))
            ix.update_many("logs", {"w": worker}, {"$inc": {"n": 1}})
        queue.put((worker, "ok"))
    except Exception as exc:  # reported to the parent, which fails the test
        queue.put((worker, repr(exc)))
    finally:
        ix.close()


@pytest.mark.slow
def test_eight_concurrent_writers_never_see_locked(tmp_path):
    path = tmp_path / "busy.sqlite"
    SQLiteIndex(path).close()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_write_a_lot, args=(path, w, queue)) for w in range(8)]
    for p in procs:
        p.start()
    outcomes = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == {w: "ok" for w in range(8)}
    with SQLiteIndex(path) as ix:
        assert ix.count("logs") == 8 * 500
        assert ix.count("logs", {"n": {"$gte": 1}}) == 8 * 500
