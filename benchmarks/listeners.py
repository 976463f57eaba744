"""Listeners: what a model attached to a collection costs, against the model's own cost measured in the same run.

    python benchmarks/listeners.py [--docs 20000] [--chunk 500] [--batch 64] [--workers 2] [--latency 200]
                                   [--rate 20]

Every document holds a 1024-float tensor (a 4 KB blob) and the listener is a ``torch.nn.Linear(1024, 64)``, on
the embedded warehouse (SQLite and a blob folder) in a temporary folder.

1. Inserts without a listener: ``--docs`` documents through ``insert_many`` in chunks of ``--chunk`` (docs/s).
2. Inserts with the listener computed in the writing process (``compute="inline"``, ``batch_size=--batch``).
3. The model's own cost: a plain torch loop over the same vectors in the same chunks and batches (stack, forward).
   Overhead ratio: ``with_listener / (without + model)``; 1.0 means the listener costs nothing beyond the insert
   and the model. Target <= 1.3.
4. Backfill through ``--workers`` worker processes (``ListenerWorker``, already started and idle): attach with
   ``compute="workers"`` to the documents of 1., timed until the last listener task finished (``progress()``
   then confirms that nothing is pending; it is not what is polled, since it reads every document). Ratio:
   ``model_time / backfill_time``, the share of the plain loop's speed the backfill reaches (1.0 = as fast as the
   bare model in one process; the workers also read every document and its blob, decode, write every output
   with a compare-and-set and finish tasks). Target >= 0.5, reachable only where the model costs about as
   much per document as that storage work (this Linear costs microseconds; the table also prints the rest).
5. Insert -> output latency with the workers computing: ``--latency`` single documents inserted at ``--rate``
   per second; per document, the listener state's ``time`` stamp (written with the output) minus the moment
   before its ``insert_one``. p50 / p95; target p95 <= 2 s.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this folder holds logging.py: keep it from shadowing the standard library's logging module
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import torch  # noqa: E402

import mlwarehouse  # noqa: E402
from mlwarehouse.ids import parse_time  # noqa: E402
from mlwarehouse.schema import LISTENER_TASK  # noqa: E402

NAME, DIM, OUT = "lin", 1024, 64

WORKER = ("import sys, torch; torch.set_num_threads(int(sys.argv[2])); import mlwarehouse; "
          "from mlwarehouse.collections.worker import ListenerWorker; "
          "ListenerWorker(mlwarehouse.connect().project(sys.argv[1])).run()")


def documents(vectors: torch.Tensor, prefix: str) -> list[dict]:
    return [{"_id": f"{prefix}{i:07d}", "x": row, "i": i} for i, row in enumerate(vectors)]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(DIM, OUT).eval()


def start_workers(env: dict, project: str, n: int) -> list[subprocess.Popen]:
    threads = max(1, (os.cpu_count() or 1) // n)
    return [subprocess.Popen([sys.executable, "-c", WORKER, project, str(threads)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_idle(procs: list[subprocess.Popen], seconds: float) -> None:
    """Give the workers time to import and connect (they have nothing to do yet); fail if one died."""
    time.sleep(seconds)
    for proc in procs:
        if proc.poll() is not None:
            raise SystemExit(f"a worker exited with {proc.returncode}:\n{proc.stderr.read()}")


def _workers_alive(procs: list[subprocess.Popen]) -> None:
    """Stop the benchmark, with the worker's error output, when a worker has exited."""
    for proc in procs:
        if proc.poll() is not None:
            raise SystemExit(f"a worker exited with {proc.returncode}:\n{proc.stderr.read()}")


def wait_caught_up(c, procs: list[subprocess.Popen], timeout: float, poll: float = 0.1) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        progress = c.progress(NAME)
        if progress["pending"] == 0:
            return progress
        _workers_alive(procs)
        if time.monotonic() > deadline:
            raise SystemExit(f"the listener did not catch up in {timeout:g} s: {progress}")
        time.sleep(poll)


