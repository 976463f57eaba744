"""Bounded queries (issue 12, items 6 and 9): catastrophic regular expressions and too deep or too large filters
are refused at validation with a QueryError naming the rule or limit, on every backend; real use still works."""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest

from mlwarehouse.errors import QueryError
from mlwarehouse.index.sqlite import SQLiteIndex
from mlwarehouse.query import limits, matches, validate_sort, validate_update
from mlwarehouse.query.documents import validate_projection
from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.views_conformance import postgres_schema

REDOS = [r"^((\w+)+)+!", r"(a+)+b", r"(a|a)*b", r"(a|aa)+$", r"(.*a){20}", r"^(\d+)*$", r"(x+x+)+y", r"(a)\1"]


def _postgres(dsn: str):
    pytest.importorskip("psycopg")
    from mlwarehouse.index.postgres import PostgresIndex
    stack = ExitStack()  # unwound last in, first out: the index closes, then its fresh schema is dropped
    ix = PostgresIndex(stack.enter_context(postgres_schema(dsn)))
    stack.callback(ix.close)
    return ix, stack.close


def _mongo(uri: str):
    pytest.importorskip("pymongo")
    from mlwarehouse.index.mongo import MongoIndex
    ix = MongoIndex(fresh_uri(uri))
    return ix, lambda: (ix.conn.db().client.drop_database(ix.database), ix.close())


@pytest.fixture(params=["sqlite", "postgresql", "mongodb"])
def index(request, tmp_path):
    if request.param == "sqlite":
        ix, drop = SQLiteIndex(tmp_path / "i.db"), None
    elif request.param == "postgresql":  # the session fixtures start the servers, or skip saying why
        ix, drop = _postgres(request.getfixturevalue("postgres_server"))
    else:
        ix, drop = _mongo(request.getfixturevalue("mongo_server"))
    ix.insert_many("c", [{"_id": f"id{i:05d}", "name": "a" * 40 + "!" * (i % 2), "tags": ["x", "y"], "n": i}
                         for i in range(300)])
    ix.insert_many("c", [{"_id": "long", "name": "a" * 5000}])
    yield ix
    if drop:
        drop()
    else:
        ix.close()


@pytest.mark.parametrize("pattern", REDOS)
def test_catastrophic_patterns_are_refused_or_fast(index, pattern):
    start = time.monotonic()
    with pytest.raises(QueryError, match="exponential"):
        list(index.find("c", {"name": {"$regex": pattern}}))
    with pytest.raises(QueryError):
        index.count("c", {"name": {"$not": {"$regex": pattern}}})
    assert time.monotonic() - start < 1.0


def test_ordinary_patterns_still_work(index):
    assert index.count("c", {"name": {"$regex": "^a+!$"}}) == 150
    assert index.count("c", {"_id": {"$regex": "^id0001[0-9]$"}}) == 10
    assert index.count("c", {"name": {"$regex": "(?:ab)?a{3,}"}}) == 301


def _deep(depth: int) -> dict:
    f: dict = {"n": 1}
    for _ in range(depth):
        f = {"$or": [f, {"n": -1}]}
    return f


def _nested_list(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


def _deep_elem(depth: int) -> dict:
    f: dict = {"$gt": 0}
    for _ in range(depth):
        f = {"$not": f}
    return {"n": f}


@pytest.mark.parametrize("make, limit", [
    (lambda: _deep(200), "MAX_DEPTH"),
    (lambda: _deep(5000), "MAX_DEPTH"),
    (lambda: _deep_elem(3000), "MAX_DEPTH"),
    (lambda: {"tags": {"$elemMatch": _deep(100)}}, "MAX_DEPTH"),
    (lambda: {"n": {"$eq": _nested_list(40)}}, "MAX_DEPTH"),
    (lambda: {"$or": [{"n": i} for i in range(2000)]}, "MAX_PREDICATES"),
    (lambda: {"$or": [{"n": i} for i in range(100)]}, "MAX_PREDICATES"),
    (lambda: {"tags": {"$all": [str(i) for i in range(1000)]}}, "MAX_PREDICATES"),
    (lambda: {"$and": [{"$or": [{"$and": [{"n": 1}, {"$or": [{"n": 2}, {"n": 3}]}]}]}] * 30}, "MAX_PREDICATES"),
    (lambda: {"n": {"$in": list(range(100_000))}}, "MAX_TERMS"),
    (lambda: {"name": "a" * 200_000}, "MAX_STRING"),
    (lambda: {"name": {"$regex": "a" * 5000}}, "MAX_PATTERN"),
    (lambda: {".".join(["a"] * 2000): 1}, "MAX_PATH_LENGTH"),
])
def test_too_deep_or_too_large_filters_name_the_limit(index, make, limit):
    flt = make()
    with pytest.raises(QueryError, match=limit):
        list(index.find("c", flt))
    with pytest.raises(QueryError, match=limit):
        index.count("c", flt)
    with pytest.raises(QueryError, match=limit):
        index.delete_many("c", flt)
    with pytest.raises(QueryError, match=limit):
        matches({"_id": "x"}, flt)
    assert index.count("c", {}) == 301


def test_filters_at_the_limits_run_on_every_backend(index):
    """Just inside each limit, every backend answers (no BackendError from its parser, stack or variables)."""
    ids = [f"id{i:05d}" for i in range(10_000)]  # 10,000 ids, as the registries and task waits query them
    assert index.count("c", {"_id": {"$in": ids}}) == 300
    assert index.count("c", {"tags": {"$in": [str(i) for i in range(7_000)] + ["x"]}}) == 300
    assert index.count("c", _deep(limits.MAX_DEPTH - 2)) == 1
    start = time.monotonic()
    assert index.count("c", {"$or": [{"n": i} for i in range(limits.MAX_PREDICATES)]}) == limits.MAX_PREDICATES
    assert time.monotonic() - start < 5  # PostgreSQL plans long OR chains slowly: the limit keeps it short
    nested = {"tags": {"$elemMatch": {"$in": ["x"]}}}
    for _ in range(8):
        nested = {"$and": [nested, {"$or": [{"n": {"$gte": 0}}, {"tags": {"$not": {"$size": 9}}}]}]}
    assert index.count("c", nested) == 300


def test_sorts_projections_and_updates_are_bounded():
    with pytest.raises(QueryError, match="MAX_SORT_KEYS"):
        validate_sort([(f"f{i}", 1) for i in range(100)])
    with pytest.raises(QueryError, match="MAX_PATHS"):
        validate_projection({f"f{i}": 1 for i in range(5000)})
    with pytest.raises(QueryError, match="MAX_PATHS"):
        validate_update({"$set": {f"f{i}": 1 for i in range(5000)}})
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(QueryError, match="nested too deeply"):
        validate_update({"$set": {"a": deep}})
    with pytest.raises(QueryError, match="nested too deeply"):
        validate_update({"$push": {"a": {"$each": [deep]}}})
