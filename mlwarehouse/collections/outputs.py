"""Listeners' outputs: computed for new documents before they are written, for pending ones afterwards (inline, or
by a worker through :func:`process`), and stored with a compare-and-set on ``_rev`` that also revises every other
listener's state (:func:`write_revision`). See :mod:`mlwarehouse.collections.listeners` for the states and why
nothing is lost."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlwarehouse.codecs import values
from mlwarehouse.codecs.datatypes import Encoded
from mlwarehouse.collections.attached import DONE, FAILED, SETTLED, SKIPPED, STALE, Listener, active, get, ordered
from mlwarehouse.collections.documents import MISSING, digest, document_size, get_path
from mlwarehouse.collections.models import Runner, model_ref
from mlwarehouse.collections.queueing import enqueue, enqueue_pending
from mlwarehouse.errors import ListenerError
from mlwarehouse.ids import new_id, utc_now
from mlwarehouse.query.documents import copy_json
from mlwarehouse.query.filters import matches

__all__ = ["write_revision", "write_revisions", "compute_on_insert", "seal_inputs", "after_update", "catch_up",
           "process", "Outcome", "progress", "retry", "copy_states", "set_output", "unset_output", "traceback_tail",
           "matches_where", "CAS_TRIES"]

ERROR_TAIL = 8192
CAS_TRIES = 20


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
                or matches_where(old, x.where) != matches_where(new, x.where):
            state["status"] = STALE
    return states


def matches_where(doc: dict, where: dict | None) -> bool:
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
            if value is MISSING or not matches_where(doc, listener.where):
                state[listener.name] = {"status": SKIPPED, "time": utc_now()}
            else:
                todo.append((doc, _decoded(collection, value)))
        for start in range(0, len(todo), listener.batch_size):
            part = todo[start:start + listener.batch_size]
            try:
                outputs = runner([v for _, v in part])
            except Exception as exc:
                raise ListenerError(f"listener {listener.name!r} of collection {collection.name!r} failed, so "
                                    f"nothing was inserted:\n{traceback_tail(exc)}") from exc
            for (doc, _), output in zip(part, outputs):
                set_output(doc, listener, output)
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
        if packed is MISSING or not matches_where(doc, listener.where):
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
            error = traceback_tail(exc)
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
    for _ in range(CAS_TRIES):
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
    new = copy_states(doc)
    if output is MISSING:
        unset_output(new, listener)
    else:
        set_output(new, listener, output)
    state = {"status": status, "input": digest(get_path(doc, listener.key)), "model": model_ref(listener),
             "time": now}
    if error:
        state["error"] = error[-ERROR_TAIL:]
    new.setdefault("_listeners", {})[listener.name] = state
    return new


def copy_states(doc: dict) -> dict:
    return {k: (copy_json(v) if k in ("_outputs", "_listeners") else v) for k, v in doc.items()}


def set_output(doc: dict, listener: Listener, output: Any) -> None:
    node = doc.setdefault("_outputs", {})
    for part in listener.key.split("."):
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[listener.name] = output


def unset_output(doc: dict, listener: Listener) -> None:
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


def traceback_tail(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-ERROR_TAIL:]


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
