"""The MongoDB index against a local nx-27017 server (or $MLW_TEST_MONGO_URI): the conformance suite, a property
test against the reference matcher, the workarounds for the server's bugs, and error mapping."""

from __future__ import annotations

import functools
import multiprocessing
import time

import pytest

from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: F401
from mlwarehouse.testing.servers import in_ci

if not in_ci():  # in CI a missing driver is an error, never a skip
    pytest.importorskip("pymongo", reason="the MongoDB backend needs pymongo (pip install -e '.[mongo]')")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlwarehouse.config import open_index, resolve  # noqa: E402
from mlwarehouse.errors import BackendError, ConfigError, Unavailable  # noqa: E402
from mlwarehouse.index.mongo import REVISION, MongoIndex, pushdown  # noqa: E402
from mlwarehouse.query import matches, parse_filter, sort_docs  # noqa: E402
from mlwarehouse.testing.index_conformance import IndexTests  # noqa: E402


def drop(ix: MongoIndex) -> None:
    ix.conn.drop_database()
    ix.close()


@pytest.fixture
def uri(mongo_server):  # noqa: F811
    return fresh_uri(mongo_server)


class TestMongoIndex(IndexTests):
    @pytest.fixture
    def index(self, uri):
        ix = MongoIndex(uri)
        yield ix
        drop(ix)

    @pytest.fixture
    def reopen(self, uri):
        return functools.partial(MongoIndex, uri)


@pytest.fixture
def ix(uri):
    index = MongoIndex(uri)
    yield index
    drop(index)


def test_add_to_set_on_a_missing_field_works_despite_the_server(ix):
    ix.insert_many("c", [{"_id": "a"}, {"_id": "b", "s": [1]}])
    assert ix.update_many("c", {}, {"$addToSet": {"s": {"$each": [1, 2, 1]}}}) == 2
    assert [d["s"] for d in ix.find("c")] == [[1, 2], [1, 2]]
    assert ix.find_one_and_update("c", {"_id": "a"}, {"$addToSet": {"t": "x"}})["t"] == ["x"]


def test_revision_field_stays_hidden(ix):
    ix.insert_one("c", {"_id": "a", "n": 1})
    ix.update_many("c", {}, {"$inc": {"n": 1}})
    raw = ix._coll("c").find_one({"_id": "a"})
    assert REVISION in raw
    assert ix.find_one("c") == {"_id": "a", "n": 2}
    assert ix.find_one("c", projection={"n": 0}) == {"_id": "a"}
    assert ix.delete_many("c", {"n": 2}) == [{"_id": "a", "n": 2}]


def test_pushdown_is_a_superset_filter():
    assert pushdown(parse_filter({"a": "x", "b.c": 1, "d": {"$gt": 1}, "e": {"$in": ["p", 2]}, "f": True})) == \
        {"$and": [{"a": "x"}, {"e": {"$in": ["p", 2]}}]}
    assert pushdown(parse_filter({"$or": [{"a": 1}, {"b": 2}]})) == {}
    assert pushdown(parse_filter({"$and": [{"a": 1}], "b": None})) == {"a": 1}


def test_limit_and_sort_by_id_stream_from_the_server(ix):
    ix.insert_many("c", ({"_id": f"{i:03d}", "v": [i] if i % 3 else i} for i in range(60)))
    got = [d["_id"] for d in ix.find("c", {"v": {"$gt": 10}}, sort=[("_id", -1)], skip=1, limit=3)]
    assert got == ["058", "057", "056"]
    assert ix.count("c", {"v": {"$lt": 5}}) == 5


