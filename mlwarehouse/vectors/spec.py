"""Vector index definitions: which vectors of a collection an index holds, how it measures, where it lives.

One document per index in ``schema.VECTOR_INDEXES``: its name (unique per collection), the field its vectors are
read from (a listener's output ``_outputs.<key>.<listener>``, or any stored vector field), the metric, the
dimension (learned from the first vector when not given), the engine (``embedded``: an ANN graph in each searching
process, persisted as blobs; ``pgvector``: the vectors in PostgreSQL) and the engine's options. The persisted
snapshot of an embedded index is a field of the same document (see :mod:`mlwarehouse.vectors.mirror`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlwarehouse import schema
from mlwarehouse.errors import DuplicateKey, NotFound, VectorIndexError
from mlwarehouse.ids import utc_now
from mlwarehouse.lineage.nodes import describe
from mlwarehouse.query.jsonvalues import split_path

__all__ = ["VectorIndexSpec", "METRICS", "ENGINES", "create", "get", "find", "listed", "remove"]

VECTOR_INDEXES = schema.VECTOR_INDEXES.name
#: cosine similarity (vectors normalised), inner product, Euclidean distance
METRICS = ("cosine", "ip", "l2")
ENGINES = ("embedded", "pgvector")
_ALIASES = {"dot": "ip", "inner_product": "ip", "euclidean": "l2", "cos": "cosine"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
#: graph options: M=16 and ef_construction=200 reach recall@10 0.97 at ef 48 on 1M x 128 clustered vectors, with
#: a third less memory and build time than M=32 (``benchmarks/vectors.py``); searches take ef 64 unless told
DEFAULT_OPTIONS = {"M": 16, "ef_construction": 200, "ef_search": 64}
MAX_DIMS = 16_000
#: the most filters that one vector index keeps an index of their own for (see ``VectorIndex.index_filter``)
MAX_FILTER_INDEXES = 8


@dataclass(frozen=True)
class VectorIndexSpec:
    """A vector index of a collection (the stored record, read back)."""
    id: str
    collection: str
    name: str
    path: str
    listener: str | None
    metric: str
    dims: int | None
    engine: str
    options: dict = field(default_factory=dict)

    @classmethod
    def from_doc(cls, doc: Mapping) -> "VectorIndexSpec":
        return cls(doc["_id"], doc["collection"], doc["name"], doc["path"], doc.get("listener"), doc["metric"],
                   doc.get("dims"), doc.get("engine", "embedded"), {**DEFAULT_OPTIONS, **(doc.get("options") or {})})

    def describe(self) -> dict:
        return {"name": self.name, "collection": self.collection, "path": self.path, "listener": self.listener,
                "metric": self.metric, "dims": self.dims, "engine": self.engine, "options": dict(self.options)}


def check_metric(metric: Any) -> str:
    metric = _ALIASES.get(metric, metric)
    if metric not in METRICS:
        raise VectorIndexError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    return metric


def _check_options(options: Mapping | None) -> dict:
    out = {}
    for key, value in (options or {}).items():
        if key not in DEFAULT_OPTIONS:
            raise VectorIndexError(f"unknown vector index option {key!r} (known: {', '.join(DEFAULT_OPTIONS)})")
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 4096:
            raise VectorIndexError(f"option {key} must be an integer from 2 to 4096, not {value!r}")
        out[key] = value
    return out


def create(collection, name: str, *, listener: str | None = None, field: str | None = None,
           metric: str = "cosine", dims: int | None = None, engine: str | None = None,
           options: Mapping | None = None, default_engine: str = "embedded") -> VectorIndexSpec:
    """Record a new index over a listener's outputs (``listener``) or a stored vector ``field``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise VectorIndexError(f"a vector index name is a letter or '_' then up to 63 letters, digits or '_', "
                               f"not {name!r}")
    if (listener is None) == (field is None):
        raise VectorIndexError("a vector index reads either a listener's outputs (listener=) or a field (field=)")
    if listener is not None:
        path = collection.listener(listener).output_path  # NotFound names the attached listeners
    else:
        split_path(field, "vector field")
        if field.split(".", 1)[0] in ("_id", "_rev", "_blobs", "_listeners"):
            raise VectorIndexError(f"a vector index cannot read {field!r}")
        path = field
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 0 < dims <= MAX_DIMS):
        raise VectorIndexError(f"dims must be an integer from 1 to {MAX_DIMS}, not {dims!r}")
    engine = engine or default_engine
    if engine not in ENGINES:
        raise VectorIndexError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    project = collection.project
    project.ensure(schema.VECTOR_INDEXES)
    doc = {"collection": collection.name, "name": name, "path": path, "listener": listener,
           "metric": check_metric(metric), "dims": dims, "engine": engine, "options": _check_options(options),
           "snapshot": None, "created": utc_now()}
    try:
        project.insert(VECTOR_INDEXES, doc)
    except DuplicateKey:
        raise DuplicateKey(f"collection {collection.name!r} already has a vector index {name!r}") from None
    _record_lineage(collection, doc, listener)
    return VectorIndexSpec.from_doc(doc)


