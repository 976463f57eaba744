"""How benchmarks/vectors.py measures mlwarehouse's own vector indexes: a collection of one document per vector,
``create_vector_index``, then the public API (``VectorIndex.search`` unfiltered, ``collection.find`` filtered, and
on pgvector each filter again with an index of its own), in a forked child. The data, the timing helpers and the
libraries called directly are ``benchmarks/vector_runners.py``.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.vector_runners import FILTER_EFS, K, in_child, qps_single, rss_mb, sweep_ef, timed


def _fill(c, vectors, filters) -> float:
    """Insert one document per vector into collection ``c``: ``v`` and one boolean field per selectivity."""
    sels = sorted(filters)
    masks = [filters[s][0] for s in sels]

    def docs():
        for i in range(len(vectors)):
            doc = {"_id": f"{i:08d}", "v": vectors[i]}
            for j in range(len(sels)):
                doc[f"s{j}"] = bool(masks[j][i])
            yield doc

    _, took = timed(c.insert_many, docs())
    for j in range(len(sels)):  # as a user who filters on a field indexes it
        c.create_index(f"s{j}")
    return took


def _ids(results) -> np.ndarray:
    return np.array([[int(i) for i in r.ids] + [-1] * (K - len(r.ids)) for r in results], dtype=np.int64)


def _filtered_sweep(c, flt: dict, fq, ftruth, args) -> dict:
    """The ef sweep of ``collection.find(flt, vector=..., n=10)`` against ``ftruth``, the QPS of one query per call
    at the ef it settles on, and the plan the search took."""
    def found(qs, ef):
        return np.array([[int(d["_id"]) for d in c.find(flt, {"_id": 1}, vector=q, n=K, ef=ef)] for q in qs],
                        dtype=np.int64)
    f = sweep_ef(found, fq, ftruth, args.target, efs=FILTER_EFS, budget_s=args.filter_budget)
    f["qps_single"] = qps_single(lambda q, ef=f["ef"]: c.find(flt, {"_id": 1}, vector=q, n=K, ef=ef), fq)
    f["plan"] = c.find(flt, {"_id": 1}, vector=fq[0], n=K).plan
    return f


def measure_api(wh, engine: str, vectors, queries, truth, filters, args, reopen, baseline=None,
                filtered_baseline=None) -> dict:
    """Our index through the public API: ``create_vector_index`` over a collection of one document per vector,
    ``VectorIndex.search`` (ids and scores, the fast path) for the unfiltered sweep, ``collection.find(filter,
    vector=..., n=10)`` (documents read back and verified through the filter) for the filtered ones."""
    import faiss
    c = wh.collection("bench")
    base = rss_mb()
    insert_s = _fill(c, vectors, filters)
    print(f"  ours ({engine}): {len(vectors)} documents inserted in {insert_s:.0f} s", flush=True)
    faiss.omp_set_num_threads(args.build_threads)
    index, build_s = timed(lambda: c.create_vector_index("v", field="v", metric="cosine", engine=engine, options={
        "M": args.m, "ef_construction": args.ef_construction}))
    stats = index.stats()
    faiss.omp_set_num_threads(1)
    res = {"lib": f"ours-{engine}", "version": stats.get("kind") or "", "build_s": build_s, "insert_s": insert_s,
           "build_threads": args.build_threads, "rss_mb": rss_mb() - base,
           "index_mb": stats.get("memory_bytes", 0) / 2**20}
    with threadpool_limits(1):
        sw = sweep_ef(lambda qs, ef: _ids(index.search(qs, K, ef=ef)), queries, truth, args.target)
        res.update(ef=sw["ef"], recall=sw["recall"], reached=sw["reached"], qps_batch=sw["qps_batch"],
                   sweep=sw["points"])
        res["qps_single"] = qps_single(lambda q: index.search(q, K, ef=sw["ef"]), queries)
        print(f"  ours ({engine}): build {build_s:.1f} s, ef {sw['ef']} recall {sw['recall']:.3f} "
              f"{res['qps_single']:.0f} q/s", flush=True)
        if baseline is not None:
            res["raw"] = baseline(index, queries, truth, sw["ef"])
            print(f"  {engine} called directly: ef {sw['ef']} recall {res['raw']['recall']:.3f} "
                  f"{res['raw']['qps_single']:.0f} q/s (ours {res['qps_single'] / res['raw']['qps_single']:.2f}x)",
                  flush=True)
        res["filtered"] = {}
        fq = queries[:args.filter_queries]
        for j, sel in enumerate(sorted(filters)):
            f = res["filtered"][sel] = _filtered_sweep(c, {f"s{j}": True}, fq, filters[sel][1][:len(fq)], args)
            print(f"  ours ({engine}) selectivity {sel}: {f['plan']}, ef {f['ef']} recall {f['recall']:.3f} "
                  f"{f['qps_single']:.0f} q/s", flush=True)
        if filtered_baseline is not None:
            res["raw_filtered"] = filtered_baseline(index, c, filters, queries)
        res["filter_indexed"] = {}
        for j, sel in enumerate(sorted(filters)):  # pgvector: each filter again, with an index of its own
            if engine != "pgvector" or args.no_filter_indexes:
                continue
            made = index.index_filter({f"s{j}": True})
            f = res["filter_indexed"][sel] = _filtered_sweep(c, made["filter"], fq, filters[sel][1][:len(fq)], args)
            f["index_s"] = made["seconds"]
            print(f"  ours ({engine}) selectivity {sel} with a filter index (built in {made['seconds']:.1f} s): "
                  f"ef {f['ef']} recall {f['recall']:.3f} {f['qps_single']:.0f} q/s", flush=True)
    other, reopen_s = timed(reopen)
    res["features"] = {"insert_s": round(insert_s, 1), "reopen_s": round(reopen_s, 3),
                       "reopen_vs_build": reopen_s / build_s, "loaded_from": other.get("loaded_from"),
                       "memory_mb_reported": round(stats.get("memory_bytes", 0) / 2**20, 1)}
    res["l2_recall_ef128"] = float("nan")
    return res


def measure_ours(vectors, ids, queries, truth, *, filters, args) -> dict | None:
    """The embedded engine (the graph mlwarehouse picks: hnswlib's when installed, else faiss's) on an embedded
    warehouse, in a forked child."""
    import importlib.util
    import tempfile
    if importlib.util.find_spec("mlwarehouse.vectors") is None:
        return None
    import mlwarehouse
    home = tempfile.mkdtemp(prefix="mlw-bench-vectors-")

    def reopen():
        return mlwarehouse.connect(home=home).collection("bench").vector_index("v").stats()

    return in_child(lambda: measure_api(mlwarehouse.connect(home=home), "embedded", vectors, queries, truth, filters,
                                        args, reopen), "ours-embedded")
