"""An embedded vector index: one process's copy of a collection's vectors, kept current, persisted as blobs.

A :class:`Mirror` holds the vectors of one index (:mod:`mlwarehouse.vectors.spec`) in an engine
(:mod:`mlwarehouse.vectors.engines`), with which document and which revision (``_rev``) each label came from, and
follows the collection's writes as every vector store does (:mod:`mlwarehouse.vectors.tracking`). Labels are never
reused: an updated document's old label is marked dead (in the graph, where it can delete; else searches pass the
live labels as the engine's filter),
and :meth:`Mirror.compact` rebuilds the graph from the live vectors when the dead pass a quarter.

**Persisted.** :meth:`Mirror.save` stores the engine's arrays, the labels' ids and revisions as verified blobs in
the index's record, with the position they cover; a process that opens the index loads them and replays only the
window before that position and what came after (no rebuild). A snapshot that fails its checks is rebuilt.
**Bounded.** A mirror refuses to grow past ``MLW_VECTOR_MEMORY_MB`` (16 GiB by default) and reports what it holds.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mlwarehouse.codecs import values
from mlwarehouse.errors import CodecError, IntegrityError, VectorIndexError
from mlwarehouse.ids import utc_now
from mlwarehouse.vectors import spec as specs
from mlwarehouse.vectors.engines import best_kind, make_engine
from mlwarehouse.vectors.tracking import Follower

__all__ = ["Mirror", "MEMORY_LIMIT"]

#: a mirror's memory (vectors, graph, ids) may not grow past this many bytes (``MLW_VECTOR_MEMORY_MB``)
MEMORY_LIMIT = int(os.environ.get("MLW_VECTOR_MEMORY_MB", 16384)) * 1024 * 1024
SNAPSHOT_VERSION = 1
#: compact when more than this share of the labels is dead
DEAD_SHARE = 0.25
#: documents read per step of a build: the graph grows by this many vectors at a time (a graph inserts one batch
#: with every core), and the decoded batch is what the build holds besides the graph
BUILD_BATCH = 100_000
#: a refresh saves a snapshot once this many changes (or this share of the index) came since the last one
SAVE_CHANGES, SAVE_SHARE = 10_000, 0.2
_ID_BYTES = 120  # what one label's id, revision and dict entries cost, about


class Mirror(Follower):
    """One process's copy of an embedded vector index."""

    def __init__(self, collection, spec: specs.VectorIndexSpec):
        super().__init__(collection, spec)
        self.engine = None
        self.ids: list[str] = []
        self.revs: list[str] = []
        self.alive = np.zeros(0, dtype=bool)
        self.label_of: dict[str, int] = {}
        self.version = 0     # bumped by every change (cached filter masks are valid for one version)
        self.changes = 0     # changes applied since the snapshot this mirror was loaded from or saved
        self.loaded_from = None  # "snapshot" or "build"

    # -- opening ------------------------------------------------------------------------------------------
    def open(self) -> "Mirror":
        """Load the stored snapshot (then replay newer changes), or build from the documents."""
        with self.lock:
            self.table.create_index([("_rev", 1)])
            record = specs.find(self.collection, self.spec.name)
            snapshot = (record or {}).get("snapshot")
            if snapshot:
                try:
                    self._load(snapshot)
                    self.loaded_from = "snapshot"
                except (IntegrityError, CodecError, KeyError, TypeError, ValueError):
                    self._reset()
            if self.loaded_from is None:
                self.build()
            else:
                if self._too_old():
                    self.reconcile()
                self.refresh(force=True)
        return self

    def _reset(self) -> None:
        self.engine, self.ids, self.revs, self.alive = None, [], [], np.zeros(0, dtype=bool)
        self.label_of, self.without, self.position, self.tombstone = {}, {}, "", ""
        self.version += 1

    def build(self) -> int:
        """Read every document's vector (a full scan), replacing what the mirror held; saves a snapshot."""
        with self.lock:
            self._reset()
            self._scan_all(BUILD_BATCH)
            self.loaded_from = "build"
            self.changes = 0
            if self.count:
                self.save()
            return self.count

    def refresh(self, *, force: bool = False) -> int:
        with self.lock:
            done = super().refresh(force=force)
            if self.dead > DEAD_SHARE * max(len(self.ids), 1) and len(self.ids) > 1000:
                self.compact()
            if self.changes >= max(SAVE_CHANGES, SAVE_SHARE * self.count):
                self.save()  # so that a process opening the index later replays little
            return done

    # -- the store's hooks --------------------------------------------------------------------------------
    def _held(self, doc_ids: list[str]) -> dict[str, str]:
        label_of, revs = self.label_of, self.revs
        return {d: revs[label_of[d]] for d in doc_ids if d in label_of}

    def _all_ids(self) -> list[str]:
        return list(self.label_of)

    def _remove(self, doc_ids: list[str]) -> None:
        dead = []
        for doc_id in doc_ids:
            label = self.label_of.pop(doc_id, None)
            if label is not None and self.alive[label]:
                self.alive[label] = False
                dead.append(label)
        if dead:
            self.engine.remove(dead)
            self.changes += len(dead)
            self.version += 1

    def _put(self, rows: list[tuple[str, str, np.ndarray]]) -> None:
        rows = self._same_vectors(rows)
        if not rows:
            return
        self._remove([doc_id for doc_id, _, _ in rows])
        if self.engine is None:
            self.engine = make_engine(best_kind(), self.spec.dims, self.spec.metric, self.spec.options)
        need = self.memory() + len(rows) * (self.spec.dims * 4 + self.spec.options.get("M", 16) * 8 + _ID_BYTES)
        if need > MEMORY_LIMIT:
            raise VectorIndexError(f"vector index {self.spec.name!r} would need {need / 2**20:.0f} MiB, over the "
                                   f"limit of {MEMORY_LIMIT / 2**20:.0f} MiB (MLW_VECTOR_MEMORY_MB); use the "
                                   f"pgvector engine on PostgreSQL for indexes this large")
        first = self.engine.add(np.stack([v for _, _, v in rows]))
        for i, (doc_id, _, _) in enumerate(rows):
            self.label_of[doc_id] = first + i
        self.ids += [doc_id for doc_id, _, _ in rows]
        self.revs += [rev for _, rev, _ in rows]
        self.alive = np.concatenate([self.alive, np.ones(len(rows), dtype=bool)])
        self.changes += len(rows)
        self.version += 1

    def _same_vectors(self, rows: list[tuple[str, str, np.ndarray]]) -> list[tuple[str, str, np.ndarray]]:
        """Take the new revision of documents whose vector did not change (another field did); the rest."""
        held = [(i, self.label_of[r[0]]) for i, r in enumerate(rows) if r[0] in self.label_of]
        if not held or self.engine is None:
            return rows
        stored = self.engine.gather(np.array([label for _, label in held]))
        same = set()
        for (i, label), vector in zip(held, stored):
            if np.array_equal(vector, rows[i][2]):
                self.revs[label] = rows[i][1]
                same.add(i)
        self.version += 1  # another field changed: filter masks computed before may be wrong now
        return [r for i, r in enumerate(rows) if i not in same] if same else rows

    def compact(self) -> None:
        """Rebuild the engine from the live vectors only (dead labels cost memory and graph walks)."""
        with self.lock:
            live = np.flatnonzero(self.alive)
            vectors = self.engine.gather(live).copy()
            ids, revs = [self.ids[i] for i in live], [self.revs[i] for i in live]
            self.engine = make_engine(self.engine.kind, self.spec.dims, self.spec.metric, self.spec.options)
            self.engine.add(vectors)
            self.ids, self.revs = ids, revs
            self.alive = np.ones(len(ids), dtype=bool)
            self.label_of = {doc_id: i for i, doc_id in enumerate(ids)}
            self.version += 1
            self.changes += 1

    # -- facts --------------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return len(self.label_of)

    @property
    def dead(self) -> int:
        return len(self.ids) - self.count

    def memory(self) -> int:
        """Bytes held: the engine's vectors and graph, and the labels' ids and revisions (estimated)."""
        engine = self.engine.nbytes if self.engine is not None else 0
        return engine + (len(self.ids) + len(self.without)) * _ID_BYTES + self.alive.nbytes

    def stats(self) -> dict:
        return {"name": self.spec.name, "engine": self.spec.engine,
                "kind": self.engine.kind if self.engine is not None else None, "vectors": self.count,
                "dead": self.dead, "without_vector": len(self.without), "invalid": self.invalid,
                "dims": self.spec.dims, "metric": self.spec.metric, "memory_bytes": self.memory(),
                "position": self.position, "loaded_from": self.loaded_from}

    # -- persistence --------------------------------------------------------------------------------------
    def save(self) -> bool:
        """Store a snapshot (unless a newer one is stored already); returns whether this one was stored."""
        with self.lock:
            if self.engine is None:
                return False
            project = self.collection.project
            arrays = self.engine.to_arrays()
            body = json.dumps({"ids": self.ids, "revs": self.revs, "without": self.without},
                              separators=(",", ":")).encode()
            tree = project.pack({"arrays": arrays, "labels": body, "alive": np.packbits(self.alive)})
            snapshot = {"version": SNAPSHOT_VERSION, "kind": self.engine.kind, "dims": self.spec.dims,
                        "metric": self.spec.metric, "size": len(self.ids), "count": self.count,
                        "position": self.position, "tombstone": self.tombstone, "time": utc_now(), "data": tree}
            keys = sorted(values.blob_keys(tree))
            old = specs.find(self.collection, self.spec.name) or {}
            stored = (old.get("snapshot") or {}).get("position")
            # compare-and-set on the stored snapshot: of two processes saving at once, one wins, and an older
            # snapshot never replaces a newer one
            same = {"snapshot.position": stored} if stored is not None else {"snapshot": None}
            if (stored or "") > self.position or not project.update(
                    specs.VECTOR_INDEXES, {"_id": self.spec.id, **same},
                    {"$set": {"snapshot": snapshot, "_blobs": keys}}):
                project.warehouse._lease_end(stored=set(keys))
                project.warehouse.release_blobs([{"_blobs": keys}])
                return False
            stale = set(old.get("_blobs") or ()) - set(keys)
            if stale:
                project.warehouse.release_blobs([{"_blobs": sorted(stale)}])
            self._prune_tombstones()
            self.changes = 0
            return True

    def _load(self, snapshot: dict) -> None:
        if snapshot.get("version") != SNAPSHOT_VERSION or snapshot.get("dims") != self.spec.dims \
                or snapshot.get("metric") != self.spec.metric:
            raise IntegrityError("the stored snapshot is of another version, dimension or metric")
        data = self.collection.project.unpack(snapshot["data"])
        labels = json.loads(bytes(data["labels"]))
        ids, revs, without = labels["ids"], labels["revs"], labels["without"]
        size = len(ids)
        alive = np.unpackbits(np.asarray(data["alive"], dtype=np.uint8), count=size).astype(bool)
        if len(revs) != size or size != snapshot.get("size") or not isinstance(without, dict) \
                or not all(isinstance(i, str) for i in ids) or not all(isinstance(r, str) for r in revs):
            raise IntegrityError("the stored snapshot's labels do not match its size")
        kind = snapshot.get("kind")
        engine = make_engine(kind, self.spec.dims, self.spec.metric, self.spec.options)
        if engine.kind != kind:  # stored by a process with another graph library (or one), opened by this one
            engine.add(np.asarray(data["arrays"]["vectors"], dtype=np.float32))
        else:
            engine = type(engine).from_arrays(data["arrays"], self.spec.dims, self.spec.metric, self.spec.options)
        if engine.size != size:
            raise IntegrityError("the stored snapshot holds another number of vectors than labels")
        engine.remove(np.flatnonzero(~alive))
        self.engine, self.ids, self.revs, self.alive = engine, ids, revs, alive
        self.label_of = {doc_id: i for i, doc_id in enumerate(ids) if alive[i]}
        if len(self.label_of) != int(alive.sum()):
            raise IntegrityError("the stored snapshot names a document twice")
        self.without = {str(k): str(v) for k, v in without.items()}
        self.position, self.tombstone = str(snapshot.get("position") or ""), str(snapshot.get("tombstone") or "")
        self.changes, self.version = 0, self.version + 1