def _record_lineage(collection, doc: dict, listener: str | None) -> None:
    """The edge listener -> vector index (or collection -> vector index, for an index over a stored field)."""
    project = collection.project
    if listener is not None:
        source = project.find_one(schema.LISTENERS.name, {"collection": collection.name, "name": listener})
        source = source and describe(schema.LISTENERS.name, source)
    else:
        source = project.find_one(schema.CATALOG.name, {"name": collection.name})
        source = source and describe(schema.CATALOG.name, source)
    if source:
        project.lineage.record(source, describe(VECTOR_INDEXES, doc), "indexes")


def find(collection, name: str) -> dict | None:
    """The stored record of an index (with its snapshot), or None."""
    return collection.project.find_one(VECTOR_INDEXES, {"collection": collection.name, "name": name})


def get(collection, name: str | None = None) -> VectorIndexSpec:
    """An index by name; without a name, the collection's only (or first created) index."""
    if name is None:
        specs = listed(collection)
        if not specs:
            raise NotFound(f"collection {collection.name!r} has no vector index (create_vector_index first)")
        return specs[0]
    doc = find(collection, name)
    if doc is None:
        names = ", ".join(repr(s.name) for s in listed(collection)) or "none"
        raise NotFound(f"no vector index {name!r} on collection {collection.name!r} (indexes: {names})")
    return VectorIndexSpec.from_doc(doc)


def listed(collection) -> list[VectorIndexSpec]:
    """The collection's indexes, oldest first (the first is the default)."""
    docs = collection.project.find(VECTOR_INDEXES, {"collection": collection.name}, sort=[("created", 1), ("_id", 1)],
                                   projection={"snapshot": 0})
    return [VectorIndexSpec.from_doc(d) for d in docs]


def filters(collection, spec: VectorIndexSpec) -> list[dict]:
    """The filters the index keeps an index of their own for, in the order they were asked for (stored as JSON
    text: a document's keys never start with ``$``, a filter's may)."""
    return filters_of(collection.project.find_one(VECTOR_INDEXES, {"_id": spec.id}, projection={"filters": 1}))


def filters_of(record: Mapping | None) -> list[dict]:
    """The filters of an index's stored record (see :func:`filters`)."""
    return [json.loads(text) for text in (record or {}).get("filters") or []]


def add_filter(collection, spec: VectorIndexSpec, flt: dict) -> list[dict]:
    """Record ``flt`` among the index's filters (once; at most :data:`MAX_FILTER_INDEXES`); returns them all."""
    held = filters(collection, spec)
    if flt not in held and len(held) >= MAX_FILTER_INDEXES:
        raise VectorIndexError(f"vector index {spec.name!r} has {len(held)} filter indexes, the most it keeps: "
                               f"forget_filter one of {held} first")
    collection.project.update(VECTOR_INDEXES, {"_id": spec.id}, {"$addToSet": {"filters": _text(flt)}})
    return filters(collection, spec)


def remove_filter(collection, spec: VectorIndexSpec, flt: dict) -> list[dict]:
    """Forget ``flt`` (NotFound when the index has no such filter); returns the filters left."""
    held = filters(collection, spec)
    if flt not in held:
        raise NotFound(f"vector index {spec.name!r} has no filter index for {flt!r} (it has {held})")
    collection.project.update(VECTOR_INDEXES, {"_id": spec.id},
                              {"$set": {"filters": [_text(f) for f in held if f != flt]}})
    return filters(collection, spec)


def _text(flt: dict) -> str:
    return json.dumps(flt, sort_keys=True, separators=(",", ":"), default=str)


def set_dims(collection, spec: VectorIndexSpec, dims: int) -> VectorIndexSpec:
    """Record the dimension learned from the first vector (once: a later, different one is refused elsewhere)."""
    collection.project.update(VECTOR_INDEXES, {"_id": spec.id, "dims": None}, {"$set": {"dims": dims}})
    return get(collection, spec.name)


def remove(collection, name: str) -> dict:
    """Delete an index's record (its snapshot's blobs are released with it); returns the record."""
    deleted = collection.project.delete(VECTOR_INDEXES, {"collection": collection.name, "name": name})
    if not deleted:
        raise NotFound(f"no vector index {name!r} on collection {collection.name!r}")
    return deleted[0]
