"""The same workload on every backend set, side by side: SQLite + files, PostgreSQL + S3, MongoDB + GridFS.

    python benchmarks/backends.py [--steps 20000] [--models 10000] [--tasks 1000] [--claimers 8] [--only NAME]

Starts its own servers on 127.0.0.1 (a private PostgreSQL cluster, SeaweedFS, the nx-27017 MongoDB-wire server),
stops them by pid at the end, and prints one table and one JSON line:
- logging: points/s of one run logging ``steps`` x 4 metrics through ``run.log`` (time includes the final flush);
- best model: p50 of ``models.best`` over ``models`` documents (name filter + sort by a metric, index created);
- claims/s: ``claimers`` processes claiming ``tasks`` tasks at once, each task claimed exactly once (checked);
- blobs: put/get MB/s of 1 MiB and 64 MiB blobs.
The SQLite column is the baseline the others are compared with in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import numpy as np  # noqa: E402

import mlwarehouse  # noqa: E402
from mlwarehouse.testing import servers  # noqa: E402

METRICS = ("loss", "accuracy", "lr", "grad_norm")


def logging_rate(wh, steps: int) -> float:
    start = time.perf_counter()
    run = wh.runs.start("bench")
    for step in range(steps):
        run.log("train", step=step, loss=1 / (step + 1), accuracy=step / steps, lr=0.01, grad_norm=0.5)
    run.finish()
    return steps * len(METRICS) / (time.perf_counter() - start)


def best_model_p50(wh, models: int, queries: int = 100) -> float:
    rng = np.random.default_rng(0)
    wh.models  # declares the collection's scalar fields first, as any real use does
    docs = ({"name": f"mlp{i % 10}", "test_accuracy": float(rng.random()), "epoch": i % 50, "kind": "arrays"}
            for i in range(models))
    wh.project().insert_many("models", docs)
    wh.models.best("test_accuracy", name="mlp3")  # the first call creates the index it needs
    times = []
    for _ in range(queries):
        start = time.perf_counter()
        wh.models.best("test_accuracy", name="mlp3", where={"test_accuracy": {"$gt": 0.5}})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _claimer(env: dict, worker: str, start_at: float, out) -> None:
    os.environ.update(env)
    wh = mlwarehouse.connect()
    claimed = []
    while time.time() < start_at:
        time.sleep(0.001)
    while (task := wh.tasks.claim("bench", worker, 60)) is not None:
        claimed.append(task.id)
    out.put(claimed)
    wh.close()


def claims_rate(wh, env: dict, tasks: int, claimers: int) -> tuple[float, bool]:
    wh.tasks.sweep("bench", "builtins:dict", configs=[{"i": i} for i in range(tasks)])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0 + claimers  # every process imported and connected before the start
    procs = [ctx.Process(target=_claimer, args=(env, f"w{i}", start_at, out)) for i in range(claimers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    elapsed = time.time() - start_at
    for p in procs:
        p.join()
    counts = Counter(i for r in results for i in r)
    exactly_once = len(counts) == tasks and set(counts.values()) == {1}
    return tasks / elapsed, exactly_once


def blob_rates(store) -> dict:
    out = {}
    rng = np.random.default_rng(1)
    for label, size, count in (("1MiB", 1 << 20, 16), ("64MiB", 64 << 20, 2)):
        blobs = [rng.bytes(size) for _ in range(count)]
        start = time.perf_counter()
        keys = [store.put(b) for b in blobs]
        put = size * count / (time.perf_counter() - start) / 1e6
        start = time.perf_counter()
        for key in keys:
            store.get(key)
        get = size * count / (time.perf_counter() - start) / 1e6
        out[f"put_{label}_MBps"], out[f"get_{label}_MBps"] = round(put, 1), round(get, 1)
    return out


def measure(name: str, env: dict, args) -> dict:
    os.environ.update(env)
    wh = mlwarehouse.connect()
    try:
        row = {"backend": name}
        row["log_points_per_s"] = round(logging_rate(wh, args.steps))
        row["best_model_p50_ms"] = round(best_model_p50(wh, args.models), 3)
        rate, once = claims_rate(wh, env, args.tasks, args.claimers)
        row["claims_per_s"], row["claimed_exactly_once"] = round(rate), once
        row.update(blob_rates(wh.blobs))
        return row
    finally:
        wh.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=1_000)
    parser.add_argument("--claimers", type=int, default=8)
    parser.add_argument("--only", action="append", choices=["sqlite", "postgres+s3", "mongo+gridfs"])
    args = parser.parse_args()
    wanted = args.only or ["sqlite", "postgres+s3", "mongo+gridfs"]
    started: list = []
    rows = []
    base = {"MLW_PROJECT": "bench"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "sqlite" in wanted:
                rows.append(measure("sqlite", {**base, "MLW_URI": f"{tmp}/wh", "MLW_BLOBS": f"{tmp}/wh/blobs"}, args))
            if "postgres+s3" in wanted:
                from mlwarehouse.testing.postgres_server import start_postgres
                pg = start_postgres(durable=True)
                started.append(pg)
                s3 = servers.start_seaweedfs()
                started.append(s3)
                schema = "b_" + secrets.token_hex(4)
                import psycopg
                with psycopg.connect(pg.uri, autocommit=True) as con:
                    con.execute(f"CREATE SCHEMA {schema}")
                env = {**base, "MLW_URI": f"{pg.uri}?options={quote(f'-csearch_path={schema}')}",
                       "MLW_BLOBS": s3.uri.replace("?", "/bench?", 1),
                       "AWS_ACCESS_KEY_ID": s3.env["MLW_TEST_S3_ACCESS_KEY"],
                       "AWS_SECRET_ACCESS_KEY": s3.env["MLW_TEST_S3_SECRET_KEY"]}
                rows.append(measure("postgres+s3", env, args))
            if "mongo+gridfs" in wanted:
                from mlwarehouse.testing.mongo_server import fresh_uri, start_nx27017
                mongo = start_nx27017()
                started.append(mongo)
                uri = fresh_uri(mongo.uri)
                rows.append(measure("mongo+gridfs", {**base, "MLW_URI": uri, "MLW_BLOBS": uri}, args))
    finally:
        for server in started:
            servers.stop_any(server)
    columns = [k for k in rows[0] if k != "backend"]
    print(f"{'':28}" + "".join(f"{r['backend']:>16}" for r in rows))
    for column in columns:
        print(f"{column:28}" + "".join(f"{str(r[column]):>16}" for r in rows))
    print(json.dumps({"steps": args.steps, "models": args.models, "tasks": args.tasks, "claimers": args.claimers,
                      "rows": rows}))


if __name__ == "__main__":
    main()
