"""Filters and sorts on run summaries, hyper-parameters and model metrics are served by indexes made on demand.

``runs.find``, ``runs.best``, ``models.find`` and ``models.best`` create the index their query needs (once per
process, bounded); the SQL backends split an equality on a field that may hold arrays into two index ranges so that
the index serves the filter and the sort together. Checked here: the plans (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on
PostgreSQL), that results stay exactly the reference matcher's (arrays included, and a property test over random
filters with indexes present), the bound, the per-process cache, and MongoDB getting the same index.
"""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlwarehouse
from mlwarehouse.errors import QueryError
from mlwarehouse.ids import new_id, utc_now
from mlwarehouse.index.autoindex import QueryIndexes
from mlwarehouse.index.sql import statements
from mlwarehouse.index.sqlite import SQLiteIndex
from mlwarehouse.query import matches, parse_filter, sort_docs
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.views_conformance import postgres_schema

HP, ACC = "hyper_parameters.p0", "summary.valid.acc0.max"
QUERY = {"where": {HP: "3"}, "sort": [(ACC, -1)], "limit": 1}


def run_docs(n: int, seed: int = 0) -> list[dict]:
    """Run documents as runs.start writes them; every 50th holds a list at the hyper-parameter, some lack it."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p0 = [str(i % 10), "x"] if i % 50 == 7 else None if i % 97 == 0 else str(i % 10)
        hp = {} if p0 is None else {"p0": p0}
        out.append({"_id": new_id(), "name": f"r{i}", "status": "complete", "started": utc_now(), "ended": None,
                    "hyper_parameters": hp, "datasets": [], "tags": [], "task": None,
                    "summary": {"valid": {"acc0": {"max": round(rng.random(), 3)}}} if i % 13 else {}})
    return out


def expected(docs: list[dict], flt: dict, sort, project: str) -> list[str]:
    scoped = [d for d in docs if d.get("project") == project and matches(d, flt)]
    return [d["_id"] for d in sort_docs(scoped, sort)]


def statement(ix, collection: str, flt: dict, sort, limit):
    """The SQL (and parameters) the backend runs for ``find``."""
    node = parse_filter(flt)
    return ix._statement("find", collection, node, ix._scalar_fields(collection), sort, limit, 0)


def test_issue_query_makes_a_composite_index_that_serves_filter_and_sort(wh):
    p = wh.project()
    docs = run_docs(3000)
    p.insert_many("runs", docs)
    got = p.runs.find(**QUERY)
    assert [r.id for r in got] == expected(docs, {HP: "3"}, [(ACC, -1)], p.name)[:1]
    keys = [[tuple(k) for k in ix["keys"]] for ix in wh.index.indexes("runs")]
    assert [("project", 1), (HP, 1), (ACC, -1)] in keys
    sql, params = statement(wh.index, "runs", p.scope({HP: "3"}), [(ACC, -1)], 1)
    rows = wh.index.sql("EXPLAIN QUERY PLAN " + sql, params)
    plan = [r["detail"] for r in rows]
    searches = [line for line in plan if "c_runs" in line]
    assert len(searches) == 2 and all("USING INDEX ix_runs_" in line for line in searches), plan
    assert not any(line.startswith("SCAN c_runs") for line in plan), plan
    # the half that holds the answer: four equalities (project's and p0's rank and value), read in the index's
    # order (no sort of its own); the other half reads the (few) arrays held there
    (h0,) = [r["id"] for r in rows if r["detail"] == "CO-ROUTINE h0"]
    assert [r["detail"] for r in rows if r["parent"] == h0] == [searches[0]], plan
    assert searches[0].count("=?") == 4 and searches[1].count("=?") == 3, plan


def test_results_are_the_reference_matchers_with_arrays_skip_and_count(wh):
    p = wh.project()
    docs = run_docs(1200, seed=1)
    p.insert_many("runs", docs)
    stored = p.find("runs")
    for where, sort in [({HP: "3"}, [(ACC, -1)]), ({HP: "x"}, [(ACC, 1)]), ({HP: "7"}, None),
                        ({HP: {"$in": ["1", "x"]}}, [(ACC, -1), ("name", 1)]),
                        ({"summary.valid.acc0.max": {"$gt": 0.5}}, [(ACC, -1)]),
                        ({HP: "3", "summary.valid.acc0.max": {"$lt": 0.2}}, [(ACC, -1)])]:
        want = expected(stored, where, sort or [("started", -1)], p.name)
        for skip, limit in [(0, None), (0, 1), (3, 5), (len(want) - 1, 10)]:
            got = [r.id for r in p.runs.find(where=where, sort=sort, skip=max(skip, 0), limit=limit)]
            end = None if limit is None else max(skip, 0) + limit
            assert got == want[max(skip, 0):end], (where, sort, skip, limit)
        assert wh.index.count("runs", p.scope(where)) == len(want)
    assert p.runs.find(where={HP: "x"}, limit=0) == []


def test_count_is_split_and_served_by_the_index(wh):
    p = wh.project()
    p.insert_many("runs", run_docs(2000, seed=2))
    p.runs.find(where={HP: "4"}, sort=[(ACC, -1)], limit=1)
    node = parse_filter(p.scope({HP: "4"}))
    sql, params = wh.index._statement("count", "runs", node, wh.index._scalar_fields("runs"), None, None, 0)
    plan = " ".join(r["detail"] for r in wh.index.sql("EXPLAIN QUERY PLAN " + sql, params))
    assert plan.count("USING COVERING INDEX ix_runs_") + plan.count("USING INDEX ix_runs_") == 2, plan
    assert "SCAN c_runs" not in plan, plan
    assert wh.index.count("runs", p.scope({HP: "4"})) == sum(
        1 for d in p.find("runs") if matches(d, {HP: "4"}))


def test_best_with_a_hyper_parameter_filter_gets_its_own_index(wh):
    p = wh.project()
    docs = run_docs(1500, seed=3)
    p.insert_many("runs", docs)
    best = p.runs.best("valid.acc0", where={HP: "5"})
    want = expected(p.find("runs"), {HP: "5", ACC: {"$exists": True}}, [(ACC, -1)], p.name)
    assert best.id == want[0]
    keys = [[tuple(k) for k in ix["keys"]] for ix in wh.index.indexes("runs")]
    assert [("project", 1), (HP, 1), (ACC, -1)] in keys
    assert p.runs.best(ACC, mode="min").summary["valid"]["acc0"]["max"] == min(
        d["summary"]["valid"]["acc0"]["max"] for d in docs if d["summary"])
    assert [(ACC, 1)] in [[tuple(k) for k in ix["keys"]] for ix in wh.index.indexes("runs")]  # as best always did


def test_model_metrics_filters_and_sorts_are_indexed(wh):
    p = wh.project()
    for i in range(60):
        p.models.save({"w": [float(i)]}, ["mlp", "cnn"][i % 2], test_accuracy=(i * 37 % 61) / 61,
                      hp={"depth": i % 4})
    found = p.models.find(where={"hp.depth": 2}, sort=[("test_accuracy", -1)], limit=3)
    every = p.find("models")
    want = expected(every, {"hp.depth": 2, "checkpoint": {"$ne": True}}, [("test_accuracy", -1)], p.name)
    assert [m.id for m in found] == want[:3]
    keys = [[tuple(k) for k in ix["keys"]] for ix in wh.index.indexes("models")]
    assert [("project", 1), ("hp.depth", 1), ("test_accuracy", -1)] in keys
    worst = p.models.best("test_accuracy", mode="min", name="cnn")
    assert worst.test_accuracy == min(d["test_accuracy"] for d in every if d["name"] == "cnn")
    keys = [[tuple(k) for k in ix["keys"]] for ix in wh.index.indexes("models")]
    assert [("project", 1), ("name", 1), ("test_accuracy", 1)] in keys
    c = p.index
    sql, params = statement(c, "models", p.scope({"hp.depth": 2, "checkpoint": {"$ne": True}}),
                            [("test_accuracy", -1)], 3)
    plan = [r["detail"] for r in c.sql("EXPLAIN QUERY PLAN " + sql, params)]
    assert sum("USING INDEX ix_models_" in line for line in plan) == 2, plan


def test_indexes_are_bounded_and_refused_with_a_log_line(wh, caplog):
    p = wh.project()
    p.insert_many("runs", run_docs(200, seed=4))
    queries = QueryIndexes(p, "runs", eligible=lambda path: path.startswith("hyper_parameters."),
                           scalar_fields=("name", "status"), declared=len(wh.index.indexes("runs")), limit=2)
    assert queries.ensure({"hyper_parameters.a": 1}, None) == [("project", 1), ("hyper_parameters.a", 1)]
    assert queries.ensure({"hyper_parameters.b": 1}, [("started", -1)]) == [
        ("project", 1), ("hyper_parameters.b", 1), ("started", -1)]
    before = len(wh.index.indexes("runs"))
    with caplog.at_level(logging.WARNING, logger="mlwarehouse.index.autoindex"):
        assert queries.ensure_keys([("project", 1), ("hyper_parameters.c", 1)]) is False
        assert queries.ensure_keys([("project", 1), ("hyper_parameters.c", 1)]) is False
    assert len(wh.index.indexes("runs")) == before
    assert len([r for r in caplog.records if "hyper_parameters.c" in r.getMessage()]) == 1  # said once
    assert "limit" in caplog.records[0].getMessage()
    # a shape made already is still fine past the bound, and queries without an index stay correct
    assert queries.ensure_keys([("project", 1), ("hyper_parameters.a", 1)]) is True
    assert len(p.find("runs", {"hyper_parameters.c": 1})) == 0


def test_no_index_for_fields_outside_summaries_hyper_parameters_and_user_fields(wh):
    q = wh.runs.queries
    assert q.keys_for({"status": "complete"}, [("started", -1)]) is None
    assert q.keys_for(None, [("name", 1)]) is None
    assert q.keys_for({"status": "complete", HP: 3}, None) == [("project", 1), ("status", 1), (HP, 1)]
    assert q.keys_for({HP: {"$gt": 1}}, [("started", -1)]) == [("project", 1), (HP, 1)]
    assert q.keys_for({"$and": [{HP: True}, {"summary.x.y.max": {"$exists": True}}]}, [("summary.x.y.max", -1)]) \
        == [("project", 1), (HP, 1), ("summary.x.y.max", -1)]
    assert q.keys_for({HP: [1, 2]}, [(ACC, 1)]) == [("project", 1), (ACC, 1)]  # an array operand: sort only
    assert q.keys_for({"bad path!": 1, HP: "a"}, [("_id", 1), (ACC, 1)]) == [("project", 1), (HP, 1)]
    with pytest.raises(QueryError, match="bogus"):  # a bad query still raises from the query itself
        wh.runs.find(where={HP: {"$bogus": 1}})


def test_the_index_check_is_cached_per_process(wh, monkeypatch):
    p = wh.project()
    p.insert_many("runs", run_docs(100, seed=5))
    p.runs.find(**QUERY)
    calls = []
    for name in ("indexes", "create_index"):
        original = getattr(wh.index, name)
        monkeypatch.setattr(wh.index, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    for _ in range(50):
        p.runs.find(**QUERY)
    assert "create_index" not in calls and calls.count("indexes") <= 1  # at most the plan's periodic re-read


def test_an_index_made_by_another_process_is_used_after_the_refresh(tmp_path, monkeypatch):
    path = tmp_path / "ix.sqlite"
    mine, other = SQLiteIndex(path), SQLiteIndex(path)
    try:
        mine.ensure_collection("runs", scalar_fields=["project"])
        mine.insert_many("runs", ({"_id": f"r{i:04d}", "project": "p", "hp": i % 5, "acc": i / 100}
                                  for i in range(300)))
        flt, sort = {"project": "p", "hp": 3}, [("acc", -1)]
        assert mine._split("runs", parse_filter(flt), mine._scalar_fields("runs")) is None
        other.create_index("runs", [("project", 1), ("hp", 1), ("acc", -1)])
        monkeypatch.setattr(statements, "INDEX_FIELDS_TTL", 0.0)
        assert mine._split("runs", parse_filter(flt), mine._scalar_fields("runs")).path == "hp"
        assert [d["_id"] for d in mine.find("runs", flt, sort=sort, limit=2)] == ["r0298", "r0293"]
    finally:
        mine.close()
        other.close()


# -- the split plans return exactly what the matcher does, for random filters, with indexes present ---------------
@pytest.fixture(scope="module")
def prop():
    import test_sql_property
    return test_sql_property


_indexed = SQLiteIndex(":memory:")
_indexed.ensure_collection("docs", scalar_fields=["c"])
for _keys in ([("a", 1)], [("b", -1), ("a", 1)], [("c", 1), ("b", 1)], [("a.a", 1), ("zz", -1)], [("a.0", 1)]):
    _indexed.create_index("docs", _keys)


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_split_plans_match_python(prop, data):
    prop.check(_indexed, data)


def test_split_halves_are_taken_for_plain_and_range_conditions():
    ix = _indexed
    scalars = ix._scalar_fields("docs")
    for flt, field in [({"a": 1}, "a"), ({"c": 2, "b": "x"}, "b"), ({"b": {"$gt": 1}}, "b"), ({"a.a": True}, "a.a"),
                       ({"a": {"$in": [1, "2"]}, "b": 3}, "b"), ({"$and": [{"zz": 1}, {"a": {"$lt": 0}}]}, "a"),
                       ({"zz": 1}, None), ({"a": [1]}, None), ({"a": None}, None), ({"$or": [{"a": 1}]}, None),
                       ({"a": {"$ne": 1}}, None), ({"c": 1}, None)]:
        got = ix._split("docs", parse_filter(flt), scalars)
        assert (got.path if got else None) == field, flt
    docs = [{"_id": "x1", "a": [1, 2]}, {"_id": "x2", "a": 1}, {"_id": "x3", "a": [[1]]}, {"_id": "x4"},
            {"_id": "x5", "a": 2}, {"_id": "x6", "a": [2, "1"]}]
    ix.delete_many("docs", {})
    ix.insert_many("docs", docs)
    for flt in [{"a": 1}, {"a": 2}, {"a": "1"}, {"a": {"$in": [1, "1"]}}, {"a": {"$gte": 2}}, {"a": {"$lt": 2}}]:
        for sort in ([("a", -1)], [("a", 1)], None):
            want = [d["_id"] for d in sort_docs([d for d in docs if matches(d, flt)], sort)]
            assert [d["_id"] for d in ix.find("docs", flt, sort=sort)] == want, (flt, sort)
            assert [d["_id"] for d in ix.find("docs", flt, sort=sort, limit=1, skip=1)] == want[1:2]
            assert ix.count("docs", flt) == len(want)


# -- PostgreSQL: the same plans with EXPLAIN ----------------------------------------------------------------------
@pytest.fixture
def pg_wh(postgres_server, tmp_path):  # noqa: F811
    with postgres_schema(postgres_server) as uri:
        warehouse = mlwarehouse.connect(uri, blobs=str(tmp_path / "blobs"))
        yield warehouse
        warehouse.close()


def test_postgres_plan_serves_the_issue_query_with_the_index(pg_wh):
    p = pg_wh.project()
    docs = run_docs(4000, seed=6)
    p.insert_many("runs", docs)
    got = p.runs.find(**QUERY)
    assert [r.id for r in got] == expected(p.find("runs"), {HP: "3"}, [(ACC, -1)], p.name)[:1]
    sql, params = statement(pg_wh.index, "runs", p.scope({HP: "3"}), [(ACC, -1)], 1)
    plan = "\n".join(r["QUERY PLAN"] for r in pg_wh.index.sql("EXPLAIN " + sql, params))
    assert "Seq Scan" not in plan, plan
    assert plan.count("ix_runs_") == 2, plan
    whole = plan[plan.index("Subquery Scan on h0"):plan.index("Subquery Scan on h1")]
    assert "Index Scan using ix_runs_" in whole and "Sort" not in whole, plan  # the answer's half: no sort
    assert p.runs.find(where={HP: "x"}, sort=[(ACC, 1)], skip=2, limit=3) == [
        p.runs.get(i) for i in expected(p.find("runs"), {HP: "x"}, [(ACC, 1)], p.name)[2:5]]
    assert pg_wh.index.count("runs", p.scope({HP: "x"})) == sum(1 for d in docs if matches(d, {HP: "x"}))


@pytest.fixture(scope="module")
def pg_indexed(postgres_server):  # noqa: F811
    from mlwarehouse.index.postgres import PostgresIndex
    with postgres_schema(postgres_server) as uri:
        index = PostgresIndex(uri)
        index.ensure_collection("docs", scalar_fields=["c"])
        for keys in ([("a", 1)], [("b", -1), ("a", 1)], [("c", 1), ("b", 1)], [("a.a", 1), ("zz", -1)]):
            index.create_index("docs", keys)
        yield index
        index.close()


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_postgres_split_plans_match_python(prop, pg_indexed, data):
    prop.check(pg_indexed, data)


# -- MongoDB: the registries make the same index there ------------------------------------------------------------
def test_mongo_gets_the_same_index(mongo_server, tmp_path):  # noqa: F811
    from mlwarehouse.testing.mongo_server import fresh_uri
    uri = fresh_uri(mongo_server)
    warehouse = mlwarehouse.connect(uri, blobs=uri)
    try:
        p = warehouse.project()
        docs = run_docs(300, seed=7)
        p.insert_many("runs", docs)
        got = p.runs.find(**QUERY)
        assert [r.id for r in got] == expected(p.find("runs"), {HP: "3"}, [(ACC, -1)], p.name)[:1]
        server = warehouse.index._coll("runs").index_information()
        # the fields (this wire-compatible server reports every direction as 1)
        assert ["project", HP, ACC] in [[f for f, _ in v["key"]] for v in server.values()]
    finally:
        warehouse.index.conn.drop_database()
        warehouse.close()
