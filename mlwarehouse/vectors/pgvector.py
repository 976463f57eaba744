"""The pgvector engine: a collection's vectors in a PostgreSQL table with an HNSW index, shared by every process.

The vectors live in the database (:mod:`mlwarehouse.index.pgvectors`), so many machines search one index without
loading it. Any searching process keeps the table current (:class:`~mlwarehouse.vectors.tracking.Follower`: the
writes since ``position - WINDOW`` and the tombstones, compared with the revisions the table holds), and stores
the position it reached in the index's record, where the next process to open the index starts from.

A search is one SQL statement (the HNSW scan with iterative scans, or an exact scan of few matches, joined to the
documents); its rows carry the document as stored, so verification costs nothing extra: a row whose document's
``_rev`` is not the vector's is rescored from the document's current vector and the table corrected. The table
copies each document's *filtered fields* (the top-level fields of the collection's indexes when it was built), so
a filter on them is evaluated beside the vectors, as on a table of pgvector's own users (2.2x faster at 1,000
matches of 1M, 3.2x at 10,000); such a row matched as of its revision, so one whose document moved is checked
through the filter again, and a short answer is asked again after a refresh (a document deleted since the last
one may have taken a place). A filter searched often can have a partial HNSW index of its own
(:meth:`PgVectorTable.index_filter`), which a search with that filter (or one adding conditions to it) walks.
Any other filter is evaluated on the documents. The fast path without a
filter (:meth:`VectorIndex.search`: ids and scores) reads the scan alone, as of the last refresh, as the embedded
engine's does; ``find`` always verifies.
"""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np

from mlwarehouse.errors import VectorIndexError, WarehouseError
from mlwarehouse.query.filters import parse_filter, top_fields
from mlwarehouse.query.jsonvalues import json_text
from mlwarehouse.vectors import spec as specs
from mlwarehouse.vectors.search import EXACT_LIMIT, Hit, Results, vector_score
from mlwarehouse.vectors.tracking import Follower

__all__ = ["PgVectorTable", "drop_table"]

_ROUNDS = 3
_FILL = 5000
#: an exact plan's most matches per square root of the documents (see ``_few``)
_EXACT_PER_ROOT = 11
_EXACT_PER_ROOT_COPIED = 3


def _store(collection):
    store = collection.project.vector_store()
    if store is None:
        raise VectorIndexError("the pgvector engine needs a PostgreSQL index whose database has the vector "
                               "extension (0.8 or newer: CREATE EXTENSION vector)")
    return store


def drop_table(collection, spec: specs.VectorIndexSpec) -> None:
    _store(collection).drop(spec.id.lower())


def _key(flt: dict) -> str:
    return json.dumps(flt, sort_keys=True, default=str)


