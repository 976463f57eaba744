"""The SQLite index backend: the conformance suite, plus query plans, raw SQL, locking and in-memory use."""

from __future__ import annotations

import functools
import sqlite3
import threading
import time

import pytest

from mlwarehouse.errors import BackendError, QueryError
from mlwarehouse.index.sqlite import SQLiteIndex
from mlwarehouse.testing.index_conformance import IndexTests, docs


@pytest.fixture
def ix(tmp_path):
    index = SQLiteIndex(tmp_path / "index.sqlite")
    yield index
    index.close()


class TestSQLiteIndex(IndexTests):
    @pytest.fixture
    def index(self, ix):
        return ix

    @pytest.fixture
    def reopen(self, ix):
        return functools.partial(SQLiteIndex, ix.path)


def test_index_plan_serves_best_model_query(ix):
    ix.ensure_collection("models", scalar_fields=["name"])
    ix.insert_many("models", ({"_id": f"m{i:04d}", "name": ["mlp", "cnn"][i % 2], "acc": (i * 37 % 101) / 100}
                              for i in range(400)))
    ix.create_index("models", [("name", 1), ("acc", -1)])
    best = ix.find_one("models", {"name": "mlp", "acc": {"$gt": 0.5}}, sort=[("acc", -1)])
    assert best["acc"] == max(d["acc"] for d in ix.find("models", {"name": "mlp"}))
    from mlwarehouse.index.sql.compiler import Compiler
    c = Compiler(scalar_fields=["name"])
    where, order = c.where({"name": "mlp", "acc": {"$gt": 0.5}}), c.order_by([("acc", -1)])
    plan = ix.sql(f"EXPLAIN QUERY PLAN SELECT doc FROM c_models WHERE {where} ORDER BY {order} LIMIT 1", c.params)
    text = " ".join(str(r["detail"]) for r in plan)
    assert "USING INDEX ix_models_" in text and "TEMP B-TREE" not in text


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


def test_views_are_created_once_and_replaced_on_request(ix):
    ix.insert_many("c", docs(3))
    ix.create_view("v", "SELECT id FROM c_c")
    ix.create_view("v", "SELECT id, doc FROM c_c")  # exists: left as it is
    assert list(ix.sql("SELECT * FROM v ORDER BY id")[0]) == ["id"]
    ix.create_view("v", "SELECT id, doc FROM c_c", replace=True)
    assert list(ix.sql("SELECT * FROM v ORDER BY id")[0]) == ["id", "doc"]


def test_names_have_no_length_limit(ix):
    name = "a" * 200  # SQLite has no limit on names; PostgreSQL's index refuses more than 48 characters
    ix.insert_one(name, {"_id": "x"})
    ix.create_index(name, [("k", 1)])
    assert ix.collections() == [name] and ix.count(name) == 1


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


def test_opening_waits_for_a_writer_of_a_new_file(tmp_path):
    """Processes opening a fresh file together: switching it to WAL while another holds its write lock fails at
    once in SQLite (no busy handler, to avoid a deadlock), so the switch is retried until the writer is done."""
    path = tmp_path / "fresh.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    try:
        ix = SQLiteIndex(path, timeout=10)
    finally:
        release.join()
        holder.close()
    assert 0.25 <= time.monotonic() - started < 5
    ix.insert_one("c", {"_id": "x"})
    assert ix.count("c") == 1
    ix.close()


def test_memory_index():
    with SQLiteIndex(":memory:") as ix:
        ix.insert_many("c", docs(3))
        assert [d["i"] for d in ix.find("c", sort=[("i", -1)])] == [2, 1, 0]
