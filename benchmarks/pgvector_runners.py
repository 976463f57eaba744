"""pgvector in benchmarks/vectors.py: mlwarehouse's pgvector engine through its API on a private PostgreSQL, and
pgvector called directly beside it, unfiltered on the engine's own table and filtered on a table of its own (the
vectors with one boolean column per filter), so each row of ours has its ceiling in the same run.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.ours_runners import measure_api
from benchmarks.vector_runners import FILTER_EFS, K, in_child, qps_single, recall, sweep_ef


def _literal(q: np.ndarray) -> str:
    """A query vector as pgvector's text, as a user of pgvector alone would send it."""
    return "[" + ",".join(map(repr, q.tolist())) + "]"


def raw_pgvector(uri: str, table: str, queries, truth, ef: int) -> dict:
    """pgvector called directly on the table our engine filled: one ``ORDER BY embedding <=> q LIMIT 10`` per
    query over its own connection (the query as a text literal, as ours sends it), at the ef our sweep chose."""
    import psycopg
    with psycopg.connect(uri, autocommit=True) as con:
        con.execute(f"SET hnsw.ef_search = {int(ef)}")
        sql = f"SELECT doc_id FROM {table} ORDER BY embedding <=> %s::vector LIMIT {K}"

        def one(q):
            return [int(r[0]) for r in con.execute(sql, [_literal(q)]).fetchall()]

        found = np.array([one(q) + [-1] * (K - len(one(q))) for q in queries[:200]], dtype=np.int64)
        return {"recall": recall(found, truth[:200]), "qps_single": qps_single(one, queries), "ef": ef}


def raw_pgvector_filtered(uri: str, table: str, docs: str, filters, queries, args) -> dict:
    """pgvector called directly with each filter, as a user of it alone would store them: a table of the vectors
    with the filter's boolean columns beside them (each with a B-tree), its own HNSW index, and either the graph
    with iterative scans (``WHERE s ORDER BY embedding <=> q LIMIT 10``, ef swept) or an exact scan of the rows
    the filter selects; the faster at recall@10 >= target is reported, per selectivity (``selectivities``), with
    the table's build time (``build_s``)."""
    import psycopg
    sels = sorted(filters)
    fq = queries[:args.filter_queries]
    out: dict = {}
    with psycopg.connect(uri, autocommit=True) as con:
        flags = ", ".join(f"(d.doc ->> 's{j}')::boolean AS s{j}" for j in range(len(sels)))
        started = time.perf_counter()
        con.execute(f"CREATE TABLE mlw_raw AS SELECT v.doc_id::int AS id, v.embedding, {flags} "
                    f"FROM {table} v JOIN {docs} d ON d.id = v.doc_id")
        con.execute("SET maintenance_work_mem = '2GB'")
        con.execute(f"CREATE INDEX ON mlw_raw USING hnsw (embedding vector_cosine_ops) "
                    f"WITH (m = {args.m}, ef_construction = {args.ef_construction})")
        for j in range(len(sels)):
            con.execute(f"CREATE INDEX ON mlw_raw (s{j})")
        con.execute("ANALYZE mlw_raw")
        build_s = time.perf_counter() - started
        con.execute("SET hnsw.iterative_scan = relaxed_order")

        for j, sel in enumerate(sels):
            truth = filters[sel][1][:len(fq)]
            graph = f"SELECT id FROM mlw_raw WHERE s{j} ORDER BY embedding <=> %s::vector LIMIT {K}"
            exact = f"SELECT id FROM mlw_raw WHERE s{j} ORDER BY (embedding <=> %s::vector) + 0 LIMIT {K}"

            def ids(sql, q):
                found = [r[0] for r in con.execute(sql, [_literal(q)]).fetchall()]
                return found + [-1] * (K - len(found))

            def batch(qs, ef):
                con.execute(f"SET hnsw.ef_search = {int(ef)}")
                return np.array([ids(graph, q) for q in qs], dtype=np.int64)

            sw = sweep_ef(batch, fq, truth, args.target, efs=FILTER_EFS, budget_s=args.filter_budget)
            con.execute(f"SET hnsw.ef_search = {int(sw['ef'])}")
            sw["qps_single"] = qps_single(lambda q: ids(graph, q), fq)
            exact_found = np.array([ids(exact, q) for q in fq[:50]], dtype=np.int64)
            row = {"graph": {k: sw[k] for k in ("ef", "recall", "reached", "qps_single")},
                   "exact": {"recall": recall(exact_found, truth[:50]),
                             "qps_single": qps_single(lambda q: ids(exact, q), fq)}}
            out[sel] = row
            print(f"  pgvector called directly, selectivity {sel}: graph ef {sw['ef']} recall {sw['recall']:.3f} "
                  f"{sw['qps_single']:.0f} q/s; exact {row['exact']['qps_single']:.0f} q/s", flush=True)
        con.execute("DROP TABLE mlw_raw")
    return {"build_s": build_s, "selectivities": out}


def measure_pgvector(vectors, queries, truth, *, filters, args) -> dict | None:
    """The pgvector engine: a private PostgreSQL (the test servers' binaries) on 127.0.0.1, blobs in a folder."""
    import tempfile

    import mlwarehouse
    from mlwarehouse.testing.postgres_server import find_pg_bin, has_pgvector, start_postgres, stop_postgres
    if find_pg_bin() is None:
        return {"lib": "ours-pgvector", "error": "no PostgreSQL server binaries"}
    # the index and the tables in shared memory, as pgvector's documentation asks of a server that searches them
    server = start_postgres(durable=False, settings={"shared_buffers": args.pg_shared_buffers})
    try:
        if not has_pgvector(server.uri):
            return {"lib": "ours-pgvector", "error": "the PostgreSQL server has no pgvector >= 0.8"}
        blobs = tempfile.mkdtemp(prefix="mlw-bench-pgv-")

        def reopen():
            return mlwarehouse.connect(server.uri, blobs=blobs).collection("bench").vector_index("v").stats()

        def baseline(index, qs, truth, ef):
            return raw_pgvector(server.uri, index.backend.store._table(index.backend.name), qs, truth, ef)

        def filtered_baseline(index, c, filters, qs):
            store = index.backend.store
            return raw_pgvector_filtered(server.uri, store._table(index.backend.name), store.index._table(c.table.name),
                                         filters, qs, args)

        return in_child(lambda: measure_api(mlwarehouse.connect(server.uri, blobs=blobs), "pgvector", vectors,
                                            queries, truth, filters, args, reopen, baseline, filtered_baseline),
                        "ours-pgvector")
    finally:
        stop_postgres(server)
