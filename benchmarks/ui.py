"""Web UI latency and payload: the runs page of a project with 10,000 runs, a chart over a 100,000-point history,
the sweep view over 1,000 of those runs, and 100 runs of 100,000 points compared on one chart.

    python benchmarks/ui.py [--runs 10000] [--sweep-runs 1000] [--points 100000] [--repeat 10]
                            [--compare-runs 100] [--compare-points 100000]

The UI is served by uvicorn on 127.0.0.1 in a process of its own, started once the warehouse is filled (so a first
request is a freshly started server's), and fetched over HTTP like a browser would (``Accept-Encoding: gzip``).
Each figure is the median of ``--repeat`` requests after the first one, which is reported apart.

1. Runs page: ``/p/<project>/runs`` of a project of ``--runs`` runs (8 hyper-parameters, 2 kinds x 4 metric
   summaries each), as it opens (its first 1,000 rows; later pages follow a link), then with every run on one page
   (``?limit=<--runs>``): the first request and the median of the next ones. Baseline: the floor of any reader of
   the same number of rows, ``SELECT doc FROM c_runs LIMIT n`` + ``json.loads`` in raw sqlite3. Targets: <= 5x the
   raw read and < 1 s.
2. Chart: ``/api/p/<project>/runs/metric?...&points=1000`` over one run's ``--points``-step history (logged
   through ``run.log``): the first request (reads the history from the index) and the median of the next ones
   (the server keeps recently charted histories). Baseline: the same request with ``points`` = the whole
   history, i.e. a UI that ships every point to the browser.

3. Sweep view: ``/p/<project>/sweep?q={"name": "sweep"}`` and the JSON its script reads,
   ``/api/p/<project>/sweep?q=...`` (every run's hyper-parameters and the last value of each metric, columnar),
   over the ``--sweep-runs`` runs of the project named ``sweep``: the first request of each and the median of the
   next ones, with the payload. Baseline: the raw read of the same rows by primary key
   (``SELECT doc FROM c_runs WHERE id IN (...)`` + ``json.loads``). Targets: page + JSON <= 5x the raw read and
   < 1 s.

4. Compare: ``/api/p/<project>/runs/points?ids=<--compare-runs ids>&metrics=train.loss&points=1000`` over
   ``--compare-runs`` runs logging ``--compare-points`` points each (what "compare selected" asks for one
   metric): the first request (reads every history) and the median of the next ones (the server keeps the
   downsampled curves). Baseline: the same request with ``points`` = the whole history (every point shipped),
   measured once: the histories do not fit the server's history cache, so it reads them again. Skipped with
   ``--compare-runs 0``.

Prints a table and one JSON line of the figures. Targets: runs page and sweep view <= 5x their raw reads and
< 1 s; first chart <= 1 s, later ones <= 100 ms; chart payload <= 50 KB (gzip).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import mlwarehouse  # noqa: E402

PROJECT = "bench-ui"
PARAMS = ("lr", "batch_size", "n_hidden", "dropout", "weight_decay", "seed", "optimizer", "epochs")
METRICS = ("loss", "accuracy", "f1", "lr")


def fill(wh, runs: int, points: int, sweep: int) -> str:
    """``runs`` run documents with summaries (the first ``sweep`` of them named ``sweep``), and one run with a
    ``points``-step history; returns its id."""
    p = wh.project(PROJECT)
    rng = random.Random(0)
    long_run = p.runs.start("long-history", hyper_parameters={"lr": 0.01})
    for step in range(points):
        long_run.log("train", step=step, loss=1.0 / (1 + step / 1000) + rng.random() * 0.05)
    long_run.finish()
    docs = []
    for i in range(runs - 1):
        summary = {kind: {m: {"last": rng.random(), "last_step": 99, "min": rng.random(), "min_step": 3,
                              "max": rng.random(), "max_step": 50, "count": 100, "nulls": 0} for m in METRICS}
                   for kind in ("train", "valid")}
        docs.append({"name": "sweep" if i < sweep else f"run-{i:05d}",
                     "status": rng.choice(["complete", "failed", "running"]),
                     "started": "2024-05-01T10:00:00.000000Z", "ended": None,
                     "hyper_parameters": {k: (rng.random() if k != "optimizer" else "adam") for k in PARAMS},
                     "datasets": [], "tags": [], "task": None, "summary": summary})
    p.insert_many("runs", docs)
    return long_run.id


#: the server process: the UI of the warehouse at argv[1] on port argv[2], served as ``mlw ui`` serves it
SERVER = ("import sys, mlwarehouse, mlwarehouse.web as w; "
          "w.serve(mlwarehouse.connect(home=sys.argv[1]), port=int(sys.argv[2]))")


def serve(home: Path) -> tuple[str, subprocess.Popen]:
    """The UI of the warehouse at ``home`` served by a process of its own, started after the fill: its first
    request is what the first visitor of a freshly started ``mlw ui`` waits for (nothing of the fill is in its
    memory: no cached statement, page or template)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(home), str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the UI server did not start (exit code {server.poll()})") from None
            time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def fetch(url: str, repeat: int) -> tuple[float, int, int, float]:
    """Median seconds over ``repeat`` GETs (after a warm-up), gzip bytes on the wire, bytes decoded, and the
    seconds of the first (cold) request."""
    import gzip

    def once() -> tuple[float, int, int]:
        request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
        start = time.perf_counter()
        with urllib.request.urlopen(request) as response:
            wire = response.read()
            encoded = response.headers.get("Content-Encoding") == "gzip"
        body = gzip.decompress(wire) if encoded else wire
        return time.perf_counter() - start, len(wire), len(body)

    cold = once()[0]
    results = [once() for _ in range(repeat)]
    return statistics.median(r[0] for r in results), results[0][1], results[0][2], cold


