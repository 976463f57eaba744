"""Property test: the SQL compilation returns exactly the documents, in exactly the order, of the Python matcher.

Each example draws a batch of documents (nested objects, arrays, nulls, booleans, ints, floats, strings, missing
fields), stores them in a real index, and runs several random valid filters and sorts against both: SQLite
(1,000 examples by default, ``$MLW_SQL_EXAMPLES``) and PostgreSQL (500, ``$MLW_PG_EXAMPLES``), with the same
generated queries.
Field ``c`` is declared scalar, so the index-friendly compilation of scalar fields is covered too.
"""

from __future__ import annotations

import os
import re
import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlwarehouse.index.sqlite import SQLiteIndex
from mlwarehouse.query import MISSING, get_path, matches, sort_docs
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

KEYS = ["a", "b", "0", "1"]
PATHS = ["a", "b", "c", "a", "b", "c", "a.a", "a.b", "a.0", "b.1", "a.0.a", "a.1.b", "a.a.0", "b.0.0", "_id", "zz"]

ints = st.integers(-3, 3) | st.sampled_from([2**63 - 1, -(2**63), 2**53 + 1, 10**15])
floats = st.sampled_from([-1.5, 0.0, -0.0, 1.0, 2.0, 2.5, 1e20, 1e-5, 0.1]) | st.floats(
    -1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
texts = st.text(alphabet="aAbé\U0001f600\"\\\n", max_size=3)
scalars = st.none() | st.booleans() | ints | floats | texts
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3), max_leaves=5)


@st.composite
def documents(draw):
    n = draw(st.integers(0, 10))
    docs = []
    for i in range(n):
        doc = {"_id": ["x", "", "Y"][i * 7 % 3] + f"{i:02d}"}
        for key in ("a", "b"):
            if draw(st.booleans()):
                doc[key] = draw(values)
        if draw(st.booleans()):
            doc["c"] = draw(scalars)
        docs.append(doc)
    return docs


def collect(value, out):
    out.append(value)
    if isinstance(value, list):
        for v in value:
            collect(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            collect(v, out)


class Ref:
    """Stands for "a value that occurs in the drawn documents", so that filters often match something."""

    def __init__(self, i: int):
        self.i = i


def resolve(node, docs, seen, path=None):
    """Replace each Ref by a value found at the same path in one of the documents (or anywhere, failing that)."""
    if isinstance(node, Ref):
        found = [v for v in (get_path(d, path) for d in docs) if v is not MISSING] if path else []
        if not found:
            return seen[node.i % len(seen)] if seen else None
        value = found[node.i % len(found)]
        if isinstance(value, list) and value and node.i % 3:
            value = value[node.i // 3 % len(value)]
        return value
    if isinstance(node, list):
        return [resolve(v, docs, seen, path) for v in node]
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in ("$and", "$or", "$nor"):
                out[key] = resolve(value, docs, seen, None)
            elif key.startswith("$"):
                out[key] = resolve(value, docs, seen, path)
            else:
                out[key] = resolve(value, docs, seen, key if path is None else f"{path}.{key}")
        return out
    return node


def occurring(docs):
    seen = []
    for doc in docs:
        for key, value in doc.items():
            collect(value, seen)
        seen.append(doc["_id"])
    return seen


def conditions(operand, depth):
    cmp = st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"])
    single = st.one_of(
        st.tuples(cmp, operand),
        st.tuples(st.sampled_from(["$in", "$nin", "$all"]), st.lists(operand, max_size=3)),
        st.tuples(st.just("$exists"), st.booleans()),
        st.tuples(st.just("$size"), st.integers(0, 3)),
        st.tuples(st.just("$regex"), st.sampled_from(["a", "^b", "é$", "A", "\\d", "^$"])),
    )
    ops = st.lists(single, min_size=1, max_size=2).map(dict)
    with_options = st.sampled_from(["a", "^B", "É"]).map(lambda p: {"$regex": p, "$options": "i"})
    cond = operand | ops | with_options | st.sampled_from([re.compile("^a"), re.compile("b", re.I)])
    if depth > 0:
        cond = cond | ops.map(lambda o: {"$not": o}) | ops.map(lambda o: {"$elemMatch": o}) | \
            filters(operand, depth - 1).filter(bool).map(lambda f: {"$elemMatch": f})
    return cond


def filters(operand, depth=2):
    field = st.tuples(st.sampled_from(PATHS), conditions(operand, depth))
    plain = st.lists(field, min_size=1, max_size=2).map(dict)
    if depth == 0:
        return plain
    logical = st.tuples(st.sampled_from(["$and", "$or", "$nor"]),
                        st.lists(filters(operand, depth - 1), min_size=1, max_size=3))
    combined = st.tuples(st.lists(field, max_size=1), logical).map(lambda t: {**dict(t[0]), t[1][0]: t[1][1]})
    return st.one_of(plain, plain, combined)


REF = st.builds(Ref, st.integers(0, 10**6))
OPERAND = st.one_of(REF, REF, REF, scalars, values)
FILTERS = filters(OPERAND)
sorts = st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from([1, -1])), max_size=3,
                 unique_by=lambda t: t[0])

_index = SQLiteIndex(":memory:")
_index.ensure_collection("docs", scalar_fields=["c"])


@settings(max_examples=int(os.environ.get("MLW_SQL_EXAMPLES", "1000")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_sql_matches_python(data):
    check(_index, data)


@pytest.fixture(scope="module")
def pg_index(postgres_server):
    psycopg = pytest.importorskip("psycopg")
    from psycopg.conninfo import make_conninfo

    from mlwarehouse.index.postgres import PostgresIndex
    schema = "prop_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server, autocommit=True) as con:
        con.execute(f"CREATE SCHEMA {schema}")
    index = PostgresIndex(make_conninfo(postgres_server, options=f"-csearch_path={schema}"))
    index.ensure_collection("docs", scalar_fields=["c"])
    yield index
    index.close()
    with psycopg.connect(postgres_server, autocommit=True) as con:
        con.execute(f"DROP SCHEMA {schema} CASCADE")


@settings(max_examples=int(os.environ.get("MLW_PG_EXAMPLES", "500")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_postgres_sql_matches_python(pg_index, data):
    check(pg_index, data)


def check(index, data):
    """Store drawn documents in ``index``, then compare three random queries with the Python matcher."""
    _index = index
    docs = data.draw(documents())
    _index.delete_many("docs", {})
    _index.insert_many("docs", docs)
    seen = occurring(docs)
    for _ in range(3):
        f = resolve(data.draw(FILTERS, label="filter"), docs, seen)
        sort = data.draw(sorts, label="sort")
        skip = data.draw(st.sampled_from([0, 0, 1, 3]), label="skip")
        limit = data.draw(st.sampled_from([None, None, 1, 2]), label="limit")
        expected = sort_docs([d for d in docs if matches(d, f)], sort)
        got = list(_index.find("docs", f, sort=sort))
        assert [d["_id"] for d in got] == [d["_id"] for d in expected], (f, sort)
        assert got == expected
        end = None if limit is None else skip + limit
        page = [d["_id"] for d in _index.find("docs", f, sort=sort, skip=skip, limit=limit)]
        assert page == [d["_id"] for d in expected[skip:end]]
        assert _index.count("docs", f) == len(expected)
