"""Listeners: models attached to a collection, whose outputs every matching document carries.

A listener is (collection, name, key, where, model). Its output for a document is ``doc["_outputs"][key][name]``
and its state ``doc["_listeners"][name]``: ``{"status", "input", "model", "error", "time"}`` with status

- ``done``     the output is current (``input`` is the digest of the packed input it was computed from)
- ``failed``   the model raised on this document (``error`` holds the traceback); the output is removed
- ``skipped``  the document lacks the key or does not match ``where`` (no output)
- missing or ``stale``: pending work

**Nothing is lost, on any clock.** Pending work is a query (the status is none of the three above), not a log read
past a high-water mark, so a write by any process on any machine is found however late it commits. Writers keep
states right in the same compare-and-set that stores the write (:func:`write_revision`): an insert has no state
(pending for every listener, even one attached a moment ago by another process), an update marks ``stale`` exactly
the listeners whose input or ``where`` match changed (and any listener it does not know), and an output written for
one listener marks stale the listeners that read it (``key="_outputs.x.embed"``: a dependency graph, computed in
order; a listener runs only on documents whose upstream is done). An output is written only if the document is
unchanged since it was read (``_rev``); otherwise it is recomputed if the input changed, or written again if not.

Inline listeners compute in the writing process (inserts store the outputs with the documents in one write);
worker listeners are computed by ``mlw worker`` through the task queue (:mod:`mlwarehouse.collections.worker`).
"""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlwarehouse import schema
from mlwarehouse.codecs import values
from mlwarehouse.codecs.datatypes import Encoded
from mlwarehouse.collections.documents import MISSING, digest, document_size, get_path
from mlwarehouse.collections.models import Runner, model_ref, store_model
from mlwarehouse.collections.queueing import enqueue, enqueue_pending
from mlwarehouse.errors import DuplicateKey, ListenerError, NotFound, QueryError
from mlwarehouse.ids import new_id, utc_now
from mlwarehouse.lineage.nodes import Ref, describe
from mlwarehouse.query.documents import copy_json
from mlwarehouse.query.filters import matches, validate_filter
from mlwarehouse.query.jsonvalues import split_path

__all__ = ["Listener", "ListenerError", "attach", "detach", "get", "active", "catch_up", "progress", "process"]

LISTENERS = schema.LISTENERS.name
DONE, FAILED, SKIPPED, STALE = "done", "failed", "skipped", "stale"
SETTLED = [DONE, FAILED, SKIPPED]
COMPUTE = ("inline", "workers")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_ERROR_TAIL = 8192
_CAS_TRIES = 20


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


# -- the catalog of listeners ------------------------------------------------------------------------------------

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
    for _ in range(_CAS_TRIES):
        new = _copy(doc)
        _unset_output(new, listener)
        (new.get("_listeners") or {}).pop(listener.name, None)
        if new.get("_listeners") == {}:
            del new["_listeners"]
        if write_revision(collection, [], doc, new, revise=False):
            return 1
        doc = collection.table.find_one({"_id": doc["_id"]})
        if doc is None:
            return 0
    return 0


# -- writes by users: revisions ----------------------------------------------------------------------------------

def write_revision(collection, attached: Sequence[Listener], old: dict, new: dict, *, revise: bool = True,
                   exclude: str | None = None) -> bool:
    """Store ``new`` over ``old`` if the document is unchanged since ``old`` was read (compare-and-set on
    ``_rev``), with the listener states revised and ``_blobs`` exact; False if another write came first."""
    _prepare(attached, old, new, revise, exclude)
    fields = {k: v for k, v in new.items() if k != "_id"}
    fields.setdefault("_blobs", [])
    return collection.table.swap(old["_id"], old["_rev"], fields, unset=[k for k in old if k not in new],
                                 old_blobs=old.get("_blobs") or ())


def write_revisions(collection, attached: Sequence[Listener], pairs: Sequence[tuple[dict, dict]], *,
                    exclude: str | None = None) -> list[bool]:
    """:func:`write_revision` of many ``(old, new)`` pairs (distinct documents) in one batched compare-and-set;
    whether each was written."""
    for old, new in pairs:
        _prepare(attached, old, new, True, exclude)
    return collection.table.swap_many(pairs)


def _prepare(attached: Sequence[Listener], old: dict, new: dict, revise: bool, exclude: str | None) -> None:
    """``new`` made ready to store over ``old``: listener states revised, a fresh ``_rev``, ``_blobs`` exact."""
    if revise:
        states = _revise(old, new, attached, exclude)
        if states:
            new["_listeners"] = states
        else:
            new.pop("_listeners", None)
    new["_rev"] = new_id()
    new.pop("_blobs", None)
    keys = values.blob_keys(new)
    if keys:
        new["_blobs"] = sorted(keys)
    document_size(new)


