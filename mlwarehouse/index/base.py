"""The index protocol: JSON documents in named collections, queried with MongoDB's filter language.

Backends (SQLite, PostgreSQL, MongoDB) implement this small contract and know nothing about datasets, models
or runs; everything smart lives above it. Semantics are defined by :mod:`mlwarehouse.query` (the pure-Python
matcher and update applier): a backend must return exactly what the matcher would.

Conventions every backend honours:
- A document is a dict of JSON values (dict with str keys, list, str, int, finite float, bool, None) with a
  string ``_id``; the caller generates ids (:func:`mlwarehouse.ids.new_id`). Validation of documents is
  :func:`mlwarehouse.query.validate_document`; backends call it before writing.
- ``sort`` is a list of ``(field, 1 | -1)``; ``_id`` ascending is always appended as the final tie-breaker,
  so results are deterministic on every backend.
- Every write is atomic per document; ``insert_many`` is atomic per chunk; ``find_one_and_update`` is atomic
  across processes (it is how tasks are claimed).
- Driver errors are mapped to :mod:`mlwarehouse.errors` at the backend boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

Filter = dict[str, Any]
Sort = Sequence[tuple[str, int]]
Update = dict[str, Any]
Projection = dict[str, int]

__all__ = ["Index", "Filter", "Sort", "Update", "Projection"]


class Index(ABC):
    """Abstract index backend. One instance may be shared by threads of one process."""

    #: short name of the backend ("sqlite", "postgresql", "mongodb")
    name: str = "abstract"
    #: ``wh.sql()`` is available (SQLite and PostgreSQL)
    supports_sql: bool = False
    #: ``listen`` wakes on writes (PostgreSQL's LISTEN/NOTIFY) instead of sleeping out its timeout
    supports_listen: bool = False

    # -- collections and indexes -------------------------------------------------------------------------
    @abstractmethod
    def ensure_collection(self, collection: str, *, scalar_fields: Sequence[str] = ()) -> None:
        """Create the collection if needed (idempotent, safe from many processes at once).

        ``scalar_fields`` are fields the caller promises never hold an array or object (ids, names,
        status...): the backend may compile equality on them to a plain indexed comparison, and
        must reject a write that puts an array or object there (InvalidDocument).
        """

    @abstractmethod
    def create_index(self, collection: str, keys: Sequence[tuple[str, int]], *, unique: bool = False) -> None:
        """Create (idempotently) an index over the given fields; usable by filters and sorts on them."""

    @abstractmethod
    def collections(self) -> list[str]:
        """Names of the existing collections."""

    # -- writes --------------------------------------------------------------------------------------------
    @abstractmethod
    def insert_many(self, collection: str, docs: Iterable[dict], *, chunk_size: int = 1000) -> int:
        """Insert documents from any iterable, one transaction per chunk; returns how many were inserted.

        Raises DuplicateKey if an ``_id`` exists (the failing chunk is not written), InvalidDocument for a value
        that cannot be stored (validated before anything of that chunk is written).
        """

    def insert_one(self, collection: str, doc: dict) -> None:
        self.insert_many(collection, [doc])

    @abstractmethod
    def update_many(self, collection: str, filter: Filter, update: Update) -> int:
        """Apply ``$set $unset $inc $min $max $push $addToSet`` to every match; returns how many matched."""

    @abstractmethod
    def find_one_and_update(self, collection: str, filter: Filter, update: Update, *,
                            sort: Sort | None = None) -> dict | None:
        """Atomically update the first match (in ``sort`` order) and return it as it is after the update."""

    @abstractmethod
    def replace_one(self, collection: str, doc: dict, *, upsert: bool = False) -> bool:
        """Replace the document with ``doc["_id"]``; with ``upsert`` insert it if missing. True if written."""

    @abstractmethod
    def delete_many(self, collection: str, filter: Filter) -> list[dict]:
        """Delete every match and return the deleted documents (so callers can release their blobs)."""

    # -- reads ---------------------------------------------------------------------------------------------
    @abstractmethod
    def find(self, collection: str, filter: Filter | None = None, *, sort: Sort | None = None,
             limit: int | None = None, skip: int = 0, projection: Projection | None = None) -> Iterator[dict]:
        """Matching documents, sorted, skipped, limited and projected. A missing collection yields nothing."""

    def find_one(self, collection: str, filter: Filter | None = None, *, sort: Sort | None = None,
                 projection: Projection | None = None) -> dict | None:
        for doc in self.find(collection, filter, sort=sort, limit=1, projection=projection):
            return doc
        return None

    def values(self, collection: str, filter: Filter | None, fields: Sequence[str], *, sort: Sort | None = None,
               limit: int | None = None) -> list[tuple]:
        """The values of ``fields`` (None where missing) of each matching document, in ``sort`` order.

        Columns without whole documents: histories of 100k log points read several times faster where a
        backend can extract them in the database. This default reads the documents.
        """
        from mlwarehouse.query import MISSING, get_path, split_path
        paths = [split_path(f, "field") for f in fields]
        projection = {".".join(p[:1]): 1 for p in paths}
        out = []
        for doc in self.find(collection, filter, sort=sort, limit=limit, projection=projection or None):
            row = tuple(get_path(doc, p) for p in paths)
            out.append(tuple(None if v is MISSING else v for v in row))
        return out

    @abstractmethod
    def count(self, collection: str, filter: Filter | None = None) -> int:
        """How many documents match."""

    def distinct(self, collection: str, field: str, filter: Filter | None = None) -> list:
        """Distinct values of a field (array values contribute their elements), in sort order."""
        from mlwarehouse.query import distinct_values  # reference implementation; backends may override
        return distinct_values(self.find(collection, filter, projection={field: 1}), field)

    def indexes(self, collection: str) -> list[dict]:
        """The indexes created with :meth:`create_index`: ``{"name", "keys", "unique"}`` each."""
        return []

    # -- waiting for writes --------------------------------------------------------------------------------
    def listen(self, collection: str, timeout: float) -> bool:
        """Block until a write to ``collection`` may have happened (True) or ``timeout`` seconds pass (False).

        Backends with notifications wake at once; this default sleeps, so callers re-check what they wait for.
        """
        import time
        time.sleep(timeout)
        return False

    # -- raw SQL (SQLite, PostgreSQL) ----------------------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | dict = ()) -> list[dict]:
        """Run read-only SQL over the documented views; rows as dicts."""
        from mlwarehouse.errors import ConfigError
        raise ConfigError(f"the {self.name} index does not support SQL")

    def close(self) -> None:
        """Release connections; the object must not be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