def test_delete_rechecks_a_document_changed_meanwhile(ix):
    ix.insert_many("c", [{"_id": "a", "s": "old"}, {"_id": "b", "s": "old"}])
    found = ix._fetch("c", parse_filter({"s": "old"}), None)
    ix.update_many("c", {"_id": "b"}, {"$set": {"s": "new"}})  # changes after the read, before the delete
    coll = ix._coll("c")
    import pymongo

    from mlwarehouse.index.mongo import _guard
    coll.bulk_write([pymongo.DeleteOne(_guard(d["_id"], rev)) for d, rev in found], ordered=False)
    assert [d["_id"] for d in ix.find("c")] == ["b"]  # the guard kept the changed document


def test_unreachable_server_fails_fast_naming_it():
    start = time.monotonic()
    with pytest.raises(Unavailable, match="127.0.0.1:9"):
        MongoIndex("mongodb://127.0.0.1:9/x", timeout=1.0)
    assert time.monotonic() - start < 5


def test_credentials_refused_name_the_user(mongo_server):  # noqa: F811
    authed = mongo_server.replace("mongodb://", "mongodb://ghost:wrong@", 1)
    start = time.monotonic()
    try:
        MongoIndex(fresh_uri(authed))
    except Unavailable as exc:
        assert "'ghost'" in str(exc) and "username/password" in str(exc)
    else:  # pragma: no cover - a real server with this user would be a misconfigured test server
        pytest.fail("a made-up user was accepted")
    assert time.monotonic() - start < 10


def test_bad_uris():
    for bad in ["mongodb://", "mongodb:///db"]:
        with pytest.raises(ConfigError):
            MongoIndex(bad)


def test_closed_index(uri):
    ix = MongoIndex(uri)
    ix.close()
    with pytest.raises(BackendError, match="closed"):
        ix.count("c")


def test_config_opens_mongo_index_and_gridfs_blobs(uri, monkeypatch):
    monkeypatch.delenv("MLW_BLOBS", raising=False)
    settings_ = resolve(uri)
    assert settings_.blobs_uri == uri
    ix = open_index(uri)
    assert isinstance(ix, MongoIndex)
    drop(ix)


# -- property test: the server plus the Python check return exactly what the reference returns ---------------
def _property_strategies():
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import test_sql_property as p
    return p


_p = _property_strategies()


@pytest.fixture(scope="module")
def prop_index(mongo_server):  # noqa: F811
    index = MongoIndex(fresh_uri(mongo_server))
    index.ensure_collection("docs", scalar_fields=["c"])
    yield index
    drop(index)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_results_equal_the_reference(prop_index, data):
    docs = data.draw(_p.documents())
    prop_index.delete_many("docs", {})
    prop_index.insert_many("docs", docs)
    seen = _p.occurring(docs)
    for _ in range(3):
        f = _p.resolve(data.draw(_p.FILTERS, label="filter"), docs, seen)
        sort = data.draw(_p.sorts, label="sort")
        skip = data.draw(st.sampled_from([0, 1, 3]), label="skip")
        limit = data.draw(st.sampled_from([None, 1, 2]), label="limit")
        expected = sort_docs([d for d in docs if matches(d, f)], sort)
        got = list(prop_index.find("docs", f, sort=sort, skip=skip, limit=limit))
        end = None if limit is None else skip + limit
        assert got == expected[skip:end], (f, sort)
        assert prop_index.count("docs", f) == len(expected)


# -- TensorHub(ip, port) against the server ------------------------------------------------------------------
def test_tensorhub_over_mongodb(mongo_server, tmp_path):  # noqa: F811
    np = pytest.importorskip("numpy")
    from urllib.parse import urlsplit

    from mlwarehouse import TensorHub
    host = urlsplit(mongo_server)
    dbname = fresh_uri(mongo_server).rsplit("/", 1)[1]
    a = TensorHub(ip=host.hostname, port=host.port, dbname=dbname, project_name="alpha")
    b = TensorHub(ip=host.hostname, port=host.port, dbname=dbname, project_name="beta")
    try:
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        assert a.save_dataset((x, x * 2), "mnist", split="train")
        got = a.find_top_dataset("mnist", split="train")
        assert np.array_equal(got[0], x) and np.array_equal(got[1], x * 2)
        assert b.find_top_dataset("mnist") is False  # projects are scoped
        assert a.save_model({"w": x}, model_name="mlp", accuracy=0.8)
        assert a.save_model({"w": x + 1}, model_name="mlp", accuracy=0.9)
        best = a.find_top_model(sort=[("accuracy", -1)], model_name="mlp")
        assert np.array_equal(best["w"], x + 1) and best._accuracy == 0.9
        assert a.delete_model(accuracy=0.8) == 1
        assert a.delete_datasets() == 1 and a.find_top_dataset("mnist") is False
    finally:
        a.warehouse.index.conn.drop_database()
        a.close()
        b.close()


