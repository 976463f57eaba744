"""The PostgreSQL index backend: the conformance suite, plus plans, raw SQL, LISTEN/NOTIFY and error mapping.

Each test gets its own schema in the test database (``search_path`` in the connection options), so tests are
isolated without creating a database each time.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import secrets
import threading
import time

import pytest

psycopg = pytest.importorskip("psycopg") if not os.environ.get("CI") else __import__("psycopg")

from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

from mlwarehouse.errors import ConfigError, QueryError, Unavailable  # noqa: E402
from mlwarehouse.index.postgres import PostgresIndex  # noqa: E402
from mlwarehouse.index.sql.compiler import Compiler  # noqa: E402
from mlwarehouse.index.sql.postgres_dialect import POSTGRES  # noqa: E402
from mlwarehouse.testing.index_conformance import IndexTests, docs  # noqa: E402
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: E402,F401


@pytest.fixture
def schema_dsn(postgres_server):
    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server, autocommit=True) as con:
        con.execute(f"CREATE SCHEMA {schema}")
    yield make_conninfo(postgres_server, options=f"-csearch_path={schema}")
    with psycopg.connect(postgres_server, autocommit=True) as con:
        con.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def ix(schema_dsn):
    index = PostgresIndex(schema_dsn)
    yield index
    index.close()


class TestPostgresIndex(IndexTests):
    @pytest.fixture
    def index(self, ix):
        return ix

    @pytest.fixture
    def reopen(self, schema_dsn):
        return functools.partial(PostgresIndex, schema_dsn)


def test_index_plan_serves_best_model_query(ix):
    ix.ensure_collection("models", scalar_fields=["name"])
    ix.insert_many("models", ({"_id": f"m{i:05d}", "name": ["mlp", "cnn"][i % 2], "acc": (i * 37 % 101) / 100}
                              for i in range(5000)))
    ix.create_index("models", [("name", 1), ("acc", -1)])
    c = Compiler(POSTGRES, scalar_fields=["name"])
    where, order = c.where({"name": "mlp", "acc": {"$gt": 0.5}}), c.order_by([("acc", -1)])
    plan = ix.sql(f"EXPLAIN SELECT doc FROM c_models WHERE {where} ORDER BY {order} LIMIT 1", c.params)
    text = " ".join(r["QUERY PLAN"] for r in plan)
    assert "Index Scan using ix_models_" in text and "Sort" not in text, text
    best = ix.find_one("models", {"name": "mlp", "acc": {"$gt": 0.5}}, sort=[("acc", -1)])
    assert best["acc"] == max(d["acc"] for d in ix.find("models", {"name": "mlp"}))


def test_a_new_index_is_analyzed_and_one_already_there_is_not(ix, schema_dsn):
    """create_index ANALYZEs the table when it makes an index (the planner then knows it pays), and costs nothing
    when the index is there already (every process opening a vector index asks for its ``_rev`` index)."""
    ix.insert_many("items", ({"_id": f"i{i:04d}", "k": i % 7} for i in range(500)))  # too few to ANALYZE on load
    with psycopg.connect(schema_dsn, autocommit=True) as con:
        con.execute("ALTER TABLE c_items SET (autovacuum_enabled = false)")

        def rows():
            return con.execute("SELECT reltuples FROM pg_class WHERE oid = 'c_items'::regclass").fetchone()[0]

        assert rows() < 0  # never analyzed
        ix.create_index("items", [("k", 1)])
        assert rows() == 500
        ix.insert_many("items", ({"_id": f"j{i:04d}", "k": i % 7} for i in range(300)))
        ix.create_index("items", [("k", 1)])
        assert rows() == 500
        ix.create_index("items", [("k", -1), ("_id", 1)])
        assert rows() == 800


def test_sql_is_read_only(ix):
    ix.insert_many("c", docs(5))
    assert ix.sql("SELECT count(*) AS n FROM c_c WHERE (doc->>'i')::int > %s", [2]) == [{"n": 2}]
    for statement in ["DELETE FROM c_c", "DROP TABLE c_c", "UPDATE c_c SET doc = '{}'", "COMMIT; DROP TABLE c_c",
                      "INSERT INTO c_c VALUES ('q', '{}')", "CREATE TABLE x (a int)", "SELECT nextval('nope')"]:
        with pytest.raises(QueryError):
            ix.sql(statement)
    assert ix.count("c") == 5
    ix.insert_one("c", {"_id": "after"})  # writes still work after a refused statement
    assert ix.count("c") == 6


def test_views_are_created_once_and_replaced_on_request(schema_dsn):
    with PostgresIndex(schema_dsn, max_connections=1) as ix, PostgresIndex(schema_dsn, max_connections=1) as other:
        ix.insert_many("c", docs(3))
        ix.create_view("v", "SELECT id FROM c_c")
        ix.create_view("v", "SELECT id, doc::text AS doc FROM c_c")  # exists: left as it is
        assert list(ix.sql("SELECT * FROM v")[0]) == ["id"]
        ix.create_view("v", "SELECT id, doc::text AS doc FROM c_c", replace=True)
        assert list(ix.sql("SELECT * FROM v")[0]) == ["id", "doc"]
        other.create_view("v", "SELECT id AS x FROM c_c", replace=True)  # ix's prepared "SELECT * FROM v" is stale
        assert list(ix.sql("SELECT * FROM v")[0]) == ["x"]
        with pytest.raises(QueryError, match="at most 48"):
            ix.create_view("v" * 49, "SELECT 1")


def test_names_are_at_most_48_characters(ix):
    ix.insert_one("a" * 48, {"_id": "x"})
    ix.create_index("a" * 48, [("k", 1)])
    assert ix.collections() == ["a" * 48]
    for call in (lambda: ix.insert_one("a" * 49, {"_id": "x"}), lambda: ix.count("a" * 49),
                 lambda: ix.listen("a" * 49, 0)):
        with pytest.raises(QueryError, match="invalid collection name 'a+': use at most 48 lowercase letters"):
            call()


def test_listen_wakes_on_a_delete(ix):
    ix.insert_one("tasks", {"_id": "t1"})
    assert ix.listen("tasks", 0.1) is False
    other = threading.Timer(0.3, ix.delete_many, ("tasks", {}))
    other.start()
    assert ix.listen("tasks", 10) is True
    other.join()


def test_listen_wakes_on_a_write_from_another_process(ix, schema_dsn):
    ix.ensure_collection("tasks")
    assert ix.listen("tasks", 0.2) is False  # nothing written: times out

    def write_later():
        time.sleep(0.3)
        other = PostgresIndex(schema_dsn)
        other.insert_one("tasks", {"_id": "t1"})
        other.close()
    t = threading.Thread(target=write_later)
    start = time.monotonic()
    t.start()
    assert ix.listen("tasks", 10) is True
    assert time.monotonic() - start < 5
    t.join()


def test_unreachable_server_is_reported_quickly():
    start = time.monotonic()
    with pytest.raises(Unavailable, match="127.0.0.1:1"):
        PostgresIndex("postgresql://mlw:x@127.0.0.1:1/mlw_test", connect_timeout=2)
    assert time.monotonic() - start < 5


def test_wrong_password_names_the_user(postgres_server):
    info = conninfo_to_dict(postgres_server)
    bad = make_conninfo(postgres_server, password="wrong")
    with pytest.raises(Unavailable, match=f"user '{info['user']}'.*check the credentials"):
        PostgresIndex(bad)


def test_missing_database_is_a_config_error(postgres_server):
    with pytest.raises(ConfigError, match="'no_such_db'.*does not exist"):
        PostgresIndex(make_conninfo(postgres_server, dbname="no_such_db"))


def test_server_dropping_mid_write_leaves_no_half_written_chunk(ix, schema_dsn):
    ix.insert_many("c", docs(10))
    with psycopg.connect(schema_dsn, autocommit=True) as con:  # slow every row down, so the chunk is in flight
        con.execute("CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$")
        con.execute("CREATE TRIGGER slow BEFORE INSERT ON c_c FOR EACH ROW EXECUTE FUNCTION slow()")
    errors = []

    def insert():
        try:
            ix.insert_many("c", ({"_id": f"new{i}", "i": i} for i in range(3000)), chunk_size=3000)
        except Exception as exc:
            errors.append(exc)
    t = threading.Thread(target=insert)
    t.start()
    time.sleep(1.0)
    with psycopg.connect(schema_dsn, autocommit=True) as con:
        killed = con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'COPY%%' "
                             "AND pid <> pg_backend_pid()").fetchall()
    t.join(30)
    assert killed and len(errors) == 1 and isinstance(errors[0], Unavailable), errors
    assert ix.count("c") == 10  # the chunk in flight left nothing behind, and the index still works


def _log_writer(dsn, worker, queue):
    ix = PostgresIndex(dsn, connect_timeout=30)  # 16 processes on 2 cores: slow connects are not failures
    try:
        for chunk in range(20):
            ix.insert_many("logs", ({"_id": f"{worker}-{chunk}-{i}", "w": worker, "step": i, "loss": 1 / (i + 1)}
                                    for i in range(100)))
        queue.put(("log", worker, "ok"))
    except Exception as exc:
        queue.put(("log", worker, repr(exc)))
    finally:
        ix.close()


def _claimer(dsn, worker, queue):
    ix = PostgresIndex(dsn, connect_timeout=30)
    claimed = []
    try:
        while (doc := ix.find_one_and_update("tasks", {"status": "pending"},
                                             {"$set": {"status": "running", "worker": worker}},
                                             sort=[("prio", -1)])) is not None:
            claimed.append(doc["_id"])
        queue.put(("claim", worker, claimed))
    except Exception as exc:
        queue.put(("claim", worker, repr(exc)))
    finally:
        ix.close()


@pytest.mark.slow
def test_eight_log_writers_and_eight_claimers_at_once(ix, schema_dsn):
    ix.insert_many("tasks", ({"_id": f"t{i:04d}", "status": "pending", "prio": i % 7} for i in range(800)))
    ix.create_index("tasks", [("status", 1), ("prio", -1)])
    ix.ensure_collection("logs")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_log_writer, args=(schema_dsn, w, queue)) for w in range(8)]
    procs += [ctx.Process(target=_claimer, args=(schema_dsn, w, queue)) for w in range(8)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(r[2] for r in results if r[0] == "log") == ["ok"] * 8
    claims = {r[1]: r[2] for r in results if r[0] == "claim"}
    errors = {w: c for w, c in claims.items() if not isinstance(c, list)}
    assert not errors, errors
    claimed = [t for c in claims.values() for t in c]
    assert len(claimed) == len(set(claimed)) == 800  # nothing lost, nothing claimed twice
    assert ix.count("logs") == 8 * 20 * 100
    for w, ids in claims.items():
        assert all(d["worker"] == w for d in ix.find("tasks", {"_id": {"$in": ids}}))
