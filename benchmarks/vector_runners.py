"""How benchmarks/vectors.py measures: the seeded data and exact ground truth, the timing helpers, hnswlib, faiss
and usearch behind one small interface and exact numpy search, each run in a forked child (see benchmarks/vectors.py
for what the rows mean and how to run it). mlwarehouse's engines through its API are ``benchmarks/ours_runners.py``;
the pgvector engine and pgvector called directly beside it, ``benchmarks/pgvector_runners.py``.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import pickle
import resource
import time
from importlib import metadata

import numpy as np
from threadpoolctl import threadpool_limits

K = 10
EFS = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
FILTER_EFS = EFS + (1536, 2048, 3072, 4096)
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)


# ---- data and ground truth -------------------------------------------------------------------------------------

def normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(n: int, dims: int, queries: int, seed: int, clusters: int = 1000, noise: float = 0.6,
              unit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points and ``queries`` held-out queries, float32, each a cluster centre plus gaussian noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dims), dtype=np.float32)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dims), dtype=np.float32)
        for start in range(0, count, 1 << 16):
            part = out[start:start + (1 << 16)]
            rng.standard_normal(part.shape, dtype=np.float32, out=part)
            part *= noise
            part += centres[rng.integers(0, clusters, len(part))]
        return normalise(out) if unit else out

    return draw(n), draw(queries)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int = K, metric: str = "ip",
               chunk: int = 1 << 16) -> np.ndarray:
    """Row ids (into ``vectors``) of each query's exact top ``k``, best first, by inner product or L2."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        part = vectors[start:start + chunk]
        s = queries @ part.T
        if metric == "l2":  # larger is better: -|q - v|^2 less the per-query constant |q|^2
            s = 2 * s - np.einsum("ij,ij->i", part, part)[None, :]
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall@k: the share of each query's true top k that ``found`` holds (rows of ids, any order)."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(f[:k], t)) / k for f, t in zip(found, truth)]))


