"""The test PostgreSQL has pgvector 0.8 or newer: vector columns, HNSW indexes and iterative index scans work.

Skipped where the server lacks the extension (Debian's server package), except in CI, where it must be there.
"""

from __future__ import annotations

import os
import secrets

import pytest

psycopg = pytest.importorskip("psycopg") if not os.environ.get("CI") else __import__("psycopg")

from psycopg.conninfo import make_conninfo  # noqa: E402

from mlwarehouse.testing.postgres_server import postgres_server, require_pgvector  # noqa: E402,F401


@pytest.fixture
def vector_dsn(postgres_server):  # noqa: F811
    """A connection string to a schema of its own, with ``public`` (where ``vector`` lives) on the path."""
    require_pgvector(postgres_server)
    schema = "v_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server, autocommit=True) as con:
        con.execute(f"CREATE SCHEMA {schema}")
    yield make_conninfo(postgres_server, options=f"-csearch_path={schema},public")
    with psycopg.connect(postgres_server, autocommit=True) as con:
        con.execute(f"DROP SCHEMA {schema} CASCADE")


def test_hnsw_cosine_nearest_with_an_iterative_scan(vector_dsn):
    with psycopg.connect(vector_dsn, autocommit=True) as con:
        con.execute("CREATE TABLE items (id int PRIMARY KEY, kind text NOT NULL, embedding vector(3) NOT NULL)")
        # 300 rows near the x axis, one of kind 'rare' near the y axis: a filter that an HNSW scan of
        # ef_search candidates misses unless the scan goes on (iterative) until it has LIMIT rows.
        rows = [(i, "common", f"[1,{i / 100},0]") for i in range(1, 301)]
        rows.append((999, "rare", "[0.1,1,0]"))
        with con.cursor() as cur:
            cur.executemany("INSERT INTO items VALUES (%s, %s, %s::vector)", rows)
        con.execute("CREATE INDEX items_embedding ON items USING hnsw (embedding vector_cosine_ops)")
        con.execute("ANALYZE items")
        con.execute("SET enable_seqscan = off")
        con.execute("SET hnsw.ef_search = 10")
        con.execute("SET hnsw.iterative_scan = relaxed_order")
        assert con.execute("SHOW hnsw.iterative_scan").fetchone()[0] == "relaxed_order"

        nearest = "SELECT id FROM items ORDER BY embedding <=> %s::vector LIMIT 1"
        plan = "\n".join(r[0] for r in con.execute("EXPLAIN " + nearest, ("[0,1,0]",)).fetchall())
        assert "items_embedding" in plan
        assert con.execute(nearest, ("[0,1,0]",)).fetchone() == (999,)
        assert con.execute(nearest, ("[1,0,0]",)).fetchone() == (1,)

        filtered = "SELECT id FROM items WHERE kind = 'common' ORDER BY embedding <=> %s::vector LIMIT 1"
        assert con.execute(filtered, ("[0,1,0]",)).fetchone() == (300,)
        rare = "SELECT id FROM items WHERE kind = 'rare' ORDER BY embedding <=> %s::vector LIMIT 1"
        assert con.execute(rare, ("[1,0,0]",)).fetchall() == [(999,)]


def test_our_graph_statement_is_served_by_the_hnsw_index(vector_dsn, postgres_server, tmp_path):  # noqa: F811
    """The statement of a graph search orders by its distance column (the query vector is one binary parameter),
    and PostgreSQL still answers it with the HNSW index scan, with and without a filter."""
    import numpy as np

    import mlwarehouse
    from mlwarehouse.index.pgvectors import _Query
    from mlwarehouse.testing.backend_sets import postgres_schema
    x = np.random.default_rng(5).standard_normal((3000, 8)).astype(np.float32)
    with postgres_schema(postgres_server) as uri:  # vector_dsn: only to skip where pgvector is missing
        wh = mlwarehouse.connect(uri, blobs=str(tmp_path / "blobs"))
        c = wh.collection("items")
        c.insert_many({"_id": f"d{i}", "v": x[i], "g": i % 3} for i in range(len(x)))
        c.create_index("g")  # before the vector index: its table copies "g" and filters it there
        index = c.create_vector_index("v", field="v", engine="pgvector")
        store, name, table = index.backend.store, index.backend.name, c.table.name
        assert index.backend.copied == {"g"}
        for flt, first, out, copied in ((None, "d7", None, False), (None, "d7", "d.doc::text", False),
                                        ({"g": 1}, "d7", "d.doc ->> '_rev'", False),
                                        ({"g": 1}, "d7", "d.doc ->> '_rev'", True),
                                        ({"g": 2}, None, "d.doc ->> '_rev'", True)):
            sql, params = store._graph_statement(name, table, store.index._scalar_fields(table),
                                                 store._op("cosine"), flt, out, 10, copied)
            assert sql.count("%s") == 1 + len(params) and "LIMIT 10" in sql  # the vector, the filter's values
            with store.index._connection() as con:
                store._prepare(con, (40, 1000))
                plan = "\n".join(r[0] for r in con.execute("EXPLAIN " + sql, [_Query(x[7]), *params]))
            assert f"Index Scan using vx_{name}" in plan, plan
            found = index.search(x[7], 5, flt)[0].ids
            assert len(found) == 5 and (first is None or found[0] == first)
            assert flt is None or all(int(i[1:]) % 3 == flt["g"] for i in found)
        wh.close()


