"""Tables: index collections that belong to one project whole, for users' own documents.

The warehouse's own collections share one table across projects and stamp every document with ``project`` and
``time`` (see :class:`mlwarehouse.warehouse.Project`). Users' collections cannot: their documents may have a field
called ``project`` or ``time`` of their own. So each user collection of each project gets a table of its own
(named by the catalog, ``docs_<name>_<digest>``), whose documents carry only ``_id``, ``_rev`` (a fresh id on
every write: the compare-and-set token that lets concurrent writers and listeners never overwrite each other) and
``_blobs``. The invariants are the warehouse's: blobs before documents under the writer's lease, references
released on delete (:meth:`Warehouse.release_blobs`), and nothing else reaches the index.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from mlwarehouse import schema
from mlwarehouse.codecs import values
from mlwarehouse.errors import DuplicateKey, InvalidDocument
from mlwarehouse.index.base import Filter, Sort
from mlwarehouse.query.documents import validate_document

__all__ = ["Table", "table_name"]

#: fields a table's documents may not hold in users' hands (written by the table and its collection)
SCALARS = ("_rev",)


def table_name(project: str, collection: str) -> str:
    """A stable, valid index name for a project's collection: readable, and unique by a digest of both names."""
    digest = hashlib.sha256(f"{project}\x00{collection}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "_", collection.lower()).strip("_")[:32] or "c"
    return f"{schema.TABLE_PREFIX}{slug}_{digest}"


class Table:
    """One project's collection of documents: the index operations with the warehouse's blob bookkeeping."""

    def __init__(self, project, name: str):
        self.project = project
        self.name = name
        self._ensured = False  # created with its scalar fields and noted as a blob collection, by this object
        self._exists = False   # seen to exist (tables are never dropped, so this stays true)

    @property
    def _warehouse(self):
        return self.project.warehouse

    @property
    def _index(self):
        return self.project.warehouse.index

    def ensure(self) -> None:
        if not self._ensured:
            self._index.ensure_collection(self.name, scalar_fields=SCALARS)
            self._warehouse.note_blob_collection(self.name)
            self._ensured = self._exists = True

    def create_index(self, keys: Sequence[tuple[str, int]], *, unique: bool = False) -> None:
        self.ensure()
        self._warehouse.create_index(self.name, keys, unique=unique)

    def indexes(self) -> list[dict]:
        return self._index.indexes(self.name)

    # -- writes ---------------------------------------------------------------------------------------------
    def insert_many(self, docs: Sequence[dict]) -> int:
        """Insert documents whose values are packed and whose ``_id`` and ``_rev`` are set; each gets ``_blobs``."""
        self.ensure()
        keys: set[str] = set()
        for doc in docs:
            found = values.blob_keys(doc)
            if found:
                doc["_blobs"] = sorted(found)
                keys |= found
            validate_document(doc)
        try:
            return self._index.insert_many(self.name, docs)
        except (DuplicateKey, InvalidDocument):
            self._warehouse._lease_end(stored=keys)
            self._warehouse.release_blobs([{"_blobs": sorted(keys)}])
            raise
        finally:
            self._warehouse._lease_end(stored=keys)

    def swap(self, doc_id: str, rev: str, fields: dict, *, unset: Iterable[str] = (), old_blobs: Iterable[str] = ()
             ) -> bool:
        """Compare-and-set: write ``fields`` (packed; ``_rev`` among them) and unset ``unset`` on the document
        ``doc_id`` only if its ``_rev`` is still ``rev``. ``fields["_blobs"]`` must list every blob the document
        refers to afterwards; blobs in ``old_blobs`` that no document refers to any more are released."""
        update: dict[str, Any] = {"$set": fields}
        unset = [u for u in unset if u not in fields]
        if unset:
            update["$unset"] = {u: "" for u in unset}
        new = set(fields.get("_blobs") or ())
        try:
            done = self._index.update_many(self.name, {"_id": doc_id, "_rev": rev}, update) == 1
        finally:
            self._warehouse._lease_end(stored=new)
        gone = set(old_blobs) - new
        if done and gone:
            self._warehouse.release_blobs([{"_blobs": sorted(gone)}])
        return done

    def swap_many(self, pairs: Sequence[tuple[dict, dict]]) -> list[bool]:
        """:meth:`swap` of many documents at once: write each ``new`` over its ``old`` (``(old, new)`` pairs;
        ``new`` whole and packed, with a fresh ``_rev`` and its exact ``_blobs``) if the document's ``_rev`` is
        still ``old``'s, through the index's ``swap_many`` (one transaction for the batch on the SQL backends);
        whether each was written. The blobs the replaced documents no longer refer to are released."""
        if not pairs:
            return []
        if len({old["_id"] for old, _ in pairs}) != len(pairs):
            raise ValueError("swap_many takes each document once")
        docs = [{**new, "_blobs": new.get("_blobs") or []} for _, new in pairs]
        stored = {key for doc in docs for key in doc["_blobs"]}
        try:
            done = set(self._index.swap_many(self.name, docs, [old["_rev"] for old, _ in pairs]))
        finally:
            self._warehouse._lease_end(stored=stored)
        written = [old["_id"] in done for old, _ in pairs]
        gone = set()
        for (old, new), ok in zip(pairs, written):
            if ok:
                gone |= set(old.get("_blobs") or ()) - set(new.get("_blobs") or ())
        if gone:  # kept where another document still refers to them
            self._warehouse.release_blobs([{"_blobs": sorted(gone)}])
        return written

    def update_all(self, filter: Filter, update: dict) -> int:
        """An update of the table's own bookkeeping over many documents (no blob is added by it)."""
        return self._index.update_many(self.name, filter, update)

    def delete(self, filter: Filter, *, tombstones: bool = True) -> list[dict]:
        """Delete matching documents and release the blobs only they referenced; returns them. A tombstone per
        document tells other processes' vector indexes (which learn of writes by ``_rev``) of the delete
        (``tombstones=False``: undoing a write nobody could have followed yet, e.g. a failed import)."""
        deleted = self._index.delete_many(self.name, filter)
        if deleted and tombstones:
            self.project.ensure(schema.TOMBSTONES)
            self.project.insert_many(schema.TOMBSTONES.name, ({"table": self.name, "doc": d["_id"]} for d in deleted))
        self._warehouse.release_blobs(deleted)
        return deleted

    def release(self, keys: Iterable[str]) -> int:
        """Release blobs a write stopped referring to (kept if any document still refers to them)."""
        keys = sorted(set(keys))
        return self._warehouse.release_blobs([{"_blobs": keys}]) if keys else 0

    # -- reads ----------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the table was created (by any process); once seen, not asked again (tables are not dropped)."""
        if not self._exists:
            self._exists = self.name in self._index.collections()
        return self._exists

    def find(self, filter: Filter | None = None, *, sort: Sort | None = None, limit: int | None = None,
             skip: int = 0, projection: dict | None = None) -> Iterable[dict]:
        if not self.exists():
            return iter(())
        return self._index.find(self.name, filter or {}, sort=sort, limit=limit, skip=skip, projection=projection)

    def find_one(self, filter: Filter | None = None, *, sort: Sort | None = None,
                 projection: dict | None = None) -> dict | None:
        if not self.exists():
            return None
        return self._index.find_one(self.name, filter or {}, sort=sort, projection=projection)

    def count(self, filter: Filter | None = None) -> int:
        if not self.exists():
            return 0
        return self._index.count(self.name, filter or {})

    def values(self, filter: Filter | None, fields: Sequence[str]) -> list[tuple]:
        """Columns of the matching documents (see :meth:`Index.values`), without whole documents."""
        if not self.exists():
            return []
        return self._index.values(self.name, filter or {}, fields)

    def distinct(self, field: str, filter: Filter | None = None) -> list:
        if not self.exists():
            return []
        return self._index.distinct(self.name, field, filter or {})

    def listen(self, timeout: float) -> bool:
        """Wait until the table may have been written (True) or ``timeout`` passes."""
        self.ensure()
        return self._index.listen(self.name, timeout)

    @property
    def wakes_on_writes(self) -> bool:
        return self._index.supports_listen

    def __repr__(self) -> str:
        return f"<Table {self.name} of project {self.project.name!r}>"