def random_mask(n: int, selectivity: float, seed: int) -> np.ndarray:
    """A boolean mask allowing a random ``selectivity`` share of ``n`` ids (at least ``K``)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, max(K, round(n * selectivity)), replace=False)] = True
    return mask


# ---- timing ----------------------------------------------------------------------------------------------------

def qps_single(search_one, queries: np.ndarray, budget_s: float = 1.0, rounds: int = 3) -> float:
    """Queries per second of one query per call, best of ``rounds`` passes (each in order, stopping after
    ``budget_s``, at least 20 queries): the best pass is the one least disturbed by other work on the machine."""
    for q in queries[:5]:
        search_one(q)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        done = 0
        for q in queries:
            search_one(q)
            done += 1
            if done >= 20 and time.perf_counter() - start > budget_s:
                break
        best = max(best, done / (time.perf_counter() - start))
    return best


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def sweep_ef(search_batch, queries: np.ndarray, truth: np.ndarray, target: float, efs=EFS,
             budget_s: float = 30.0) -> dict:
    """The smallest ef whose batch recall reaches ``target`` (else the best seen), with every point tried.

    ``search_batch(queries, ef)`` returns ids; the sweep stops at the target, or once one call took ``budget_s``.
    """
    points, best = [], None
    for ef in efs:
        ids, took = timed(search_batch, queries, ef)
        r = recall(ids, truth)
        points.append({"ef": ef, "recall": round(r, 4), "qps_batch": len(queries) / took})
        if best is None or r > best["recall"] + 1e-9:
            best = points[-1]
        if r >= target or took > budget_s:
            break
    return {**best, "reached": best["recall"] >= target, "points": points}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


# ---- the libraries, behind one small interface ------------------------------------------------------------------
# build(vectors, ids, threads), search(queries, ef, mask=None) -> ids, prepare_filter(mask) -> handle,
# dumps() -> bytes, loads(bytes) -> adapter, add(vectors, ids), delete(ids) -> note, version.

class Hnswlib:
    name = "hnswlib"

    def __init__(self, dims: int, metric: str, m: int, ef_construction: int):
        import hnswlib
        self.lib, self.version = hnswlib, metadata.version("hnswlib")
        self.dims, self.metric, self.m, self.efc = dims, metric, m, ef_construction
        self.index = hnswlib.Index(space="ip" if metric == "ip" else "l2", dim=dims)

    def build(self, vectors, ids, threads):
        self.index.init_index(max_elements=len(vectors), M=self.m, ef_construction=self.efc, random_seed=100)
        self.index.add_items(vectors, ids, num_threads=threads)

    def prepare_filter(self, mask):
        allowed = mask.tolist()  # a list of Python bools: the cheapest lookup the per-node callback can make
        return allowed.__getitem__

    def search(self, queries, ef, flt=None):
        self.index.set_ef(ef)
        return self.index.knn_query(queries, K, num_threads=1, filter=flt)[0]

    def dumps(self):
        return pickle.dumps(self.index)

    def loads(self, blob):
        other = object.__new__(Hnswlib)
        other.__dict__.update(self.__dict__, index=pickle.loads(blob))
        return other

    def add(self, vectors, ids):
        self.index.resize_index(self.index.get_current_count() + len(vectors))  # capacity is fixed otherwise
        self.index.add_items(vectors, ids, num_threads=1)

    def delete(self, ids):
        for i in ids:
            self.index.mark_deleted(int(i))
        return "mark_deleted (tombstone; allow_replace_deleted reuses slots)"


class Faiss:
    name = "faiss"

    def __init__(self, dims: int, metric: str, m: int, ef_construction: int):
        import faiss
        self.lib, self.version = faiss, metadata.version("faiss-cpu")
        self.index = faiss.IndexHNSWFlat(dims, m, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
        self.index.hnsw.efConstruction = ef_construction
        faiss.omp_set_num_threads(1)

    def build(self, vectors, ids, threads):
        assert np.array_equal(ids, np.arange(len(ids))), "IndexHNSWFlat numbers rows 0..n-1 (IndexIDMap for keys)"
        self.lib.omp_set_num_threads(threads)
        self.index.add(vectors)
        self.lib.omp_set_num_threads(1)

    def prepare_filter(self, mask):
        bits = np.packbits(mask, bitorder="little")
        return bits, self.lib.IDSelectorBitmap(len(mask), self.lib.swig_ptr(bits))  # bits must outlive the selector

    def search(self, queries, ef, flt=None):
        flt = flt if flt is not None else getattr(self, "alive", None)
        sel = flt[1] if flt is not None else None
        params = self.lib.SearchParametersHNSW(efSearch=ef, sel=sel) if sel is not None else \
            self.lib.SearchParametersHNSW(efSearch=ef)
        return self.index.search(queries, K, params=params)[1]

    def dumps(self):
        return self.lib.serialize_index(self.index).tobytes()

    def loads(self, blob):
        other = object.__new__(Faiss)
        other.__dict__.update(self.__dict__, index=self.lib.deserialize_index(np.frombuffer(blob, dtype=np.uint8)))
        return other

    def add(self, vectors, ids):
        assert ids[0] == self.index.ntotal
        self.index.add(vectors)

    def delete(self, ids):
        try:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
            return "remove_ids"
        except RuntimeError:  # IndexHNSW has none: keep a tombstone bitmap and search through it (AND a filter)
            alive = np.ones(self.index.ntotal, dtype=bool)
            alive[np.asarray(ids)] = False
            self.alive = self.prepare_filter(alive)
            return "no remove_ids on HNSW: tombstone bitmap as the selector"


class Usearch:
    name = "usearch"

    def __init__(self, dims: int, metric: str, m: int, ef_construction: int):
        import usearch
        from usearch.index import Index
        self.version = usearch.__version__
        self.Index = Index
        self.index = Index(ndim=dims, metric="ip" if metric == "ip" else "l2sq", dtype="f32", connectivity=m,
                           expansion_add=ef_construction)

    def build(self, vectors, ids, threads):
        self.index.add(ids, vectors, threads=threads)

    prepare_filter = None  # the Python API (2.26) has no predicate for search: no in-walk filtering

    def search(self, queries, ef, flt=None):
        self.index.expansion_search = ef
        out = self.index.search(queries, K, threads=1)
        return out.keys if queries.ndim == 2 else out.keys[None, :]

    def dumps(self):
        return bytes(self.index.save())

    def loads(self, blob):
        other = object.__new__(Usearch)
        other.__dict__.update(self.__dict__, index=self.Index.restore(blob))
        return other

    def add(self, vectors, ids):
        self.index.add(ids, vectors, threads=1)

    def delete(self, ids):
        self.index.remove(np.asarray(ids, dtype=np.uint64))
        return "remove (tombstone)"


LIBRARIES = {"hnswlib": Hnswlib, "faiss": Faiss, "usearch": Usearch}


# ---- one library, measured --------------------------------------------------------------------------------------

def features(lib, vectors, queries, truth, ef, build_s) -> dict:
    """Persistence, add after load, delete, and whether results survive the round trip."""
    out = {}
    blob, out["dump_s"] = timed(lib.dumps)
    loaded, out["load_s"] = timed(lib.loads, blob)
    out["load_vs_build"] = out["load_s"] / build_s
    q = queries[:100]
    out["same_after_load"] = bool(np.array_equal(lib.search(q, ef), loaded.search(q, ef)))
    extra = queries  # held out, from the same clusters: once added, each must find itself
    new_ids = np.arange(len(vectors), len(vectors) + len(extra))
    try:
        _, out["add_s"] = timed(loaded.add, extra, new_ids)
        found = loaded.search(extra[:200], ef)[:, 0]
        out["added_found_top1"] = float(np.mean(found == new_ids[:200]))
    except Exception as exc:  # noqa: BLE001 - a library refusing is itself the finding
        out["add_after_load"] = f"failed: {exc}"[:120]
    gone = np.unique(truth[:, 0])
    try:
        out["delete"] = loaded.delete(gone)
        after = loaded.search(queries, ef)
        out["deleted_returned"] = int(np.isin(after, gone).sum())
    except Exception as exc:  # noqa: BLE001
        out["delete"] = f"failed: {exc}"[:120]
    return out


def l2_check(cls, dims, m, efc, seed, ef=128) -> float:
    """Recall@10 of an L2 index on 20,000 raw (unnormalised) vectors: the L2 metric works, not just cosine."""
    vectors, queries = make_data(20000, dims, 200, seed + 3, unit=False)
    lib = cls(dims, "l2", m, efc)
    lib.build(vectors, np.arange(len(vectors)), 2)
    return recall(lib.search(queries, ef), exact_topk(vectors, queries, metric="l2"))


def measure_filtered(lib, queries, filters, args) -> dict:
    """Per selectivity: the smallest ef reaching the target with the filter inside the walk, and its QPS."""
    out = {}
    fq = queries[:args.filter_queries]
    for sel, (mask, ftruth) in filters.items():
        if lib.prepare_filter is None:
            out[sel] = None
            continue
        flt = lib.prepare_filter(mask)

        def search(qs, ef, flt=flt):
            return lib.search(qs, ef, flt)

        sw = sweep_ef(search, fq, ftruth[:len(fq)], args.target, efs=FILTER_EFS, budget_s=args.filter_budget)
        single = qps_single(lambda q, ef=sw["ef"], search=search: search(q[None, :], ef), fq)
        out[sel] = {"ef": sw["ef"], "recall": sw["recall"], "reached": sw["reached"], "qps_batch": sw["qps_batch"],
                    "qps_single": single, "sweep": sw["points"]}
        print(f"  {lib.name} selectivity {sel}: ef {sw['ef']} recall {sw['recall']:.3f} {single:.0f} q/s", flush=True)
    return out


def measure_library(cls, vectors, queries, truth, filters, args) -> dict:
    """Everything the table shows for one library; runs in a forked child.

    No threadpool_limits here: the libraries take their thread counts explicitly, and it would cap faiss's build.
    """
    base = rss_mb()
    lib = cls(vectors.shape[1], "ip", args.m, args.ef_construction)
    _, build_s = timed(lib.build, vectors, np.arange(len(vectors)), args.build_threads)
    gc.collect()
    res = {"lib": lib.name, "version": lib.version, "build_s": build_s, "build_threads": args.build_threads,
           "rss_mb": rss_mb() - base, "index_mb": len(lib.dumps()) / 2**20}
    sw = sweep_ef(lib.search, queries, truth, args.target)
    res.update(ef=sw["ef"], recall=sw["recall"], reached=sw["reached"], qps_batch=sw["qps_batch"], sweep=sw["points"])
    res["qps_single"] = qps_single(lambda q: lib.search(q[None, :], sw["ef"]), queries)
    print(f"  {lib.name}: build {build_s:.1f} s, ef {sw['ef']} recall {sw['recall']:.3f} "
          f"{res['qps_single']:.0f} q/s", flush=True)
    res["filtered"] = measure_filtered(lib, queries, filters, args)
    res["features"] = features(lib, vectors, queries, truth, sw["ef"], build_s)
    res["l2_recall_ef128"] = l2_check(cls, vectors.shape[1], args.m, args.ef_construction, args.seed)
    return res


def _run(conn, fn, label):
    try:
        conn.send(fn())
    except BaseException as exc:  # noqa: BLE001 - reported by the parent as the row
        conn.send({"lib": label, "error": repr(exc)})


def in_child(fn, label: str) -> dict:
    """``fn()`` in a forked child (the data is inherited, not copied), so its resident-set growth is its own; a
    failure comes back as the row ``{"lib": label, "error": ...}``."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run, args=(send, fn, label))
    proc.start()
    out = recv.recv()
    proc.join()
    return out


