"""Watch latency: a document written by this process -> its event delivered to a watch in another process.

    python benchmarks/watch.py [--events 200] [--interval 0.05] [--only sqlite] [--only postgres]
    python benchmarks/watch.py --postgres-uri postgresql://user:pw@host/db    # a server of yours

A consumer process opens ``wh.watch(COLLECTION, where={"bench": True})`` (start now) and, for each event, takes
``time.time()`` minus the ``sent`` stamp the writer put in the document just before its ``insert_one`` (one
machine, one clock). The writer inserts ``--events`` documents ``--interval`` seconds apart (jittered, so writes
do not lock step with the polls), plus one non-matching document between each two that the watch must skip.
Printed per row: the poll interval, p50 / p95 / max event latency in ms, the writer's own ``insert_one`` p50 (the
baseline: a watch cannot deliver before the write commits), and the p95 latency as a fraction of the poll interval.
SQLite polls (every ``--poll`` seconds, and at the default); PostgreSQL wakes on each write's NOTIFY (its poll is
only a fallback; the writer connects after the watch listened, as a PostgreSQL writer learns that someone
listens only every few seconds). PostgreSQL is a private cluster started from the test servers' binaries unless
``--postgres-uri`` names one (a fresh schema is made there and dropped after).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
# this file's folder comes first on sys.path and benchmarks/logging.py would shadow the standard library's: drop it
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import mlwarehouse  # noqa: E402
from mlwarehouse.collections import watch as watching  # noqa: E402

COLLECTION = "bench_watch"

CONSUMER = """
import json, sys, time
import mlwarehouse
events, poll = int(sys.argv[1]), float(sys.argv[2])
wh = mlwarehouse.connect()
watch = wh.watch(sys.argv[3], where={"bench": True}, poll=poll or None, timeout=30)
print("ready", flush=True)
latencies = []
for event in watch:
    if event.document.get("warm"):
        print("warm", flush=True)
        continue
    latencies.append(time.time() - event.document["sent"])
    if len(latencies) >= events:
        break
print(json.dumps({"latencies": latencies, "poll": watch.poll}), flush=True)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(backend: str, uri: str, blobs: str, poll: float, args) -> dict:
    env = {**os.environ, "MLW_URI": uri, "MLW_BLOBS": blobs, "MLW_PROJECT": "bench",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    collection = f"{COLLECTION}_{secrets.token_hex(3)}"
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER, str(args.events), str(poll), collection], env=env,
                                stdout=subprocess.PIPE, text=True)
    wh = None
    try:
        assert consumer.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # its first read and listen are done
        # connected after the watch listens: a PostgreSQL writer re-reads who listens only every few seconds
        wh = mlwarehouse.connect(uri, blobs=blobs, project="bench")
        target = wh.collection(collection)
        while True:  # writes notify once the writer has seen that someone listens (PostgreSQL)
            target.insert_one({"bench": True, "warm": True, "sent": time.time()})
            line = consumer.stdout.readline().strip()
            if line == "warm":
                break
        rng = random.Random(0)
        inserts = []
        for _ in range(args.events):
            time.sleep(args.interval * rng.uniform(0.5, 1.5))
            target.insert_one({"bench": False, "sent": time.time()})
            started = time.time()
            target.insert_one({"bench": True, "sent": started})
            inserts.append(time.time() - started)
        result = json.loads(consumer.stdout.readline())
        consumer.wait(timeout=60)
    finally:
        if consumer.poll() is None:
            consumer.kill()
        if wh is not None:
            wh.close()
    ms = [v * 1000 for v in result["latencies"]]
    return {"backend": backend, "wakes": "NOTIFY" if backend == "postgres" else "polling",
            "poll_ms": round(result["poll"] * 1000, 1), "events": len(ms),
            "p50_ms": round(statistics.median(ms), 1), "p95_ms": round(percentile(ms, 0.95), 1),
            "max_ms": round(max(ms), 1), "insert_p50_ms": round(statistics.median(inserts) * 1000, 2),
            "p95/poll": round(percentile(ms, 0.95) / (result["poll"] * 1000), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.05, help="mean seconds between matching writes")
    parser.add_argument("--poll", type=float, action="append",
                        help=f"SQLite poll intervals to measure (default: 0.02 and {watching.POLL_SECONDS})")
    parser.add_argument("--only", action="append", choices=["sqlite", "postgres"])
    parser.add_argument("--postgres-uri", help="a PostgreSQL server to use (default: start a private one)")
    args = parser.parse_args()
    wanted = args.only or ["sqlite", "postgres"]
    rows, started = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "sqlite" in wanted:
                for poll in args.poll or [0.02, watching.POLL_SECONDS]:
                    home = f"{tmp}/wh-{poll}"
                    rows.append(measure("sqlite", home, f"{home}/blobs", poll, args))
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
                try:
                    joiner = "&" if "?" in uri else "?"
                    rows.append(measure("postgres", f"{uri}{joiner}options={quote(f'-csearch_path={name}')}",
                                        f"{tmp}/pg-blobs", 0.0, args))
                finally:
                    with psycopg.connect(uri, autocommit=True) as con:
                        con.execute(f"DROP SCHEMA {name} CASCADE")
    finally:
        from mlwarehouse.testing import servers
        for server in started:
            servers.stop_any(server)
    columns = [k for k in rows[0] if k != "backend"]
    print(f"{'':16}" + "".join(f"{r['backend']:>12}" for r in rows))
    for column in columns:
        print(f"{column:16}" + "".join(f"{str(r[column]):>12}" for r in rows))
    print(json.dumps({"events": args.events, "interval": args.interval, "rows": rows}))


if __name__ == "__main__":
    main()
