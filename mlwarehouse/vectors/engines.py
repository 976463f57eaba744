"""Search engines over a dense matrix of vectors addressed by label (0, 1, 2, ... in the order added).

- :class:`ExactEngine`: the vectors in one float32 matrix; exact top-k by batched matrix products (numpy). Always
  available, exact by construction, and what the planner uses for small candidate sets of any engine.
- :class:`HnswEngine`: faiss's HNSW graph (the ``vectors`` extra, ``faiss-cpu``). Chosen by measurement (see
  ``benchmarks/vectors.py``): its filter runs inside the graph walk in C++ (a bitmap of allowed labels), where
  hnswlib calls back into Python for every candidate; unfiltered, the two are within a few percent.

Both score "higher is closer": the inner product (of normalised vectors, for cosine) or minus the squared L2
distance. Labels are never reused; the caller keeps which are alive and passes them as ``allowed``.

Persistence is the engine's arrays as plain ``.npy`` values (the vectors, and the graph's levels, offsets and
neighbour lists), never a library's own file format: the bytes come from the store, so :meth:`from_arrays`
checks every array's shape and range before faiss sees it, and nothing in them can make us allocate more than
they hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlwarehouse.errors import IntegrityError, VectorIndexError

__all__ = ["ExactEngine", "HnswEngine", "make_engine", "ann_available", "exact_top", "BLOCK"]

#: rows per block of an exact scan (a block of scores for 64 queries is 64 x 65,536 float32, 16 MiB)
BLOCK = 65_536


def ann_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def exact_top(matrix: np.ndarray, queries: np.ndarray, k: int, metric: str, labels: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` rows of ``matrix`` for each query, best first: (scores, labels), -1 labels where fewer rows.

    ``labels`` names the rows (default: their positions). Scores are inner products, or minus squared L2."""
    q = len(queries)
    best_s = np.full((q, k), -np.inf, dtype=np.float32)
    best_l = np.full((q, k), -1, dtype=np.int64)
    if k == 0:
        return best_s, best_l
    qn = (queries * queries).sum(1)[:, None] if metric == "l2" else None
    for start in range(0, len(matrix), BLOCK):
        block = matrix[start:start + BLOCK]
        scores = queries @ block.T
        if metric == "l2":
            scores = 2 * scores - qn - (block * block).sum(1)[None, :]
        names = np.arange(start, start + len(block)) if labels is None else labels[start:start + len(block)]
        take = min(k, len(block))
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < len(block) else \
            np.broadcast_to(np.arange(len(block)), (q, len(block)))
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], 1)
        cand_l = np.concatenate([best_l, names[part]], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_l = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_l, order, 1)
    best_l[~np.isfinite(best_s)] = -1
    return best_s, best_l


class ExactEngine:
    """Every vector in one growable matrix; search is exact."""

    kind = "exact"

    def __init__(self, dims: int, metric: str, options: dict | None = None):
        self.dims, self.metric = dims, metric
        self._data = np.empty((0, dims), dtype=np.float32)
        self.size = 0

    def add(self, vectors: np.ndarray) -> int:
        """Append vectors; returns the label of the first."""
        first = self.size
        if self.size + len(vectors) > len(self._data):
            grown = np.empty((max(1024, 2 * len(self._data), self.size + len(vectors)), self.dims), np.float32)
            grown[:self.size] = self._data[:self.size]
            self._data = grown
        self._data[self.size:self.size + len(vectors)] = vectors
        self.size += len(vectors)
        return first

    @property
    def matrix(self) -> np.ndarray:
        return self._data[:self.size]

    def gather(self, labels: np.ndarray) -> np.ndarray:
        return self.matrix[labels]

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None, ef: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
        if allowed is None:
            return exact_top(self.matrix, queries, k, self.metric)
        labels = np.flatnonzero(allowed[:self.size])
        return exact_top(self.matrix[labels], queries, k, self.metric, labels)

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The engine's arrays, as views (valid until the next ``add``): what a snapshot stores."""
        return {"vectors": self.matrix}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], dims: int, metric: str, options: dict | None = None
                    ) -> "ExactEngine":
        engine = cls(dims, metric)
        vectors = _array(arrays, "vectors", np.float32, 2)
        if vectors.shape[1:] != (dims,):
            raise IntegrityError(f"a stored vector index has vectors of shape {vectors.shape}, not (n, {dims})")
        engine.add(vectors)
        return engine


