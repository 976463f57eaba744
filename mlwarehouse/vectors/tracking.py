"""Keeping a vector store current with a collection: the writes and deletes of every process, by revision.

Every write of a document gives it a fresh ``_rev``, a sortable id made by the writer, and every delete leaves a
tombstone with a sortable id (:meth:`mlwarehouse.warehouse.tables.Table.delete`). A :class:`Follower` (the base of the
embedded :class:`~mlwarehouse.vectors.mirror.Mirror` and of the pgvector table) holds, per document, the revision
its vector was read at. :meth:`Follower.refresh` reads the ``(_id, _rev)`` pairs newer than ``position - WINDOW``
(an index on ``_rev`` makes that a range scan), fetches the vectors of the documents whose revision it does not
hold, and drops the documents tombstoned since. Re-reading a window rather than strictly past the position is what
makes it safe across processes and machines: a write whose ``_rev`` was made before the position but committed
after the last refresh is still inside the window (the assumption: a write commits within ``WINDOW`` of its
``_rev`` being made, clocks included; :meth:`Follower.reconcile` rechecks everything). Each refresh re-reads the
last ``RECENT_MS`` (where writes in flight on one machine land), the whole window once every ``WINDOW_SECONDS``,
and neither reaches back further than its window before the previous read of its kind began (what commits later
was made after that): an index whose collection is quiet reads nothing, where it re-read its last writes.

A follower may lag (by at most ``REFRESH_SECONDS`` for searches of other processes' writes); what a search returns
does not: the searches read their results back through the filter and rescore any whose revision moved.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from mlwarehouse import schema
from mlwarehouse.errors import CodecError
from mlwarehouse.ids import id_millis, ids_after
from mlwarehouse.query.jsonvalues import MISSING, get_path
from mlwarehouse.vectors import spec as specs

__all__ = ["Follower", "WINDOW_MS", "REFRESH_SECONDS", "TOMBSTONE_MS", "vector_of"]

#: how long after its ``_rev`` was made a write may still commit and be seen (clock skew and transaction time)
WINDOW_MS = int(os.environ.get("MLW_VECTOR_WINDOW_MS", 10 * 60 * 1000))
#: every refresh re-reads this much before the position (writes in flight on one machine land in it), and the
#: whole ``WINDOW_MS`` every ``WINDOW_SECONDS`` (a bulk load of a million documents must not be re-read each time)
RECENT_MS = 5000
WINDOW_SECONDS = 60.0
#: searches refresh at most this often (another process's write is searchable within this time, as in
#: Elasticsearch; this process's own writes are searchable at once)
REFRESH_SECONDS = float(os.environ.get("MLW_VECTOR_REFRESH_SECONDS", 1.0))
#: tombstones older than this are pruned; a follower whose position is older than this reconciles in full
TOMBSTONE_MS = 7 * 24 * 3600 * 1000
CHUNK = 500


def vector_of(collection, value: Any, dims: int | None) -> np.ndarray | None:
    """A stored value as a float32 vector (arrays, tensors, lists of numbers), or None when it is not one."""
    if value is MISSING or value is None:
        return None
    try:
        decoded = collection.unpack(value) if isinstance(value, (dict, list)) else value
    except CodecError:
        return None
    if hasattr(decoded, "detach"):  # a torch tensor
        decoded = decoded.detach().cpu().numpy()
    try:
        vector = np.asarray(decoded, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        return None
    if vector.size == 0 or (dims is not None and vector.size != dims) or not np.isfinite(vector).all():
        return None
    return vector


class Follower:
    """The change tracking of a vector store; subclasses hold the vectors (:meth:`_held`, :meth:`_put`,
    :meth:`_remove`)."""

    def __init__(self, collection, spec: specs.VectorIndexSpec):
        self.collection, self.spec = collection, spec
        self.table = collection.table
        self.lock = threading.RLock()
        self.without: dict[str, str] = {}  # documents seen without a vector (or an invalid one): id -> _rev
        self.position = ""   # the newest _rev seen
        self.tombstone = ""  # the newest tombstone seen
        self.invalid = 0
        self.refreshed = 0.0  # when the last refresh ran (monotonic seconds)
        self.windowed = -WINDOW_SECONDS  # ... and the last that re-read the whole window (the first one does)
        # wall-clock milliseconds at which the last read (and the last whole-window read) began, None before one:
        # what committed since began after it, so a read need not look back further than the window before it
        self.read_ms: int | None = None
        self.whole_ms: int | None = None

    # -- what a store does --------------------------------------------------------------------------------
    def _held(self, doc_ids: list[str]) -> dict[str, str]:
        """The revision each of ``doc_ids`` has a vector of (absent: none)."""
        raise NotImplementedError

    def _put(self, rows: list[tuple[str, str, np.ndarray]]) -> None:
        """Hold these vectors ``(id, rev, vector)``, replacing any held for the same ids."""
        raise NotImplementedError

    def _remove(self, doc_ids: list[str]) -> None:
        """Hold no vector for these ids."""
        raise NotImplementedError

    # -- keeping current ----------------------------------------------------------------------------------
    def refresh(self, *, force: bool = False) -> int:
        """Apply the writes and deletes of every process since the last refresh; returns how many changed."""
        with self.lock:
            if not force and time.monotonic() - self.refreshed < REFRESH_SECONDS:
                return 0
            now = self.refreshed = time.monotonic()
            wall = int(time.time() * 1000)
            whole = now - self.windowed >= WINDOW_SECONDS
            before = WINDOW_MS if whole else RECENT_MS
            since = self.whole_ms if whole else self.read_ms
            floor = self._floor(self.position, before, since)
            if whole:
                self.windowed = now
            rows = self.table.values({"_rev": {"$gte": floor}} if floor else {}, ["_id", "_rev"])
            changed = self._changed(rows)
            newest = max((rev for _, rev in rows if rev), default="")
            done = self._fetch(changed)
            done += self._apply_tombstones(before, since)
            self.position = max(self.position, newest)
            self.read_ms = wall  # only once all of it was taken: a read that failed is made again in full
            if whole:
                self.whole_ms = wall
            return done

    def reconcile(self) -> int:
        """Compare every document's revision with the store's (no vectors read unless changed); returns changes."""
        with self.lock:
            rows = self.table.values({}, ["_id", "_rev"])
            present = {doc_id for doc_id, _ in rows}
            gone = [doc_id for doc_id in self._all_ids() if doc_id not in present]
            self._remove(gone)
            for doc_id in [d for d in self.without if d not in present]:
                del self.without[doc_id]
            self.position = max([self.position] + [rev for _, rev in rows if rev])
            return len(gone) + self._fetch(self._changed(rows))

    def _all_ids(self) -> list[str]:
        raise NotImplementedError

    def _changed(self, rows: list[tuple]) -> list[str]:
        held = self._held([doc_id for doc_id, _ in rows])
        return [doc_id for doc_id, rev in rows if held.get(doc_id, self.without.get(doc_id)) != rev]

    def _fetch(self, doc_ids: list[str]) -> int:
        for start in range(0, len(doc_ids), CHUNK):
            chunk = doc_ids[start:start + CHUNK]
            docs = list(self.table.find({"_id": {"$in": chunk}}, projection=self._projection()))
            found = {d["_id"] for d in docs}
            gone = [doc_id for doc_id in chunk if doc_id not in found]
            for doc_id in gone:
                self.without.pop(doc_id, None)
            self._remove(gone)
            self._take(docs)
        return len(doc_ids)

    def _take(self, docs: list[dict]) -> None:
        """Hold these documents' current vectors (or none, for those that have none now)."""
        rows, empty = [], []
        for doc in docs:
            doc_id, rev = doc["_id"], doc.get("_rev") or ""
            vector = self.current(doc)
            if vector is not None and self.spec.dims is None:
                self.spec = specs.set_dims(self.collection, self.spec, int(vector.size))
            if vector is None or vector.size != self.spec.dims:
                self.without[doc_id] = rev
                self.invalid += get_path(doc, self.spec.path) is not MISSING
                empty.append(doc_id)
                continue
            self.without.pop(doc_id, None)
            rows.append((doc_id, rev, vector))
            self.position = max(self.position, rev)
        self._remove(empty)
        if rows:
            self._put(rows)

    def _apply_tombstones(self, before_ms: int = WINDOW_MS, since_ms: int | None = None) -> int:
        floor = self._floor(self.tombstone, before_ms, since_ms)
        flt: dict = {"table": self.table.name}
        if floor:
            flt["_id"] = {"$gte": floor}
        rows = self.collection.project.values(schema.TOMBSTONES.name, flt, ["_id", "doc"])
        if not rows:
            return 0
        self.tombstone = max(self.tombstone, max(r[0] for r in rows))
        named = sorted({doc for _, doc in rows})
        held = self._held(named)
        named = [d for d in named if d in held or d in self.without]
        if not named:
            return 0
        present = {d for (d,) in self.table.values({"_id": {"$in": named}}, ["_id"])}
        gone = [d for d in named if d not in present]  # deleted, not written again since
        for doc_id in gone:
            self.without.pop(doc_id, None)
        self._remove(gone)
        return len(gone)

    def _scan_all(self, batch: int) -> None:
        """Take every document's vector, ``batch`` documents at a time (a build). The first refresh after it
        re-reads the whole window: writes made during the scan."""
        self.tombstone = self._newest_tombstone()
        self.read_ms = self.whole_ms = int(time.time() * 1000)  # what commits after this, the window catches
        docs: list[dict] = []
        for doc in self.table.find({}, projection=self._projection()):
            docs.append(doc)
            if len(docs) >= batch:
                self._take(docs)
                docs = []
        self._take(docs)
        self.refreshed = time.monotonic()

    def _newest_tombstone(self) -> str:
        rows = self.collection.project.values(schema.TOMBSTONES.name, {"table": self.table.name}, ["_id"],
                                              sort=[("_id", -1)], limit=1)
        return rows[0][0] if rows else ""

    def _prune_tombstones(self) -> None:
        cutoff = ids_after(int(time.time() * 1000) - TOMBSTONE_MS)
        self.collection.project.delete(schema.TOMBSTONES.name, {"table": self.table.name, "_id": {"$lt": cutoff}})

    def _too_old(self) -> bool:
        """Whether the position is older than the tombstones kept (then only a full reconcile is safe)."""
        return time.time() * 1000 - (id_millis(self.position) or 0) > TOMBSTONE_MS

    @staticmethod
    def _floor(position: str, before_ms: int = WINDOW_MS, since_ms: int | None = None) -> str:
        """Where a read starts: ``before_ms`` before the position, and no earlier than ``before_ms`` before the
        last such read began (``since_ms``): a change committed since that read has an id made at most
        ``before_ms`` before its commit (the window's assumption), so both bounds are safe and the higher one is
        kept. Without the second, a quiet collection re-read its last writes at every refresh, for ever."""
        if not position:
            return ""
        ms = id_millis(position)
        floor = ids_after(ms - before_ms) if ms is not None else ""
        if since_ms is not None:
            floor = max(floor, ids_after(since_ms - before_ms))
        return floor

    def _projection(self) -> dict:
        projection = {"_id": 1, "_rev": 1, self.spec.path: 1}
        if self.spec.listener:
            projection[f"_listeners.{self.spec.listener}.status"] = 1
        return projection

    def current(self, doc: dict) -> np.ndarray | None:
        """The vector a stored document holds now for this index (None if it has none, or the listener's output
        is not done: a stale output is not the document's vector)."""
        if self.spec.listener and get_path(doc, f"_listeners.{self.spec.listener}.status") != "done":
            return None
        vector = vector_of(self.collection, get_path(doc, self.spec.path), self.spec.dims)
        if vector is not None and self.spec.metric == "cosine":
            norm = float(np.linalg.norm(vector))
            vector = vector / norm if norm > 0 else None
        return vector
