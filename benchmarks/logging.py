"""Logging throughput and best-model query latency, each against a baseline measured in the same run.

    python benchmarks/logging.py [--steps 200000] [--models 100000] [--queries 200]

1. Baseline: plain ``sqlite3``, a table ``(run, kind, step, metric, value)``, ``executemany`` of steps x 4 rows in
   one transaction (WAL, synchronous=NORMAL, like the warehouse's index).
2. Ours: one run logging steps x 4 metrics through ``run.log(...)``, then ``run.finish()``; the time includes the
   final flush, so every point is durable when the clock stops.
3. The best-model query (p50 over ``--queries`` runs) over ``--models`` model documents: ``name`` among 10 names,
   a filter on ``test_accuracy`` and a sort by it, after creating the index a user would create.

Prints a table and one JSON line of the figures. Targets: ours >= 0.3x the raw executemany; query p50 <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This file's folder comes first on sys.path and its name shadows the standard library's logging: drop it.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import mlwarehouse  # noqa: E402

METRICS = ("loss", "accuracy", "lr", "grad_norm")


def baseline(folder: Path, steps: int) -> float:
    """Seconds for plain sqlite3 to write steps x 4 rows with executemany in one transaction."""
    con = sqlite3.connect(folder / "raw.sqlite", isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("CREATE TABLE points (run TEXT, kind TEXT, step INTEGER, metric TEXT, value REAL)")
    start = time.perf_counter()
    rows = (("run-1", "train", step, metric, 1.0 / (step + 1) + i)
            for step in range(steps) for i, metric in enumerate(METRICS))
    con.execute("BEGIN")
    con.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?)", rows)
    con.execute("COMMIT")
    elapsed = time.perf_counter() - start
    con.close()
    return elapsed


def ours(folder: Path, steps: int) -> tuple[float, float]:
    """Seconds for run.log of steps x 4 metrics plus finish(), and the seconds spent inside log() calls."""
    with mlwarehouse.connect(home=folder / "wh") as wh:
        run = wh.runs.start("bench")
        log = run.log
        start = time.perf_counter()
        for step in range(steps):
            x = 1.0 / (step + 1)
            log("train", step=step, loss=x, accuracy=x + 1, lr=x + 2, grad_norm=x + 3)
        in_log = time.perf_counter() - start
        run.finish()
        elapsed = time.perf_counter() - start
        assert run.summary["train"]["loss"]["count"] == steps, run.summary
    return elapsed, in_log


def best_query(folder: Path, n_models: int, queries: int) -> dict[str, tuple[float, float]]:
    """{query: (p50 ms, p90 ms)} of the best-model query over n_models documents, with the user's index."""
    rng = random.Random(0)
    names = [f"mlp{i}" for i in range(10)]
    where = {"name": "mlp3", "test_accuracy": {"$gt": 0.9}}
    with mlwarehouse.connect(home=folder / "models") as wh:
        p = wh.project()
        docs = ({"name": names[i % 10], "test_accuracy": rng.random(), "loss": rng.random(), "epoch": i % 50}
                for i in range(n_models))
        p.insert_many("models", docs)
        # the index a user creates for "best by test_accuracy within a name" (ties broken by time, newest first)
        p.index.create_index("models", [("project", 1), ("name", 1), ("test_accuracy", -1), ("time", -1)])
        queries_to_run = {"p.find": lambda: p.find("models", where, sort=[("test_accuracy", -1)], limit=1)}
        if hasattr(p.models, "best"):
            queries_to_run["p.models.best"] = lambda: p.models.best("test_accuracy", where=where)
        results = {}
        for how, query in queries_to_run.items():
            best = query()
            best = best[0] if isinstance(best, list) else best
            assert best["name"] == "mlp3" and best["test_accuracy"] > 0.9
            times = []
            for _ in range(queries):
                start = time.perf_counter()
                query()
                times.append((time.perf_counter() - start) * 1000)
            times.sort()
            results[how] = (statistics.median(times), times[int(len(times) * 0.9)])
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--models", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args(argv)
    points = args.steps * len(METRICS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw_s = baseline(folder, args.steps)
        ours_s, in_log_s = ours(folder, args.steps)
        latencies = best_query(folder, args.models, args.queries)
    figures = {
        "steps": args.steps, "points": points,
        "raw_points_per_s": round(points / raw_s), "ours_points_per_s": round(points / ours_s),
        "ratio": round(raw_s / ours_s, 3), "log_call_us": round(in_log_s / args.steps * 1e6, 2),
        "models": args.models,
    }
    for how, (p50, p90) in latencies.items():
        figures[f"{how}_p50_ms"] = round(p50, 3)
        figures[f"{how}_p90_ms"] = round(p90, 3)
    rows = [
        ("raw sqlite3 executemany", f"{figures['raw_points_per_s']:,} points/s", f"{raw_s:.2f} s"),
        ("run.log + finish (durable)", f"{figures['ours_points_per_s']:,} points/s", f"{ours_s:.2f} s"),
        ("ratio ours / raw (target >= 0.3)", f"{figures['ratio']:.2f}x", ""),
        ("time inside run.log()", f"{figures['log_call_us']} us/call", f"{in_log_s:.2f} s"),
    ]
    rows += [(f"best model over {args.models:,}: {how}", f"p50 {p50:.3f} ms (target <= 5)", f"p90 {p90:.3f} ms")
             for how, (p50, p90) in latencies.items()]
    width = max(len(r[0]) for r in rows)
    for name, value, extra in rows:
        print(f"{name:<{width}}  {value:>28}  {extra}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
