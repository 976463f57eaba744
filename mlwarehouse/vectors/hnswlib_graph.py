"""hnswlib's HNSW graph as an engine of the embedded vector index (the ``hnswlib`` extra; built from source).

The fastest graph measured for one query per call (``benchmarks/vectors.py``, 128 dimensions, recall@10 0.95:
hnswlib answers 1.44x faiss's queries/s at 200,000 vectors, 1.11x-1.76x at 1,000,000), so the mirror prefers it.
Labels are the mirror's (0, 1, 2, ... in the order added). A dead label is marked deleted in the graph
(``removes``): searches skip it in C++ without a filter. A filter runs inside the walk as a Python callback per
candidate (a list lookup), which is why the planner sends small candidate sets to the exact scan.

Persisted as plain arrays, never hnswlib's own format: the vectors (by label), and in hnswlib's order of nodes each
node's label, level-0 link list and level, the upper levels' link lists and the entry point.
:meth:`HnswlibGraph.from_arrays` checks every count and link (in range, and pointing at a node that has the level
it links on: hnswlib reads a neighbour's list at that level without checking) before it hands hnswlib the layout
it asks for, taken from an index of the same parameters.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mlwarehouse.errors import IntegrityError, VectorIndexError
from mlwarehouse.vectors.stored import stored_array

__all__ = ["HnswlibGraph", "available"]

#: the most levels a stored node may claim (hnswlib draws a level as -ln(U) / ln(M): beyond 40 never happens)
MAX_LEVEL = 64
#: a batch of at least this many vectors is inserted with every core (hnswlib starts threads per call)
_THREADED = 1000
_available: bool | None = None


def available() -> bool:
    global _available
    if _available is None:
        try:
            import hnswlib  # noqa: F401
            _available = True
        except ImportError:
            _available = False
    return _available


def _cores() -> int:
    """The cores this process may run on (not the machine's: a container may get fewer)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class HnswlibGraph:
    """hnswlib's graph over float32 vectors; ``ip`` (for cosine and inner product) or ``l2`` space."""

    kind = "hnswlib"
    graph = True
    removes = True

    def __init__(self, dims: int, metric: str, options: dict | None = None):
        import hnswlib
        self._lib = hnswlib
        self.dims, self.metric = dims, metric
        self.options = dict(options or {})
        self.m = int(self.options.get("M", 16))
        self.ef_construction = int(self.options.get("ef_construction", 200))
        self.ef_search = int(self.options.get("ef_search", 64))
        self.space = "l2" if metric == "l2" else "ip"
        self.index = hnswlib.Index(space=self.space, dim=dims)
        self._capacity = 0
        self._ef = 0
        self._filter: tuple[np.ndarray, Any] | None = None  # the last mask and its lookup

    @property
    def size(self) -> int:
        return int(self.index.element_count) if self._capacity else 0

    def add(self, vectors: np.ndarray) -> int:
        """Append vectors (labels follow on); returns the label of the first."""
        first = self.size
        if not len(vectors):
            return first
        need = first + len(vectors)
        if need > self._capacity:  # hnswlib's capacity is fixed: grow by half again, so growth is amortised
            capacity = max(need, self._capacity + self._capacity // 2, 1024)
            if self._capacity:
                self.index.resize_index(capacity)
            else:
                self.index.init_index(max_elements=capacity, M=self.m, ef_construction=self.ef_construction,
                                      random_seed=100)
            self._capacity = capacity
        threads = _cores() if len(vectors) >= _THREADED else 1
        self.index.add_items(np.ascontiguousarray(vectors, dtype=np.float32), np.arange(first, need),
                             num_threads=threads)
        return first

    def gather(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        if not len(labels):
            return np.empty((0, self.dims), np.float32)
        return np.asarray(self.index.get_items(labels, return_type="numpy"), dtype=np.float32)

    @property
    def matrix(self) -> np.ndarray:
        """Every stored vector, a copy (hnswlib keeps them interleaved with the graph)."""
        return self.gather(np.arange(self.size))

    def remove(self, labels) -> None:
        """Mark labels deleted: searches skip them (they still route the walk until a compaction)."""
        for label in np.asarray(labels, dtype=np.int64).tolist():
            self.index.mark_deleted(label)

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None, ef: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top ``k``; ``allowed`` (a bool per label) is asked inside the walk. A query for which the
        walk finds fewer than ``k`` (hnswlib then returns nothing) comes back as labels -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dims or k <= 0:
            raise VectorIndexError(f"queries must be of shape (n, {self.dims}) and k positive")
        ef = max(int(ef or self.ef_search), k)
        if ef != self._ef:
            self.index.set_ef(ef)
            self._ef = ef
        check = self._lookup(allowed) if allowed is not None else None
        try:
            labels, dist = self.index.knn_query(queries, k, num_threads=1, filter=check)
        except RuntimeError:  # one query found fewer than k: answer the others, that one empty
            labels = np.full((len(queries), k), -1, dtype=np.int64)
            dist = np.full((len(queries), k), np.inf, dtype=np.float32)
            for i, q in enumerate(queries):
                try:
                    labels[i], dist[i] = self.index.knn_query(q, k, num_threads=1, filter=check)
                except RuntimeError:
                    pass
        labels = labels.view(np.int64) if labels.dtype == np.uint64 else labels
        # hnswlib's ip distance is 1 - dot; an empty row's infinite distance becomes a score of -inf either way
        return (-dist if self.space == "l2" else np.float32(1) - dist), labels

    def _lookup(self, allowed: np.ndarray):
        """The walk's filter for a mask: a list's item lookup (the cheapest call back from C++), kept for the
        last mask (the planner reuses one mask across a stream of queries under a filter)."""
        held = self._filter
        if held is None or held[0] is not allowed:
            flags = allowed[:self.size].tolist()
            flags += [False] * (self.size - len(flags))  # labels added after the mask was made are not in it
            held = self._filter = (allowed, flags.__getitem__)
        return held[1]

    @property
    def nbytes(self) -> int:
        per = 4 * (2 * self.m + 1) + 4 * self.dims + 8 + 4 + 48  # level 0, vector, label, level, label map
        upper = 4 * (self.m + 1) / max(self.m - 1, 1)  # expected upper-level links per node
        return int(self._capacity * per + self.size * upper)

    # -- persistence --------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        """hnswlib's own sizes and constants for these parameters (from an empty index of them)."""
        probe = self._lib.Index(space=self.space, dim=self.dims)
        probe.init_index(max_elements=1, M=self.m, ef_construction=self.ef_construction, random_seed=100)
        return {k: v for k, v in probe.__getstate__()[0].items() if not isinstance(v, np.ndarray)}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The engine's arrays (copies): what a snapshot stores. Deletion marks are left out (the mirror's live
        labels are stored beside them and marked again on load)."""
        n = self.size
        if n == 0:
            return {"vectors": np.empty((0, self.dims), np.float32)}
        state = self.index.__getstate__()[0]
        rows = state["data_level0"].view(np.uint8).reshape(-1, state["size_data_per_element"])[:n]
        links0 = rows[:, :state["offset_data"]].view(np.uint32).copy()
        links0[:, 0] &= 0xFFFF  # the count; the byte above it is the deletion mark
        labels = rows[:, state["label_offset"]:state["label_offset"] + 8].view(np.uint64)[:, 0].astype(np.int64)
        vectors = np.empty((n, self.dims), dtype=np.float32)  # by label, as every engine stores them
        vectors[labels] = rows[:, state["offset_data"]:state["label_offset"]].view(np.float32)
        return {"vectors": vectors, "labels": labels, "links0": links0,
                "levels": state["element_levels"][:n].astype(np.int32),
                "upper": state["link_lists"].view(np.uint32).copy(),
                "entry": np.array([state["enterpoint_node"], state["max_level"]], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], dims: int, metric: str, options: dict | None = None
                    ) -> "HnswlibGraph":
        """An engine from stored arrays, each checked (shape, dtype, every link in range) before hnswlib sees it."""
        engine = cls(dims, metric, options)
        vectors = stored_array(arrays, "vectors", np.float32, 2)
        n = len(vectors)
        if vectors.shape[1:] != (dims,):
            raise IntegrityError(f"a stored vector index has vectors of shape {vectors.shape}, not (n, {dims})")
        if n == 0:
            return engine
        labels = stored_array(arrays, "labels", np.int64, 1)
        links0 = stored_array(arrays, "links0", np.uint32, 2)
        levels = stored_array(arrays, "levels", np.int32, 1)
        upper = stored_array(arrays, "upper", np.uint32, 1)
        entry = stored_array(arrays, "entry", np.int64, 1)
        layout = engine._layout()
        m0, m = layout["max_M0"], layout["max_M"]
        ok = (links0.shape == (n, m0 + 1) and len(levels) == n and len(labels) == n and len(entry) == 2
              and labels.min() >= 0 and labels.max() < n and (np.bincount(labels, minlength=n) == 1).all()
              and layout["offset_data"] == 4 * (m0 + 1) and layout["size_links_per_element"] == 4 * (m + 1)
              and levels.min() >= 0 and levels.max() <= MAX_LEVEL
              and len(upper) == int(levels.astype(np.int64).sum()) * (m + 1)
              and 0 <= entry[0] < n and entry[1] == levels.max() and levels[entry[0]] == entry[1])
        ok = ok and _links_ok(links0, m0, np.zeros(n, dtype=np.int64), levels)
        if ok and len(upper):
            blocks = upper.reshape(-1, m + 1)
            starts = np.cumsum(levels) - levels
            owner_level = np.arange(len(blocks)) - np.repeat(starts, levels) + 1  # level 1.. of each block
            ok = _links_ok(blocks, m, owner_level, levels)
        if not ok:
            raise IntegrityError("a stored vector index graph is inconsistent (sizes or links out of range); "
                                 "it will be rebuilt from the documents")
        rows = np.zeros((n, layout["size_data_per_element"]), dtype=np.uint8)
        rows[:, :layout["offset_data"]] = links0.view(np.uint8).reshape(n, -1)
        rows[:, layout["offset_data"]:layout["label_offset"]] = vectors[labels].view(np.uint8).reshape(n, -1)
        rows[:, layout["label_offset"]:layout["label_offset"] + 8] = labels.view(np.uint8).reshape(n, 8)
        params = {**layout, "max_elements": n, "cur_element_count": n, "ep_added": True, "num_threads": 1,
                  "max_level": int(entry[1]), "enterpoint_node": int(entry[0]), "ef": engine.ef_search,
                  "has_deletions": False, "allow_replace_deleted": False,
                  "label_lookup_external": labels.astype(np.uint64),
                  "label_lookup_internal": np.arange(n, dtype=np.uint32),
                  "element_levels": levels, "data_level0": rows.reshape(-1).view(np.int8),
                  "link_lists": upper.view(np.int8)}
        engine.index = engine._lib.Index(params)
        engine._capacity = n
        return engine


def _links_ok(blocks: np.ndarray, most: int, level: np.ndarray, levels: np.ndarray) -> bool:
    """Whether each block (a count, then ``most`` links) holds at most ``most`` links, each to a node that exists
    and has the block's ``level`` (only the counted links are read)."""
    counts = blocks[:, 0]
    if counts.max(initial=0) > most:
        return False
    used = np.arange(most)[None, :] < counts[:, None]
    targets = blocks[:, 1:][used]
    if len(targets) and int(targets.max()) >= len(levels):
        return False
    return bool((levels[targets] >= np.repeat(level, counts)).all())
