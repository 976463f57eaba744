"""Warehouse (an index + a blob store) and Project (everything scoped to one project name).

Domain packages (datasets, models, runs, tasks) use only the methods of :class:`Project` below and the
collections declared in :mod:`mlwarehouse.schema`; they never see a backend. Project enforces the invariants that
every domain shares (numbered as in the design document):

1. Blobs first, index second: ``insert`` packs the value (every blob put and durable) before the document is
   written, so a reader never sees a document whose bytes are missing; a crash leaves at most unreferenced blobs.
2. Deletes are real: ``delete`` removes documents, then each blob they referenced that no document references
   any more, at once unless another writer is in flight (then ``Warehouse.gc`` removes them after its grace).
3. Integrity: every blob read is verified by the blob store (see :mod:`mlwarehouse.blobs.base`).
4. Every write is stamped with ``_id`` (sortable, client-made), ``project`` and ``time`` (UTC).

How a delete beside a writer in flight never removes bytes the writer is about to commit (content addressing
shares them): :mod:`mlwarehouse.warehouse.blobrefs`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Any

from mlwarehouse import schema
from mlwarehouse.blobs.base import BlobStore
from mlwarehouse.codecs import values
from mlwarehouse.errors import DuplicateKey, InvalidDocument, NotFound, QueryError
from mlwarehouse.ids import MIN_PREFIX, new_id, prefix_filter, utc_now
from mlwarehouse.index.base import Filter, Index, Sort
from mlwarehouse.query.documents import validate_document
from mlwarehouse.warehouse.blobrefs import BlobReferences, GcReport

__all__ = ["Warehouse", "Project", "GcReport", "connect"]

META = schema.META.name
#: the collections whose documents ``Warehouse.locate`` looks in by default (what ``mlw show`` shows)
ENTITY_COLLECTIONS = (schema.RUNS.name, schema.MODELS.name, schema.DATASETS.name, schema.TASKS.name)


def connect(uri: str | None = None, *, blobs: str | None = None, home: str | os.PathLike | None = None,
            project: str | None = None) -> "Warehouse":
    """Open a warehouse: the embedded default (``./.mlwarehouse`` or ``$MLW_HOME``) unless told otherwise.

    ``uri`` names the index (``$MLW_URI``), ``blobs`` the blob store (``$MLW_BLOBS``); see :mod:`mlwarehouse.config`.
    ``project`` is the default project that ``wh.datasets``, ``wh.models``... work in (``$MLW_PROJECT``, else
    "default"); a worker sets these variables for its tasks, so ``connect()`` in a task script needs no arguments.
    """
    from mlwarehouse.config import open_blobs, open_index, resolve
    settings = resolve(uri, blobs, home)
    index = open_index(settings.index_uri)
    try:
        store = open_blobs(settings.blobs_uri)
    except BaseException:
        index.close()
        raise
    project = project or os.environ.get("MLW_PROJECT") or "default"
    return Warehouse(index, store, default_project=project, settings=settings)


class Warehouse(BlobReferences):
    """An index and a blob store, and the projects inside them."""

    def __init__(self, index: Index, blobs: BlobStore, *, default_project: str = "default", settings=None):
        self.index = index
        self.blobs = blobs
        self.settings = settings
        self.default_project = default_project
        self._projects: dict[str, Project] = {}
        self._blob_collections: set[str] = set()
        self._ensured: set[str] = set()
        self._indexed: set[tuple] = set()
        self._local = threading.local()  # this thread's write lease: id, renewal time, keys packed, not stored
        self.ensure(schema.META)

    # -- projects ------------------------------------------------------------------------------------------
    def project(self, name: str | None = None) -> "Project":
        """The project called ``name`` (created on first write; any string of 1-100 visible characters)."""
        name = self.default_project if name is None else name
        if not isinstance(name, str) or not 0 < len(name) <= 100 or not name.isprintable():
            raise QueryError(f"project name {name!r} must be 1 to 100 printable characters")
        if name not in self._projects:
            self._projects[name] = Project(self, name)
        return self._projects[name]

    def projects(self) -> list[str]:
        """Names of every project that holds at least one document.

        Read from an index that leads with the project where a collection has one (the warehouse's own): per
        project, the first name after the last one found, from the index alone (200,000 runs in 3 projects: 35 ms,
        against 355 ms for reading every document). Users' tables are skipped: their documents carry no project
        (a field of theirs called ``project`` was listed before), and the catalog names the projects they belong
        to. Any other collection (logs, tombstones) is read whole, as before."""
        names: set[str] = set()
        for collection in self.index.collections():
            if collection == META or collection.startswith(schema.TABLE_PREFIX):
                continue
            declared = schema.COLLECTIONS.get(collection)
            if declared is not None and any(ix.keys[0][0] == "project" for ix in declared.indexes):
                names.update(self._project_names(collection))
            else:
                names.update(v for v in self.index.distinct(collection, "project") if isinstance(v, str))
        return sorted(names)

    def _project_names(self, collection: str) -> list[str]:
        """The project names in ``collection``, one query each (the next name), over an index that leads with
        ``project``."""
        out: list[str] = []
        while True:
            bound = {"$gt": out[-1]} if out else {"$gte": ""}  # strings only: the range is type-bracketed
            doc = self.index.find_one(collection, {"project": bound}, sort=[("project", 1)],
                                      projection={"project": 1})
            if doc is None or not isinstance(doc.get("project"), str) or doc["project"] in out:
                return out  # (a name seen again would be a backend ordering names unlike its own $gt)
            out.append(doc["project"])

    def locate(self, id_or_prefix: str, collections: Sequence[str] = ENTITY_COLLECTIONS, *,
               project: str | None = None) -> tuple[str, dict]:
        """``(collection, doc)`` of the document whose ``_id`` is ``id_or_prefix`` or the only one that starts with
        it (as git takes commits), in any project unless ``project`` is given: ids are unique across projects.
        Prefixes also match in upper case (ids are upper-case base32). NotFound if none; QueryError listing the
        candidates if several match."""
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise QueryError(f"an id or id prefix must be a non-empty string, not {id_or_prefix!r}")
        existing = set(self.index.collections())
        names = [c for c in collections if c in existing]
        scope = {} if project is None else {"project": project}
        for name in names:
            doc = self.index.find_one(name, {"_id": id_or_prefix, **scope})
            if doc is not None:
                return name, doc
        prefix = prefix_filter(id_or_prefix)
        if prefix is None and len(id_or_prefix) < MIN_PREFIX:
            raise QueryError(f"id prefix {id_or_prefix!r} is too short: give at least {MIN_PREFIX} characters")
        found = [] if prefix is None else [
            (name, doc) for name in names
            for doc in self.index.find(name, {**prefix, **scope}, sort=[("_id", 1)], limit=11)]
        if len(found) == 1:
            return found[0]
        if found:
            shown = ", ".join(f"{doc['_id']} ({name[:-1]} in {doc.get('project')})" for name, doc in found[:10])
            more = ", ..." if len(found) > 10 else ""
            raise QueryError(f"id prefix {id_or_prefix!r} is ambiguous: {shown}{more}")
        where = "" if project is None else f" in project {project!r}"
        kinds = [c[:-1] if c.endswith("s") else c for c in collections] or ["document"]
        what = f"{', '.join(kinds[:-1])} or {kinds[-1]}" if len(kinds) > 1 else kinds[0]
        raise NotFound(f"no {what} with id or id prefix {id_or_prefix!r}{where}")

    def __getattr__(self, attr: str):
        # wh.datasets, wh.models, wh.runs, wh.tasks, wh.log... act on the default project
        if attr.startswith("_") or attr in ("index", "blobs", "settings", "default_project"):
            raise AttributeError(attr)
        return getattr(self.project(), attr)

    # -- schema --------------------------------------------------------------------------------------------
    def ensure(self, collection: schema.Collection) -> None:
        """Create a declared collection, its scalar fields and its indexes (idempotent; once per object)."""
        if collection.name in self._ensured:
            return
        self.index.ensure_collection(collection.name, scalar_fields=collection.scalar_fields)
        for spec in collection.indexes:
            self.create_index(collection.name, spec.keys, unique=spec.unique)
        if collection.blobs:
            self.note_blob_collection(collection.name)
        self._ensured.add(collection.name)

    def create_index(self, collection: str, keys: Sequence[tuple[str, int]], *, unique: bool = False) -> None:
        """Create an index once per warehouse object (the backends make it idempotent across processes)."""
        key = (collection, tuple(map(tuple, keys)), unique)
        if key not in self._indexed:
            self.index.create_index(collection, keys, unique=unique)
            self._indexed.add(key)

    # -- SQL -----------------------------------------------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | dict = ()) -> list[dict]:
        """Read-only SQL over the documented views (``runs``, ``metrics``, ``models``, ``datasets``, ``tasks``: see
        :mod:`mlwarehouse.index.views`); rows as dicts. Placeholders are the database's own: ``?`` on SQLite,
        ``%s`` on PostgreSQL. MongoDB has no SQL: ConfigError."""
        from mlwarehouse.index.views import ensure_views
        ensure_views(self.index)  # first: a backend without SQL says so before anything else happens
        for project in list(self._projects.values()):
            if "runs" in project.__dict__:  # points logged in this process are in the views too
                project.runs.flush()
        return self.index.sql(query, params)

    def close(self) -> None:
        """Flush pending logs, then release the index and the blob store (even if a flush fails)."""
        try:
            for project in self._projects.values():
                project._close()
            self._lease_end(stored=list(getattr(self._local, "pending", ())))  # packed values never stored
        finally:
            self.index.close()
            self.blobs.close()

    def __enter__(self) -> "Warehouse":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.settings.index_uri if self.settings else self.index.name
        return f"<Warehouse {where}>"


class Project:
    """A view of the warehouse scoped to one project: every read filters on it, every write is stamped with it."""

    def __init__(self, warehouse: Warehouse, name: str):
        self.warehouse = warehouse
        self.name = name

    @property
    def index(self) -> Index:
        return self.warehouse.index

    @property
    def blobs(self) -> BlobStore:
        return self.warehouse.blobs

    # -- domains -------------------------------------------------------------------------------------------
    @cached_property
    def datasets(self):
        from mlwarehouse.datasets.whole import Datasets
        return Datasets(self)

    @cached_property
    def items(self):
        from mlwarehouse.datasets.items import ItemDatasets
        return ItemDatasets(self)

    @cached_property
    def models(self):
        from mlwarehouse.models.registry import Models
        return Models(self)

    @cached_property
    def runs(self):
        from mlwarehouse.runs.registry import Runs
        return Runs(self)

    @cached_property
    def tasks(self):
        from mlwarehouse.tasks.queue import Tasks
        return Tasks(self)

    @cached_property
    def lineage(self):
        from mlwarehouse.lineage import Lineage
        return Lineage(self)

    @cached_property
    def training(self):
        from mlwarehouse.training.registry import Training
        return Training(self)

    @cached_property
    def catalog(self):
        from mlwarehouse.collections.catalog import Catalog
        return Catalog(self)

    def collection(self, name: str):
        """The collection of users' documents called ``name`` (created on first write; pymongo's methods)."""
        return self.catalog.collection(name)

    def table(self, name: str):
        """A table that holds only this project's documents (see :mod:`mlwarehouse.warehouse.tables`)."""
        from mlwarehouse.warehouse.tables import Table
        return Table(self, name)

    # -- schema --------------------------------------------------------------------------------------------
    def ensure(self, collection: schema.Collection) -> None:
        """Create a declared collection with its scalar fields and indexes (once per warehouse object)."""
        self.warehouse.ensure(collection)

    def create_index(self, collection: str | schema.Collection, keys: Sequence[tuple[str, int]]) -> None:
        """An extra index for a query shape users ask for (e.g. a sort on a metric); idempotent."""
        self.warehouse.create_index(str(collection), keys)

    def vector_store(self):
        """The index's own vector tables (pgvector on PostgreSQL), or None where the index has none."""
        store = getattr(self.warehouse.index, "vector_store", None)
        return store() if store is not None else None

    # -- values --------------------------------------------------------------------------------------------
    def pack(self, value: Any, *, allow_pickle: bool = False, **options: Any) -> Any:
        """Store the blobs a value needs and return its JSON tree (blob references at the leaves), under this
        thread's write lease until a document holding the tree is inserted or updated (see the module notes).
        ``options`` go to :func:`mlwarehouse.codecs.values.pack` (inline limits, a data-type encoder). The lease
        is taken before the first put: a value that puts no blob (small, or kept inline) costs no lease writes."""
        def put(data: Any) -> str:
            self.warehouse._lease_begin()
            return self.blobs.put(data)
        tree = None
        try:
            tree = values.pack(value, put, allow_pickle=allow_pickle, **options)
        finally:
            self.warehouse._lease_end(packed=values.blob_keys(tree))
        return tree

    def unpack(self, tree: Any, *, allow_pickle: bool = False, writable: bool = False, decode=None) -> Any:
        """Rebuild a value from its JSON tree, reading (and verifying) its blobs. Arrays are read-only views of
        the bytes read unless ``writable`` (then each owns writable memory, e.g. for ``torch.from_numpy``);
        ``decode`` replaces the codec registry's decoder (a collection's data types)."""
        return values.unpack(tree, self.blobs.get, allow_pickle=allow_pickle, writable=writable, decode=decode)

    # -- documents -----------------------------------------------------------------------------------------
    def scope(self, filter: Filter | None) -> Filter:
        """``filter`` restricted to this project."""
        if not filter:
            return {"project": self.name}
        if not isinstance(filter, dict):
            raise QueryError(f"a filter must be a dict, not {type(filter).__name__}")
        if "project" in filter:
            return {"$and": [{"project": self.name}, filter]}
        return {"project": self.name, **filter}

    def stamp(self, doc: dict) -> dict:
        """Add ``_id``, ``project``, ``time`` and the ``_blobs`` list to a new document (in place)."""
        doc.setdefault("_id", new_id())
        doc["project"] = self.name
        doc["time"] = utc_now()  # stamped after the blobs were put
        keys = values.blob_keys(doc)
        if keys:
            doc["_blobs"] = sorted(keys)
        return doc

    def insert(self, collection: str, doc: dict) -> dict:
        """Stamp and insert one document whose values are already packed."""
        self.stamp(doc)
        if collection in schema.REVISED:
            doc["_rev"] = doc["_id"]
        keys = doc.get("_blobs", ())
        try:
            if keys:
                validate_document(doc)  # a bad document must not leave even the bookkeeping below behind
                self.warehouse.note_blob_collection(collection)
            self.index.insert_one(collection, doc)
        except (DuplicateKey, InvalidDocument):  # certainly not written: its fresh blobs go too
            self.warehouse._lease_end(stored=keys)
            self.warehouse.release_blobs([doc])
            raise
        finally:  # written or not, this thread no longer guards these keys
            self.warehouse._lease_end(stored=keys)
        return doc

    def insert_many(self, collection: str, docs: Iterable[dict]) -> int:
        """Stamp and insert many documents (any iterable, chunked by the backend)."""
        keys: set[str] = set()
        revised = collection in schema.REVISED
        def stamped():
            for doc in docs:
                self.stamp(doc)
                if revised:
                    doc["_rev"] = doc["_id"]
                if "_blobs" in doc:
                    validate_document(doc)
                    self.warehouse.note_blob_collection(collection)
                    keys.update(doc["_blobs"])
                yield doc
        count = self.index.insert_many(collection, stamped())
        self.warehouse._lease_end(stored=keys)
        return count

    def insert_stamped(self, collection: str, docs: Iterable[dict], *, chunk_size: int | None = None) -> int:
        """Insert documents the caller stamped itself (``_id``, this ``project``, ``time``) and that reference no
        blobs: the log writer's bulk path, which makes ids in batches and keeps each point's own time."""
        return self.index.insert_many(collection, docs, chunk_size=chunk_size)

    def find(self, collection: str, filter: Filter | None = None, *, sort: Sort | None = None,
             limit: int | None = None, skip: int = 0, projection: dict | None = None) -> list[dict]:
        return list(self.index.find(collection, self.scope(filter), sort=sort, limit=limit, skip=skip,
                                    projection=projection))

    def find_one(self, collection: str, filter: Filter | None = None, *, sort: Sort | None = None,
                 projection: dict | None = None) -> dict | None:
        return self.index.find_one(collection, self.scope(filter), sort=sort, projection=projection)

    def count(self, collection: str, filter: Filter | None = None) -> int:
        return self.index.count(collection, self.scope(filter))

    def values(self, collection: str, filter: Filter | None, fields: Sequence[str], *, sort: Sort | None = None,
               limit: int | None = None) -> list[tuple]:
        """Columns of the matching documents (see :meth:`Index.values`)."""
        return self.index.values(str(collection), self.scope(filter), fields, sort=sort, limit=limit)

    def distinct(self, collection: str, field: str, filter: Filter | None = None) -> list:
        """Distinct values of ``field`` among this project's matching documents, in sort order."""
        return self.index.distinct(str(collection), field, self.scope(filter))

    def listen(self, collection: str, timeout: float) -> bool:
        """Wait until ``collection`` may have been written (True) or ``timeout`` passes (see :meth:`Index.listen`)."""
        return self.index.listen(str(collection), timeout)

    @property
    def wakes_on_writes(self) -> bool:
        """Whether :meth:`listen` wakes at once on a write (else it sleeps out its timeout)."""
        return self.index.supports_listen

    def watch(self, collection: Any, where: Filter | None = None, *, consumer: str | None = None,
              start: str = "now", poll: float | None = None, timeout: float | None = None, batch: int = 500):
        """A durable cursor over the new and changed matches of ``where`` in a users' collection (a name or
        :class:`~mlwarehouse.collections.collection.Collection`) or a warehouse collection (``"models"``,
        ``schema.MODELS``): iterate it for events, ``event.ack()`` them; a named ``consumer`` resumes after a
        crash with every event it had not acknowledged (see :mod:`mlwarehouse.collections.watch`)."""
        from mlwarehouse.collections.watch import Watcher
        return Watcher(self, collection, where, consumer=consumer, start=start, poll=poll, timeout=timeout,
                       batch=batch)

    def update(self, collection: str, filter: Filter | None, update: dict) -> int:
        """Apply ``update`` to every matching document; how many matched. In a ``schema.REVISED`` collection each
        document gets a fresh ``_rev`` of its own (a watch tells changes apart by it), so an update that may match
        several documents is applied to them one by one, each still under ``filter``."""
        if collection not in schema.REVISED:
            return self._stored(update, self.index.update_many(collection, self.scope(filter), update))
        scoped = self.scope(filter)
        if isinstance((filter or {}).get("_id"), str):
            return self._stored(update, self.index.update_many(collection, scoped, _revised(update)))
        ids = [row[0] for row in self.index.values(collection, scoped, ["_id"])]
        done = sum(self.index.update_many(collection, {"$and": [scoped, {"_id": i}]}, _revised(update))
                   for i in ids)
        return self._stored(update, done)

    def find_one_and_update(self, collection: str, filter: Filter | None, update: dict, *,
                            sort: Sort | None = None) -> dict | None:
        if collection in schema.REVISED:
            update = _revised(update)
        return self._stored(update, self.index.find_one_and_update(collection, self.scope(filter), update, sort=sort))

    def _stored(self, update: dict, result: Any) -> Any:
        """An update that wrote packed references ends their wait (and maybe this thread's lease); ``result``."""
        if getattr(self.warehouse._local, "lease", None) is not None:
            self.warehouse._lease_end(stored=values.blob_keys(update))
        return result

    def delete(self, collection: str, filter: Filter | None = None) -> list[dict]:
        """Delete matching documents and release the blobs only they referenced; returns the deleted docs."""
        deleted = self.index.delete_many(collection, self.scope(filter))
        self.warehouse.release_blobs(deleted)
        return deleted

    def _close(self) -> None:
        runs = self.__dict__.get("runs")
        if runs is not None and hasattr(runs, "close"):
            runs.close()

    def __repr__(self) -> str:
        return f"<Project {self.name!r}>"


def _revised(update: dict) -> dict:
    """``update`` that also sets a fresh ``_rev`` unless it sets one itself (a copy: the caller's dict is left as
    it was)."""
    return {**update, "$set": {"_rev": new_id(), **update.get("$set", {})}}