# -- measurements ------------------------------------------------------------------------------------------
def bench_inserts(plain_wh, inline_wh, vectors: torch.Tensor, chunk: int, batch: int) -> dict:
    """Both kinds of insert, chunk by chunk in alternating order (so that a change of the disk's pace in the middle
    of the run falls on both alike), each into a warehouse of its own (blobs are named by their content: the
    second warehouse to store a vector would otherwise find its blob there already)."""
    plain = plain_wh.project("bench").collection("docs")
    inline = inline_wh.project("bench").collection("docs")
    inline.attach(NAME, model(), key="x", compute="inline", batch_size=batch)
    docs = documents(vectors, "d")
    seconds = {"plain": 0.0, "inline": 0.0}
    for k, at in enumerate(range(0, len(docs), chunk)):
        for which in (("plain", "inline") if k % 2 == 0 else ("inline", "plain")):
            c = plain if which == "plain" else inline
            part = [dict(d) for d in docs[at:at + chunk]]
            started = time.perf_counter()
            c.insert_many(part, chunk_size=chunk)
            seconds[which] += time.perf_counter() - started
    assert plain.count_documents({}) == inline.count_documents({}) == len(docs)
    assert inline.progress(NAME)["done"] == len(docs)
    return seconds


def bench_model(vectors: torch.Tensor, chunk: int, batch: int, rounds: int = 3) -> float:
    """The plain loop: the same vectors, the same chunks and batches, stacked and passed forward (best round)."""
    net, rows, best = model(), list(vectors.unbind(0)), float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        with torch.no_grad():
            for at in range(0, len(rows), chunk):
                part = rows[at:at + chunk]
                for b in range(0, len(part), batch):
                    out = net(torch.stack(part[b:b + batch]))
                    _ = [row.clone() for row in out.unbind(0)]
        best = min(best, time.perf_counter() - started)
    return best


def wait_tasks_done(c, procs: list[subprocess.Popen], timeout: float, poll: float = 0.05) -> tuple[float, dict]:
    """Wait until no listener task is left unfinished and ``progress()`` confirms nothing is pending; returns the
    moment the last task finished and that progress. The task queue is a small table that costs next to nothing
    to ask (a ``progress()`` reads every document, which on two cores takes CPU from the workers timed)."""
    tasks, deadline = c.project.tasks, time.monotonic() + timeout
    while True:
        if not tasks.has_unfinished(LISTENER_TASK, where={"hyper_parameters.listener": NAME}):
            finished = time.perf_counter()
            progress = c.progress(NAME)
            if progress["pending"] == 0:
                return finished, progress
        _workers_alive(procs)
        if time.monotonic() > deadline:
            raise SystemExit(f"the listener did not catch up in {timeout:g} s: {c.progress(NAME)}")
        time.sleep(poll)


def bench_backfill(wh, project: str, env: dict, n_workers: int, batch: int, n_docs: int) -> dict:
    c = wh.project(project).collection("docs")
    assert c.count_documents({}) == n_docs
    procs = start_workers(env, project, n_workers)
    try:
        wait_idle(procs, 4.0)
        started = time.perf_counter()
        c.attach(NAME, model(), key="x", compute="workers", batch_size=batch)
        attached = time.perf_counter() - started
        finished, progress = wait_tasks_done(c, procs, timeout=1800)
        seconds = finished - started
    finally:
        stop_workers(procs)
    assert progress["done"] == n_docs, progress
    return {"seconds": seconds, "attach_seconds": attached, "docs_per_s": n_docs / seconds}


