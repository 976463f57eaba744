"""Lineage: edges from what a thing came from to what was made from it, and queries both ways.

An edge (collection :data:`mlwarehouse.schema.LINEAGE`) says ``src`` is upstream of ``dst`` by a ``relation``:

    dataset  -input->     run        runs.start(datasets=...), run.use_datasets, datasets.load inside a run
    task     -ran->       run        runs.start(task=...) (what a worker's task child does)
    run      -produced->  model      models.save / models.checkpoint (kind "checkpoint" for checkpoints)
    dataset  -trained_on-> model     models.save(dataset=...)
    model    -computes->  listener   a collection's listener whose torch model is in the registry
    collection -reads->   listener   (the collection's catalog record)
    listener -indexes->   vector_index, or collection -indexes-> vector_index for an index over a stored field

Edges are idempotent per (src, dst, relation) and keep each end's kind and name as recorded, so traversals
never look a node up: :meth:`Lineage.upstream` and :meth:`Lineage.downstream` walk breadth first, one indexed
``$in`` query per level (depth 10 is at most 10 queries, plus one for tombstones), whatever the fan-out.

Deletes: :meth:`Lineage.check_delete` refuses (:class:`~mlwarehouse.errors.DependencyError`) a delete of
something live things were derived from (a direct downstream node whose document still exists; checkpoints do
not hold their run back) unless forced; :meth:`Lineage.deleted` then leaves a tombstone
(:data:`mlwarehouse.schema.LINEAGE_DELETED`: id, kind, name, deleted time) for each deleted node that has edges, so
lineage keeps answering with ``deleted=True``. Checkpoints pruned by a retention policy are forgotten instead
(:meth:`Lineage.forget`: their edges go), since they were never meant to be kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlwarehouse import schema
from mlwarehouse.errors import DependencyError, DuplicateKey, QueryError
from mlwarehouse.ids import utc_now
from mlwarehouse.lineage.nodes import Ref, describe, existing, ref_of, resolve

__all__ = ["Lineage", "Node", "Edge", "Ref", "NOT_BLOCKING"]

EDGES = schema.LINEAGE.name
DELETED = schema.LINEAGE_DELETED.name
#: kinds of downstream nodes that never hold a delete back (a run's checkpoints go with their run's history)
NOT_BLOCKING = frozenset({"checkpoint", "unknown"})
_CHUNK = 5000
_MAX_DEPTH = 100
_RELATION_MAX = 64
_FIELDS_MAX = 1 << 16


@dataclass(frozen=True)
class Node:
    """A node reached by a traversal: ``distance`` edges away, through ``relation`` from the node ``via``."""
    id: str
    kind: str
    name: str | None
    distance: int
    relation: str
    via: str
    deleted: bool = False

    def as_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "name": self.name, "distance": self.distance,
                "relation": self.relation, "via": self.via, "deleted": self.deleted}


@dataclass(frozen=True)
class Edge:
    """One stored edge: ``src`` upstream of ``dst``."""
    src: str
    dst: str
    relation: str
    src_kind: str
    dst_kind: str
    src_name: str | None = None
    dst_name: str | None = None
    fields: dict = field(default_factory=dict)
    time: str | None = None

    @classmethod
    def from_doc(cls, doc: dict) -> "Edge":
        return cls(doc["src"], doc["dst"], doc["relation"], doc.get("src_kind") or "unknown",
                   doc.get("dst_kind") or "unknown", doc.get("src_name"), doc.get("dst_name"),
                   _fields_of(doc.get("fields")), doc.get("time"))


class Lineage:
    """The lineage of one project (``project.lineage``, ``wh.lineage``)."""

    def __init__(self, project):
        self.project = project
        self._ready = False

    def _ensure(self) -> None:
        if not self._ready:  # writes only: a read of a warehouse without lineage finds nothing, creates nothing
            self.project.ensure(schema.LINEAGE)
            self.project.ensure(schema.LINEAGE_DELETED)
            self._ready = True

    # -- recording -----------------------------------------------------------------------------------------
    def record(self, source: Any, target: Any, relation: str, **fields) -> None:
        """Record that ``source`` is upstream of ``target`` (ids, records with ``.id`` or documents with ``_id``);
        ``fields`` are small JSON extras kept on the edge. Recording the same edge again adds nothing but the
        fields it brings (merged into the stored edge's)."""
        self.record_many([(source, target, relation, fields)])

    def record_many(self, edges: Iterable[Sequence]) -> int:
        """Record ``(source, target, relation)`` tuples (a fourth item: the fields dict); returns how many edges
        it wrote (a batch that met stored edges on a backend writing in chunks may count fewer). Nodes whose kind
        or name is not known from the object are looked up, once per batch."""
        rows: dict[tuple[str, str, str], tuple[Ref, Ref, dict]] = {}
        for edge in edges:
            if len(edge) not in (3, 4):
                raise QueryError(f"an edge is (source, target, relation[, fields]), not {edge!r}")
            src, dst, relation = ref_of(edge[0]), ref_of(edge[1]), edge[2]
            extra = dict(edge[3]) if len(edge) == 4 and edge[3] else {}
            if not isinstance(relation, str) or not relation or len(relation) > _RELATION_MAX:
                raise QueryError(f"a relation is a non-empty string of at most {_RELATION_MAX} characters, "
                                 f"not {relation!r}")
            if src.id == dst.id:
                raise QueryError(f"a node cannot be upstream of itself ({src.id!r})")
            rows.setdefault((src.id, dst.id, relation), (src, dst, extra))
        if not rows:
            return 0
        refs = resolve(self.project, [r for src, dst, _ in rows.values() for r in (src, dst)])
        self._ensure()
        docs = {}
        for key, (src, dst, extra) in rows.items():
            src, dst = _merge(src, refs[src.id]), _merge(dst, refs[dst.id])
            doc = {"src": src.id, "dst": dst.id, "relation": key[2], "src_kind": src.kind, "dst_kind": dst.kind,
                   "src_name": src.name, "dst_name": dst.name}
            if extra:  # JSON text: a fold spec's filter has "$" keys, which a document field may not have
                doc["fields"] = _fields_text(extra)
            docs[key] = doc
        # new edges (what the hooks record) are written at once; the unique index on (project, src, dst,
        # relation) says when some were there already: then only the missing ones, one by one if racing
        try:
            return self.project.insert_many(EDGES, [dict(d) for d in docs.values()])
        except DuplicateKey:
            pass
        stored = self._stored(list(docs))
        for key, old in stored.items():
            if rows[key][2]:
                self._add_fields(key, old, rows[key][2])
        missing = [doc for key, doc in docs.items() if key not in stored]
        return self._insert_new(EDGES, missing)

    def _stored(self, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], dict]:
        """The stored edges among the (src, dst, relation) keys: their extra fields by key."""
        wanted, have = set(keys), {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            dsts = sorted({k[1] for k in chunk})
            flt = {"dst": dsts[0]} if len(dsts) == 1 else {"dst": {"$in": dsts}}
            for doc in self.project.find(EDGES, flt, projection={"src": 1, "dst": 1, "relation": 1, "fields": 1}):
                key = (doc["src"], doc["dst"], doc["relation"])
                if key in wanted:
                    have[key] = _fields_of(doc.get("fields"))
        return have

    def _add_fields(self, key: tuple[str, str, str], old: dict, new: dict) -> None:
        """An edge recorded again with fields it lacked (or changed): the stored edge gets them."""
        merged = {**old, **new}
        if merged != old:
            self.project.update(EDGES, {"src": key[0], "dst": key[1], "relation": key[2]},
                                {"$set": {"fields": _fields_text(merged)}})

    # -- traversals ----------------------------------------------------------------------------------------
    def upstream(self, x: Any, depth: int = 10) -> list[Node]:
        """Everything ``x`` came from, to ``depth`` edges: nearest first, each node once."""
        return self._walk(ref_of(x).id, depth, forward=False)

    def downstream(self, x: Any, depth: int = 10) -> list[Node]:
        """Everything made from ``x``, to ``depth`` edges: nearest first, each node once."""
        return self._walk(ref_of(x).id, depth, forward=True)

    def impact(self, x: Any, depth: int = 10) -> list[Node]:
        """What deleting ``x`` would orphan: the live (not deleted) nodes downstream of it."""
        return [n for n in self.downstream(x, depth) if not n.deleted]

    def edges(self, x: Any) -> list[Edge]:
        """The edges that touch ``x``, both directions (upstream ones first, oldest first)."""
        ident = ref_of(x).id
        up = self.project.find(EDGES, {"dst": ident}, sort=[("_id", 1)])
        down = self.project.find(EDGES, {"src": ident}, sort=[("_id", 1)])
        return [Edge.from_doc(d) for d in up + down]

    def node(self, x: Any) -> Ref | None:
        """``x``'s kind and name, from its document, its tombstone or an edge that touches it; None if unknown."""
        ref = ref_of(x)
        found = resolve(self.project, [ref])[ref.id]
        if found.kind != "unknown":
            return found
        tomb = self.project.find_one(DELETED, {"_id": ref.id})
        if tomb is not None:
            return Ref(ref.id, tomb.get("kind") or "unknown", tomb.get("name"))
        for key in ("src", "dst"):
            doc = self.project.find_one(EDGES, {key: ref.id})
            if doc is not None:
                return Ref(ref.id, doc.get(f"{key}_kind") or "unknown", doc.get(f"{key}_name"))
        return None

    def _walk(self, start: str, depth: int, *, forward: bool) -> list[Node]:
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= _MAX_DEPTH:
            raise QueryError(f"depth must be an integer from 0 to {_MAX_DEPTH}, not {depth!r}")
        near, far = ("src", "dst") if forward else ("dst", "src")
        wanted = {far: 1, f"{far}_kind": 1, f"{far}_name": 1, "relation": 1, near: 1}
        seen, frontier, found = {start}, [start], []
        for distance in range(1, depth + 1):
            if not frontier:
                break
            level: dict[str, Node] = {}
            for start_at in range(0, len(frontier), _CHUNK):
                chunk = frontier[start_at:start_at + _CHUNK]
                flt = {near: chunk[0]} if len(chunk) == 1 else {near: {"$in": chunk}}
                for doc in self.project.find(EDGES, flt, projection=wanted):
                    ident = doc[far]
                    if ident in seen:
                        continue
                    node = Node(ident, doc.get(f"{far}_kind") or "unknown", doc.get(f"{far}_name"), distance,
                                doc["relation"], doc[near])
                    if ident not in level or (node.relation, node.via) < (level[ident].relation, level[ident].via):
                        level[ident] = node
            ordered = sorted(level.values(), key=lambda n: (n.kind, n.name or "", n.id))
            seen.update(level)
            found.extend(ordered)
            frontier = [n.id for n in ordered]
        return self._marked(found)

    def _marked(self, nodes: list[Node]) -> list[Node]:
        """``nodes`` with ``deleted`` set from the tombstones (one query per 5,000 nodes)."""
        if not nodes:
            return nodes
        ids = [n.id for n in nodes]
        gone: dict[str, dict] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            for doc in self.project.find(DELETED, {"_id": {"$in": chunk}}, projection={"_id": 1}):
                gone[doc["_id"]] = doc
        if not gone:
            return nodes
        return [Node(n.id, n.kind, n.name, n.distance, n.relation, n.via, True) if n.id in gone else n
                for n in nodes]

    # -- deletes -------------------------------------------------------------------------------------------
    def dependents(self, ids: Iterable[str]) -> list[Node]:
        """The live nodes directly derived from any of ``ids`` (outside ``ids``) that hold a delete back:
        their document still exists and they are not checkpoints."""
        doomed = list(dict.fromkeys(ids))
        skip = set(doomed)
        direct: dict[str, Node] = {}
        for start in range(0, len(doomed), _CHUNK):
            chunk = doomed[start:start + _CHUNK]
            for doc in self.project.find(EDGES, {"src": {"$in": chunk}},
                                         projection={"src": 1, "dst": 1, "dst_kind": 1, "dst_name": 1,
                                                     "relation": 1}):
                kind = doc.get("dst_kind") or "unknown"
                if doc["dst"] in skip or kind in NOT_BLOCKING or doc["dst"] in direct:
                    continue
                direct[doc["dst"]] = Node(doc["dst"], kind, doc.get("dst_name"), 1, doc["relation"], doc["src"])
        if not direct:
            return []
        alive = existing(self.project, [Ref(n.id, n.kind) for n in direct.values()])
        return sorted((n for n in direct.values() if n.id in alive), key=lambda n: (n.kind, n.name or "", n.id))

    def check_delete(self, ids: Iterable[str], what: str, *, force: bool = False) -> None:
        """Refuse (DependencyError) a delete of ``ids`` that would orphan live things derived from them, unless
        ``force``. ``what`` names the deleted things in the message ("model 'mlp'")."""
        if force:
            return
        blocking = self.dependents(ids)
        if blocking:
            shown = ", ".join(f"{n.kind} {n.name or ''} {n.id} ({n.relation} from {n.via})".replace("  ", " ")
                              for n in blocking[:5])
            more = f" and {len(blocking) - 5} more" if len(blocking) > 5 else ""
            raise DependencyError(f"cannot delete {what}: {shown}{more} derived from it; delete those first, or "
                                  f"pass force=True (lineage keeps a tombstone)", blocking)

    def delete(self, collection: str, flt: dict, what: str, *, force: bool = False) -> list[dict]:
        """Delete the documents of ``collection`` matching ``flt`` as a registry does: refused (DependencyError)
        when live things were derived from them unless ``force``, with a tombstone for each that has edges."""
        if not force:
            self.check_delete([d["_id"] for d in self.project.find(collection, flt, projection={"_id": 1})], what)
        deleted = self.project.delete(collection, flt)
        self.deleted(collection, deleted)
        return deleted

    def deleted(self, collection: str, docs: Iterable[dict]) -> int:
        """Leave a tombstone for each deleted document of ``collection`` that has lineage edges; returns how many."""
        refs = {d["_id"]: describe(collection, d) for d in docs if isinstance(d.get("_id"), str)}
        if not refs:
            return 0
        linked: set[str] = set()
        ids = list(refs)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            for key in ("src", "dst"):
                linked.update(d[key] for d in self.project.find(EDGES, {key: {"$in": chunk}}, projection={key: 1}))
        if not linked:
            return 0
        self._ensure()
        when = utc_now()
        tombs = [{"_id": i, "kind": refs[i].kind, "name": refs[i].name, "deleted": when} for i in ids if i in linked]
        return self._insert_new(DELETED, tombs)

    def _insert_new(self, collection: str, docs: list[dict]) -> int:
        """Insert ``docs``, skipping those another process inserted meanwhile (a unique key); how many went in."""
        try:
            return self.project.insert_many(collection, [dict(d) for d in docs])
        except DuplicateKey:
            added = 0
            for doc in docs:
                try:
                    self.project.insert(collection, dict(doc))
                    added += 1
                except DuplicateKey:
                    pass
            return added

    def tombstones(self, ids: Iterable[str] | None = None) -> list[dict]:
        """The tombstones of these ids (all of this project's if None)."""
        if ids is None:
            return self.project.find(DELETED, sort=[("_id", 1)])
        ids = list(ids)
        return [d for start in range(0, len(ids), _CHUNK)
                for d in self.project.find(DELETED, {"_id": {"$in": ids[start:start + _CHUNK]}})]

    def forget(self, ids: Iterable[str]) -> int:
        """Delete every edge that touches ``ids`` (checkpoints pruned by retention); returns how many went."""
        ids = list(dict.fromkeys(ids))
        gone = 0
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            for key in ("src", "dst"):
                gone += len(self.project.delete(EDGES, {key: {"$in": chunk}}))
        return gone

    def __repr__(self) -> str:
        return f"<Lineage of {self.project.name!r}>"


def _fields_of(stored: Any) -> dict:
    """An edge's extra fields as stored (JSON text) back to a dict."""
    if isinstance(stored, str):
        value = json.loads(stored)
        return value if isinstance(value, dict) else {}
    return dict(stored) if isinstance(stored, dict) else {}


def _fields_text(extra: dict) -> str:
    """An edge's extra fields as compact JSON (numpy scalars and arrays as numbers and lists); at most 64 KiB."""
    def plain(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        raise QueryError(f"lineage fields must be JSON values, not {type(value).__name__}")
    try:
        text = json.dumps(extra, sort_keys=True, separators=(",", ":"), default=plain, allow_nan=False)
    except ValueError as exc:  # NaN or infinity
        raise QueryError(f"lineage fields must be JSON values: {exc}") from None
    if len(text) > _FIELDS_MAX:
        raise QueryError(f"lineage fields are small extras: {len(text)} characters of JSON exceed {_FIELDS_MAX}")
    return text


def _merge(given: Ref, found: Ref) -> Ref:
    """What the caller said of a node, completed by what was looked up (a document's kind wins over a guess)."""
    kind = found.kind if found.kind not in (None, "unknown") else (given.kind or "unknown")
    return Ref(given.id, kind, given.name if given.name is not None else found.name)