def test_exact_for_few_matches_and_the_graph_past_the_square_root(vector_dsn, postgres_server, tmp_path):  # noqa: F811
    """Below about 11 sqrt(documents) matches of an indexed field the search is exact; above, the iterative graph
    scan (cheaper there on pgvector, though the embedded engine would still scan them exactly)."""
    import numpy as np

    import mlwarehouse
    from mlwarehouse.testing.backend_sets import postgres_schema
    x = np.random.default_rng(6).standard_normal((3000, 8)).astype(np.float32)  # 11 sqrt(3000): 602
    with postgres_schema(postgres_server) as uri:
        wh = mlwarehouse.connect(uri, blobs=str(tmp_path / "blobs"))
        c = wh.collection("items")
        c.insert_many({"_id": f"d{i}", "v": x[i], "g": i % 3, "rare": i % 100 == 0} for i in range(len(x)))
        c.create_index("g")
        c.create_index("rare")
        c.create_vector_index("v", field="v", engine="pgvector")
        for flt, plan, allowed in (({"rare": True}, "exact", np.arange(0, 3000, 100)),
                                   ({"g": 1}, "graph", np.arange(1, 3000, 3))):
            same = 0
            for q in x[:10]:
                found = c.find(flt, {"_id": 1}, vector=q, n=5)
                ids = [int(d["_id"][1:]) for d in found]
                assert found.plan == plan and len(ids) == 5 and set(ids) <= set(allowed.tolist())
                scores = x[allowed] @ q / np.linalg.norm(x[allowed], axis=1)
                same += len(set(ids) & set(allowed[np.argsort(-scores)[:5]].tolist()))
            assert same == 50 if plan == "exact" else same >= 45, (plan, same)
        wh.close()


