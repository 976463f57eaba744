"""Listeners: models attached to a collection, whose outputs every matching document carries.

A listener is (collection, name, key, where, model). Its output for a document is ``doc["_outputs"][key][name]``
and its state ``doc["_listeners"][name]``: ``{"status", "input", "model", "error", "time"}`` with status

- ``done``     the output is current (``input`` is the digest of the packed input it was computed from)
- ``failed``   the model raised on this document (``error`` holds the traceback); the output is removed
- ``skipped``  the document lacks the key or does not match ``where`` (no output)
- missing or ``stale``: pending work

**Nothing is lost, on any clock.** Pending work is a query (the status is none of the three above), not a log read
past a high-water mark, so a write by any process on any machine is found however late it commits. Writers keep
states right in the same compare-and-set that stores the write (:func:`~.outputs.write_revision`): an insert has no
state (pending for every listener, even one attached a moment ago by another process), an update marks ``stale``
exactly the listeners whose input or ``where`` match changed (and any listener it does not know), and an output
written for one listener marks stale the listeners that read it (``key="_outputs.x.embed"``: a dependency graph,
computed in order; a listener runs only on documents whose upstream is done). An output is written only if the
document is unchanged since it was read (``_rev``); otherwise it is recomputed if the input changed, or written
again if not.

Inline listeners compute in the writing process (inserts store the outputs with the documents in one write);
worker listeners are computed by ``mlw worker`` through the task queue (:mod:`mlwarehouse.collections.worker`).
This module attaches and detaches them; :mod:`~.attached` reads them, :mod:`~.outputs` computes and stores outputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mlwarehouse import schema
from mlwarehouse.collections.attached import (
    DONE,
    FAILED,
    LISTENERS,
    SETTLED,
    SKIPPED,
    STALE,
    Listener,
    active,
    get,
    ordered,
)
from mlwarehouse.collections.models import store_model
from mlwarehouse.collections.outputs import CAS_TRIES, catch_up, copy_states, unset_output, write_revision
from mlwarehouse.collections.queueing import enqueue_pending
from mlwarehouse.errors import DuplicateKey, ListenerError, QueryError
from mlwarehouse.ids import utc_now
from mlwarehouse.lineage.nodes import Ref, describe
from mlwarehouse.query.filters import validate_filter
from mlwarehouse.query.jsonvalues import split_path

__all__ = ["Listener", "ListenerError", "attach", "detach", "get", "active", "ordered", "DONE", "FAILED", "SKIPPED",
           "STALE", "SETTLED"]

COMPUTE = ("inline", "workers")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def _upstream_of(key: str, listeners: Sequence[Listener], name: str) -> tuple[str, ...]:
    if not key.startswith("_outputs."):
        return ()
    for x in listeners:
        if key == x.output_path or key.startswith(x.output_path + "."):
            if x.name == name:
                raise QueryError(f"listener {name!r} cannot read its own output {key!r}: a dependency cycle")
            return (x.name,)
    raise QueryError(f"key {key!r} reads an output that no listener of this collection writes "
                     f"(their outputs: {', '.join(x.output_path for x in listeners) or 'none'})")


def _check_graph(new: Listener, others: Sequence[Listener]) -> None:
    graph = {x.name: set(x.upstream) for x in others if x.name != new.name}
    graph[new.name] = set(new.upstream)
    path: list[str] = []

    def walk(node: str) -> None:
        if node in path:
            cycle = " -> ".join(path[path.index(node):] + [node])
            raise QueryError(f"listener {new.name!r} would make a dependency cycle: {cycle}")
        path.append(node)
        for up in graph.get(node, ()):
            walk(up)
        path.pop()
    walk(new.name)
    for x in others:
        if x.name == new.name:
            continue
        a, b = new.output_path, x.output_path
        if a == b or a.startswith(b + ".") or b.startswith(a + "."):
            raise QueryError(f"listener {new.name!r} would write {a!r}, which overlaps {b!r} of listener "
                             f"{x.name!r}; choose another name")


def attach(collection, name: str, model: Any, *, key: str, where: Mapping | None, compute: str, batch_size: int,
           example_inputs: Any = None, batched: bool | None = None) -> Listener:
    if not isinstance(name, str) or not _NAME.match(name):
        raise QueryError(f"a listener name is a letter or '_' then up to 63 letters, digits or '_', not {name!r}")
    split_path(key, "listener key")
    if key.split(".", 1)[0] in ("_listeners", "_rev", "_blobs", "_id") or key == "_outputs":
        raise QueryError(f"a listener cannot read {key!r}")
    if where is not None:
        validate_filter(dict(where))
    if compute not in COMPUTE:
        raise QueryError(f"compute must be 'inline' or 'workers', not {compute!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 0 < batch_size <= 100_000:
        raise QueryError(f"batch_size must be an integer from 1 to 100000, not {batch_size!r}")
    existing = active(collection)
    if any(x.name == name for x in existing):
        raise DuplicateKey(f"collection {collection.name!r} already has a listener {name!r} (detach it first)")
    upstream = _upstream_of(key, existing, name)
    draft = Listener("", collection.name, name, key, dict(where) if where else None, {}, compute, batch_size, batched,
                     upstream)
    _check_graph(draft, existing)
    table = collection.table
    if not upstream and table.count({}) and not table.count({key: {"$exists": True}}):
        raise QueryError(f"no document of collection {collection.name!r} has the field {key!r}: nothing for "
                         f"listener {name!r} to compute (check the key)")
    catalog_record = collection._created()
    ref = store_model(collection, name, model, example_inputs)
    where_text = json.dumps(draft.where, sort_keys=True) if draft.where else None
    doc = {"collection": collection.name, "name": name, "key": key, "where": where_text, "model": ref,
           "compute": compute, "batch_size": batch_size, "batched": batched, "upstream": list(upstream),
           "status": "active", "created": utc_now()}
    try:
        collection.project.insert(LISTENERS, doc)
    except DuplicateKey:
        raise DuplicateKey(f"collection {collection.name!r} already has a listener {name!r}") from None
    listener = Listener.from_doc(doc)
    me = describe(LISTENERS, doc)  # lineage: the registry's model and the collection -> this listener
    edges = [(describe(schema.CATALOG.name, catalog_record), me, "reads")]
    if ref.get("kind") == "torch":
        edges.append((Ref(ref["id"], "model", ref.get("name")), me, "computes"))
    collection.project.lineage.record_many(edges)
    if compute == "inline":
        catch_up(collection, name)
    else:
        enqueue_pending(collection, listener)
    return listener


def detach(collection, name: str, *, force: bool = False) -> int:
    listener = get(collection, name)
    dependents = [x for x in active(collection) if name in x.upstream]
    if dependents and not force:
        raise QueryError(f"listener {name!r} is read by {', '.join(repr(x.name) for x in dependents)}: detach "
                         f"them first, or pass force=True to remove them too")
    cleaned = 0
    for x in dependents:
        cleaned += detach(collection, x.name, force=True)
    collection.project.delete(LISTENERS, {"_id": listener.id})  # first: no writer computes it any more
    for doc in list(collection.table.find({f"_listeners.{name}": {"$exists": True}})):
        cleaned += _clear(collection, listener, doc)
    for doc in list(collection.table.find({listener.output_path: {"$exists": True}})):  # a write in flight
        cleaned += _clear(collection, listener, doc)
    if listener.model.get("kind") == "torch":
        collection.project.models.delete(listener.model["name"])
    collection.project.tasks.cancel({"task_name": schema.LISTENER_TASK, "hyper_parameters.collection":
                                     collection.name, "hyper_parameters.listener": name})
    return cleaned


def _clear(collection, listener: Listener, doc: dict) -> int:
    for _ in range(CAS_TRIES):
        new = copy_states(doc)
        unset_output(new, listener)
        (new.get("_listeners") or {}).pop(listener.name, None)
        if new.get("_listeners") == {}:
            del new["_listeners"]
        if write_revision(collection, [], doc, new, revise=False):
            return 1
        doc = collection.table.find_one({"_id": doc["_id"]})
        if doc is None:
            return 0
    return 0
