"""Filtered nearest-neighbour search over an embedded index, planned by selectivity, verified against the store.

The plan for ``n`` neighbours of each query under a filter (any filter of the query language):

1. **No filter**: the graph, over the live labels.
2. **A filter that many documents match** (a quarter or more of a sample of ``SAMPLE``), in an index of more than
   ``EXACT_LIMIT`` vectors: the graph's nearest ``3 n / share`` candidates, kept if they match (one query by id).
   Cheap however many match (but ``matched`` is then unknown: None); when a query keeps fewer than ``n``, the
   next plan takes over.
3. **Any other filter**: its matching labels are computed once per mirror version (the index asks for the ids
   that match, which an index on the filtered field makes cheap) and cached, so a stream of queries under one
   filter pays for it once. If at most ``EXACT_LIMIT`` documents match, the search is exact (numpy over just those
   vectors): below that, a scan of the subset is faster than a walk and never misses. Above it, the graph walks
   with the matching labels inside the walk (the engine skips the others as it goes, so results are not
   thinned out after the fact, as pgvector's post-filtering does), and the walk widens (``ef`` x4) until ``n``
   matches come back or the whole subset has been scanned exactly.
4. **Verification**: the result documents are read back by id *through the filter*, so every result satisfies it
   now; a document whose ``_rev`` moved since the mirror took its vector is rescored from its current vector
   (and one that lost its vector is dropped), so a deleted or updated-away vector is never returned.

Results say how many documents matched the filter, so "fewer than n" is told apart from "nothing close".
"""

from __future__ import annotations

import json

import numpy as np

from mlwarehouse.errors import VectorIndexError

__all__ = ["Hit", "Results", "plan_search", "user_scores", "vector_score", "EXACT_LIMIT"]

#: at most this many matching documents: exact search over them (a 20,000 x 128 scan is about 1 ms)
EXACT_LIMIT = 20_000
#: a filter that matches at least this share of the documents is applied to the graph's nearest candidates (at 1M
#: vectors: 727 queries/s at share 0.5; at 0.1 the 320 candidates cost 10 ms, where the walk with the filter's
#: cached labels inside it answers 1,254 queries/s)
POST_FILTER_SHARE = 0.25
#: documents in the sample a filter's share is estimated on
SAMPLE = 512
_WIDEN = 4
_MAX_EF = 4096
_CACHE = 16
_SUBSETS = 4


class Hit:
    """One neighbour: the document's id, its score (higher is closer) and, when read, the document."""

    __slots__ = ("id", "score", "doc")

    def __init__(self, id: str, score: float, doc: dict | None = None):
        self.id, self.score, self.doc = id, score, doc

    def __repr__(self) -> str:
        return f"Hit({self.id!r}, {self.score:.4f})"


class Results:
    """The neighbours of one query, nearest first, and what the search did.

    ``matched``: documents that match the filter (with a vector), None without a filter; ``plan``: "graph",
    "graph+filter", "exact", ...; ``complete``: False when fewer than n documents match at all. A search holds
    its neighbours as ids and scores and makes the :class:`Hit` objects only when ``hits`` is first read: a caller
    that wants ids and scores (the fast path, a batch of queries) never pays for them."""

    __slots__ = ("_hits", "_ids", "_scores", "matched", "plan", "complete", "extra")

    def __init__(self, hits: list[Hit] | None, matched: int | None, plan: str, complete: bool = True,
                 extra: dict | None = None, *, ids: list[str] | None = None, scores: list[float] | None = None):
        self._hits = hits if hits is not None or ids is not None else []
        self._ids, self._scores = ids, scores
        self.matched, self.plan, self.complete, self.extra = matched, plan, complete, extra if extra else {}

    @property
    def hits(self) -> list[Hit]:
        if self._hits is None:
            self._hits = [Hit(i, s) for i, s in zip(self._ids, self._scores)]
            self._ids = self._scores = None
        return self._hits

    @hits.setter
    def hits(self, hits: list[Hit]) -> None:
        self._hits, self._ids, self._scores = list(hits), None, None

    @property
    def ids(self) -> list[str]:
        return list(self._ids) if self._hits is None else [h.id for h in self._hits]

    @property
    def scores(self) -> list[float]:
        return list(self._scores) if self._hits is None else [h.score for h in self._hits]

    def __iter__(self):
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self._ids) if self._hits is None else len(self._hits)

    def __repr__(self) -> str:
        return f"Results({len(self)} hits, matched={self.matched}, plan={self.plan!r}, complete={self.complete})"


