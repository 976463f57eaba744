"""The listeners attached to a collection: the stored record (:class:`Listener`), read fresh on every use, in the
order their outputs feed each other, and the states a document's ``_listeners`` holds for each."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mlwarehouse import schema
from mlwarehouse.errors import NotFound

__all__ = ["Listener", "active", "get", "ordered", "LISTENERS", "DONE", "FAILED", "SKIPPED", "STALE", "SETTLED"]

LISTENERS = schema.LISTENERS.name
DONE, FAILED, SKIPPED, STALE = "done", "failed", "skipped", "stale"
SETTLED = [DONE, FAILED, SKIPPED]


@dataclass(frozen=True)
class Listener:
    """A model attached to a collection (the stored record, read back)."""
    id: str
    collection: str
    name: str
    key: str
    where: dict | None
    model: dict
    compute: str
    batch_size: int
    batched: bool | None
    upstream: tuple[str, ...]

    @classmethod
    def from_doc(cls, doc: Mapping) -> "Listener":
        where = doc.get("where")  # stored as JSON text: a filter's "$" keys cannot be document fields
        where = json.loads(where) if isinstance(where, str) else where
        return cls(doc["_id"], doc["collection"], doc["name"], doc["key"], where, doc["model"],
                   doc.get("compute", "inline"), int(doc.get("batch_size") or 64), doc.get("batched"),
                   tuple(doc.get("upstream") or ()))

    @property
    def output_path(self) -> str:
        return f"_outputs.{self.key}.{self.name}"

    @property
    def pending(self) -> dict:
        """The query of this listener's pending documents (its upstream listeners done)."""
        flt: dict = {f"_listeners.{self.name}.status": {"$nin": SETTLED}}
        for up in self.upstream:
            flt[f"_listeners.{up}.status"] = DONE
        return flt


def active(collection) -> list[Listener]:
    """The collection's listeners, read fresh (another process may have attached one a moment ago)."""
    docs = collection.project.find(LISTENERS, {"collection": collection.name}, sort=[("_id", 1)])
    return [Listener.from_doc(d) for d in docs]


def get(collection, name: str) -> Listener:
    doc = collection.project.find_one(LISTENERS, {"collection": collection.name, "name": name})
    if doc is None:
        names = ", ".join(repr(x.name) for x in active(collection)) or "none"
        raise NotFound(f"no listener {name!r} on collection {collection.name!r} (attached: {names})")
    return Listener.from_doc(doc)


def ordered(listeners: Sequence[Listener]) -> list[Listener]:
    """Upstream listeners before the ones that read their outputs."""
    by_name, out, seen = {x.name: x for x in listeners}, [], set()

    def visit(x: Listener) -> None:
        if x.name in seen:
            return
        seen.add(x.name)
        for up in x.upstream:
            if up in by_name:
                visit(by_name[up])
        out.append(x)
    for x in listeners:
        visit(x)
    return out