def _revise(old: dict, new: dict, attached: Sequence[Listener], exclude: str | None) -> dict:
    states = {k: dict(v) for k, v in (new.get("_listeners") or {}).items() if isinstance(v, dict)}
    known = {x.name: x for x in attached}
    for name, state in states.items():
        if name == exclude or state.get("status") not in SETTLED:
            continue
        x = known.get(name)
        if x is None or get_path(old, x.key) != get_path(new, x.key) \
                or _matches(old, x.where) != _matches(new, x.where):
            state["status"] = STALE
    return states


def _matches(doc: dict, where: dict | None) -> bool:
    return True if not where else matches(doc, where)


def compute_on_insert(collection, attached: Sequence[Listener], docs: list[dict]) -> None:
    """Outputs of the inline listeners for new (plain) documents, set on them before they are packed."""
    inline = [x for x in ordered(attached) if x.compute == "inline"]
    if not inline or not docs:
        return
    for listener in inline:
        runner = Runner.get(collection, listener, trusted=False)
        todo = []
        for doc in docs:
            state = doc.setdefault("_listeners", {})
            if any((state.get(up) or {}).get("status") != DONE for up in listener.upstream):
                continue
            value = get_path(doc, listener.key)
            if value is MISSING or not _matches(doc, listener.where):
                state[listener.name] = {"status": SKIPPED, "time": utc_now()}
            else:
                todo.append((doc, _decoded(collection, value)))
        for start in range(0, len(todo), listener.batch_size):
            part = todo[start:start + listener.batch_size]
            try:
                outputs = runner([v for _, v in part])
            except Exception as exc:
                raise ListenerError(f"listener {listener.name!r} of collection {collection.name!r} failed, so "
                                    f"nothing was inserted:\n{_traceback(exc)}") from exc
            for (doc, _), output in zip(part, outputs):
                _set_output(doc, listener, output)
                doc["_listeners"][listener.name] = {"status": DONE, "input": None, "model": model_ref(listener),
                                                    "time": utc_now()}
    for doc in docs:
        if not doc.get("_listeners"):
            doc.pop("_listeners", None)


def _decoded(collection, value: Any) -> Any:
    """An input as the model sees it: a value given already encoded (``Encoded``) is decoded by its data type."""
    if isinstance(value, Encoded):
        return collection.catalog.datatype(value.datatype).decode(value.data)
    return value


def seal_inputs(attached: Sequence[Listener], tree: dict) -> None:
    """After packing: the input digests of the states :func:`compute_on_insert` set."""
    states = tree.get("_listeners") or {}
    for x in attached:
        state = states.get(x.name)
        if state and state.get("status") == DONE and state.get("input") is None:
            state["input"] = digest(get_path(tree, x.key))


def after_update(collection, attached: Sequence[Listener], ids: list[str]) -> None:
    """Recompute (inline) or enqueue (workers) what the updated documents made pending."""
    if not ids:
        return
    for listener in ordered(attached):
        if listener.compute == "inline":
            _run_pending(collection, listener, {"_id": {"$in": ids}}, trusted=False, raise_failures=True)
    enqueue(collection, attached, ids)


# -- computing ---------------------------------------------------------------------------------------------------

def catch_up(collection, name: str | None = None, *, trusted: bool = False, raise_failures: bool = True) -> int:
    """Compute every pending output in this process (of ``name``, or of all listeners in order)."""
    chosen = [get(collection, name)] if name else ordered(active(collection))
    return sum(_run_pending(collection, x, None, trusted=trusted, raise_failures=raise_failures) for x in chosen)


def _run_pending(collection, listener: Listener, scope: dict | None, *, trusted: bool, raise_failures: bool) -> int:
    written, failures = 0, []
    while True:
        flt = listener.pending if scope is None else {"$and": [listener.pending, scope]}
        docs = list(collection.table.find(flt, sort=[("_id", 1)], limit=max(listener.batch_size, 256)))
        if not docs:
            break
        result = process(collection, listener, docs, trusted=trusted)
        written += result.written
        failures += result.errors
        if result.written == 0:
            break
    if failures and raise_failures:
        raise ListenerError(f"listener {listener.name!r} of collection {collection.name!r} failed on "
                            f"{len(failures)} batch(es); those documents are marked failed "
                            f"(_listeners.{listener.name}.status):\n{failures[0]}")
    return written


@dataclass
class Outcome:
    """What one :func:`process` call wrote: documents written, documents failed, the tracebacks of failed batches."""
    written: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def process(collection, listener: Listener, docs: list[dict], *, trusted: bool) -> Outcome:
    """Compute and store ``listener``'s outputs for these stored documents (those still pending): each model
    batch's inputs decoded in one pass, its outputs written in one batched compare-and-set."""
    outcome = Outcome()
    attached = active(collection)
    if not any(x.id == listener.id for x in attached):
        return outcome  # detached meanwhile
    pending = [d for d in docs if _is_pending(d, listener)]
    todo, skipped = [], []
    for doc in pending:
        packed = get_path(doc, listener.key)
        if packed is MISSING or not _matches(doc, listener.where):
            skipped.append((doc, SKIPPED, MISSING, None))
        else:
            todo.append(doc)
    outcome.written += _store_many(collection, listener, attached, skipped)
    for start in range(0, len(todo), listener.batch_size):
        part = todo[start:start + listener.batch_size]
        try:
            runner = Runner.get(collection, listener, trusted=trusted)
            inputs = collection.unpack([get_path(d, listener.key) for d in part])
            outputs = runner(inputs)
        except Exception as exc:
            error = _traceback(exc)
            outcome.errors.append(error)
            outcome.failed += _store_many(collection, listener, attached,
                                          [(doc, FAILED, MISSING, error) for doc in part])
            continue
        encoder = collection.codecs.encoder()
        outcome.written += _store_many(collection, listener, attached,
                                       [(doc, DONE, collection.pack(output, encoder), None)
                                        for doc, output in zip(part, outputs)])
    return outcome