def baseline_runs(index_path: Path, repeat: int, limit: int | None = None, ids: list[str] | None = None) -> float:
    """Median seconds of a raw read + ``json.loads`` of ``limit`` rows of the runs table, or of the rows ``ids``."""
    con = sqlite3.connect(index_path)
    if ids is not None:
        sql, args = f"SELECT doc FROM c_runs WHERE id IN ({','.join('?' * len(ids))})", ids
    else:
        sql, args = "SELECT doc FROM c_runs LIMIT ?", [limit if limit is not None else -1]
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        docs = [json.loads(row[0]) for row in con.execute(sql, args)]
        times.append(time.perf_counter() - start)
    con.close()
    assert docs and (ids is None or len(docs) == len(ids))
    return statistics.median(times[1:])


def measure_runs_page(base: str, index_path: Path, runs: int, repeat: int) -> dict:
    """The runs page as it opens (its first 1,000 rows) and with every run on one page, each against a raw read of
    as many rows."""
    out = {}
    for key, query, rows in (("runs_page", "", min(runs, 1000)), ("runs_page_all", f"?limit={runs}", runs)):
        p50, wire, raw, cold = fetch(f"{base}/p/{PROJECT}/runs{query}", repeat if not query else max(3, repeat // 3))
        floor_s = baseline_runs(index_path, repeat, limit=rows)
        out.update({f"{key}_rows": rows, f"{key}_ms": round(p50 * 1000, 1), f"{key}_first_ms": round(cold * 1000, 1),
                    f"{key}_gzip_bytes": wire, f"{key}_bytes": raw, f"{key}_raw_read_ms": round(floor_s * 1000, 1),
                    f"{key}_vs_raw": round(p50 / floor_s, 2), f"{key}_first_vs_raw": round(cold / floor_s, 2)})
    return out


def measure_sweep(base: str, index_path: Path, repeat: int) -> dict:
    """The sweep view of the runs named ``sweep``: the page and its JSON (first and median), the JSON's payload,
    and the raw read of the same rows by primary key."""
    q = urllib.parse.quote('{"name": "sweep"}')
    page_s, _, _, page_cold = fetch(f"{base}/p/{PROJECT}/sweep?q={q}", repeat)
    json_s, wire, raw, json_cold = fetch(f"{base}/api/p/{PROJECT}/sweep?q={q}", repeat)
    con = sqlite3.connect(index_path)
    ids = [row[0] for row in con.execute("SELECT id FROM c_runs WHERE json_extract(doc, '$.name') = 'sweep'")]
    con.close()
    floor_s = baseline_runs(index_path, repeat, ids=ids)
    return {"sweep_page_ms": round(page_s * 1000, 1), "sweep_page_first_ms": round(page_cold * 1000, 1),
            "sweep_json_ms": round(json_s * 1000, 1), "sweep_json_first_ms": round(json_cold * 1000, 1),
            "sweep_runs": len(ids), "sweep_gzip_bytes": wire, "sweep_bytes": raw,
            "sweep_raw_read_ms": round(floor_s * 1000, 1),
            "sweep_vs_raw": round((page_s + json_s) / floor_s, 2),
            "sweep_first_vs_raw": round((page_cold + json_cold) / floor_s, 2)}


def fill_compare(wh, runs: int, points: int) -> list[str]:
    """``runs`` runs logging ``points`` steps of ``train.loss`` each (through ``run.log``); returns their ids."""
    p = wh.project(PROJECT)
    rng = random.Random(1)
    ids = []
    for i in range(runs):
        run = p.runs.start("compare", hyper_parameters={"lr": 10 ** -rng.uniform(1, 4), "seed": i})
        scale = rng.uniform(500, 5000)
        for step in range(points):
            run.log("train", step=step, loss=1.0 / (1 + step / scale) + rng.random() * 0.05)
        run.finish()
        ids.append(run.id)
    return ids


def fetch_once(url: str) -> tuple[float, int, int]:
    """Seconds, gzip bytes on the wire and bytes decoded of one GET (for a baseline too slow to repeat)."""
    import gzip
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as response:
        wire = response.read()
        encoded = response.headers.get("Content-Encoding") == "gzip"
    seconds = time.perf_counter() - start
    return seconds, len(wire), len(gzip.decompress(wire) if encoded else wire)


def measure_compare(base: str, wh, runs: int, points: int, repeat: int) -> dict:
    """Fill ``runs`` x ``points``, then time one chart of them all: downsampled (first, median) and every point."""
    start = time.perf_counter()
    ids = fill_compare(wh, runs, points)
    fill_s = time.perf_counter() - start
    url = f"{base}/api/p/{PROJECT}/runs/points?ids={','.join(ids)}&metrics=train.loss"
    seconds, wire, raw, cold = fetch(url + "&points=1000", repeat)
    every_s, every_wire, every_raw = fetch_once(url + f"&points={max(4, points)}")
    return {"compare_runs": runs, "compare_points": points, "compare_fill_s": round(fill_s, 1),
            "compare_first_ms": round(cold * 1000, 1), "compare_ms": round(seconds * 1000, 1),
            "compare_gzip_bytes": wire, "compare_bytes": raw, "compare_every_point_ms": round(every_s * 1000, 1),
            "compare_every_point_gzip_bytes": every_wire, "compare_every_point_bytes": every_raw}


def verdict(what: str, ratio: float, first_ratio: float, first_s: float) -> str:
    met = max(ratio, first_ratio) <= 5 and first_s < 1
    return (f"{what} / raw read: {ratio:.1f}x, first {first_ratio:.1f}x in {first_s * 1000:.0f} ms "
            f"(target <= 5x, < 1 s: {'met' if met else 'missed'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000, help="runs in the project")
    parser.add_argument("--sweep-runs", type=int, default=1000, help="of them, the runs of the sweep view")
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--compare-runs", type=int, default=100)
    parser.add_argument("--compare-points", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, mlwarehouse.connect(home=Path(tmp) / "wh") as wh:
        start = time.perf_counter()
        long_id = fill(wh, args.runs, args.points, min(args.sweep_runs, args.runs - 1))
        fill_s = time.perf_counter() - start
        base, server = serve(Path(tmp) / "wh")
        try:
            page = measure_runs_page(base, Path(tmp) / "wh" / "index.sqlite", args.runs, args.repeat)
            chart = f"{base}/api/p/{PROJECT}/runs/metric?ids={long_id}&kind=train&metric=loss"
            chart_s, chart_wire, chart_raw, chart_cold = fetch(chart + "&points=1000", args.repeat)
            full_s, full_wire, full_raw, _ = fetch(chart + f"&points={args.points}", max(1, args.repeat // 2))
            sweep = measure_sweep(base, Path(tmp) / "wh" / "index.sqlite", args.repeat)
            compare = measure_compare(base, wh, args.compare_runs, args.compare_points, args.repeat) \
                if args.compare_runs else {}
        finally:
            server.terminate()
            server.wait(30)
    rows = []
    for key, label in (("runs_page", "as it opens"), ("runs_page_all", "all on one page")):
        rows += [(f"runs page of {args.runs}, {label}: {page[key + '_rows']} rows, first",
                  page[key + "_first_ms"] / 1000, page[key + "_gzip_bytes"], page[key + "_bytes"]),
                 ("  again", page[key + "_ms"] / 1000, page[key + "_gzip_bytes"], page[key + "_bytes"]),
                 (f"  baseline: raw read of {page[key + '_rows']} rows", page[key + "_raw_read_ms"] / 1000, None, None)]
    rows += [
        (f"chart, {args.points} points -> 1000, first", chart_cold, chart_wire, chart_raw),
        ("  again (history cached)", chart_s, chart_wire, chart_raw),
        (f"  baseline: all {args.points} points (cached)", full_s, full_wire, full_raw),
    ]
    print(f"filled in {fill_s:.1f} s")
    print(f"{'request':<44} {'p50 ms':>9} {'gzip KB':>9} {'raw KB':>9}")
    for name, seconds, wire, raw in rows:
        kb = lambda n: f"{n / 1024:9.1f}" if n is not None else f"{'':>9}"  # noqa: E731
        print(f"{name:<44} {seconds * 1000:9.1f} {kb(wire)} {kb(raw)}")
    for name, key, wire_key, raw_key in (
            (f"sweep view, {sweep['sweep_runs']} runs: page, first", "sweep_page_first_ms", None, None),
            ("  page again", "sweep_page_ms", None, None),
            ("  its JSON (params + metrics), first", "sweep_json_first_ms", "sweep_gzip_bytes", "sweep_bytes"),
            ("  its JSON again", "sweep_json_ms", "sweep_gzip_bytes", "sweep_bytes"),
            ("  baseline: raw read of the same rows by id", "sweep_raw_read_ms", None, None)):
        kb = lambda k: f"{sweep[k] / 1024:9.1f}" if k else f"{'':>9}"  # noqa: E731
        print(f"{name:<44} {sweep[key]:9.1f} {kb(wire_key)} {kb(raw_key)}")
    first_s = (sweep["sweep_page_first_ms"] + sweep["sweep_json_first_ms"]) / 1000
    print(verdict("sweep view (page + JSON)", sweep["sweep_vs_raw"], sweep["sweep_first_vs_raw"], first_s))
    for key, label in (("runs_page", "as it opens"), ("runs_page_all", "all on one page")):
        print(verdict(f"runs page, {label}", page[key + "_vs_raw"], page[key + "_first_vs_raw"],
                      page[key + "_first_ms"] / 1000))
    if compare:
        c, kb = compare, lambda n: f"{n / 1024:9.1f}"  # noqa: E731
        for name, ms, wire, raw in (
                (f"compare {c['compare_runs']} runs x {c['compare_points']}, first", c["compare_first_ms"],
                 c["compare_gzip_bytes"], c["compare_bytes"]),
                ("  again (downsampled curves cached)", c["compare_ms"], c["compare_gzip_bytes"], c["compare_bytes"]),
                (f"  baseline: every point ({c['compare_runs'] * c['compare_points']})", c["compare_every_point_ms"],
                 c["compare_every_point_gzip_bytes"], c["compare_every_point_bytes"])):
            print(f"{name:<44} {ms:9.1f} {kb(wire)} {kb(raw)}")
        print(f"compare: {c['compare_every_point_gzip_bytes'] / c['compare_gzip_bytes']:.0f}x fewer bytes than "
              f"shipping every point; first request {c['compare_every_point_ms'] / c['compare_first_ms']:.1f}x, "
              f"later ones {c['compare_every_point_ms'] / c['compare_ms']:.0f}x faster")
    print(f"chart payload: {full_wire / chart_wire:.0f}x smaller and {full_s / chart_s:.1f}x faster than shipping "
          f"every point")
    print(json.dumps({"runs": args.runs, "points": args.points, **page, "chart_first_ms": round(chart_cold * 1000, 1),
                      "chart_ms": round(chart_s * 1000, 1),
                      "chart_gzip_bytes": chart_wire, "chart_bytes": chart_raw,
                      "full_chart_ms": round(full_s * 1000, 1), "full_chart_gzip_bytes": full_wire, **sweep,
                      **compare}))


if __name__ == "__main__":
    main()
