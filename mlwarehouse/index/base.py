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

Below the protocol, :class:`IndexBackend`, the base of every backend: what they share so that they say the same
thing everywhere (the checks of names, limits, index keys and scalar fields, index naming, the scalar-field cache).
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mlwarehouse.errors import ConfigError, InvalidDocument, QueryError
from mlwarehouse.query import MISSING, distinct_values, get_path, split_path, validate_document, validate_sort

Filter = dict[str, Any]
Sort = Sequence[tuple[str, int]]
Update = dict[str, Any]
Projection = dict[str, int]

__all__ = ["Index", "IndexBackend", "Filter", "Sort", "Update", "Projection"]


class Index(ABC):
    """Abstract index backend. One instance may be shared by threads of one process."""

    #: short name of the backend ("sqlite", "postgresql", "mongodb")
    name: str = "abstract"
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
    def insert_many(self, collection: str, docs: Iterable[dict], *, chunk_size: int | None = None) -> int:
        """Insert documents from any iterable, one transaction per chunk of ``chunk_size`` (None: the backend's
        own, set when it was opened); returns how many were inserted.

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

    def swap_many(self, collection: str, docs: Sequence[dict], expected: Sequence[Any], *,
                  field: str = "_rev") -> list[str]:
        """Compare-and-set many documents: replace the stored document ``docs[i]["_id"]`` by ``docs[i]`` only if
        its top-level scalar ``field`` (a revision token that every write changes) still equals ``expected[i]``
        (None: missing or null); returns the ids replaced, in order. Every document is validated before anything
        is written; each replacement is atomic. SQL backends write the whole batch in one transaction, where a
        loop of conditional updates commits once per document; this default is that loop."""
        checked = self._swaps(docs, expected, field)
        for doc, _ in checked:
            validate_document(doc)
        done = []
        for doc, want in checked:
            guard = {"_id": doc["_id"], field: want}
            old = self.find_one(collection, guard)
            if old is None:
                continue
            update: dict[str, Any] = {"$set": {k: v for k, v in doc.items() if k != "_id"}}
            gone = {k: "" for k in old if k not in doc}
            if gone:
                update["$unset"] = gone
            if self.update_many(collection, guard, update):  # missed if another write changed ``field`` meanwhile
                done.append(doc["_id"])
        return done

    @staticmethod
    def _swaps(docs: Sequence[dict], expected: Sequence[Any], field: str) -> list[tuple[dict, Any]]:
        """The checked arguments of :meth:`swap_many` as ``(document, expected)`` pairs (the documents are each
        backend's to validate, on its own fast path)."""
        if len(split_path(field, "swap field")) != 1 or field == "_id":
            raise QueryError(f"swap_many compares a top-level field other than _id, not {field!r}")
        docs, expected = list(docs), list(expected)
        if len(docs) != len(expected):
            raise QueryError(f"swap_many takes one expected value per document ({len(docs)} documents, "
                             f"{len(expected)} values)")
        for doc, want in zip(docs, expected):
            if not isinstance(doc, dict) or not isinstance(doc.get("_id"), str):
                raise QueryError(f"swap_many takes documents with a string _id, not {doc!r:.80}")
            if want is not None and type(want) not in (str, int, float):
                raise QueryError(f"swap_many compares scalar values, not {want!r}")
        return list(zip(docs, expected))

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
        paths = [split_path(f, "field") for f in fields]
        projection = {p[0]: 1 for p in paths}
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
        raise ConfigError(f"the {self.name} index does not support SQL")

    def close(self) -> None:
        """Release connections; the object must not be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- what every backend shares ---------------------------------------------------------------------------------
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*\Z")


class IndexBackend(Index):
    """The base of every backend: the protocol, plus what backends share so that they say the same thing.

    Checks (names, limits, index keys, scalar fields), index naming, and each collection's scalar fields as the
    backend last read them from its metadata: read once, then cached (they only grow; a collection not seen yet
    is looked up again on each use). A backend supplies :meth:`_read_scalar_fields` and, if its names are
    bounded, :attr:`name_limit`. Callers see only :class:`Index`.
    """

    #: the longest collection or view name the backend can hold (None: no limit)
    name_limit: int | None = None

    def __init__(self) -> None:
        self._scalars: dict[str, frozenset[str]] = {}

    # -- checks --------------------------------------------------------------------------------------------
    def _check_name(self, kind: str, name: Any) -> str:
        """``name`` if it can name a collection (or a view): lowercase letters, digits and '_', starting with a
        letter, at most :attr:`name_limit` characters; otherwise QueryError."""
        limit = self.name_limit
        if isinstance(name, str) and _NAME_RE.match(name) and (limit is None or len(name) <= limit):
            return name
        most = "" if limit is None else f"at most {limit} "
        raise QueryError(f"invalid {kind} name {name!r}: use {most}lowercase letters, digits and '_', "
                         "starting with a letter")

    @staticmethod
    def _check_limits(limit: Any, skip: Any = 0) -> None:
        """QueryError unless ``limit`` (None: no limit) and ``skip`` are integers from 0 to 2**63 - 1."""
        for what, n in (("limit", limit), ("skip", skip)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 1 << 63):
                raise QueryError(f"{what} must be an integer from 0 to 2**63 - 1, not {n!r}")

    @staticmethod
    def _index_spec(collection: str, keys: Sequence[tuple[str, int]], unique: bool) -> tuple[list, str]:
        """The validated keys of :meth:`create_index` (at least one ``(field, 1 | -1)``) and the index's name,
        derived from what it indexes so that every process and backend agrees on it."""
        keys = list(keys)
        if not keys:
            raise QueryError("create_index needs at least one (field, 1 or -1) key")
        spec = validate_sort(keys)[:len(keys)]  # without the appended tie-breaker
        digest = hashlib.sha1(json.dumps([spec, unique]).encode()).hexdigest()[:12]
        return spec, f"ix_{collection}_{digest}"

    @staticmethod
    def _check_scalars(doc: dict, scalars: Iterable[str], collection: str) -> None:
        """InvalidDocument if ``doc`` holds an array or object at one of the collection's scalar fields."""
        for field in scalars:
            value = doc.get(field) if "." not in field else get_path(doc, field)  # the common case, cheaply
            if isinstance(value, (dict, list)):
                raise IndexBackend._not_scalar(doc, field, collection)

    @staticmethod
    def _not_scalar(doc: dict, field: str, collection: str) -> InvalidDocument:
        return InvalidDocument(f"collection {collection!r}: {field!r} is a scalar field and cannot hold an array "
                               f"or object (document {doc['_id']!r})")

    # -- scalar fields, cached -----------------------------------------------------------------------------
    @abstractmethod
    def _read_scalar_fields(self, collection: str) -> Iterable[str] | None:
        """The stored scalar fields of ``collection``, or None if it does not exist."""

    def _scalar_fields(self, collection: str) -> frozenset[str] | None:
        """Scalar fields of a collection, or None if it does not exist (checks the name before reading)."""
        known = self._scalars.get(collection)
        if known is not None:
            return known
        fields = self._read_scalar_fields(self._check_name("collection", collection))
        if fields is None:
            return None
        known = self._scalars[collection] = frozenset(fields)
        return known

    def _known(self, collection: str) -> frozenset[str]:
        """Scalar fields of a collection, created first if it does not exist (for writes)."""
        known = self._scalar_fields(collection)
        if known is None:
            self.ensure_collection(collection)
            known = self._scalars[collection]
        return known

    def _wanted(self, collection: str, scalar_fields: Sequence[str]) -> set[str] | None:
        """The checked arguments of ``ensure_collection``: the scalar fields asked for, or None when the cache
        shows there is nothing to do."""
        self._check_name("collection", collection)
        if isinstance(scalar_fields, str):
            raise QueryError(f"scalar_fields must be a list of field paths, not the string {scalar_fields!r}")
        wanted = {f for f in scalar_fields if split_path(f, "scalar field")}
        known = self._scalars.get(collection)
        return None if known is not None and wanted <= known else wanted

    def _remember(self, collection: str, fields: Iterable[str]) -> None:
        self._scalars[collection] = frozenset(fields)
