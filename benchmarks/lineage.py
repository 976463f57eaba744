"""Lineage traversals over 100,000 edges: ``upstream``/``downstream`` to depth 10 against one recursive SQL query.

    python benchmarks/lineage.py [--edges 100000] [--depth 10] [--queries 30] [--only sqlite] [--only postgres]
    python benchmarks/lineage.py --postgres-uri postgresql://user:pw@host/db    # a server of yours

The graph: chains of ``--runs`` fine-tuning steps, each ``dataset -input-> run -produced-> model -input-> run
-produced-> model ...`` (a chain of 6 runs is 12 edges deep), every run also reading a corpus dataset shared by
``--share`` chains and saving ``--checkpoints`` checkpoints; chains are added until there are ``--edges`` edges
(36 per chain by default), recorded through ``lineage.record_many``. Queries: ``upstream`` of a chain's last model
and ``downstream`` of a chain's first dataset, for ``--queries`` chains drawn at random, to ``--depth``.

The baseline, in the same run and on the same table: one ``WITH RECURSIVE`` statement through the index's
read-only SQL, whose join condition is the very expression the index compiles for ``{"project": ..., "dst": ...}``
(so it uses the same expression indexes). Both return the same set of nodes (checked). Printed per backend:
median and 90th percentile milliseconds of each, and the ratio ours / recursive SQL. On PostgreSQL the queries run
twice: right after the bulk load, and again after ``ANALYZE`` (what autovacuum does soon after a load): until the
planner has statistics of the grown table it may scan it instead of using the expression indexes.

PostgreSQL is a private cluster started from the test servers' binaries unless ``--postgres-uri`` names one (a
fresh schema is made there and dropped after).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
# this file's folder comes first on sys.path and benchmarks/logging.py would shadow the standard library's: drop it
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import mlwarehouse  # noqa: E402
from mlwarehouse import schema  # noqa: E402
from mlwarehouse.ids import new_id  # noqa: E402
from mlwarehouse.index.sql.compiler import Compiler  # noqa: E402
from mlwarehouse.lineage import Ref  # noqa: E402


def build(lineage, edges: int, runs: int, checkpoints: int, share: int, seed: int) -> list[tuple[str, str]]:
    """Record chains until ``edges`` edges; returns (first dataset, last model) of every chain."""
    rng = random.Random(seed)
    chains, batch, total, corpus = [], [], 0, None
    while total < edges:
        if len(chains) % share == 0:
            corpus = Ref(new_id(), "dataset", f"corpus v{len(chains) // share + 1}")
        first = Ref(new_id(), "dataset", f"data-{len(chains)} v1")
        node = first
        for step in range(runs):
            run = Ref(new_id(), "run", f"finetune-{len(chains)}-{step}")
            model = Ref(new_id(), "model", f"model-{len(chains)}-{step}")
            batch += [(node, run, "input"), (corpus, run, "input"), (run, model, "produced")]
            batch += [(run, Ref(new_id(), "checkpoint", f"ckpt {e}"), "produced") for e in range(checkpoints)]
            node = model
        chains.append((first.id, node.id))
        total += runs * (3 + checkpoints)
        if len(batch) >= 5000:
            lineage.record_many(batch)
            batch = []
    if batch:
        lineage.record_many(batch)
    rng.shuffle(chains)
    return chains


def recursive_sql(wh, project: str, forward: bool, depth: int) -> tuple[str, list]:
    """A WITH RECURSIVE statement over the lineage table, joined on the index's own compiled expression."""
    index = wh.index
    dialect = index.dialect
    near, far = ("src", "dst") if forward else ("dst", "src")
    compiler = Compiler(dialect, schema.LINEAGE.scalar_fields)
    marker = "__MLW_NEAR__"
    condition = compiler.where({"project": project, near: marker})
    params = list(compiler.params)
    assert params[-1] == marker and params[0] == project, params
    head, sep, tail = condition.rpartition(dialect.placeholder)
    pg = dialect.placeholder == "%s"
    condition = head + ("w.id::text" if pg else "w.id") + tail
    # SQLite: CROSS JOIN keeps the walk outside, so each step is an index lookup, as PostgreSQL plans it itself
    far_value = f"(doc ->> '{far}')" if pg else f"json_extract(doc, '$.{far}')"
    table = index.table_name(schema.LINEAGE.name)
    # SQLite: no CAST (a TEXT column would give the comparison an affinity the expression index does not have)
    start = f"CAST({dialect.placeholder} AS TEXT)" if pg else dialect.placeholder
    ph = dialect.placeholder
    query = (f"WITH RECURSIVE w(id, depth) AS (SELECT {start}, 0 UNION "
             f"SELECT {far_value}, w.depth + 1 FROM w {'JOIN' if pg else 'CROSS JOIN'} {table} ON w.depth < {ph} AND {condition}) "
             f"SELECT id, MIN(depth) AS distance FROM w WHERE depth > 0 GROUP BY id")
    return query, params[:-1]  # after the start id and the depth


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def measure(backend: str, uri: str, blobs: str, args, analyze=None) -> list[dict]:
    """One row of figures right after the build; with ``analyze`` (PostgreSQL), a second after it ran."""
    wh = mlwarehouse.connect(uri, blobs=blobs, project="bench")
    try:
        lineage = wh.project("bench").lineage
        start = time.perf_counter()
        chains = build(lineage, args.edges, args.runs, args.checkpoints, args.share, args.seed)
        built = time.perf_counter() - start
        count = wh.project("bench").count(schema.LINEAGE.name)
        rows = [queries(wh, lineage, chains, {"backend": backend, "edges": count, "build_s": round(built, 1)}, args)]
        if analyze is not None:
            analyze(wh.index.table_name(schema.LINEAGE.name))
            rows.append(queries(wh, lineage, chains, {"backend": backend + "+analyze", "edges": count,
                                                      "build_s": ""}, args))
        return rows
    finally:
        wh.close()


