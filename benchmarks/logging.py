"""Logging throughput and best-model query latency, each against a baseline measured in the same run.

    python benchmarks/logging.py [--steps 200000] [--models 100000] [--queries 200] [--runs 10000] [--million]
                                 [--rounds 3] [--processes 8] [--only all|logging|models|runs]

1. Baseline: plain ``sqlite3``, a table ``(run, kind, step, metric, value)``, ``executemany`` of steps x 4 rows in
   one transaction (WAL, synchronous=NORMAL, like the warehouse's index).
2. Ours: one run logging steps x 4 metrics through ``run.log(...)``, then ``run.finish()``; the time includes the
   final flush, so every point is durable when the clock stops. ``--rounds`` rotated rounds of both (who goes
   first alternates), medians reported. Then the same points split over ``--processes`` processes logging at
   once into one warehouse, against as many raw ``executemany`` processes into one SQLite file (each process
   starts at one common instant, after its imports; the clock stops when the last is durable; every point is
   counted afterwards).
3. The best-model query (p50 over ``--queries`` runs) over ``--models`` model documents: ``name`` among 10 names,
   a filter on ``test_accuracy`` and a sort by it, after creating the index a user would create.

4. The run query of a leaderboard: ``runs.find(where={"hyper_parameters.p0": "3"},
   sort=[("summary.valid.acc0.max", -1)], limit=1)`` (p50 over ``--queries`` calls, ``--rounds`` rounds) over
   ``--runs`` run documents as ``runs.start`` writes them (and 1,000,000 more with ``--million``), against plain
   ``sqlite3`` in the same run: a table ``(id, project, p0, acc, doc)`` with an index on ``(project, p0, acc DESC)``
   and ``SELECT id, doc ... ORDER BY acc DESC LIMIT 1``. ``runs.find`` makes its index on the first call (timed
   apart); the same query before that index exists is timed too (``p.find``, which makes none).

Prints a table and one JSON line of the figures. Targets: ours >= 1.0x the raw executemany, alone and with 8
processes; query p50 <= 5 ms;
the run query p50 <= 0.2 ms at 10k runs and <= 1 ms at 1M.
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
from mlwarehouse.ids import new_id  # noqa: E402

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


def _raw_child(path: str, worker: int, steps: int, start_at: float, out) -> None:
    con = sqlite3.connect(path, isolation_level=None, timeout=60)
    con.execute("PRAGMA synchronous = NORMAL")
    rows = [(f"run-{worker}", "train", step, metric, 1.0 / (step + 1) + i)
            for step in range(steps) for i, metric in enumerate(METRICS)]
    time.sleep(max(0.0, start_at - time.time()))
    con.execute("BEGIN IMMEDIATE")
    con.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?)", rows)
    con.execute("COMMIT")
    con.close()
    out.put(time.time())


def _ours_child(home: str, worker: int, steps: int, start_at: float, out) -> None:
    with mlwarehouse.connect(home=home) as wh:
        run = wh.runs.start(f"bench-{worker}")
        log = run.log
        time.sleep(max(0.0, start_at - time.time()))
        for step in range(steps):
            x = 1.0 / (step + 1)
            log("train", step=step, loss=x, accuracy=x + 1, lr=x + 2, grad_norm=x + 3)
        run.finish()
    out.put(time.time())


def in_processes(folder: Path, steps: int, processes: int, raw: bool) -> float:
    """Seconds from a common start until ``processes`` processes have each written ``steps`` x 4 points (every
    process starts at the same instant, after its imports): raw sqlite3 into one table, or run.log + finish."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    if raw:
        con = sqlite3.connect(folder / "raw-many.sqlite", isolation_level=None)
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("CREATE TABLE points (run TEXT, kind TEXT, step INTEGER, metric TEXT, value REAL)")
        con.close()
        target, where = _raw_child, str(folder / "raw-many.sqlite")
    else:
        target, where = _ours_child, str(folder / "wh-many")
        mlwarehouse.connect(home=where).close()  # created once, before the clock
    out = ctx.Queue()
    start_at = time.time() + 1.5 + 0.1 * processes
    procs = [ctx.Process(target=target, args=(where, i, steps, start_at, out)) for i in range(processes)]
    for proc in procs:
        proc.start()
    ends = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0, proc.exitcode
    if not raw:
        with mlwarehouse.connect(home=where) as wh:
            assert wh.runs.count_logs() == processes * steps, "points were lost"
    return max(ends) - start_at


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


