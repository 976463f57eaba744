"""Search engines over a dense matrix of vectors addressed by label (0, 1, 2, ... in the order added).

- :class:`ExactEngine`: the vectors in one float32 matrix; exact top-k by batched matrix products (numpy). Always
  available, exact by construction, and what the planner uses for small candidate sets of any engine.
- Graphs (HNSW), chosen by measurement (``benchmarks/vectors.py``, 128 dimensions, recall@10 0.95, one query per
  call): :class:`~mlwarehouse.vectors.hnswlib_graph.HnswlibGraph` when hnswlib is installed (the ``hnswlib``
  extra: the fastest, 1.00x), else :class:`~mlwarehouse.vectors.faiss_graph.FaissGraph` (the ``vectors`` extra,
  wheels on every platform: 0.69x hnswlib's queries/s at 200k vectors, 0.57x-0.90x at 1M), else exact. usearch measured
  0.37x at 200k and is not used.

Every engine scores "higher is closer": the inner product (of normalised vectors, for cosine) or minus the squared
L2 distance. Labels are never reused; the caller keeps which are alive, tells the engine which died (``remove``:
a graph that can delete skips them itself, ``removes``) and otherwise passes the live labels as ``allowed``.

Persistence is the engine's arrays as plain ``.npy`` values, never a library's own file format: the bytes come
from the store, so ``from_arrays`` checks every array's shape and range before a library sees it, and nothing in
them can make us allocate more than they hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlwarehouse.errors import IntegrityError, VectorIndexError
from mlwarehouse.vectors import faiss_graph, hnswlib_graph
from mlwarehouse.vectors.stored import stored_array

__all__ = ["ExactEngine", "make_engine", "engine_class", "ann_available", "best_kind", "exact_top", "BLOCK"]

#: rows per block of an exact scan (a block of scores for 64 queries is 64 x 65,536 float32, 16 MiB)
BLOCK = 65_536


def ann_available() -> bool:
    """Whether a graph library (hnswlib or faiss) is installed."""
    return best_kind() != "exact"


def best_kind() -> str:
    """The fastest engine this process can make: ``hnswlib``, ``hnsw`` (faiss) or ``exact``."""
    if hnswlib_graph.available():
        return "hnswlib"
    return "hnsw" if faiss_graph.available() else "exact"


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
    graph = False
    removes = False

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

    def remove(self, labels) -> None:
        """Nothing: the caller passes the live labels as ``allowed``."""

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
        vectors = stored_array(arrays, "vectors", np.float32, 2)
        if vectors.shape[1:] != (dims,):
            raise IntegrityError(f"a stored vector index has vectors of shape {vectors.shape}, not (n, {dims})")
        engine.add(vectors)
        return engine


def engine_class(kind: str):
    """The class of an engine kind (``exact``, ``hnsw``: faiss, ``hnswlib``), None when its library is missing."""
    if kind == "exact":
        return ExactEngine
    if kind == "hnsw":
        return faiss_graph.FaissGraph if faiss_graph.available() else None
    if kind == "hnswlib":
        return hnswlib_graph.HnswlibGraph if hnswlib_graph.available() else None
    raise VectorIndexError(f"unknown vector engine {kind!r}")


def make_engine(kind: str, dims: int, metric: str, options: dict | None = None):
    """A new engine of ``kind``, or of the best kind installed when that one's library is missing."""
    cls = engine_class(kind) or engine_class(best_kind())
    return cls(dims, metric, options)