def queries(wh, lineage, chains, row: dict, args) -> dict:
    for direction, forward in (("upstream", False), ("downstream", True)):
        query, params = recursive_sql(wh, "bench", forward, args.depth)
        ours, sql, sizes = [], [], []
        for first, last in chains[:args.queries]:
            start_id = first if forward else last
            walk = getattr(lineage, direction)
            nodes = walk(start_id, args.depth)  # warm: the first call of a shape plans it
            rows = wh.index.sql(query, [start_id, args.depth, *params])
            assert {n.id: n.distance for n in nodes} == {r["id"]: r["distance"] for r in rows}, direction
            sizes.append(len(nodes))
            ours.append(timed(lambda: walk(start_id, args.depth)))
            sql.append(timed(lambda: wh.index.sql(query, [start_id, args.depth, *params])))
        row[f"{direction}_nodes"] = round(statistics.median(sizes))
        row[f"{direction}_ms"] = round(statistics.median(ours), 2)
        row[f"{direction}_p90_ms"] = round(sorted(ours)[int(0.9 * (len(ours) - 1))], 2)
        row[f"{direction}_sql_ms"] = round(statistics.median(sql), 2)
        row[f"{direction}_ratio"] = round(statistics.median(ours) / statistics.median(sql), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=int, default=100_000)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--runs", type=int, default=6, help="fine-tuning steps per chain")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints per run")
    parser.add_argument("--share", type=int, default=50, help="chains that share one corpus dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", choices=["sqlite", "postgres"])
    parser.add_argument("--postgres-uri", help="a PostgreSQL server to use (default: start a private one)")
    args = parser.parse_args()
    wanted = args.only or ["sqlite", "postgres"]
    rows, started = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "sqlite" in wanted:
                rows += measure("sqlite", f"{tmp}/wh", f"{tmp}/wh/blobs", args)
            if "postgres" in wanted:
                import psycopg
                uri = args.postgres_uri
                if uri is None:
                    from mlwarehouse.testing.postgres_server import start_postgres
                    pg = start_postgres(durable=False)
                    started.append(pg)
                    uri = pg.uri
                name = "b_" + secrets.token_hex(4)
                with psycopg.connect(uri, autocommit=True) as con:
                    con.execute(f"CREATE SCHEMA {name}")
                def analyze(table: str) -> None:  # what autovacuum does once enough rows changed
                    with psycopg.connect(uri, autocommit=True) as con:
                        con.execute(f"ANALYZE {name}.{table}")

                try:
                    joiner = "&" if "?" in uri else "?"
                    rows += measure("postgres", f"{uri}{joiner}options={quote(f'-csearch_path={name}')}",
                                    f"{tmp}/pg-blobs", args, analyze)
                finally:
                    with psycopg.connect(uri, autocommit=True) as con:
                        con.execute(f"DROP SCHEMA {name} CASCADE")
    finally:
        from mlwarehouse.testing import servers
        for server in started:
            servers.stop_any(server)
    columns = [k for k in rows[0] if k != "backend"]
    print(f"{'':22}" + "".join(f"{r['backend']:>18}" for r in rows))
    for column in columns:
        print(f"{column:22}" + "".join(f"{str(r[column]):>18}" for r in rows))
    print(json.dumps({"edges": args.edges, "depth": args.depth, "queries": args.queries, "rows": rows}))


if __name__ == "__main__":
    main()