RUN_WHERE = {"hyper_parameters.p0": "3"}
RUN_SORT = [("summary.valid.acc0.max", -1)]


def _run_docs(n: int, seed: int):
    """Run documents shaped as runs.start and the log writer leave them: 10 values of p0, one summary metric."""
    rng = random.Random(seed)
    for i in range(n):
        acc = rng.random()
        yield {"_id": new_id(), "name": f"run-{i}", "status": "complete",
               "started": "2026-01-01T00:00:00.000000Z", "ended": "2026-01-01T01:00:00.000000Z",
               "hyper_parameters": {"p0": str(i % 10), "p1": i % 7, "lr": 10 ** -rng.uniform(1, 5)},
               "datasets": [], "tags": [], "task": None, "host": "bench", "pid": 1,
               "summary": {"valid": {"acc0": {"last": acc * 0.99, "last_step": 99, "min": acc / 3, "min_step": 0,
                                              "max": acc, "max_step": 90, "count": 100, "nulls": 0}}}}


def _p50_ms(query, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        query()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run_query(folder: Path, n_runs: int, queries: int, rounds: int) -> dict:
    """The run query over n_runs runs: ours (runs.find) and raw indexed sqlite3, p50 ms per round."""
    tag = f"runs{n_runs}"
    raw = sqlite3.connect(folder / f"{tag}-raw.sqlite", isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute("PRAGMA synchronous = NORMAL")
    raw.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, project TEXT, p0 TEXT, acc REAL, doc TEXT)")
    raw.execute("BEGIN")
    raw.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                    ((d["_id"], "default", d["hyper_parameters"]["p0"], d["summary"]["valid"]["acc0"]["max"],
                      json.dumps(d)) for d in _run_docs(n_runs, 1)))
    raw.execute("COMMIT")
    raw.execute("CREATE INDEX runs_p0_acc ON runs (project, p0, acc DESC)")
    raw_sql = "SELECT id, doc FROM runs WHERE project = ? AND p0 = ? ORDER BY acc DESC LIMIT 1"
    raw_query = lambda: raw.execute(raw_sql, ("default", "3")).fetchall()  # noqa: E731
    with mlwarehouse.connect(home=folder / tag) as wh:
        p = wh.project()
        start = time.perf_counter()
        p.insert_many("runs", _run_docs(n_runs, 1))
        load_s = time.perf_counter() - start
        plain = lambda: p.find("runs", RUN_WHERE, sort=RUN_SORT, limit=1)  # noqa: E731
        before_ms = _p50_ms(plain, 3)
        start = time.perf_counter()
        first = p.runs.find(where=RUN_WHERE, sort=RUN_SORT, limit=1)
        first_ms = (time.perf_counter() - start) * 1000
        ours_query = lambda: p.runs.find(where=RUN_WHERE, sort=RUN_SORT, limit=1)  # noqa: E731
        best_raw = json.loads(raw_query()[0][1])["summary"]["valid"]["acc0"]["max"]
        assert first[0].summary["valid"]["acc0"]["max"] == best_raw, (first[0].summary, best_raw)
        ours_rounds, raw_rounds = [], []
        for _ in range(rounds):
            ours_rounds.append(_p50_ms(ours_query, queries))
            raw_rounds.append(_p50_ms(raw_query, queries))
    raw.close()
    return {"runs": n_runs, "load_s": load_s, "before_index_ms": before_ms, "first_call_ms": first_ms,
            "ours_ms": ours_rounds, "raw_ms": raw_rounds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--models", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--runs", type=int, default=10_000, help="runs for the run query")
    parser.add_argument("--million", action="store_true", help="the run query over 1,000,000 runs too")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measure (medians are reported)")
    parser.add_argument("--processes", type=int, default=8, help="processes logging at once (1: skip)")
    parser.add_argument("--only", choices=["all", "logging", "models", "runs"], default="all")
    args = parser.parse_args(argv)
    points = args.steps * len(METRICS)
    figures: dict = {}
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only in ("all", "logging"):
            raws, ourss, in_logs, ratios = [], [], [], []
            for r in range(args.rounds):  # rotated: who goes first alternates, each round in a fresh folder
                sub = folder / f"logging-{r}"
                sub.mkdir()
                if r % 2 == 0:
                    raw_s = baseline(sub, args.steps)
                    ours_s, in_log_s = ours(sub, args.steps)
                else:
                    ours_s, in_log_s = ours(sub, args.steps)
                    raw_s = baseline(sub, args.steps)
                raws.append(raw_s), ourss.append(ours_s), in_logs.append(in_log_s), ratios.append(raw_s / ours_s)
                rows.append((f"logging round {r + 1}: raw executemany / run.log + finish",
                             f"{points / raw_s:,.0f} / {points / ours_s:,.0f} points/s",
                             f"ratio {raw_s / ours_s:.2f}x"))
            raw_s, ours_s, in_log_s = (statistics.median(x) for x in (raws, ourss, in_logs))
            figures.update({
                "steps": args.steps, "points": points,
                "raw_points_per_s": round(points / raw_s), "ours_points_per_s": round(points / ours_s),
                "ratio": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
                "log_call_us": round(in_log_s / args.steps * 1e6, 2)})
            rows += [
                ("raw sqlite3 executemany (median)", f"{figures['raw_points_per_s']:,} points/s", f"{raw_s:.2f} s"),
                ("run.log + finish, durable (median)", f"{figures['ours_points_per_s']:,} points/s", f"{ours_s:.2f} s"),
                ("ratio ours / raw, median (target >= 1.0)", f"{figures['ratio']:.2f}x", ""),
                ("time inside run.log() (median)", f"{figures['log_call_us']} us/call", f"{in_log_s:.2f} s"),
            ]
            if args.processes > 1:
                per = args.steps // args.processes
                many = points // args.steps * per * args.processes
                pratios = []
                for r in range(args.rounds):
                    order = (True, False) if r % 2 == 0 else (False, True)
                    took = {raw: in_processes(folder / f"logging-{r}", per, args.processes, raw) for raw in order}
                    pratios.append(took[True] / took[False])
                    rows.append((f"{args.processes} processes round {r + 1}: raw / ours",
                                 f"{many / took[True]:,.0f} / {many / took[False]:,.0f} points/s",
                                 f"ratio {took[True] / took[False]:.2f}x"))
                figures["processes"] = args.processes
                figures["processes_ratios"] = [round(x, 3) for x in pratios]
                figures["processes_ratio"] = round(statistics.median(pratios), 3)
                rows.append((f"{args.processes} processes, ratio ours / raw, median (target >= 1.0)",
                             f"{figures['processes_ratio']:.2f}x", "0 points lost (counted)"))
        if args.only in ("all", "models"):
            latencies = best_query(folder, args.models, args.queries)
            figures["models"] = args.models
            for how, (p50, p90) in latencies.items():
                figures[f"{how}_p50_ms"] = round(p50, 3)
                figures[f"{how}_p90_ms"] = round(p90, 3)
            rows += [(f"best model over {args.models:,}: {how}", f"p50 {p50:.3f} ms (target <= 5)",
                      f"p90 {p90:.3f} ms") for how, (p50, p90) in latencies.items()]
        if args.only in ("all", "runs"):
            sizes = [args.runs] + ([1_000_000] if args.million and args.runs != 1_000_000 else [])
            for n in sizes:
                r = run_query(folder, n, args.queries, args.rounds)
                target = 0.2 if n <= 10_000 else 1.0
                figures[f"run_query_{n}"] = {k: [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)
                                             for k, v in r.items()}
                rows.append((f"run query over {n:,} runs: before its index (p.find)",
                             f"p50 {r['before_index_ms']:.3f} ms", f"load {r['load_s']:.1f} s"))
                rows.append((f"run query over {n:,} runs: first runs.find (makes the index)",
                             f"{r['first_call_ms']:.1f} ms", ""))
                for i, (o, w) in enumerate(zip(r["ours_ms"], r["raw_ms"]), 1):
                    rows.append((f"run query over {n:,} runs, round {i}: runs.find",
                                 f"p50 {o:.4f} ms (target <= {target:g})",
                                 f"raw indexed sqlite3 p50 {w:.4f} ms, ratio {o / w:.1f}x"))
    width = max(len(r[0]) for r in rows)
    for name, value, extra in rows:
        print(f"{name:<{width}}  {value:>28}  {extra}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
