"""faiss's HNSW graph as an engine of the embedded vector index (the ``vectors`` extra: ``faiss-cpu``, wheels on
every platform).

The graph the mirror uses when hnswlib is not installed (:mod:`mlwarehouse.vectors.hnswlib_graph` is faster for one
query per call: 0.74x hnswlib's queries/s at 1M x 128, see ``benchmarks/vectors.py``). Its filter runs inside the
graph walk in C++ (a bitmap of allowed labels). faiss's HNSW cannot delete: the mirror passes the live labels as
the filter while it holds dead ones (``removes`` is False).

Persisted as plain arrays (the vectors, and the graph's levels, offsets and neighbour lists), never faiss's own
file format: :meth:`FaissGraph.from_arrays` checks every array's shape and range before faiss sees it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlwarehouse.errors import IntegrityError, VectorIndexError
from mlwarehouse.vectors.stored import stored_array

__all__ = ["FaissGraph", "available"]


def available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class FaissGraph:
    """faiss's HNSW graph over flat float32 storage."""

    kind = "hnsw"  # the name snapshots record (kept from when it was the only graph)
    graph = True
    removes = False  # no deletion in faiss's HNSW: the caller filters the dead out

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

    def remove(self, labels) -> None:
        """Nothing: a dead label stays in the graph, and searches pass the live labels as their filter."""

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
            selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bits))
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
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
                    ) -> "FaissGraph":
        """An engine from stored arrays, each checked (shape, dtype, every value in range) before faiss sees it."""
        engine = cls(dims, metric, options)
        faiss, h = engine._faiss, engine.index.hnsw
        vectors = stored_array(arrays, "vectors", np.float32, 2)
        levels = stored_array(arrays, "levels", np.int32, 1)
        offsets = stored_array(arrays, "offsets", np.uint64, 1)
        neighbors = stored_array(arrays, "neighbors", np.int32, 1)
        entry = stored_array(arrays, "entry", np.int64, 1)
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