def test_a_filter_index_is_walked_for_its_filter_kept_current_and_shared(vector_dsn, postgres_server, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    """``index_filter`` makes a partial HNSW index over the rows its filter selects; a search with that filter is
    an index scan of it (EXPLAIN), finds what exact search finds, sees rows inserted and moved since, and a second
    process's index of the collection has it too; ``forget_filter`` drops it, and a filter on a field the table
    does not copy is refused."""
    import numpy as np

    import mlwarehouse
    from mlwarehouse.errors import BackendError, NotFound, QueryError, VectorIndexError
    from mlwarehouse.index.pgvectors import PgVectors, _Query
    from mlwarehouse.testing.backend_sets import postgres_schema
    x = np.random.default_rng(7).standard_normal((3000, 8)).astype(np.float32)
    with postgres_schema(postgres_server) as uri:
        wh = mlwarehouse.connect(uri, blobs=str(tmp_path / "blobs"))
        c = wh.collection("items")
        c.insert_many({"_id": f"d{i}", "v": x[i], "kind": "rare" if i % 50 == 0 else "common", "n": i, "m": i}
                      for i in range(len(x)))
        c.create_index("kind")
        c.create_index("n")
        index = c.create_vector_index("v", field="v", engine="pgvector")
        flt = {"kind": "rare"}
        made = index.index_filter(flt)
        store, name, table = index.backend.store, index.backend.name, c.table.name
        assert made["index"].startswith(f"vp_{name}_") and store.filter_indexes(name) == {made["index"]}
        assert index.index_filter(dict(flt))["index"] == made["index"] and index.stats()["filters"] == [flt]
        sql, params = store._graph_statement(name, table, store.index._scalar_fields(table), store._op("cosine"),
                                             flt, "d.doc ->> '_rev'", 10, True, flt)
        assert "'rare'" in sql  # the predicate's value written in, the filter's own a parameter
        with store.index._connection() as con:
            store._prepare(con, (40, 1000))
            plan = "\n".join(r[0] for r in con.execute("EXPLAIN " + sql, [_Query(x[0]), *params]))
        assert f"Index Scan using {made['index']}" in plan, plan

        def exact(q, allowed):
            scores = x[allowed] @ q / np.linalg.norm(x[allowed], axis=1)
            return [f"d{i}" for i in allowed[np.argsort(-scores)[:5]]]
        rare = np.arange(0, 3000, 50)
        for q in x[1:11]:
            found = c.find(flt, {"_id": 1}, vector=q, n=5)
            assert found.plan == "graph" and [d["_id"] for d in found] == exact(q, rare)
        more = {"kind": "rare", "n": {"$lt": 1500}}  # adds a condition: walks the same index
        sql, params = store._graph_statement(name, table, store.index._scalar_fields(table), store._op("cosine"),
                                             more, "d.doc ->> '_rev'", 10, True, index.backend._indexed_within(more))
        with store.index._connection() as con:
            plan = "\n".join(r[0] for r in con.execute("EXPLAIN " + sql, [_Query(x[0]), *params]))
        assert f"Index Scan using {made['index']}" in plan, plan
        for q in x[1:6]:
            found = c.find(more, {"_id": 1}, vector=q, n=5)
            assert found.plan == "graph" and [d["_id"] for d in found] == exact(q, rare[rare < 1500])
        c.update_one({"_id": "d1"}, {"$set": {"kind": "rare"}})  # moved in, and one moved out
        c.update_one({"_id": "d50"}, {"$set": {"kind": "common"}})
        c.insert_one({"_id": "new", "v": x[1] * 2, "kind": "rare", "n": -1})
        got = [d["_id"] for d in c.find(flt, {"_id": 1}, vector=x[1], n=3)]
        assert got[:2] in (["d1", "new"], ["new", "d1"]) and "d50" not in got
        assert all(d["kind"] == "rare" for d in c.find(flt, {"kind": 1}, vector=x[50], n=20))
        c.insert_one({"_id": "listed", "v": x[2] * 3, "kind": ["common", "rare"], "n": -2})  # an element matches
        assert c.find(flt, {"_id": 1}, vector=x[2], n=1)[0]["_id"] == "listed"
        with pytest.raises(QueryError, match="conjunction"):
            index.index_filter({"$or": [{"kind": "rare"}, {"kind": "odd"}]})

        other = mlwarehouse.connect(uri, blobs=str(tmp_path / "blobs")).collection("items").vector_index("v")
        assert other.backend.filter_indexes == index.backend.filter_indexes
        assert [d["_id"] for d in other.find(flt, {"_id": 1}, vector=x[1], n=2)] == got[:2]
        with pytest.raises(VectorIndexError, match="fields the vector table copies"):
            index.index_filter({"m": {"$lt": 10}})
        assert index.forget_filter(flt) == [] and store.filter_indexes(name) == set()
        with pytest.raises(NotFound):
            index.forget_filter(flt)

        def refused(*args, **kwargs):
            raise BackendError("PostgreSQL refused it")
        monkeypatch.setattr(PgVectors, "filter_index", refused)
        with pytest.raises(BackendError):
            index.index_filter(flt)
        assert index.stats()["filters"] == []  # not recorded when it cannot be made
        monkeypatch.undo()
        c.update_one({"_id": "d3"}, {"$set": {"kind": "rarest"}})
        assert index.index_filter({"kind": {"$regex": "^rares"}})["index"]  # a pattern: an immutable operator
        assert [d["_id"] for d in c.find({"kind": {"$regex": "^rares"}}, {"_id": 1}, vector=x[5], n=2)] == ["d3"]
        monkeypatch.setattr(PgVectors, "filter_index", refused)  # recorded, refused where the index opens
        with pytest.warns(RuntimeWarning, match="no index for the filter"):
            reopened = mlwarehouse.connect(uri, blobs=str(tmp_path / "blobs")).collection("items").vector_index("v")
            assert reopened.backend.filter_indexes == {}  # a warning, not a failure to open
        monkeypatch.undo()
        assert reopened.find({"kind": {"$regex": "^rares"}}, {"_id": 1}, vector=x[5], n=1)[0]["_id"] == "d3"
        index.forget_filter({"kind": {"$regex": "^rares"}})
        assert c.find(flt, {"_id": 1}, vector=x[1], n=2).plan == "exact"  # 61 matches: the exact plan again
        wh.close()
