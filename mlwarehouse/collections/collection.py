"""A collection of users' documents with pymongo's methods, data types, and models attached (listeners).

``wh.collection("products")`` is scoped to the project. Filters, sorts and updates are the warehouse's query
language; values of any registered type go in and come out as the same Python objects (arrays, tensors, images,
audio, bytes and users' types as verified blobs, or inside the document when small; scalars inline, so filters
and sorts reach them). Every write keeps the listeners' state right (see :mod:`mlwarehouse.collections.listeners`):
an insert is pending for every listener, an update marks stale exactly the listeners whose input (or filter
match) changed, a delete takes the document's outputs with it.

Updates are read-modify-write with a compare-and-set on ``_rev`` (retried on conflict), so concurrent writers
lose nothing, ``$inc`` stays atomic, and the blobs a write stops referring to are released at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from mlwarehouse import schema
from mlwarehouse.codecs import values
from mlwarehouse.collections import listeners as engine
from mlwarehouse.collections import outputs
from mlwarehouse.collections.documents import (
    INLINE_BYTES,
    INLINE_LIMIT,
    Codecs,
    DeleteResult,
    InsertManyResult,
    InsertOneResult,
    UpdateResult,
    check_fraction,
    check_update_paths,
    check_user_fields,
    document_size,
    fold_of,
    strip,
)
from mlwarehouse.collections.queueing import enqueue
from mlwarehouse.errors import DuplicateKey, InvalidDocument, QueryError, WarehouseError
from mlwarehouse.ids import new_id
from mlwarehouse.query.filters import validate_filter
from mlwarehouse.query.updates import apply_update
from mlwarehouse.warehouse.tables import table_name

__all__ = ["Collection", "Cursor"]

CHUNK = 500
_CAS_TRIES = 50


class Collection:
    """Users' documents in one project (``project.collection(name)``)."""

    def __init__(self, catalog, name: str):
        self.catalog = catalog
        self.project = catalog.project
        self.name = name
        self._table = None
        self.codecs = Codecs(catalog)
        self._vector_indexes: dict[str, Any] = {}
        self._index_lookups: dict[str | None, tuple[float, Any]] = {}  # name -> (when looked up, the index)

    def __repr__(self) -> str:
        return f"<Collection {self.name!r} of project {self.project.name!r}>"

    # -- storage ------------------------------------------------------------------------------------------
    @property
    def table(self):
        if self._table is None:  # the catalog records the same name: it is derived from the two names
            self._table = self.project.table(table_name(self.project.name, self.name))
        return self._table

    def _created(self) -> dict:
        record = self.catalog.record(self.name, create=True)
        self.table.ensure()
        return record

    @property
    def valid_fraction(self) -> float:
        record = self.catalog.record(self.name)
        return record["valid_fraction"] if record else 0.05

    @valid_fraction.setter
    def valid_fraction(self, value: float) -> None:
        """New documents' share of the validation fold (old documents keep theirs)."""
        self.catalog.set(self.name, valid_fraction=check_fraction(value))

    def pack(self, value: Any, encoder=None) -> Any:
        """Store a value's blobs and return its tree (``encoder``: one made for a whole batch of values)."""
        return self.project.pack(value, inline_limit=INLINE_LIMIT, inline_bytes=INLINE_BYTES,
                                 encode=encoder or self.codecs.encoder())

    def pack_document(self, doc: Mapping, encoder=None) -> dict:
        """A document packed field by field: it stays a dict (with its ``_id``) however large its JSON, where
        packing it whole would make one JSON blob of it."""
        encoder = encoder or self.codecs.encoder()
        return {k: self.pack(v, encoder) for k, v in doc.items()}

    def unpack(self, tree: Any, *, raw: bool = False, writable: bool = False) -> Any:
        return self.project.unpack(tree, decode=self.codecs.decoder(raw=raw, writable=writable))

    # -- inserting ----------------------------------------------------------------------------------------
    def insert_one(self, document: Mapping) -> InsertOneResult:
        return InsertOneResult(self.insert_many([document]).inserted_ids[0])

    def insert_many(self, documents: Iterable[Mapping], *, chunk_size: int = CHUNK) -> InsertManyResult:
        """Insert documents (any iterable, ``chunk_size`` at a time); returns their ids. A bad document fails
        its chunk before anything of that chunk is written; the error says how many were inserted before it."""
        if isinstance(documents, Mapping):
            raise InvalidDocument("insert_many takes an iterable of documents, not one document (insert_one)")
        record = self._created()
        fraction = record.get("valid_fraction", 0.05)
        ids: list[str] = []
        source = iter(documents)
        while chunk := list(islice(source, max(1, chunk_size))):
            try:
                ids += self._insert_chunk(chunk, fraction)
            except WarehouseError as exc:
                if ids:
                    raise type(exc)(f"{exc} ({len(ids)} documents were inserted before this chunk)") from exc
                raise
        return InsertManyResult(ids)

    def _insert_chunk(self, chunk: list, fraction: float) -> list[str]:
        docs = []
        for i, document in enumerate(chunk):
            doc = check_user_fields(document, f"document {i}")
            doc.setdefault("_id", new_id())
            doc.setdefault("_fold", fold_of(doc["_id"], fraction))
            docs.append(doc)
        ids = [d["_id"] for d in docs]
        if len(set(ids)) != len(ids):
            raise DuplicateKey(f"the same _id appears twice among the documents: {_first_repeat(ids)!r}")
        given = [d["_id"] for d in chunk if isinstance(d, Mapping) and "_id" in d]
        if given:
            taken = [d["_id"] for d in self.table.find({"_id": {"$in": given}}, projection={"_id": 1})]
            if taken:
                raise DuplicateKey(f"a document with _id {taken[0]!r} already exists in {self.name!r}")
        attached = engine.active(self)
        outputs.compute_on_insert(self, attached, docs)  # inline listeners' outputs, stored with the documents
        packed, keys, encoder = [], set(), self.codecs.encoder()
        try:
            for doc in docs:
                tree = self.pack_document(doc, encoder)
                outputs.seal_inputs(attached, tree)
                tree["_rev"] = new_id()
                keys |= values.blob_keys(tree)
                document_size(tree)
                packed.append(tree)
            self.table.insert_many(packed)
        except BaseException:
            self.project.warehouse._lease_end(stored=keys)
            self.table.release(keys)
            raise
        enqueue(self, attached, ids)
        self._wrote()
        return ids

    # -- reading ------------------------------------------------------------------------------------------
    def find(self, filter: Mapping | None = None, projection: Mapping | None = None, *, sort=None,
             limit: int | None = None, skip: int = 0, raw: bool = False, like: Any = None, vector: Any = None,
             n: int | None = None, index: str | None = None, ef: int | None = None):
        """Matching documents, decoded (user types as :class:`~mlwarehouse.codecs.datatypes.Encoded` when
        ``raw``). A cursor: iterate it, or chain ``.sort()``, ``.limit()``, ``.skip()`` as with pymongo.

        With ``like`` (a value for the index's model, a document, or ``{"_id": ...}``) or ``vector``: the ``n``
        (default 10) matching documents nearest to it by vector index ``index`` (default: the first created),
        nearest first, each with ``_score`` (see :meth:`mlwarehouse.vectors.index.VectorIndex.find`); ``ef``: how
        much of the graph a search walks (more: slower, closer to exact)."""
        if like is not None or vector is not None:
            if sort is not None or skip:
                raise QueryError("a vector search is ordered by closeness: it takes no sort or skip")
            return self.vector_index(index).find(filter, projection, like=like, vector=vector,
                                                 n=n if n is not None else (limit or 10), ef=ef, raw=raw)
        if n is not None or ef is not None:
            raise QueryError("n and ef belong to a vector search: pass like= or vector= too")
        return Cursor(self, filter, projection, sort, limit, skip, raw)

    def find_one(self, filter: Mapping | None = None, projection: Mapping | None = None, *, sort=None,
                 raw: bool = False) -> dict | None:
        return next(iter(self.find(filter, projection, sort=sort, limit=1, raw=raw)), None)

    def count_documents(self, filter: Mapping | None = None) -> int:
        return self.table.count(filter or {})

    def estimated_document_count(self) -> int:
        return self.table.count({})

    def distinct(self, key: str, filter: Mapping | None = None) -> list:
        return self.table.distinct(key, filter or {})

    def create_index(self, keys, *, unique: bool = False) -> None:
        """An index on field(s): ``"price"`` or ``[("price", 1), ("name", -1)]``."""
        keys = [(keys, 1)] if isinstance(keys, str) else [tuple(k) for k in keys]
        self._created()
        self.table.create_index(keys, unique=unique)

    # -- updating -----------------------------------------------------------------------------------------
    def update_one(self, filter: Mapping, update: Mapping, *, upsert: bool = False) -> UpdateResult:
        return self._update(filter, update, many=False, upsert=upsert)

    def update_many(self, filter: Mapping, update: Mapping, *, upsert: bool = False) -> UpdateResult:
        return self._update(filter, update, many=True, upsert=upsert)

    def replace_one(self, filter: Mapping, replacement: Mapping, *, upsert: bool = False) -> UpdateResult:
        body = check_user_fields(replacement, "a replacement")
        if any(isinstance(k, str) and k.startswith("$") for k in body):
            raise InvalidDocument("a replacement is a document, not update operators (use update_one)")
        return self._update(filter, body, many=False, upsert=upsert, replace=True)

    def _update(self, filter: Mapping, update: Mapping, *, many: bool, upsert: bool,
                replace: bool = False) -> UpdateResult:
        validate_filter(dict(filter or {}))
        if not replace:
            check_update_paths(update)
            packed_update = {op: {p: self.pack(v) for p, v in fields.items()} if op != "$unset" else fields
                             for op, fields in update.items()}
            apply_update({}, packed_update)  # the operators are checked before anything is read
        else:
            packed_body = self.pack_document(body_without_id(update))
        attached = engine.active(self)
        result, changed = UpdateResult(), []
        scope = dict(filter or {})
        for old in self.table.find(scope, sort=[("_id", 1)], limit=None if many else 1):
            result.matched_count += 1
            if replace and update.get("_id", old["_id"]) != old["_id"]:
                raise InvalidDocument(f"a replacement cannot change _id ({old['_id']!r} to {update['_id']!r})")
            for _ in range(_CAS_TRIES):
                if replace:
                    new = {**packed_body, "_id": old["_id"], "_fold": packed_body.get("_fold", old.get("_fold"))}
                    new.update({k: old[k] for k in ("_outputs", "_listeners") if k in old})
                else:
                    new = apply_update(old, packed_update)
                if outputs.write_revision(self, attached, old, new):
                    if _user_fields(old) != _user_fields(new):
                        result.modified_count += 1
                        changed.append(old["_id"])
                    break
                old = self.table.find_one({"_id": old["_id"], **({"$and": [scope]} if scope else {})})
                if old is None:
                    break
            else:
                raise WarehouseError(f"document {old['_id']!r} kept changing under this update ({_CAS_TRIES} tries)")
        if result.matched_count == 0 and upsert:
            result.upserted_id = self._upsert(scope, update, replace)
        outputs.after_update(self, attached, changed)
        self._wrote()
        return result

    def _upsert(self, scope: dict, update: Mapping, replace: bool) -> str:
        if replace:
            doc = dict(update)
            if isinstance(scope.get("_id"), str):  # as MongoDB: the filter's _id is the new document's
                doc.setdefault("_id", scope["_id"])
        else:
            seed = {k: v for k, v in scope.items() if not k.startswith("$") and not isinstance(v, Mapping)}
            doc = self.unpack(raw=True, tree=apply_update(self.pack(seed), {
                op: {p: self.pack(v) for p, v in f.items()} if op != "$unset" else f for op, f in update.items()}))
        return self.insert_one(doc).inserted_id

    # -- deleting -----------------------------------------------------------------------------------------
    def delete_one(self, filter: Mapping) -> DeleteResult:
        first = self.table.find_one(dict(filter or {}), sort=[("_id", 1)], projection={"_id": 1})
        if first is None:
            return DeleteResult(0)
        deleted = len(self.table.delete({"_id": first["_id"]}))
        self._wrote()
        return DeleteResult(deleted)

    def delete_many(self, filter: Mapping) -> DeleteResult:
        """Delete matching documents: their outputs go with them, and the blobs only they referenced."""
        validate_filter(dict(filter or {}))
        deleted = len(self.table.delete(dict(filter or {})))
        self._wrote()
        return DeleteResult(deleted)

    def drop(self, *, force: bool = False) -> None:
        """Delete every document, listener, vector index and the catalog entry of this collection.

        Refused (DependencyError, nothing deleted) while live things were derived from it outside it (a fit's run,
        a model trained on its documents), unless ``force``; lineage keeps a tombstone of what went."""
        gone = self._lineage_nodes()
        self.project.lineage.check_delete([d["_id"] for docs in gone.values() for d in docs],
                                          f"collection {self.name!r}", force=force)
        for spec in self.vector_indexes():
            self.drop_vector_index(spec["name"])
        for listener in reversed(engine.ordered(engine.active(self))):
            engine.detach(self, listener.name, force=True)
        self.table.delete({})
        self.catalog.forget(self.name)
        self._tombstones(gone)

    # -- listeners ----------------------------------------------------------------------------------------
    def attach(self, name: str, model: Any, *, key: str, where: Mapping | None = None, compute: str = "inline",
               batch_size: int = 64, example_inputs: Any = None, batched: bool | None = None):
        """Attach a model: its output for ``key`` of every matching document, now and after every write.

        ``model`` is a torch module (stored without pickle in the model registry) or an importable callable
        (by import path). ``compute="inline"`` computes in the writing process; ``"workers"`` leaves it to
        ``mlw worker`` processes (through the task queue, in batches of ``batch_size``). Existing documents are
        backfilled (inline: before this returns)."""
        return engine.attach(self, name, model, key=key, where=where, compute=compute, batch_size=batch_size,
                             example_inputs=example_inputs, batched=batched)

    def detach(self, name: str, *, force: bool = False) -> int:
        """Remove a listener and all of its outputs (its dependents' too with ``force``; else refused). A vector
        index over its outputs is refused the same way, and dropped with ``force``."""
        over = [spec["name"] for spec in self.vector_indexes() if spec.get("listener") == name]
        if over and not force:
            raise QueryError(f"vector index {over[0]!r} of collection {self.name!r} reads listener {name!r}'s "
                             f"outputs: drop it first, or detach with force=True")
        gone = self._lineage_nodes(name)
        for index in over:
            self.drop_vector_index(index)
        cleaned = engine.detach(self, name, force=force)
        self._tombstones(gone)
        return cleaned

    def _lineage_nodes(self, listener: str | None = None) -> dict[str, list[dict]]:
        """What a drop (or the detach of ``listener``, with the listeners and indexes that read it) removes, by
        collection: the documents lineage keeps tombstones of."""
        project = self.project
        found: dict[str, list[dict]] = {}
        listeners = project.find(schema.LISTENERS.name, {"collection": self.name})
        indexes = project.find(schema.VECTOR_INDEXES.name, {"collection": self.name}, projection={"snapshot": 0})
        if listener is None:
            found[schema.CATALOG.name] = project.find(schema.CATALOG.name, {"name": self.name})
        else:
            names = {listener}  # with force, the listeners reading its outputs go too (their indexes with them)
            for x in engine.ordered([engine.Listener.from_doc(d) for d in listeners]):
                if names & set(x.upstream):
                    names.add(x.name)
            listeners = [d for d in listeners if d.get("name") in names]
            indexes = [d for d in indexes if d.get("listener") in names]
        found[schema.LISTENERS.name] = listeners
        found[schema.VECTOR_INDEXES.name] = indexes
        return found

    def _tombstones(self, found: dict[str, list[dict]]) -> None:
        """Tombstones of the nodes :meth:`_lineage_nodes` listed that are gone now."""
        for collection, docs in found.items():
            ids = [d["_id"] for d in docs]
            if ids:
                still = {d["_id"] for d in self.project.find(collection, {"_id": {"$in": ids}},
                                                             projection={"_id": 1})}
                self.project.lineage.deleted(collection, [d for d in docs if d["_id"] not in still])

    def listener(self, name: str):
        return engine.get(self, name)

    def listeners(self) -> list:
        return engine.active(self)

    def catch_up(self, name: str | None = None, *, trusted: bool = False) -> int:
        """Compute in this process every pending output (of ``name``, or of every listener in order)."""
        return outputs.catch_up(self, name, trusted=trusted)

    def progress(self, name: str) -> dict:
        """``{"done", "pending", "failed", "skipped"}`` document counts of a listener."""
        return outputs.progress(self, engine.get(self, name))

    def retry(self, name: str) -> int:
        """Put a listener's failed documents back to pending (and compute them if it computes inline)."""
        return outputs.retry(self, engine.get(self, name))

    # -- vector indexes -------------------------------------------------------------------------------------
    def create_vector_index(self, name: str, *, listener: str | None = None, field: str | None = None,
                            metric: str = "cosine", dims: int | None = None, engine: str | None = None,
                            options: Mapping | None = None):
        """A vector index over a listener's outputs (``listener``) or a stored vector ``field``, built now and
        kept current with every write by any process. ``metric``: cosine, ip or l2. ``engine``: ``embedded`` (an
        HNSW graph per process, persisted as blobs) or ``pgvector`` (in PostgreSQL; the default there when the
        extension is installed). ``options``: ``M``, ``ef_construction``, ``ef_search`` of the graph."""
        from mlwarehouse.vectors import spec as specs
        from mlwarehouse.vectors.index import VectorIndex
        self._created()
        spec = specs.create(self, name, listener=listener, field=field, metric=metric, dims=dims, engine=engine,
                            options=options, default_engine=_default_engine(self))
        index = self._vector_indexes[name] = VectorIndex(self, spec)
        self._index_lookups.clear()
        index.backend  # built (or, for pgvector, filled) before this returns
        return index

    def vector_index(self, name: str | None = None):
        """A vector index by name (default: the collection's first). Its definition is looked up again once
        the index's refresh interval has passed (a lookup is a query: every search asks for its index), so
        another process's drop or new default is seen as late as its writes are; this process's at once."""
        from mlwarehouse.vectors import spec as specs
        from mlwarehouse.vectors import tracking
        from mlwarehouse.vectors.index import VectorIndex
        now = time.monotonic()
        looked = self._index_lookups.get(name)
        if looked is not None and now - looked[0] < tracking.REFRESH_SECONDS:
            return looked[1]
        spec = specs.get(self, name)
        held = self._vector_indexes.get(spec.name)
        if held is None or held.spec.id != spec.id:  # dropped and made again by another process
            held = self._vector_indexes[spec.name] = VectorIndex(self, spec)
        self._index_lookups[name] = (now, held)
        return held

    def _wrote(self) -> None:
        """This process wrote: its vector indexes refresh before their next search (read your own writes)."""
        for index in self._vector_indexes.values():
            index.stale = True

    def vector_indexes(self) -> list[dict]:
        """The collection's vector indexes (their definitions), oldest first."""
        from mlwarehouse.vectors import spec as specs
        return [s.describe() for s in specs.listed(self)]

    def drop_vector_index(self, name: str) -> None:
        """Delete a vector index (its stored snapshot and, for pgvector, its table)."""
        from mlwarehouse.vectors import spec as specs
        index = self.vector_index(name)
        if index.spec.engine == "pgvector":
            from mlwarehouse.vectors.pgvector import drop_table
            drop_table(self, index.spec)
        specs.remove(self, name)
        self._vector_indexes.pop(name, None)
        self._index_lookups.clear()

    # -- data types ---------------------------------------------------------------------------------------
    def register_type(self, name: str, encode: Any, decode: Any, *, instance_of: Any = None, description: str = "",
                      replace: bool = False):
        """Register a data type for the project (see :meth:`Catalog.register_type`)."""
        return self.catalog.register_type(name, encode, decode, instance_of=instance_of, description=description,
                                          replace=replace)