class Planner:
    """Search plans of one mirror, with the filter masks it has computed (valid for one mirror version)."""

    def __init__(self, mirror):
        self.mirror = mirror
        self._masks: dict[str, tuple[int, np.ndarray, int]] = {}
        self._shares: dict[str, tuple[int, float]] = {}
        self._sample: tuple[int, list[str]] | None = None
        self._subsets: dict[int, tuple] = {}  # id(mask) -> (mask, version, labels, vectors)

    def share(self, filter: dict) -> float:
        """The share of live documents that match ``filter``, estimated on a sample of ``SAMPLE`` of them (one
        query by id; cached for the mirror's version)."""
        m = self.mirror
        key = _key(filter)
        cached = self._shares.get(key)
        if cached and cached[0] == m.version:
            return cached[1]
        if self._sample is None or self._sample[0] != m.version:
            live = np.flatnonzero(m.alive)
            pick = live if len(live) <= SAMPLE else np.random.default_rng(m.version).choice(live, SAMPLE, replace=False)
            self._sample = (m.version, [m.ids[i] for i in pick.tolist()])
        ids = self._sample[1]
        hits = len(m.table.values({"$and": [{"_id": {"$in": ids}}, filter]}, ["_id"])) if ids else 0
        share = hits / max(len(ids), 1)
        if len(self._shares) >= _CACHE:
            self._shares.pop(next(iter(self._shares)))
        self._shares[key] = (m.version, share)
        return share

    def _post_filtered(self, queries, n, filter, share, ef) -> list[Results] | None:
        """When most documents match: the graph's nearest ``n / share`` (x3) candidates, kept if they match (one
        query by id); None when any query keeps fewer than ``n`` (then the filter's labels are computed)."""
        m = self.mirror
        k = min(m.count, int(np.ceil(3 * n / share)) + 20)
        scores, labels = m.engine.search(queries, k, allowed=self._alive(), ef=max(ef, k))
        wanted = sorted({m.ids[x] for x in labels[labels >= 0].tolist()})
        ok = {d for (d,) in m.table.values({"$and": [{"_id": {"$in": wanted}}, filter]}, ["_id"])}
        keep = np.array([[x >= 0 and m.ids[x] in ok for x in row] for row in labels.tolist()], dtype=bool)
        if (keep.sum(1) < n).any():
            return None
        out = []
        for s_row, l_row, k_row in zip(scores, labels, keep):
            res = self._results(s_row[k_row][:n], l_row[k_row][:n], None, "graph+post-filter", n)
            res.complete = True
            out.append(res)
        return out

    def _alive(self) -> np.ndarray | None:
        """The filter of a search without one: the live labels while there are dead ones the engine still holds."""
        m = self.mirror
        return m.alive if m.dead and not m.engine.removes else None

    def mask(self, filter: dict) -> tuple[np.ndarray, int]:
        """Live labels whose document matches ``filter`` (bool per label) and how many."""
        m = self.mirror
        key = _key(filter)
        cached = self._masks.get(key)
        if cached and cached[0] == m.version:
            return cached[1], cached[2]
        labels = [m.label_of.get(doc_id) for (doc_id,) in m.table.values(filter, ["_id"])]
        mask = np.zeros(len(m.ids), dtype=bool)
        found = np.fromiter((x for x in labels if x is not None), dtype=np.int64)
        mask[found] = True
        mask &= m.alive
        count = int(mask.sum())
        if len(self._masks) >= _CACHE:
            self._masks.pop(next(iter(self._masks)))
        self._masks[key] = (m.version, mask, count)
        return mask, count

    def search(self, queries: np.ndarray, n: int, filter: dict | None, *, ef: int | None = None
               ) -> list[Results]:
        """Labels and scores of the ``n`` nearest live vectors per query (not yet verified)."""
        m = self.mirror
        if m.engine is None or m.count == 0:
            return [Results([], 0 if filter else None, "exact", complete=not filter) for _ in queries]
        ef = int(ef or m.spec.options.get("ef_search", 64))
        if not filter:
            k = min(n, m.count)
            scores, labels = m.engine.search(queries, k, allowed=self._alive(), ef=max(ef, k))
            short: list[int] = []
            out = self._batch(scores, labels, None, "graph" if m.engine.graph else "exact", n, short=short)
            if short:  # a walk found fewer than there are: scan those exactly
                for j, res in zip(short, self._exact(queries[short], k, m.alive, None, n)):
                    out[j] = res
            return out
        cached = self._masks.get(_key(filter))
        if not (cached and cached[0] == m.version) and m.engine.graph and m.count > EXACT_LIMIT:
            share = self.share(filter)
            if share >= POST_FILTER_SHARE:
                done = self._post_filtered(queries, n, filter, share, ef)
                if done is not None:
                    return done
        mask, count = self.mask(filter)
        k = min(n, count)
        if count == 0:
            return [Results([], 0, "exact", complete=False) for _ in queries]
        if count <= EXACT_LIMIT or not m.engine.graph:
            return self._exact(queries, k, mask, count, n)
        out: list[Results | None] = [None] * len(queries)
        todo = np.arange(len(queries))
        # the fewer match, the more of the graph a walk must see for the same recall (measured at 1M vectors:
        # ef x log2(1 / share) keeps recall@10 at 0.95 from share 0.5 to 0.02)
        walk = max(int(ef * max(1.0, np.log2(m.count / count))), 2 * k)
        while len(todo) and walk <= _MAX_EF:
            scores, labels = m.engine.search(queries[todo], k, allowed=mask, ef=walk)
            full = (labels >= 0).sum(1) >= k
            for j in np.flatnonzero(full):
                out[todo[j]] = self._results(scores[j], labels[j], count, "graph+filter", n, ef=walk)
            todo = todo[~full]
            walk *= _WIDEN
        if len(todo):
            for j, res in zip(todo, self._exact(queries[todo], k, mask, count, n)):
                out[j] = res
        return out  # type: ignore[return-value]

    def _exact(self, queries, k, mask, count, n) -> list[Results]:
        from mlwarehouse.vectors.engines import exact_top
        m = self.mirror
        labels, matrix = self._subset(mask)
        scores, found = exact_top(matrix, queries, k, m.spec.metric, labels)
        return self._batch(scores, found, count, "exact", n)

    def _subset(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The labels of a mask and their vectors, gathered once per mask and mirror version (a stream of queries
        under one filter multiplies against the same ``EXACT_LIMIT`` rows at most: 10 MiB at 128 dimensions)."""
        m = self.mirror
        held = self._subsets.get(id(mask))
        if held is not None and held[0] is mask and held[1] == m.version:
            return held[2], held[3]
        labels = np.flatnonzero(mask)
        matrix = m.engine.gather(labels)
        if len(labels) <= EXACT_LIMIT:
            if len(self._subsets) >= _SUBSETS:
                self._subsets.pop(next(iter(self._subsets)))
            self._subsets[id(mask)] = (mask, m.version, labels, matrix)
        return labels, matrix

    def _results(self, scores, labels, matched, plan, n, **extra) -> Results:
        return self._batch(scores[None, :], labels[None, :], matched, plan, n, **extra)[0]

    def _batch(self, scores, labels, matched, plan, n, short: list | None = None, **extra) -> list[Results]:
        """Rows of engine scores and labels as results: scores converted once for the whole batch, labels named
        by document id (slots the engine left empty, label -1, dropped; engines fill a row best first, so a row
        with an empty slot ends with one, and its position goes to ``short``)."""
        ids = self.mirror.ids
        complete = matched is None or matched >= n
        out = []
        for row, (s_row, l_row) in enumerate(zip(user_scores(scores, self.mirror.spec.metric).tolist(),
                                                 labels.tolist())):
            if l_row and l_row[-1] < 0:
                s_row = [s for s, lab in zip(s_row, l_row) if lab >= 0]
                l_row = [lab for lab in l_row if lab >= 0]
                if short is not None:
                    short.append(row)
            out.append(Results(None, matched, plan, complete, dict(extra) if extra else None,
                               ids=[ids[lab] for lab in l_row], scores=s_row))
        return out


def _key(filter: dict) -> str:
    return json.dumps(filter, sort_keys=True, default=str)


def user_scores(scores: np.ndarray, metric: str) -> np.ndarray:
    """Engine scores as users read them (higher is closer): cosine similarity (rounding can take a product of unit
    vectors a hair past 1), the inner product, or minus the Euclidean distance (engines give minus its square)."""
    if metric == "l2":
        return -np.sqrt(np.maximum(-scores, 0))
    if metric == "cosine":
        return np.minimum(scores, 1.0)
    return scores


def vector_score(query: np.ndarray, vector: np.ndarray, metric: str) -> float:
    """The score of one stored vector for a query, as :func:`user_scores` gives it (rescoring a moved document)."""
    if metric == "l2":
        return -float(np.sqrt(((query - vector) ** 2).sum()))
    if metric == "cosine":
        q = query / (np.linalg.norm(query) or 1)
        return min(1.0, float(q @ vector))
    return float(query @ vector)


def plan_search(planner: Planner, queries: np.ndarray, n: int, filter: dict | None, ef: int | None = None
                ) -> list[Results]:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= 10_000:
        raise VectorIndexError(f"n must be an integer from 1 to 10000, not {n!r}")
    return planner.search(queries, n, filter or None, ef=ef)
