"""The warehouse's blob bookkeeping: which collections reference blobs, what is referenced, releasing blobs after
deletes, writers' leases, and garbage collection (a part of :class:`mlwarehouse.warehouse.Warehouse`).

Deletes beside writers in flight (content addressing shares bytes): each writing thread holds a lease in ``meta``
from before its first put (``pack`` writes it) until the insert or update storing what it packed drops it (two small
index writes per save; logs skip it). A delete announces its removal in ``meta`` and reads the leases: another live
one means it removes nothing (``gc`` will); else it removes the blobs, never those its own thread packed and has not
stored. A new lease waits until no removal is announced before its first put. Either a delete sees the writer's
lease or the writer's puts follow the removal (and write the bytes again), so a writer whose first put and commit
lie within ``LEASE_SECONDS`` never commits a reference to a removed blob, on any backend, comparing no mtimes.
Crashed processes' leases and announcements expire. Other writers hold ``Warehouse.writing()``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from mlwarehouse import schema
from mlwarehouse.errors import DuplicateKey
from mlwarehouse.ids import new_id

__all__ = ["BlobReferences", "GcReport", "LEASE_SECONDS", "REMOVAL_SECONDS"]

META = schema.META.name
#: collections whose documents may reference blobs (others, e.g. logs, are never scanned for references)
BLOB_COLLECTIONS_ID = "blob_collections"
#: how long a writer may take from its first blob put to its commit (its lease; also deletes' grace period)
LEASE_SECONDS = 3600.0
REMOVAL_SECONDS = 10.0  # a removal's announcement lasts this long unless renewed (a crashed deleter's expires)


@dataclass
class GcReport:
    """What a garbage collection found (and removed, unless it was a dry run)."""
    scanned: int = 0
    referenced: int = 0
    removed: list[str] = field(default_factory=list)
    removed_bytes: int = 0
    kept_recent: int = 0
    dry_run: bool = False


class BlobReferences:
    """Blob bookkeeping over ``self.index`` and ``self.blobs``; ``self._local`` holds this thread's write lease
    (its id, renewal time, and the keys it packed and has not stored) and ``self._blob_collections`` a cache."""

    def note_blob_collection(self, collection: str) -> None:
        """Record that ``collection`` holds documents with blob references (gc and deletes scan only those)."""
        if collection not in self._blob_collections:
            if collection not in self.blob_collections():  # read first: opening a warehouse writes nothing
                self.index.update_many(META, {"_id": BLOB_COLLECTIONS_ID}, {"$addToSet": {"names": collection}}) \
                    or self._create_blob_collections_doc(collection)
            self._blob_collections.add(collection)

    def _create_blob_collections_doc(self, collection: str) -> None:
        try:
            self.index.insert_one(META, {"_id": BLOB_COLLECTIONS_ID, "names": [collection]})
        except DuplicateKey:  # another process created it first
            self.index.update_many(META, {"_id": BLOB_COLLECTIONS_ID}, {"$addToSet": {"names": collection}})

    def blob_collections(self) -> list[str]:
        doc = self.index.find_one(META, {"_id": BLOB_COLLECTIONS_ID})
        return sorted(doc["names"]) if doc else []

    def referenced_blobs(self, keys: Iterable[str] | None = None) -> set[str]:
        """Every blob key some document references (restricted to ``keys`` when given)."""
        wanted = None if keys is None else list(keys)
        found: set[str] = set()
        chunks = [None] if wanted is None else [wanted[i:i + 1000] for i in range(0, len(wanted), 1000)]
        for collection in self.blob_collections():
            for chunk in chunks:  # queries stay far below the query size limits however many blobs go
                flt = {} if chunk is None else {"_blobs": {"$in": chunk}}
                for doc in self.index.find(collection, flt, projection={"_blobs": 1}):
                    found.update(doc.get("_blobs") or ())
        return found if wanted is None else found & set(wanted)

    def release_blobs(self, deleted: Iterable[dict]) -> int:
        """After documents were deleted: remove the blobs only they referenced; returns how many. While another
        writer holds a lease nothing is removed: ``gc`` does it after its grace (see the module notes)."""
        keys = {key for doc in deleted for key in doc.get("_blobs") or ()}
        keys -= getattr(self._local, "pending", set())  # packed by this thread and about to be stored
        keys -= self.referenced_blobs(keys) if keys else set()
        if not keys:
            return 0
        mark, renewed, removed = f"removing:{new_id()}", time.time(), 0
        self.index.insert_one(META, {"_id": mark, "until": renewed + REMOVAL_SECONDS})
        try:
            if self._in_flight("lease:", getattr(self._local, "lease", None)):
                return 0
            for key in sorted(keys):
                if time.time() - renewed > REMOVAL_SECONDS / 3:  # a long removal keeps new writers waiting
                    renewed = time.time()
                    self.index.update_many(META, {"_id": mark}, {"$set": {"until": renewed + REMOVAL_SECONDS}})
                removed += bool(self.blobs.delete(key))
            return removed
        finally:
            self.index.delete_many(META, {"_id": mark})

    def _in_flight(self, kind: str, own: str | None = None) -> bool:
        """Whether a live ``meta`` record of ``kind`` ("lease:", "removing:") but ``own`` exists (clears expired)."""
        now, span = time.time(), {"_id": {"$gte": kind, "$lt": kind[:-1] + ";"}}
        found = [d for d in self.index.find(META, span, projection={"until": 1}) if d["_id"] != own]
        expired = [d["_id"] for d in found if not isinstance(d.get("until"), (int, float)) or d["until"] <= now]
        expired and self.index.delete_many(META, {"_id": {"$in": expired}})
        return len(expired) < len(found)

    def _lease_begin(self) -> None:
        """Hold this thread's lease before a put (renewed when half its time has passed)."""
        local, now = self._local, time.time()
        if getattr(local, "lease", None) is None:
            lease = f"lease:{new_id()}"
            self.index.insert_one(META, {"_id": lease, "until": now + LEASE_SECONDS})  # held once stored
            local.lease, local.renewed, local.pending = lease, now, set()
            while self._in_flight("removing:"):  # its puts come after any removal that did not see it
                time.sleep(0.002)
        elif now - local.renewed > LEASE_SECONDS / 2:
            self.index.update_many(META, {"_id": local.lease}, {"$set": {"until": now + LEASE_SECONDS}})
            local.renewed = now

    def _lease_end(self, stored: Iterable[str] = (), packed: Iterable[str] = ()) -> None:
        """Blobs ``stored`` in the index are safe, ``packed`` ones wait; no key left waiting ends the lease."""
        local = self._local
        if getattr(local, "lease", None) is not None:
            local.pending = (local.pending | set(packed)) - set(stored)
            if not local.pending:
                self.index.delete_many(META, {"_id": local.lease})
                local.lease = None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold a write lease around blob puts made outside ``Project.pack`` until their documents are stored."""
        self._lease_begin()
        self._local.pending.add(marker := f"writing:{new_id()}")
        try:
            yield
        finally:
            self._lease_end(stored=[marker])

    def gc(self, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove blobs no document references and nobody wrote in the last ``grace_seconds``."""
        report = GcReport(dry_run=dry_run)
        cutoff = time.time() - grace_seconds
        referenced = self.referenced_blobs()
        report.referenced = len(referenced)
        for info in self.blobs.list():
            report.scanned += 1
            if info.key in referenced:
                continue
            if info.mtime > cutoff:
                report.kept_recent += 1
                continue
            if dry_run or self.blobs.delete(info.key):
                report.removed.append(info.key)
                report.removed_bytes += info.size
        return report

