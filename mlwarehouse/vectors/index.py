"""A collection's vector index as users hold it: search by vector, by value (through the listener's model), by a
stored document; filtered, verified, nearest first.

``collection.create_vector_index("by_text", listener="embed")`` makes one; ``collection.find(filter, like=...,
n=10)`` searches the default one. The embedded engine keeps a mirror per process (:mod:`.mirror`); the pgvector
engine keeps the vectors in PostgreSQL (:mod:`.pgvector`). Both answer through :class:`VectorIndex`, so a
caller never knows which.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlwarehouse.collections.documents import strip
from mlwarehouse.errors import NotFound, VectorIndexError, WarehouseError
from mlwarehouse.query.documents import projector
from mlwarehouse.query.filters import validate_filter
from mlwarehouse.query.jsonvalues import MISSING, get_path
from mlwarehouse.vectors import spec as specs
from mlwarehouse.vectors import tracking
from mlwarehouse.vectors.mirror import Mirror
from mlwarehouse.vectors.search import Hit, Planner, Results, plan_search, vector_score
from mlwarehouse.vectors.tracking import vector_of

__all__ = ["VectorIndex", "Neighbours"]

_ROUNDS = 3


class Neighbours(list):
    """Documents nearest first, each with ``_score`` (higher is closer); ``matched`` is how many documents match
    the filter at all (None without a filter, or when the plan did not need to count them) and ``complete`` is
    False when fewer than ``n`` do."""

    def __init__(self, docs: list[dict], results: Results):
        super().__init__(docs)
        self.matched, self.complete, self.plan = results.matched, results.complete, results.plan


class VectorIndex:
    """One vector index of a collection."""

    def __init__(self, collection, spec: specs.VectorIndexSpec):
        self.collection, self.spec = collection, spec
        self._backend = None
        self.stale = False  # set by this process's writes to the collection: refresh before the next search

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"<VectorIndex {self.name!r} of {self.collection.name!r} ({self.spec.engine}, {self.spec.metric})>"

    # -- the engine behind it -----------------------------------------------------------------------------
    @property
    def backend(self):
        """The engine's state in this process: a :class:`Mirror` (embedded) or a pgvector table."""
        if self._backend is None:
            if self.spec.engine == "pgvector":
                from mlwarehouse.vectors.pgvector import PgVectorTable
                self._backend = PgVectorTable(self.collection, self.spec).open()
            else:
                mirror = Mirror(self.collection, self.spec).open()
                mirror.planner = Planner(mirror)
                self._backend = mirror
            self.spec = self._backend.spec
        return self._backend

    def refresh(self) -> int:
        """Take every write made since the last refresh by any process (searches do this at most once a second)."""
        return self.backend.refresh(force=True)

    def rebuild(self) -> int:
        """Read every vector again from the documents (and store the result)."""
        return self.backend.build()

    def save(self) -> bool:
        """Persist the embedded index (done after a build; call after large changes to make reopening quick)."""
        return self.backend.save()

    def stats(self) -> dict:
        return {**self.backend.stats(), "filters": specs.filters(self.collection, self.spec)}

    def index_filter(self, filter: Mapping) -> dict:
        """Keep an index of its own for a filter searched often (at most ``MAX_FILTER_INDEXES``, shared by every
        process): on pgvector a partial HNSW index over the vectors whose documents match, which a search with this
        filter (or one that adds conditions to it) walks instead of passing the others (its fields must be ones the
        vector table copies: the top-level fields of the collection's indexes when it was built). The embedded
        engine filters inside its graph walk at every selectivity and builds nothing. Returns ``{"filter",
        "index", "seconds"}`` (``index``: the partial index's name, None where nothing was built)."""
        flt = dict(filter)
        if not flt:
            raise VectorIndexError("index_filter takes a non-empty filter (an unfiltered search has the index)")
        validate_filter(flt)
        started = time.monotonic()
        if self.spec.engine == "pgvector":
            index = self.backend.index_filter(flt)
        else:
            specs.add_filter(self.collection, self.spec, flt)
            index = None
        return {"filter": flt, "index": index, "seconds": round(time.monotonic() - started, 3)}

    def forget_filter(self, filter: Mapping) -> list[dict]:
        """Drop the index of a filter (see :meth:`index_filter`); returns the filters still indexed."""
        flt = dict(filter)
        if self.spec.engine == "pgvector":
            return self.backend.forget_filter(flt)
        return specs.remove_filter(self.collection, self.spec, flt)

    # -- queries ------------------------------------------------------------------------------------------
    def encode(self, value: Any) -> np.ndarray:
        """A query vector from a value: through the listener's model when the index reads a listener's outputs
        (a tensor, an image, a text: whatever the model takes), else the value itself as a vector."""
        if isinstance(value, Mapping):
            raise VectorIndexError("encode takes a value; a document goes through search(like={...})")
        if self.spec.listener:
            from mlwarehouse.collections import listeners
            from mlwarehouse.collections.models import Runner
            listener = listeners.get(self.collection, self.spec.listener)
            runner = Runner.get(self.collection, listener, trusted=False)
            try:
                value = runner([value])[0]
            except WarehouseError:
                raise
            except Exception as exc:  # the user's model on the user's value: its error, typed and named
                raise VectorIndexError(f"listener {listener.name!r} could not encode the query value "
                                       f"({type(exc).__name__}: {exc})") from exc
        vector = vector_of(self.collection, value, self.spec.dims)
        if vector is None:
            raise VectorIndexError(f"cannot make a {self.spec.dims or 'n'}-dimensional vector of {type(value).__name__}"
                                   f" for vector index {self.name!r}")
        return vector

    def query_vector(self, *, vector: Any = None, like: Any = None) -> np.ndarray:
        """The query as a vector: given (``vector``), through the model (``like=value``), a stored document's
        (``like={"_id": ...}``) or a document's input field (``like={key: value}``, as SuperDuperDB's ``$like``)."""
        if (vector is None) == (like is None):
            raise VectorIndexError("search takes either vector= or like=")
        if vector is not None:
            out = vector_of(self.collection, vector, self.spec.dims)
            if out is None:
                raise VectorIndexError(f"the query vector must be {self.spec.dims or 'a'}-dimensional and finite")
            return out
        if isinstance(like, Mapping):
            if set(like) == {"_id"}:
                doc = self.collection.table.find_one({"_id": like["_id"]})
                if doc is None:
                    raise NotFound(f"no document {like['_id']!r} in {self.collection.name!r} to search like")
                found = self.backend.current(doc)
                if found is None:
                    raise VectorIndexError(f"document {like['_id']!r} has no vector in index {self.name!r} (yet)")
                return found
            if self.spec.listener:
                from mlwarehouse.collections import listeners
                key = listeners.get(self.collection, self.spec.listener).key
                value = get_path(dict(like), key)
                if value is MISSING:
                    raise VectorIndexError(f"the document to search like has no {key!r}, the input of listener "
                                           f"{self.spec.listener!r}")
                return self.encode(value)
            value = get_path(dict(like), self.spec.path)
            if value is MISSING:
                raise VectorIndexError(f"the document to search like has no {self.spec.path!r}")
            return self.query_vector(vector=value)
        return self.encode(like)

    def search(self, vectors: Any, n: int = 10, filter: Mapping | None = None, *, ef: int | None = None
               ) -> list[Results]:
        """The ``n`` nearest labels of each query vector (rows of ``vectors``): ids and scores, as of the last
        refresh, without reading documents (the fast path; :meth:`find` verifies against the store)."""
        flt = dict(filter) if filter else {}
        if flt:
            validate_filter(flt)
        backend = self.backend
        queries = self._queries(vectors)
        if self.spec.engine == "pgvector":
            fresh = self._take_stale()
            return [backend.search(q, n, flt, ef=ef, fresh=fresh and i == 0) for i, q in enumerate(queries)]
        with backend.lock:
            self._refresh(backend)
            return plan_search(backend.planner, queries, n, flt, ef)

    def find(self, filter: Mapping | None = None, projection: Mapping | None = None, *, vector: Any = None,
             like: Any = None, n: int = 10, ef: int | None = None, raw: bool = False) -> Neighbours:
        """Documents nearest the query, nearest first, each satisfying ``filter`` and carrying ``_score``."""
        flt = dict(filter or {})
        validate_filter(flt)
        query = self.query_vector(vector=vector, like=like)
        backend = self.backend
        if self.spec.engine == "pgvector":
            results = backend.search(query, n, flt, ef=ef, documents=True, fresh=self._take_stale())
        else:
            results = self._verified(query, n, flt, ef)
        if isinstance(projection, (list, tuple)):
            projection = {p: 1 for p in projection}
        if projection and any(projection.values()):
            projection = {**projection, "_id": projection.get("_id", 1)}
        shape = projector(projection)  # applied before decoding: fields not asked for are never read
        docs = []
        for hit in results.hits:
            doc = strip(self.collection.unpack(shape(hit.doc), raw=raw), projection)
            doc["_score"] = hit.score
            docs.append(doc)
        return Neighbours(docs, results)

    def _verified(self, query: np.ndarray, n: int, flt: dict, ef: int | None) -> Results:
        """Search the mirror, then read the hits back through the filter: rescore what changed, drop what went;
        when anything had moved, refresh and search again (at most a few rounds)."""
        mirror = self.backend
        queries = self._queries(query)
        for round_ in range(_ROUNDS):
            with mirror.lock:
                self._refresh(mirror, force=round_ > 0)
                results = plan_search(mirror.planner, queries, n, flt, ef)[0]
                held = {h.id: mirror.revs[mirror.label_of[h.id]] for h in results.hits if h.id in mirror.label_of}
            ids = [h.id for h in results.hits]
            scope = {"_id": {"$in": ids}}
            stored = {d["_id"]: d for d in self.collection.table.find({"$and": [scope, flt]} if flt else scope)}
            moved = False
            hits = []
            for hit in results.hits:
                doc = stored.get(hit.id)
                if doc is None:
                    moved = True  # deleted, or no longer matching the filter
                    continue
                if doc.get("_rev") != held.get(hit.id):
                    moved = True
                    vector = mirror.current(doc)
                    if vector is None:
                        continue
                    hit = Hit(hit.id, vector_score(query, vector, self.spec.metric))
                hits.append(Hit(hit.id, hit.score, doc))
            hits.sort(key=lambda h: -h.score)
            results.hits = hits[:n]
            if not moved:
                break
        return results

    def _take_stale(self) -> bool:
        """Whether this process wrote since the last search (and the flag, cleared)."""
        stale, self.stale = self.stale, False
        return stale

    def _refresh(self, backend, *, force: bool = False) -> None:
        """Refresh when this process wrote, when asked, or once ``REFRESH_SECONDS`` passed (checked here first:
        the check runs once per search)."""
        force = self._take_stale() or force
        if force or time.monotonic() - backend.refreshed >= tracking.REFRESH_SECONDS:
            backend.refresh(force=force)

    def _queries(self, vectors: Any) -> np.ndarray:
        """The query vectors as a contiguous float32 matrix, checked, and normalised for cosine (a copy: the
        caller's array is never changed). One vector takes a shorter path: this runs once per query."""
        if type(vectors) is not np.ndarray and hasattr(vectors, "detach"):
            vectors = vectors.detach().cpu().numpy()
        q = np.asarray(vectors, dtype=np.float32)
        dims = self.backend.spec.dims
        cosine = self.spec.metric == "cosine"
        if q.ndim == 1 and (dims is None or len(q) == dims) and len(q):
            square = float(np.dot(q, q))  # finite unless a value is not (or is so large its square is not)
            if not math.isfinite(square) and not np.isfinite(q).all():
                raise VectorIndexError(f"query vectors must be finite, of shape (n, {dims}), not {q.shape}")
            if cosine:
                q = q * np.float32(1 / math.sqrt(square) if square > 0 else 1)
            return np.ascontiguousarray(q).reshape(1, -1)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or (dims is not None and q.shape[1] != dims):
            raise VectorIndexError(f"query vectors must be finite, of shape (n, {dims}), not {q.shape}")
        squares = np.einsum("ij,ij->i", q, q)
        if not np.isfinite(squares).all() and not np.isfinite(q).all():
            raise VectorIndexError(f"query vectors must be finite, of shape (n, {dims}), not {q.shape}")
        if cosine:
            norms = np.sqrt(squares)
            norms[norms == 0] = 1
            return np.ascontiguousarray(q / norms[:, None])
        return np.ascontiguousarray(q)