def bench_latency(wh, project: str, env: dict, n_workers: int, batch: int, n: int, rate: float) -> dict:
    c = wh.project(project).collection("docs")
    c.insert_one({"_id": "warm", "x": torch.randn(DIM), "i": -1})
    c.attach(NAME, model(), key="x", compute="workers", batch_size=batch)
    procs = start_workers(env, project, n_workers)
    try:
        wait_caught_up(c, procs, timeout=120)  # the workers are up and the model loaded
        vectors, sent = torch.randn(n, DIM), {}
        started = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            doc_id = f"l{i:07d}"
            sent[doc_id] = time.time()
            c.insert_one({"_id": doc_id, "x": vectors[i], "i": i})
        wait_caught_up(c, procs, timeout=300)
    finally:
        stop_workers(procs)
    latencies = []
    for doc in c.table.find({"_id": {"$in": list(sent)}}, projection={"_id": 1, "_listeners": 1}):
        state = doc["_listeners"][NAME]
        assert state["status"] == "done", state
        latencies.append(parse_time(state["time"]).timestamp() - sent[doc["_id"]])
    latencies.sort()
    return {"p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))],
            "max": latencies[-1], "n": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    args = parser.parse_args()
    torch.manual_seed(1)
    vectors = torch.randn(args.docs, DIM)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "plain"
        env = {**os.environ, "MLW_HOME": str(home), "PYTHONPATH": str(ROOT)}
        for name in ("MLW_URI", "MLW_BLOBS", "MLW_PROJECT"):
            env.pop(name, None)
        with mlwarehouse.connect(home=home) as wh, mlwarehouse.connect(home=Path(tmp) / "inline") as inline_wh:
            seconds = bench_inserts(wh, inline_wh, vectors, args.chunk, args.batch)
            model_seconds = bench_model(vectors, args.chunk, args.batch)
            backfill = bench_backfill(wh, "bench", env, args.workers, args.batch, args.docs)
            latency = bench_latency(wh, "live", env, args.workers, args.batch, args.latency, args.rate)
    plain = {"seconds": seconds["plain"], "docs_per_s": args.docs / seconds["plain"]}
    inline = {"seconds": seconds["inline"], "docs_per_s": args.docs / seconds["inline"]}
    overhead = inline["seconds"] / (plain["seconds"] + model_seconds)
    backfill_ratio = model_seconds / backfill["seconds"]
    # what each worker spent per document beyond the model (reading it and its blob, writing the output, tasks)
    store_ms = (backfill["seconds"] * args.workers - model_seconds) / args.docs * 1000
    figures = {"docs": args.docs, "chunk": args.chunk, "batch": args.batch, "workers": args.workers,
               "cpus": os.cpu_count(), "insert_plain_s": plain["seconds"], "insert_plain_docs_per_s":
               plain["docs_per_s"], "insert_inline_s": inline["seconds"], "insert_inline_docs_per_s":
               inline["docs_per_s"], "model_s": model_seconds, "model_docs_per_s": args.docs / model_seconds,
               "overhead_ratio": overhead, "backfill_s": backfill["seconds"], "backfill_attach_s":
               backfill["attach_seconds"], "backfill_docs_per_s": backfill["docs_per_s"],
               "backfill_vs_model": backfill_ratio, "backfill_ms_per_doc_beyond_model": store_ms,
               "latency_p50_s": latency["p50"], "latency_p95_s": latency["p95"],
               "latency_max_s": latency["max"], "latency_docs": latency["n"], "latency_rate": args.rate}
    rows = [("inserts, no listener (docs/s)", f"{plain['docs_per_s']:,.0f}", f"{plain['seconds']:.2f} s"),
            ("inserts, inline listener (docs/s)", f"{inline['docs_per_s']:,.0f}", f"{inline['seconds']:.2f} s"),
            ("plain torch loop (docs/s, baseline)", f"{args.docs / model_seconds:,.0f}", f"{model_seconds:.2f} s"),
            ("overhead with / (without + model)", f"{overhead:.2f}", "target <= 1.3"),
            (f"backfill, {args.workers} workers (docs/s)", f"{backfill['docs_per_s']:,.0f}",
             f"{backfill['seconds']:.2f} s (attach {backfill['attach_seconds']:.2f} s)"),
            ("backfill speed / plain loop speed", f"{backfill_ratio:.3g}x", "target >= 0.5x"),
            ("backfill cost beyond the model (ms/doc/worker)", f"{store_ms:.2f}",
             f"the model: {model_seconds / args.docs * 1000:.4f} ms/doc"),
            (f"insert -> output p50 / p95 (s), {args.rate:g}/s", f"{latency['p50']:.2f} / {latency['p95']:.2f}",
             f"max {latency['max']:.2f}, target p95 <= 2")]
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>12}  {note}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