# ---- exact search over the allowed subset, library-free ----------------------------------------------------------

def exact_qps(vectors, allowed, queries) -> dict:
    """QPS of exact search over rows ``allowed`` (None: all): per query gather + matmul + argpartition (single),
    and one gather + batched matmul for all queries (batch, the filter shared by the whole batch)."""
    def one(q):
        s = vectors @ q if allowed is None else vectors[allowed] @ q
        top = np.argpartition(-s, K - 1)[:K]
        return top if allowed is None else allowed[top]

    def batch(qs):
        return exact_topk(vectors, qs) if allowed is None else allowed[exact_topk(vectors[allowed], qs)]

    _, took = timed(batch, queries)
    return {"qps_single": qps_single(one, queries), "qps_batch": len(queries) / took}


def measure_exact(vectors, queries, filters, filter_queries) -> dict:
    """Exact search, one thread, over everything (key 1.0) and over each filter's allowed subset."""
    fq = queries[:filter_queries]
    with threadpool_limits(1):
        out = {1.0: exact_qps(vectors, None, fq)}
        for sel, (mask, _) in filters.items():
            out[sel] = exact_qps(vectors, np.flatnonzero(mask), fq)
    return out


# ---- ours: mlwarehouse's vector index, through its API ---------------------------------------------------------