def _claim(uri, worker, queue):
    ix = MongoIndex(uri)
    got = []
    while (doc := ix.find_one_and_update("tasks", {"status": "pending"}, {"$set": {"status": worker}},
                                         sort=[("prio", -1)])) is not None:
        got.append(doc["_id"])
    ix.close()
    queue.put(got)


@pytest.mark.slow
def test_eight_processes_claim_by_priority_without_doubles(ix, uri):
    ix.insert_many("tasks", ({"_id": f"t{i:03d}", "status": "pending", "prio": i % 7} for i in range(200)))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(uri, f"w{w}", queue)) for w in range(8)]
    for p in procs:
        p.start()
    claimed = [i for _ in procs for i in queue.get(timeout=120)]
    for p in procs:
        p.join(timeout=30)
    assert len(claimed) == len(set(claimed)) == 200
    assert ix.count("tasks", {"status": "pending"}) == 0


@pytest.mark.slow
def test_server_killed_mid_write_leaves_whole_documents():
    """SIGKILL the server during a stream of updates: the writer gets Unavailable within seconds, and after a
    restart on the same files every document is wholly old or wholly new (each write is one replace)."""
    import os
    import signal
    import threading

    from mlwarehouse.testing.mongo_server import have_nx27017, start_nx27017
    from mlwarehouse.testing.servers import stop
    if not have_nx27017():
        pytest.skip("needs nx-27017 to kill and restart a server")
    server = start_nx27017()
    try:
        ix = MongoIndex(server.uri + "killed")
        ix.insert_many("c", ({"_id": f"d{i:03d}", "a": 0, "b": 0, "pad": "x" * 2000} for i in range(200)))
        outcome: list[BaseException] = []

        def write():
            try:
                for v in range(1, 1000):
                    ix.update_many("c", {}, {"$set": {"a": v, "b": v, "pad": str(v) * 2000}})
            except BaseException as exc:  # reported below
                outcome.append(exc)
        t = threading.Thread(target=write)
        t.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(server.pid, signal.SIGKILL)
        os.waitpid(server.pid, 0)
        t.join(30)
        assert outcome and isinstance(outcome[0], Unavailable), outcome
        assert time.monotonic() - killed_at < 10
        ix.close()
        server = start_nx27017(data_dir=server.data_dir)
        with MongoIndex(server.uri + "killed") as again:
            docs = list(again.find("c"))
            assert len(docs) == 200
            assert all(d["a"] == d["b"] and d["pad"] == (str(d["a"]) * 2000 if d["a"] else "x" * 2000)
                       for d in docs)
            assert len({d["a"] for d in docs}) <= 2  # the update in flight reached a prefix of the documents
    finally:
        stop(server)


def test_index_with_id_keeps_inserts_working(ix):
    ix.create_index("t", [("project", 1), ("status", 1), ("_id", 1)])
    ix.create_index("t", [("_id", -1)], unique=True)
    ix.insert_one("t", {"status": "pending", "_id": "a", "project": "p"})
    assert ix.find_one("t", {"project": "p"}) == {"status": "pending", "_id": "a", "project": "p"}
    assert [i["keys"] for i in ix.indexes("t")] == [[("project", 1), ("status", 1), ("_id", 1)], [("_id", -1)]]