def _default_engine(collection) -> str:
    """``pgvector`` on a PostgreSQL index with the extension installed, else ``embedded``."""
    return "pgvector" if collection.project.vector_store() is not None else "embedded"


def body_without_id(doc: Mapping) -> dict:
    return {k: v for k, v in doc.items() if k != "_id"}


def _user_fields(doc: Mapping) -> dict:
    return {k: v for k, v in doc.items() if k not in ("_rev", "_blobs", "_listeners", "_outputs")}


def _first_repeat(ids: list[str]) -> str:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return ids[0]


class Cursor:
    """Matching documents, read lazily in ``_id`` order unless sorted; pymongo's chaining methods."""

    def __init__(self, collection: Collection, filter, projection, sort, limit, skip, raw):
        validate_filter(dict(filter or {}))
        if projection is not None and not isinstance(projection, Mapping):
            if isinstance(projection, (list, tuple)):
                projection = {p: 1 for p in projection}
            else:
                raise QueryError(f"projection must be a dict or a list of fields, not {projection!r}")
        self._c, self._filter, self._projection = collection, dict(filter or {}), projection
        self._sort, self._limit, self._skip, self._raw = sort, limit, skip, raw

    def sort(self, key, direction: int = 1) -> "Cursor":
        self._sort = [(key, direction)] if isinstance(key, str) else list(key)
        return self

    def limit(self, n: int) -> "Cursor":
        self._limit = n or None
        return self

    def skip(self, n: int) -> "Cursor":
        self._skip = n
        return self

    def __iter__(self) -> Iterator[dict]:
        projection = self._projection
        if projection and any(projection.values()):
            projection = {**projection, "_id": projection.get("_id", 1)}
        for tree in self._c.table.find(self._filter, sort=self._sort or [("_id", 1)], limit=self._limit,
                                       skip=self._skip, projection=projection):
            yield strip(self._c.unpack(tree, raw=self._raw), projection)

    def to_list(self) -> list[dict]:
        return list(self)

