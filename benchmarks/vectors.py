"""Embedded approximate-nearest-neighbour libraries side by side, plain and filtered, on one seeded data set.

    python benchmarks/vectors.py [--n 1000000] [--dims 128] [--queries 1000] [--seed 0] [--libs hnswlib,faiss]

hnswlib (and usearch) are not dependencies of mlwarehouse: ``pip install hnswlib`` first, or ``--libs faiss``.
``ours-embedded`` and ``ours-pgvector`` are mlwarehouse's engines through its API (a collection of one document per
vector); pgvector runs on a private PostgreSQL started from the test servers' binaries.

The data: ``--clusters`` gaussian centres, points = centre + gaussian noise, normalised (cosine = inner product);
``--queries`` held-out points drawn the same way; exact top-10 from numpy (batched matrix products, argpartition).
Each library runs in its own forked child, so its resident-set growth is its own. Search is one thread everywhere
(one query per call for "single", the way ann-benchmarks measures it, best of 3 passes; one call for all queries
for "batch"); the build uses ``--build-threads``. The libraries run one after another, so other load on the machine
shifts their ratios: compare them on a quiet machine. Per library:
- build seconds, resident-set growth and serialized index size (MB);
- an ef (efSearch, expansion_search) sweep: the smallest ef whose recall@10 reaches ``--target``, and the QPS there;
- filtered search at each selectivity (a random subset of allowed ids), the filter applied inside the graph walk,
  against exact filtered ground truth: the smallest ef reaching the target (or the best recall within the sweep);
- persistence (serialize to bytes, load time), adding after load, deleting, and an L2 check on raw vectors.
Exact search over just the allowed subset (numpy gather + matmul) is measured once, library-free, so the table
shows where exact beats the graph. Every row also carries its ratio against the best library of the same run.

This file is the command line and the report; how each row is measured (the data, the libraries' adapters) is
``benchmarks/vector_runners.py``, our engines through the API ``ours_runners.py`` (where ``measure_ours`` is the
hook for mlwarehouse's own vector index: it is called with the same data and its result, when not None, is printed
beside the libraries), pgvector beside ours ``pgvector_runners.py``. The last lines compare our rows with the
faster library called directly (QPS of one query per call at the target recall). On pgvector, each filter is then
searched again with a filter index of its own (``index_filter``: a partial HNSW index), with its build time;
``--no-filter-indexes`` skips that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import numpy as np

from benchmarks.ours_runners import measure_ours
from benchmarks.pgvector_runners import measure_pgvector
from benchmarks.vector_runners import (
    LIBRARIES,
    SELECTIVITIES,
    exact_topk,
    in_child,
    make_data,
    measure_exact,
    measure_library,
    random_mask,
)

# ---- report -----------------------------------------------------------------------------------------------------

def ratio(value, best) -> str:
    return f"{value / best:.2f}x" if value and best else "-"


def print_table(rows: list[dict], exact: dict) -> None:
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"{r['lib']}: ERROR {r['error']}")
    direct = [r for r in ok if not r["lib"].startswith("ours")] or ok  # the ratios are against the libraries
    if not ok:
        return
    best_build = min(r["build_s"] for r in direct)
    best_single = max(r["qps_single"] for r in direct)
    best_batch = max(r["qps_batch"] for r in direct)
    print(f"\n{'library':<16}{'build s':>9}{'ratio':>7}{'RSS MB':>8}{'index MB':>9}{'ef':>6}{'recall':>8}"
          f"{'QPS 1':>9}{'ratio':>7}{'QPS batch':>10}{'ratio':>7}")
    for r in ok:
        print(f"{r['lib'] + ' ' + r.get('version', ''):<16}{r['build_s']:>9.1f}{ratio(r['build_s'], best_build):>7}"
              f"{r['rss_mb']:>8.0f}{r['index_mb']:>9.0f}{r['ef']:>6}{r['recall']:>8.3f}"
              f"{r['qps_single']:>9.0f}{ratio(r['qps_single'], best_single):>7}"
              f"{r['qps_batch']:>10.0f}{ratio(r['qps_batch'], best_batch):>7}")
    print(f"{'exact numpy':<16}{'':>9}{'':>7}{'':>8}{'':>9}{'':>6}{1.0:>8.3f}{exact[1.0]['qps_single']:>9.0f}"
          f"{'':>7}{exact[1.0]['qps_batch']:>10.0f}")
    print("\nfiltered (in-walk): ef, recall@10, QPS single / batch; exact subset: QPS single / batch")
    sels = [s for s in exact if s < 1.0]
    print(f"{'library':<16}" + "".join(f"{'sel ' + str(s):>30}" for s in sels))
    for r in ok:
        cells = []
        for s in sels:
            f = r["filtered"].get(s)
            cells.append("n/a" if f is None else
                         f"{f['ef']}{'' if f['reached'] else '!'} {f['recall']:.3f} "
                         f"{f['qps_single']:.0f}/{f['qps_batch']:.0f}")
        print(f"{r['lib']:<16}" + "".join(f"{c:>30}" for c in cells))
    cells = [f"1.000 {exact[s]['qps_single']:.0f}/{exact[s]['qps_batch']:.0f}" for s in sels]
    print(f"{'exact subset':<16}" + "".join(f"{c:>30}" for c in cells))
    print("(! = target recall not reached within the ef sweep; the best recall seen is shown)")
    for s in sels:
        graph = max((r["filtered"][s]["qps_single"] for r in ok if r["filtered"].get(s) and
                     r["filtered"][s]["reached"]), default=0.0)
        winner = "exact" if exact[s]["qps_single"] > graph else "graph"
        print(f"selectivity {s}: {winner} wins one query per call ({exact[s]['qps_single']:.0f} exact vs "
              f"{graph:.0f} best graph q/s at the target recall)")
    for r in ok:
        if r["lib"].startswith("ours") and direct is not ok:
            print(f"{r['lib']}: unfiltered QPS of one query per call at recall {r['recall']:.3f} is "
                  f"{ratio(r['qps_single'], best_single)} the faster library's, called directly")
        for sel, row in (r.get("raw_filtered") or {}).get("selectivities", {}).items():
            ours = r["filtered"][sel]
            best = max(row["exact"]["qps_single"], row["graph"]["qps_single"] if row["graph"]["reached"] else 0)
            print(f"{r['lib']}: selectivity {sel}: pgvector called directly (its own table with the filter's column): "
                  f"graph ef {row['graph']['ef']} recall {row['graph']['recall']:.3f} "
                  f"{row['graph']['qps_single']:.0f} q/s, exact {row['exact']['qps_single']:.0f} q/s; "
                  f"ours {ours['qps_single']:.0f} q/s ({ratio(ours['qps_single'], best)} the faster at the target)")
        for sel, f in (r.get("filter_indexed") or {}).items():
            print(f"{r['lib']}: selectivity {sel} with a filter index of its own (index_filter, built in "
                  f"{f['index_s']:.1f} s): ef {f['ef']}{'' if f['reached'] else '!'} recall {f['recall']:.3f} "
                  f"{f['qps_single']:.0f} q/s ({f['plan']})")
        if r.get("raw"):
            print(f"{r['lib']}: pgvector called directly at ef {r['raw']['ef']}: recall {r['raw']['recall']:.3f}, "
                  f"{r['raw']['qps_single']:.0f} q/s; ours through the API "
                  f"{ratio(r['qps_single'], r['raw']['qps_single'])}")
    print("\nfeatures")
    for r in ok:
        checks = {k: round(v, 4) if isinstance(v, float) else v for k, v in r["features"].items()}
        checks["l2_recall_ef128"] = round(r["l2_recall_ef128"], 3)
        print(f"{r['lib']:<16}{json.dumps(checks, default=str)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dims", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.6, help="noise sigma per dimension (centres have sigma 1)")
    ap.add_argument("--libs", default="hnswlib,faiss",
                    help=f"comma-separated, of {','.join(LIBRARIES)}; none: only ours")
    ap.add_argument("--m", type=int, default=16, help="graph degree M (connectivity); level 0 has 2M")
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.95, help="recall@10 the ef sweeps aim for")
    ap.add_argument("--selectivities", default=",".join(map(str, SELECTIVITIES)))
    ap.add_argument("--filter-queries", type=int, default=300, help="queries used for the filtered measurements")
    ap.add_argument("--filter-budget", type=float, default=20.0, help="stop a filtered sweep after a call this long")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--no-ours", action="store_true", help="skip mlwarehouse's embedded engine")
    ap.add_argument("--no-pgvector", action="store_true", help="skip mlwarehouse's pgvector engine")
    ap.add_argument("--no-filter-indexes", action="store_true",
                    help="skip the pgvector searches with a filter index of their own (index_filter)")
    ap.add_argument("--pg-shared-buffers", default="4GB", help="the benchmark server's shared_buffers (pgvector asks "
                    "for the index to fit: 1M x 128 is about 1.4 GB of index and 0.7 GB of vectors)")
    args = ap.parse_args()

    start = time.perf_counter()
    vectors, queries = make_data(args.n, args.dims, args.queries, args.seed, args.clusters, args.noise)
    truth = exact_topk(vectors, queries)
    filters = {}
    for i, sel in enumerate(float(s) for s in args.selectivities.split(",")):
        mask = random_mask(args.n, sel, args.seed + 100 + i)
        allowed = np.flatnonzero(mask)
        filters[sel] = (mask, allowed[exact_topk(vectors[allowed], queries[:args.filter_queries])])
    print(f"data + ground truth: {time.perf_counter() - start:.1f} s ({args.n} x {args.dims}, {args.queries} "
          f"queries)", flush=True)
    exact = measure_exact(vectors, queries, filters, args.filter_queries)

    rows = []
    for name in [x for x in args.libs.split(",") if x and x != "none"]:
        t = time.perf_counter()
        rows.append(in_child(lambda cls=LIBRARIES[name]: measure_library(cls, vectors, queries, truth, filters, args),
                             name))
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    if not args.no_ours:
        ours = measure_ours(vectors, np.arange(args.n), queries, truth, filters=filters, args=args)
        if ours is not None:
            rows.append(ours)
    if not args.no_pgvector:
        rows.append(measure_pgvector(vectors, queries, truth, filters=filters, args=args))
    print_table(rows, exact)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows,
                                               "exact": {str(k): v for k, v in exact.items()}}, default=str))


if __name__ == "__main__":
    main()