def _is_pending(doc: dict, listener: Listener) -> bool:
    states = doc.get("_listeners") or {}
    if (states.get(listener.name) or {}).get("status") in SETTLED:
        return False
    return all((states.get(up) or {}).get("status") == DONE for up in listener.upstream)


def _store_many(collection, listener: Listener, attached, items: list[tuple]) -> int:
    """Write ``(doc, status, packed output, error)`` items in one batched compare-and-set; a document another
    write changed meanwhile goes through :func:`_store` (re-read, and written again if its input is the same)."""
    now = utc_now()
    try:
        pairs = [(doc, _with_state(doc, listener, status, output, error, now)) for doc, status, output, error in items]
        written = write_revisions(collection, attached, pairs, exclude=listener.name)
    except BaseException:  # e.g. an output too large for its document: the batch's fresh output blobs go
        keys = values.blob_keys([output for _, _, output, _ in items if output is not MISSING])
        collection.project.warehouse._lease_end(stored=keys)
        collection.table.release(keys)
        raise
    return sum(1 if ok else _store(collection, listener, attached, doc, status, output=output, error=error,
                                   conflicted=True)
               for (doc, status, output, error), ok in zip(items, written))


def _store(collection, listener: Listener, attached, doc: dict, status: str, *, output: Any = MISSING,
           error: str | None = None, conflicted: bool = False) -> int:
    """Write one document's state (and its packed ``output``) for ``listener``; 1 if written. ``conflicted``:
    a write of it just lost to another (so it is read again first)."""
    seen = digest(get_path(doc, listener.key))
    for _ in range(_CAS_TRIES):
        if conflicted:
            doc = collection.table.find_one({"_id": doc["_id"]})
            if doc is None or not _is_pending(doc, listener) or digest(get_path(doc, listener.key)) != seen:
                return 0  # deleted, done by another worker, or changed: its new input is pending work
        if write_revision(collection, attached, doc, _with_state(doc, listener, status, output, error, utc_now()),
                          exclude=listener.name):
            return 1
        conflicted = True
    return 0


def _with_state(doc: dict, listener: Listener, status: str, output: Any, error: str | None, now: str) -> dict:
    """A copy of ``doc`` with ``listener``'s output (or none) and its state (of time ``now``), for the input
    ``doc`` holds."""
    new = _copy(doc)
    if output is MISSING:
        _unset_output(new, listener)
    else:
        _set_output(new, listener, output)
    state = {"status": status, "input": digest(get_path(doc, listener.key)), "model": model_ref(listener),
             "time": now}
    if error:
        state["error"] = error[-_ERROR_TAIL:]
    new.setdefault("_listeners", {})[listener.name] = state
    return new


def _copy(doc: dict) -> dict:
    return {k: (copy_json(v) if k in ("_outputs", "_listeners") else v) for k, v in doc.items()}


def _set_output(doc: dict, listener: Listener, output: Any) -> None:
    node = doc.setdefault("_outputs", {})
    for part in listener.key.split("."):
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[listener.name] = output


def _unset_output(doc: dict, listener: Listener) -> None:
    node, trail = doc.get("_outputs"), []
    for part in listener.key.split("."):
        if not isinstance(node, dict) or part not in node:
            return
        trail.append((node, part))
        node = node[part]
    if isinstance(node, dict):
        node.pop(listener.name, None)
    for parent, part in reversed(trail):  # empty dicts go too
        if parent[part] == {}:
            del parent[part]
    if doc.get("_outputs") == {}:
        del doc["_outputs"]


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-_ERROR_TAIL:]


def progress(collection, listener: Listener) -> dict:
    """Document counts by state, from one read of every document's status (not a count per state)."""
    counts = dict.fromkeys(SETTLED, 0)
    pending = 0
    for (status,) in collection.table.values(None, [f"_listeners.{listener.name}.status"]):
        if type(status) is str and status in counts:
            counts[status] += 1
        else:
            pending += 1
    counts["pending"] = pending
    return counts


def retry(collection, listener: Listener) -> int:
    n = collection.table.update_all({f"_listeners.{listener.name}.status": FAILED},
                                    {"$set": {f"_listeners.{listener.name}.status": STALE, "_rev": new_id()}})
    if listener.compute == "inline":
        catch_up(collection, listener.name, raise_failures=False)
    else:
        enqueue_pending(collection, listener)
    return n