class PgVectorTable(Follower):
    """A pgvector index as one process sees it (the rows are shared; the positions are the process's own)."""

    def __init__(self, collection, spec: specs.VectorIndexSpec):
        super().__init__(collection, spec)
        self.store = _store(collection)
        self.name = spec.id.lower()
        self._ready = False
        self.loaded_from = None
        self._plans: dict[str, tuple[float, bool]] = {}  # filter -> (when asked, exact)
        self.copied: frozenset[str] = frozenset()  # the fields the table copies (see the module notes)
        self._docs: dict[str, dict] = {}  # the documents being taken, for their copied fields
        self.filter_indexes: dict[str, str] = {}  # a filter (its JSON) -> the partial index of it

    # -- opening ------------------------------------------------------------------------------------------
    def open(self) -> "PgVectorTable":
        with self.lock:
            self.table.create_index([("_rev", 1)])
            record = specs.find(self.collection, self.spec.name) or {}
            shared = record.get("snapshot") or {}
            if self.store.exists(self.name) and shared.get("position"):
                self._ready = True
                self.copied = frozenset(record.get("copied") or ())
                if self.copied:  # the collection's indexes on those fields made since
                    self.store.copy_indexes(self.name, self.table.name, self.copied)
                self._index_filters(specs.filters_of(record))
                self.position, self.tombstone = shared["position"], shared.get("tombstone", "")
                self.loaded_from = "table"
                if self._too_old():
                    self.reconcile()
                self.refresh(force=True)
            else:
                self.build()
        return self

    def build(self) -> int:
        """Fill the table from every document (then build the HNSW index over it)."""
        with self.lock:
            if self.store.exists(self.name):
                self.store.truncate(self.name)
            self.without, self.position = {}, ""
            self.copied = self._filtered_fields()
            self._scan_all(_FILL)
            if self._ready:
                self.store.create_index(self.name, self.spec.metric, dims=self.spec.dims, m=self.spec.options["M"],
                                        ef_construction=self.spec.options["ef_construction"])
                self.store.copy_indexes(self.name, self.table.name, self.copied)
            self.collection.project.update(specs.VECTOR_INDEXES, {"_id": self.spec.id},
                                           {"$set": {"copied": sorted(self.copied)}})
            if self._ready:
                self._index_filters(specs.filters(self.collection, self.spec))
            self.loaded_from = "build"
            self._share()
            return self.stats()["vectors"]

    def refresh(self, *, force: bool = False) -> int:
        with self.lock:
            done = super().refresh(force=force)
            if done:
                self._share()
            return done

    def _share(self) -> None:
        """Record the position reached, for the next process that opens the index (never moving it back)."""
        project = self.collection.project
        project.update(specs.VECTOR_INDEXES, {"_id": self.spec.id, "$or": [
            {"snapshot": None}, {"snapshot.position": {"$lt": self.position}}]},
            {"$set": {"snapshot": {"position": self.position, "tombstone": self.tombstone}}})

    def save(self) -> bool:
        """Nothing to persist: the vectors are in the database (the position is recorded as it moves)."""
        self._share()
        return True

    # -- filter indexes -------------------------------------------------------------------------------------
    def index_filter(self, flt: dict) -> str:
        """A partial HNSW index for ``flt`` (see the module notes), recorded for every process; its name."""
        if not self._on_copy(flt):
            raise VectorIndexError(f"a filter index needs a filter on fields the vector table copies "
                                   f"({sorted(self.copied) or 'none'}: the top-level fields of the collection's "
                                   f"indexes when it was built); {flt!r} is not")
        self.store.filter_predicate(self.table.name, flt)  # refused here unless it can have an index
        with self.lock:
            new = flt not in specs.filters(self.collection, self.spec)
            held = specs.add_filter(self.collection, self.spec, flt)
            if not self._ready:
                self.refresh(force=True)
            try:
                self._index_filters(held, strict=True)
            except Exception:
                if new:  # PostgreSQL refused it (a function that is not immutable...): not recorded either
                    specs.remove_filter(self.collection, self.spec, flt)
                raise
            return self.filter_indexes.get(_key(flt))  # None while the table holds no vector: made with it

    def forget_filter(self, flt: dict) -> list[dict]:
        with self.lock:
            held = specs.remove_filter(self.collection, self.spec, flt)
            self._index_filters(held)
            return held

    def _index_filters(self, filters: list[dict], *, strict: bool = False) -> None:
        """Make the partial index of each of ``filters`` that the table lacks, and drop those of no filter the
        record holds now (read again: another process may have added one meanwhile) or of one whose compiled
        predicate changed. One that cannot be made is left out with a warning (``strict``: raised), so that a
        filter never keeps the index from opening; its searches take the general path."""
        if not self._ready:
            return
        made = {}
        for flt in filters:
            if not self._on_copy(flt):
                continue
            try:
                made[_key(flt)] = self.store.filter_index(
                    self.name, self.table.name, flt, self.spec.metric, dims=self.spec.dims, m=self.spec.options["M"],
                    ef_construction=self.spec.options["ef_construction"])
            except WarehouseError as exc:
                if strict:
                    raise
                warnings.warn(f"vector index {self.spec.name!r}: no index for the filter {flt!r} ({exc})",
                              RuntimeWarning, stacklevel=2)
        recorded = {self.store.filter_index_name(self.name, self.table.name, flt)
                    for flt in specs.filters(self.collection, self.spec) if self._on_copy(flt)}
        for index in self.store.filter_indexes(self.name) - recorded - set(made.values()):
            self.store.drop_index(index)
        self.filter_indexes = made

    def _indexed_within(self, flt: dict) -> dict | None:
        """The filter with an index of its own that ``flt`` holds all of (each of its fields with the same
        condition; the one of most fields when several do), or None."""
        best = None
        for key in self.filter_indexes:
            held = json.loads(key)
            if all(k in flt and _key(flt[k]) == _key(v) for k, v in held.items()) and len(held) > len(best or {}):
                best = held
        return best

    def _on_copy(self, flt: dict) -> bool:
        """Whether ``flt`` reads only fields the table copies (``_id`` never is)."""
        return bool(flt and self.copied) and top_fields(parse_filter(flt)) <= self.copied

    def _filtered_fields(self) -> frozenset[str]:
        """The top-level fields of the collection's indexes: the fields users filter on. Not the warehouse's own
        (``_id``, ``_rev``, ``_outputs``, ``_listeners``...): a copy of ``_outputs`` would hold every listener's
        outputs, embeddings included, for a filter on one label; those filters read the documents."""
        fields = {key.split(".")[0] for ix in self.table.indexes() for key, _ in ix["keys"]}
        return frozenset(f for f in fields if not f.startswith("_"))

    def _copy(self, doc: dict | None) -> str | None:
        """A document's copied fields as stored JSON (None: the table copies none)."""
        if not self.copied or doc is None:
            return None
        return json_text({k: doc[k] for k in sorted(self.copied) if k in doc})

    def _projection(self) -> dict:
        return {**super()._projection(), **{field: 1 for field in self.copied}}

    def _take(self, docs: list[dict]) -> None:
        self._docs = {d["_id"]: d for d in docs} if self.copied else {}
        try:
            super()._take(docs)
        finally:
            self._docs = {}

    # -- the store's hooks --------------------------------------------------------------------------------
    def _held(self, doc_ids: list[str]) -> dict[str, str]:
        return self.store.revisions(self.name, doc_ids) if self._ready and doc_ids else {}

    def _all_ids(self) -> list[str]:
        return list(self.store.revisions(self.name, self.table.distinct("_id"))) if self._ready else []

    def _put(self, rows: list[tuple[str, str, np.ndarray]]) -> None:
        if not self._ready:
            self.store.ensure(self.name, self.spec.dims)
            self._ready = True
            if self.loaded_from is not None:  # not inside build(), which indexes after its bulk fill
                self.store.create_index(self.name, self.spec.metric, dims=self.spec.dims, m=self.spec.options["M"],
                                        ef_construction=self.spec.options["ef_construction"])
                self.store.copy_indexes(self.name, self.table.name, self.copied)
                self._index_filters(specs.filters(self.collection, self.spec))
        self.store.put(self.name, [(i, r, v, self._copy(self._docs.get(i))) for i, r, v in rows])

    def _remove(self, doc_ids: list[str]) -> None:
        if self._ready and doc_ids:
            self.store.delete(self.name, doc_ids)

    # -- search -------------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, n: int, flt: dict, *, ef: int | None = None, documents: bool = False,
               fresh: bool = False) -> Results:
        """The ``n`` nearest matching documents, verified (see the module notes); ``fresh``: refresh first
        (this process wrote since the last search)."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= 10_000:
            raise VectorIndexError(f"n must be an integer from 1 to 10000, not {n!r}")
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        ef = int(ef or self.spec.options.get("ef_search", 64))
        copied = self._on_copy(flt)
        for round_ in range(_ROUNDS):
            self.refresh(force=fresh or round_ > 0)
            if not self._ready:
                return Results([], 0 if flt else None, "exact", complete=not flt)
            indexed = self._indexed_within(flt) if copied else None
            exact = bool(flt) and indexed is None and self._few(flt, copied)
            rows, by_index = self.store.search(self.name, self.table.name, self.spec.metric, query, n, flt or None,
                                               ef=ef, documents=documents, exact=exact, copied=copied,
                                               indexed=indexed)
            if not documents:  # the documents' revisions only; the few that moved are read whole
                stale = [doc_id for doc_id, rev, _, now in rows if now != rev]
                docs = {d["_id"]: d for d in self.table.find({"_id": {"$in": stale}})} if stale else {}
                rows = [(doc_id, rev, dist, docs.get(doc_id)) for doc_id, rev, dist, _ in rows
                        if doc_id not in stale or doc_id in docs]
            hits, moved = [], []
            for doc_id, rev, dist, text in rows:
                doc = json.loads(text) if isinstance(text, str) else text
                score = self._score(float(dist))
                if doc is not None and doc.get("_rev") != rev:
                    moved.append(doc)
                    vector = self.current(doc)
                    if vector is None:
                        continue
                    score = vector_score(query, vector, self.spec.metric)
                hits.append(Hit(doc_id, score, doc if documents else None))
            if moved:
                with self.lock:
                    self._take(moved)
                if round_ < _ROUNDS - 1:
                    continue
                if copied:  # they matched as of the vectors' revisions: the last round checks them now
                    ids = [d["_id"] for d in moved]
                    still = {i for (i,) in self.table.values({"$and": [{"_id": {"$in": ids}}, flt]}, ["_id"])}
                    hits = [h for h in hits if h.id in still or h.id not in ids]
            elif copied and len(hits) < n and round_ == 0:
                continue  # rows of documents deleted since the last refresh may have taken places: once more
            break
        hits.sort(key=lambda h: -h.score)
        complete = len(hits) >= n or not flt
        matched = len(hits) if not complete else None
        return Results(hits[:n], matched, "graph" if by_index else "exact", complete)

    def _few(self, flt: dict, copied: bool = False) -> bool:
        """Whether to scan the documents ``flt`` selects exactly instead of walking the graph: when PostgreSQL
        selects them through an index (on the filtered field) and expects few enough. Without such an index an
        exact plan reads every document, and the iterative graph scan, which stops at ``n``, is cheaper. Asked
        once per filter a minute (one EXPLAIN).

        "Few enough" is where the two costs cross: an exact plan pays for every match, an iterative scan for every
        vector it passes before ``n`` match (``n / share`` of them), so exact wins below ``k sqrt(documents)``
        matches, and never above the embedded engine's ``EXACT_LIMIT``. Filtered on the documents, a match costs
        about 1.7 us (its id, then its vector by key) and a passed vector 20 us (a step of the graph and a join
        to the document): k = 11 (measured at 100,000 x 128: 10,000 matches took 17 ms exactly and 2.5 ms in the
        graph, 1,000 took 2 ms and 31 ms). Filtered on the table's copy (``copied``), a passed vector is no
        join, and pgvector called directly on such a table crosses between 1,000 and 10,000 matches of 1M: k = 3."""
        now = time.monotonic()
        key = json.dumps([flt, copied], sort_keys=True, default=str)
        cached = self._plans.get(key)
        if cached is None or now - cached[0] > 60:
            indexed, rows, total = self.store.filter_plan(self.table.name, flt)
            per_root = _EXACT_PER_ROOT_COPIED if copied else _EXACT_PER_ROOT
            few = rows <= min(EXACT_LIMIT, per_root * math.sqrt(total))
            cached = self._plans[key] = (now, indexed and few)
            if len(self._plans) > 64:
                self._plans.pop(next(iter(self._plans)))
        return cached[1]

    def _score(self, dist: float) -> float:
        """pgvector's distances as scores (higher is closer): cosine similarity, inner product, -L2 distance."""
        if self.spec.metric == "cosine":
            return 1.0 - dist
        return -dist

    def stats(self) -> dict:
        facts = self.store.stats(self.name) if self._ready else {"vectors": 0, "memory_bytes": 0}
        return {"name": self.spec.name, "engine": "pgvector", "kind": "hnsw", **facts,
                "without_vector": len(self.without), "invalid": self.invalid, "dims": self.spec.dims,
                "metric": self.spec.metric, "position": self.position, "loaded_from": self.loaded_from,
                "pgvector": ".".join(map(str, self.store.version))}