class HnswEngine:
    """faiss's HNSW graph over flat float32 storage."""

    kind = "hnsw"

    def __init__(self, dims: int, metric: str, options: dict | None = None):
        import faiss
        self._faiss = faiss
        self.dims, self.metric = dims, metric
        self.options = dict(options or {})
        self.m = int(self.options.get("M", 16))
        kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.index = faiss.IndexHNSWFlat(dims, self.m, kind)
        self.index.hnsw.efConstruction = int(self.options.get("ef_construction", 200))
        self.index.hnsw.efSearch = int(self.options.get("ef_search", 64))
        self._params: dict[int, object] = {}

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray) -> int:
        first = self.size
        if len(vectors):
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return first

    @property
    def matrix(self) -> np.ndarray:
        """The stored vectors, a zero-copy view of faiss's storage (valid until the next add)."""
        n = self.size
        if n == 0:
            return np.empty((0, self.dims), np.float32)
        storage = self._faiss.downcast_index(self.index.storage)
        return self._faiss.rev_swig_ptr(storage.get_xb(), n * self.dims).reshape(n, self.dims)

    def gather(self, labels: np.ndarray) -> np.ndarray:
        return self.matrix[labels]

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None, ef: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top ``k``; ``allowed`` (a bool per label) is applied inside the graph walk."""
        faiss = self._faiss
        ef = max(int(ef or self.index.hnsw.efSearch), k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dims or k <= 0:
            raise VectorIndexError(f"queries must be of shape (n, {self.dims}) and k positive")
        if allowed is not None:
            bits = np.packbits(allowed[:self.size], bitorder="little")
            params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bits)), efSearch=ef)
        else:
            bits, params = None, self._params.get(ef)
            if params is None:  # made once per ef: making one costs a tenth of a small search
                params = self._params[ef] = faiss.SearchParametersHNSW(efSearch=ef)
        # faiss's own search() wrapper, minus its checks (done here): a tenth of a single small query's time
        n = len(queries)
        dist, labels = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)
        self.index.search_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(dist), faiss.swig_ptr(labels), params)
        del bits  # kept alive through the search: the selector holds a raw pointer to it
        scores = -dist if self.metric == "l2" else dist
        if allowed is not None or k > self.size:  # only then can faiss leave slots empty (label -1)
            scores[labels < 0] = -np.inf
        return scores, labels

    @property
    def nbytes(self) -> int:
        h = self.index.hnsw
        return int(self.size * self.dims * 4 + h.neighbors.size() * 4 + h.offsets.size() * 8 + h.levels.size() * 4)

    def to_arrays(self) -> dict[str, np.ndarray]:
        faiss, h = self._faiss, self.index.hnsw
        return {"vectors": self.matrix, "levels": faiss.vector_to_array(h.levels),
                "offsets": faiss.vector_to_array(h.offsets), "neighbors": faiss.vector_to_array(h.neighbors),
                "entry": np.array([h.entry_point, h.max_level], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], dims: int, metric: str, options: dict | None = None
                    ) -> "HnswEngine":
        """An engine from stored arrays, each checked (shape, dtype, every value in range) before faiss sees it."""
        engine = cls(dims, metric, options)
        faiss, h = engine._faiss, engine.index.hnsw
        vectors = _array(arrays, "vectors", np.float32, 2)
        levels = _array(arrays, "levels", np.int32, 1)
        offsets = _array(arrays, "offsets", np.uint64, 1)
        neighbors = _array(arrays, "neighbors", np.int32, 1)
        entry = _array(arrays, "entry", np.int64, 1)
        n = len(vectors)
        per_level = faiss.vector_to_array(h.cum_nneighbor_per_level).astype(np.int64)
        ok = vectors.shape[1:] == (dims,) and len(levels) == n and len(offsets) == n + 1 and len(entry) == 2
        if ok and n:
            ok = (levels.min() >= 1 and levels.max() < len(per_level) and offsets[0] == 0
                  and np.array_equal(np.diff(offsets.astype(np.int64)), per_level[levels])
                  and int(offsets[-1]) == len(neighbors) and neighbors.min() >= -1 and neighbors.max() < n
                  and 0 <= entry[0] < n and entry[1] == levels.max() - 1)
        elif ok:
            ok = len(neighbors) == 0 and entry[0] == -1
        if not ok:
            raise IntegrityError("a stored vector index graph is inconsistent (sizes or links out of range); "
                                 "it will be rebuilt from the documents")
        if n:
            engine.index.storage.add(np.ascontiguousarray(vectors))
            faiss.copy_array_to_vector(levels, h.levels)
            faiss.copy_array_to_vector(offsets, h.offsets)
            faiss.copy_array_to_vector(neighbors, h.neighbors)
            h.entry_point, h.max_level = int(entry[0]), int(entry[1])
            engine.index.ntotal = n
        return engine


def _array(arrays: dict, name: str, dtype, ndim: int) -> np.ndarray:
    value = arrays.get(name)
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != ndim:
        raise IntegrityError(f"a stored vector index lacks a valid {name!r} array ({np.dtype(dtype).name}, "
                             f"{ndim} dimensions)")
    return value


ENGINES = {"exact": ExactEngine, "hnsw": HnswEngine}


def make_engine(kind: str, dims: int, metric: str, options: dict | None = None):
    """A new engine: ``hnsw`` when faiss is installed and asked for, else ``exact``."""
    if kind == "hnsw" and not ann_available():
        kind = "exact"
    if kind not in ENGINES:
        raise VectorIndexError(f"unknown vector engine {kind!r}")
    return ENGINES[kind](dims, metric, options)
