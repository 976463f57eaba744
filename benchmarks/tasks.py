"""Task queue throughput and latency on the embedded warehouse, against a raw SQLite queue measured in the same run.

    python benchmarks/tasks.py [--tasks 2000] [--claimers 8] [--latency 50] [--e2e 100] [--rounds 3]
                               [--long 5] [--skip-claims]

1. Claims: ``--tasks`` pending tasks, ``--claimers`` processes claiming at once (one atomic find_one_and_update
   each, then a finish update, like a worker with a no-op task), started together after their imports. Prints
   claims/s and checks that every task was claimed exactly once. Baseline: the same processes on a bare SQLite
   table ``(id, status, priority, worker)`` with ``BEGIN IMMEDIATE; SELECT ... LIMIT 1; UPDATE; COMMIT``.
2. Create -> start latency: one idle worker process; tasks created one at a time (each after the previous one
   ended) at random moments of its poll cycle; latency is the task's ``started`` stamp minus its ``created`` stamp
   (p50 and p90 over ``--latency`` tasks).
3. End to end, warm against cold: two worker processes already idle (a warm worker's fork server ready),
   ``--e2e`` no-op tasks (``builtins:dict``) created at once; tasks/s until all are finished. Warm workers fork
   each task process from their fork server; the baseline, cold workers, start a fresh interpreter per task.
4. A 1-second task's overhead, warm against cold: one idle worker, ``--long`` tasks whose script sleeps 1 s
   queued at once; overhead = (last task's ``ended`` - first task's ``started``) / ``--long`` - 1 s, as a
   fraction of the second (it counts claiming, starting the process, connecting, the run, recording).

Sections 3 and 4 run ``--rounds`` rounds, cold and warm alternating (fresh workers each round), and print medians.
Prints a table and one JSON line. Targets: >= 1,000 claims/s; create -> start p50 under 200 ms; end-to-end
>= 50 no-op tasks/s with 2 warm workers; a 1-second task's overhead <= 5 % warm.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this folder holds logging.py: keep it from shadowing the standard library's logging module
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import mlwarehouse  # noqa: E402
from mlwarehouse.ids import parse_time  # noqa: E402

WORKER = ("import sys; from mlwarehouse import connect; from mlwarehouse.tasks.worker import Worker; "
          "w = Worker(connect().project('bench'), sys.argv[1], concurrency=int(sys.argv[2]), verbose=False, "
          "warm={'warm': True, 'cold': False, 'auto': None}[sys.argv[3]]); "
          "w.warm_up() if w.mode == 'warm' else None; print('ready', w.mode, flush=True); w.run()")
#: the 1-second task of section 4
LONG_SCRIPT = "import time\ntime.sleep(seconds)\n"
MODES = ("cold", "warm")


# -- child modes -------------------------------------------------------------------------------------------
def claimer(name: str, start_at: float) -> None:
    p = mlwarehouse.connect().project("bench")
    p.tasks.claim("nothing-yet", name)  # opens the connection and prepares the collection before the clock
    claimed = []
    time.sleep(max(0.0, start_at - time.time()))
    while True:
        task = p.tasks.claim("claims", name, 60)
        if task is None:
            break
        claimed.append(task.id)
        p.tasks.finish(task.id, name, {})
    print(json.dumps({"claimed": claimed, "end": time.time()}))


def raw_claimer(path: str, name: str, start_at: float) -> None:
    con = sqlite3.connect(path, isolation_level=None, timeout=60)
    con.execute("PRAGMA synchronous = NORMAL")
    claimed = []
    time.sleep(max(0.0, start_at - time.time()))
    while True:
        con.execute("BEGIN IMMEDIATE")
        row = con.execute("SELECT id FROM q WHERE status = 'pending' ORDER BY priority DESC, id LIMIT 1").fetchone()
        if row is None:
            con.execute("COMMIT")
            break
        con.execute("UPDATE q SET status = 'running', worker = ? WHERE id = ?", (name, row[0]))
        con.execute("COMMIT")
        con.execute("UPDATE q SET status = 'finished' WHERE id = ? AND worker = ?", (row[0], name))
        claimed.append(row[0])
    print(json.dumps({"claimed": claimed, "end": time.time()}))


# -- measurements ------------------------------------------------------------------------------------------
def _race(argv_of, n: int, env: dict, delay: float) -> tuple[float, Counter]:
    start_at = time.time() + delay
    procs = [subprocess.Popen([sys.executable, __file__, *argv_of(k, start_at)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(n)]
    counts: Counter = Counter()
    end = 0.0
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a claimer failed:\n{err}")
        report = json.loads(out)
        counts.update(report["claimed"])
        end = max(end, report["end"])
    return end - start_at, counts


def bench_claims(p, env: dict, n_tasks: int, n_procs: int) -> dict:
    created = p.tasks.sweep("claims", "builtins:dict", configs=[{"i": i} for i in range(n_tasks)])
    seconds, counts = _race(lambda k, t: ["claimer", f"w{k}", repr(t)], n_procs, env, 2.0 + 0.2 * n_procs)
    once = len(counts) == n_tasks and set(counts) == {t.id for t in created} and max(counts.values()) == 1
    return {"claims_per_s": n_tasks / seconds, "claims_seconds": seconds, "exactly_once": once}


def bench_raw(folder: Path, env: dict, n_tasks: int, n_procs: int) -> dict:
    path = str(folder / "raw.sqlite")
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("CREATE TABLE q (id TEXT PRIMARY KEY, status TEXT, priority REAL, worker TEXT)")
    con.execute("CREATE INDEX q_claim ON q (status, priority DESC, id)")
    con.executemany("INSERT INTO q VALUES (?, 'pending', 0, NULL)", [(f"{i:08d}",) for i in range(n_tasks)])
    con.close()
    seconds, counts = _race(lambda k, t: ["raw", path, f"w{k}", repr(t)], n_procs, env, 1.0 + 0.1 * n_procs)
    return {"raw_claims_per_s": n_tasks / seconds, "raw_exactly_once": max(counts.values()) == 1
            and len(counts) == n_tasks}


def _workers(env: dict, task_name: str, n: int, concurrency: int = 1, mode: str = "auto") -> list[subprocess.Popen]:
    """``n`` worker processes, returned once each says it is ready (a warm one: its fork server imported)."""
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, task_name, str(concurrency), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
    for proc in procs:
        line = proc.stdout.readline().split()
        if line[:1] != ["ready"] or (mode != "auto" and line[1:] != [mode]):
            _stop(procs)
            raise SystemExit(f"a {mode} worker did not start: {line}")
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(30)


def bench_latency(p, env: dict, n: int) -> dict:
    procs = _workers(env, "latency", 1)
    try:
        warm = p.tasks.create("latency", "builtins:dict")
        p.tasks.wait([warm], timeout=60, progress=False)  # the worker is up
        done = []
        for i in range(n):  # one at a time, at a random moment of the idle worker's poll cycle
            time.sleep(random.uniform(0.0, 0.2))
            task = p.tasks.create("latency", "builtins:dict", hyper_parameters={"i": i})
            done += p.tasks.wait([task], timeout=60, progress=False, poll=0.02)
    finally:
        _stop(procs)
    ms = sorted((parse_time(t.started) - parse_time(t.created)).total_seconds() * 1000 for t in done)
    return {"create_to_start_p50_ms": statistics.median(ms), "create_to_start_p90_ms": ms[int(0.9 * (len(ms) - 1))]}


def bench_e2e(p, env: dict, n: int, mode: str, round_: int) -> dict:
    name = f"e2e-{mode}-{round_}"
    procs = _workers(env, name, 2, mode=mode)
    try:
        warm = p.tasks.sweep(name, "builtins:dict", configs=[{"warm": 0}, {"warm": 1}])
        p.tasks.wait(warm, timeout=60, progress=False)
        started = time.perf_counter()
        tasks = p.tasks.sweep(name, "builtins:dict", configs=[{"i": i} for i in range(n)])
        done = p.tasks.wait(tasks, timeout=600, progress=False, poll=0.02)
        seconds = time.perf_counter() - started
    finally:
        _stop(procs)
    return {"tasks_per_s": n / seconds, "all_finished": all(t.status == "finished" for t in done)}


def bench_long(p, env: dict, n: int, script: Path, mode: str, round_: int, seconds: float = 1.0) -> dict:
    name = f"long-{mode}-{round_}"
    procs = _workers(env, name, 1, mode=mode)
    try:
        tasks = p.tasks.sweep(name, script, configs=[{"seconds": seconds, "i": i} for i in range(n)])
        done = p.tasks.wait(tasks, timeout=120 + 10 * n, progress=False, poll=0.05)
    finally:
        _stop(procs)
    first = min(parse_time(t.started) for t in done)
    last = max(parse_time(t.ended) for t in done)
    per_task = (last - first).total_seconds() / n
    return {"overhead": (per_task - seconds) / seconds, "all_finished": all(t.status == "finished" for t in done)}


def bench_modes(p, env: dict, folder: Path, args) -> dict:
    """Sections 3 and 4: ``args.rounds`` rounds, cold then warm in each, medians and every round's figure."""
    script = folder / "one_second.py"
    script.write_text(LONG_SCRIPT)
    rounds: dict[str, list[dict]] = {f"{kind}_{mode}": [] for kind in ("e2e", "long") for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            rounds[f"e2e_{mode}"].append(bench_e2e(p, env, args.e2e, mode, r))
        for mode in MODES:
            rounds[f"long_{mode}"].append(bench_long(p, env, args.long, script, mode, r))
    out: dict = {}
    for mode in MODES:
        e2e, long = rounds[f"e2e_{mode}"], rounds[f"long_{mode}"]
        out[f"e2e_{mode}_tasks_per_s"] = statistics.median(x["tasks_per_s"] for x in e2e)
        out[f"e2e_{mode}_rounds"] = [round(x["tasks_per_s"], 2) for x in e2e]
        out[f"long_{mode}_overhead"] = statistics.median(x["overhead"] for x in long)
        out[f"long_{mode}_rounds"] = [round(x["overhead"], 4) for x in long]
        out[f"{mode}_all_finished"] = all(x["all_finished"] for x in e2e + long)
    out["e2e_warm_vs_cold"] = out["e2e_warm_tasks_per_s"] / out["e2e_cold_tasks_per_s"]
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "claimer":
        return claimer(sys.argv[2], float(sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "raw":
        return raw_claimer(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--claimers", type=int, default=8)
    parser.add_argument("--latency", type=int, default=50)
    parser.add_argument("--e2e", type=int, default=100)
    parser.add_argument("--long", type=int, default=5, help="1-second tasks per round of section 4")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of sections 3 and 4")
    parser.add_argument("--skip-claims", action="store_true", help="only sections 3 and 4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "MLW_HOME": str(folder / "wh"), "PYTHONPATH": str(ROOT)}
        for name in ("MLW_URI", "MLW_BLOBS", "MLW_PROJECT", "MLW_WORKER_MODE"):
            env.pop(name, None)
        wh = mlwarehouse.connect(home=folder / "wh")
        p = wh.project("bench")
        figures = {"tasks": args.tasks, "claimers": args.claimers, "cpus": os.cpu_count(), "rounds": args.rounds,
                   "e2e": args.e2e, "long": args.long}
        if not args.skip_claims:
            figures.update(bench_raw(folder, env, args.tasks, args.claimers))
            figures.update(bench_claims(p, env, args.tasks, args.claimers))
            figures["claims_vs_raw"] = figures["claims_per_s"] / figures["raw_claims_per_s"]
            figures.update(bench_latency(p, env, args.latency))
        figures.update(bench_modes(p, env, folder, args))
        wh.close()
    rows = []
    if not args.skip_claims:
        rows += [("raw SQLite claims/s (baseline)", f"{figures['raw_claims_per_s']:,.0f}", ""),
                 (f"claims/s, {args.claimers} processes", f"{figures['claims_per_s']:,.0f}",
                  f"{figures['claims_vs_raw']:.2f}x raw, target >= 1,000"),
                 ("each task claimed exactly once", str(figures["exactly_once"]), ""),
                 ("create -> start p50 / p90 (ms)",
                  f"{figures['create_to_start_p50_ms']:.0f} / {figures['create_to_start_p90_ms']:.0f}",
                  "target < 200")]
    warm, cold = figures["e2e_warm_tasks_per_s"], figures["e2e_cold_tasks_per_s"]
    long_warm, long_cold = figures["long_warm_overhead"], figures["long_cold_overhead"]
    rows += [("no-op tasks/s, 2 cold workers (baseline)", f"{cold:.1f}",
              f"rounds {figures['e2e_cold_rounds']}, a fresh interpreter per task"),
             ("no-op tasks/s, 2 warm workers", f"{warm:.1f}",
              f"rounds {figures['e2e_warm_rounds']}, {warm / cold:.1f}x cold; target >= 50: {_met(warm >= 50)}"),
             ("1-second task overhead, cold (baseline)", f"{100 * long_cold:.1f} %",
              f"rounds {[round(100 * x, 1) for x in figures['long_cold_rounds']]}"),
             ("1-second task overhead, warm", f"{100 * long_warm:.1f} %",
              f"rounds {[round(100 * x, 1) for x in figures['long_warm_rounds']]}; target <= 5 %: "
              f"{_met(long_warm <= 0.05)}"),
             ("every task finished (cold / warm)", f"{figures['cold_all_finished']} / {figures['warm_all_finished']}",
              "")]
    width = max(len(r[0]) for r in rows)
    print(f"medians of {args.rounds} rounds, {os.cpu_count()} CPUs")
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>12}  {note}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
