"""What a lineage node is: an id with a kind and a name, read from the entity collection that holds its document.

An edge stores the kind and name of both its ends when it is recorded, so a traversal never looks them up again
(and still answers after the documents are gone). Kinds: ``dataset`` (whole or item dataset version), ``run``,
``model``, ``checkpoint``, ``task``, ``collection`` (a users' collection: its catalog record), ``listener``,
``vector_index``; ``unknown`` for an id no collection of the project holds (a dataset id of another warehouse).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from mlwarehouse import schema
from mlwarehouse.errors import QueryError

__all__ = ["Ref", "KINDS", "COLLECTION_OF", "describe", "ref_of", "resolve", "existing"]

UNKNOWN = "unknown"
#: every kind, and the collection whose documents are nodes of that kind
COLLECTION_OF = {
    "dataset": schema.DATASETS.name, "run": schema.RUNS.name, "model": schema.MODELS.name,
    "checkpoint": schema.MODELS.name, "task": schema.TASKS.name, "collection": schema.CATALOG.name,
    "listener": schema.LISTENERS.name, "vector_index": schema.VECTOR_INDEXES.name,
}
KINDS = tuple(COLLECTION_OF)
#: the collections looked in for an id of unknown kind, most likely first
_LOOKUP = (schema.MODELS.name, schema.RUNS.name, schema.DATASETS.name, schema.TASKS.name, schema.CATALOG.name,
           schema.LISTENERS.name, schema.VECTOR_INDEXES.name)
#: the fields :func:`describe` reads
_FIELDS = {"name": 1, "version": 1, "checkpoint": 1, "epoch": 1, "task_name": 1, "collection": 1}
#: record classes whose kind is known without a query (by class name: lineage imports no other domain package)
_CLASSES = {"ModelRecord": schema.MODELS.name, "Run": schema.RUNS.name, "DatasetRecord": schema.DATASETS.name,
            "ItemDataset": schema.DATASETS.name, "Task": schema.TASKS.name}


class Ref(NamedTuple):
    """One end of an edge: its id, kind and name (``None`` where not known yet: looked up when recorded)."""
    id: str
    kind: str | None = None
    name: str | None = None


def describe(collection: str, doc: dict) -> Ref:
    """The node a document of ``collection`` is."""
    ident, name = doc["_id"], doc.get("name")
    if collection == schema.MODELS.name:
        kind = "checkpoint" if doc.get("checkpoint") is True else "model"
        if kind == "checkpoint" and doc.get("epoch") is not None:
            name = f"{name} epoch {doc['epoch']}"
        return Ref(ident, kind, name)
    if collection == schema.DATASETS.name:
        version = doc.get("version")
        return Ref(ident, "dataset", name if version is None else f"{name} v{version}")
    if collection == schema.TASKS.name:
        return Ref(ident, "task", doc.get("task_name"))
    if collection in (schema.LISTENERS.name, schema.VECTOR_INDEXES.name):
        kind = "listener" if collection == schema.LISTENERS.name else "vector_index"
        return Ref(ident, kind, f"{doc.get('collection')}.{name}")
    kind = {schema.RUNS.name: "run", schema.CATALOG.name: "collection"}.get(collection, UNKNOWN)
    return Ref(ident, kind, name)


def ref_of(x: Any) -> Ref:
    """A node given as an id, a record (``.id``, and ``.doc`` for the warehouse's records), a document (``_id``)
    or a :class:`Ref`; its kind is filled in where the object tells it."""
    if isinstance(x, Ref):
        return x
    if isinstance(x, str) and x:
        return Ref(x)
    if isinstance(x, dict) and isinstance(x.get("_id"), str):
        return Ref(x["_id"])
    catalog = getattr(x, "catalog", None)
    if type(x).__name__ == "Collection" and catalog is not None:  # a users' collection: its catalog record
        return describe(schema.CATALOG.name, catalog.record(x.name, create=True))
    ident = getattr(x, "id", None)
    if not isinstance(ident, str) or not ident:
        raise QueryError(f"a lineage node is an id, a record with .id or a document with _id, not "
                         f"{type(x).__name__}")
    doc = getattr(x, "doc", None)
    collection = _CLASSES.get(type(x).__name__)
    if collection is not None and isinstance(doc, dict) and doc.get("_id") == ident:
        return describe(collection, doc)
    kind = {"Listener": "listener", "VectorIndexSpec": "vector_index"}.get(type(x).__name__)
    if kind is not None:
        return Ref(ident, kind, f"{getattr(x, 'collection', None)}.{getattr(x, 'name', None)}")
    return Ref(ident)


def resolve(project, refs: Iterable[Ref]) -> dict[str, Ref]:
    """Every ref complete: those missing a kind or name are looked up (one ``$in`` query per collection, only
    while some are still unknown); an id found nowhere keeps the kind it was given, else ``unknown``."""
    out: dict[str, Ref] = {}
    todo: dict[str, Ref] = {}
    for ref in refs:
        if ref.kind is not None and ref.name is not None:
            out[ref.id] = ref
        elif ref.id not in out:
            todo[ref.id] = ref
    for collection in _LOOKUP:
        if not todo:
            break
        wanted = [i for i, r in todo.items() if r.kind is None or COLLECTION_OF.get(r.kind) == collection]
        for start in range(0, len(wanted), 5000):
            chunk = wanted[start:start + 5000]
            for doc in project.find(collection, {"_id": {"$in": chunk}}, projection=_FIELDS):
                out[doc["_id"]] = describe(collection, doc)
                todo.pop(doc["_id"], None)
    for ident, ref in todo.items():
        out[ident] = Ref(ident, ref.kind or UNKNOWN, ref.name)
    return out


def existing(project, refs: Iterable[Ref]) -> set[str]:
    """The ids among ``refs`` whose documents still exist (one ``$in`` query per collection involved)."""
    by_collection: dict[str, list[str]] = {}
    for ref in refs:
        collection = COLLECTION_OF.get(ref.kind or "")
        if collection is not None:
            by_collection.setdefault(collection, []).append(ref.id)
    found: set[str] = set()
    for collection, ids in by_collection.items():
        for start in range(0, len(ids), 5000):
            chunk = ids[start:start + 5000]
            found.update(d["_id"] for d in project.find(collection, {"_id": {"$in": chunk}}, projection={"_id": 1}))
    return found
