"""Watching a query: a durable cursor over the new and changed matches of a filter, in any collection.

``for event in wh.watch("products", where={"price": {"$lt": 10}}, consumer="indexer"): ...; event.ack()``

What a change is. Every write of a users' collection gives the document a fresh ``_rev`` (a sortable id made by
the writer, :mod:`mlwarehouse.warehouse.tables`): there a change is a ``_rev``, so inserts, updates and the
listeners' own writes of outputs are all changes. The warehouse's own collections are watched by ``_id`` (also
sortable and client-made, stamped at insert after the blobs were put): models, datasets, item shards, lineage
edges... are insert-only, so every change is an insert. Runs, tasks, fits, datasets and evaluations are updated in place
(``schema.REVISED``): each insert and update gives the document a fresh ``_rev``, as in users' collections, and
they are watched by it, so a task that becomes finished or a run that ends is an event (a heartbeat is a change
too: filter on the state you wait for, ``{"status": "finished"}``). Documents written before revisions existed
get their ``_id`` as ``_rev`` when a watch first opens their collection.

What a match is. An event is delivered when the document, as read after its change, matches ``where``. A document
that stops matching yields nothing, and so does a delete (the consumer learns of neither: filter on a state a
document reaches, not one it leaves). Changes are coalesced: a document written twice between two reads yields once,
with its latest state and change id. Events come in change id order within each read; ids are made by many clocks,
so a change committed late (an id older than ones already delivered) comes at the next read, after them.

Exactness. Each read takes the changes newer than the position (in id order, ``batch`` at a time) and re-reads the
ids (only) of the matches made shortly before it, delivering those not delivered yet: a write whose id was made
before the position but that committed after the last read is still inside that window (the assumption, as in
:mod:`mlwarehouse.vectors.tracking`: a write commits within ``LOOKBACK_MS`` of its id being made, clock skew
included). Each read looks back ``RECENT_MS`` (where writes in flight on one machine land), the whole
``LOOKBACK_MS`` on its first read and every ``WINDOW_SECONDS``, and not at all while it catches up with changes
older than twice ``LOOKBACK_MS`` (those committed long ago). The ids delivered within the window are remembered, so
nothing is delivered twice in one process.

Delivery. An unnamed watch starts now (or at the beginning) and keeps its place in memory; ``ack`` is a no-op.
A named ``consumer`` stores its place in :data:`mlwarehouse.schema.WATCHES`: ``resume`` (the oldest change delivered
and not acknowledged, else the newest acknowledged) and the acknowledged change ids at or after its look-back floor.
Only an acknowledgement moves it, so a consumer restarted after a crash yields again every event it had not
acknowledged, and none it had: **at least once**, with duplicates only of unacknowledged events; make the effect
of an event idempotent, or acknowledge it in the same breath as its effect. ``start`` applies to a consumer's first
run only. One process per consumer name at a time (two would both receive every event); acknowledge roughly in
order, as the list of out-of-order acknowledgements is rewritten by each ``ack``. A watch is not shared by threads.

Naming. ``collection`` is a users' collection (its name, or the
:class:`~mlwarehouse.collections.collection.Collection`) or a warehouse collection (its name, or its
:mod:`~mlwarehouse.schema` declaration). A name that is a warehouse collection's (``"models"``, ``"items"``...)
means the warehouse's: a users' collection of the same name is watched through its object,
``wh.watch(wh.collection("models"))``.

Waking. Between reads the watch waits ``poll`` seconds with :meth:`~mlwarehouse.warehouse.Project.listen`: on
PostgreSQL a write's NOTIFY wakes it at once (``poll`` is then only a fallback), elsewhere it polls (every
``POLL_SECONDS`` by default). ``timeout`` ends the iteration once no event has come for that long (None: never).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlwarehouse import schema
from mlwarehouse.collections.documents import strip
from mlwarehouse.errors import DuplicateKey, QueryError
from mlwarehouse.ids import id_millis, ids_after
from mlwarehouse.query.filters import validate_filter

__all__ = ["Watcher", "Event", "LOOKBACK_MS", "POLL_SECONDS", "NOTIFY_POLL_SECONDS", "WATCHABLE"]

#: how long after its id was made a change may still commit and be delivered (transactions and clock skew)
LOOKBACK_MS = int(os.environ.get("MLW_WATCH_LOOKBACK_MS", 10_000))
#: the default wait between reads where writes do not wake a listener (SQLite, MongoDB)
POLL_SECONDS = 0.1
#: ... and where they do (PostgreSQL's NOTIFY): a fallback for a writer that has not yet learned to notify
NOTIFY_POLL_SECONDS = 1.0
#: each read re-reads the ids of the last RECENT_MS before the position, and the whole LOOKBACK_MS every
#: WINDOW_SECONDS (a busy collection's ten seconds of ids are not re-read at every poll)
RECENT_MS = 1000
WINDOW_SECONDS = 1.0
BATCH = 500
CHUNK = 500
#: the warehouse's collections a watch may follow (by ``_id``); any other name is a users' collection
WATCHABLE = frozenset(name for name in schema.COLLECTIONS if name not in (schema.META.name, schema.WATCHES.name))
STARTS = ("now", "beginning")


@dataclass
class Event:
    """One new or changed match: the collection's name, the change id (``_rev`` or ``_id``), the document's id and
    the document (decoded for users' collections; as stored for the warehouse's own)."""
    collection: str
    change: str
    id: str
    document: dict
    watcher: "Watcher" = field(repr=False, compare=False)

    def ack(self) -> None:
        """Acknowledge this event: a named consumer restarted will not yield it again."""
        self.watcher.ack(self)


class _Users:
    """A users' collection, followed by ``_rev``."""

    field = "_rev"

    def __init__(self, collection):
        self.collection = collection
        self.name = collection.name
        self.key = collection.table.name

    def open(self) -> None:
        self.collection.table.create_index([("_rev", 1)])  # reads are ranges of _rev

    def find(self, filter: dict, *, sort=None, limit=None, fields=False) -> list[dict]:
        projection = {"_id": 1, "_rev": 1} if fields else None
        return list(self.collection.table.find(filter, sort=sort, limit=limit, projection=projection))

    def decode(self, tree: dict) -> dict:
        return strip(self.collection.unpack(tree), None)

    def listen(self, timeout: float) -> None:
        self.collection.table.listen(timeout)


class _Warehouse:
    """One of the warehouse's collections: followed by ``_rev`` where documents are updated in place
    (``schema.REVISED``: runs, tasks, fits...), else by ``_id`` (insert-only)."""

    def __init__(self, project, name: str):
        self.project, self.name, self.key = project, name, name
        self.field = "_rev" if name in schema.REVISED else "_id"

    def open(self) -> None:
        self.project.ensure(schema.COLLECTIONS[self.name])
        if self.field == "_rev":
            self._backfill()

    def _backfill(self) -> None:
        """Give documents written before revisions existed their ``_rev`` (their ``_id``: when they were made), so
        a watch from the beginning sees them; once per collection and project, a page of ids at a time."""
        while True:
            ids = [row[0] for row in self.project.values(self.name, {"_rev": {"$exists": False}}, ["_id"],
                                                         limit=BATCH)]
            for doc_id in ids:
                self.project.update(self.name, {"_id": doc_id, "_rev": {"$exists": False}},
                                    {"$set": {"_rev": doc_id}})
            if len(ids) < BATCH:
                return

    def find(self, filter: dict, *, sort=None, limit=None, fields=False) -> list[dict]:
        projection = {"_id": 1, self.field: 1} if fields else None
        return self.project.find(self.name, filter, sort=sort, limit=limit, projection=projection)

    def decode(self, doc: dict) -> dict:
        return doc

    def listen(self, timeout: float) -> None:
        self.project.listen(self.name, timeout)


def _source(project, collection: Any):
    if isinstance(collection, schema.Collection):
        if collection.name not in WATCHABLE:
            raise QueryError(f"the warehouse collection {collection.name!r} cannot be watched")
        return _Warehouse(project, collection.name)
    if isinstance(collection, str):
        if collection in WATCHABLE:
            return _Warehouse(project, collection)
        if collection in (schema.META.name, schema.WATCHES.name):
            raise QueryError(f"the warehouse collection {collection!r} cannot be watched")
        return _Users(project.collection(collection))  # checks the name
    if hasattr(collection, "table") and hasattr(collection, "catalog"):
        if collection.project.name != project.name:
            raise QueryError(f"collection {collection.name!r} belongs to project {collection.project.name!r}, "
                             f"not {project.name!r}")
        return _Users(collection)
    raise QueryError(f"watch takes a collection name, a users' collection or a schema collection, not "
                     f"{type(collection).__name__}")


def _floor(position: str, back_ms: int | None = None) -> str:
    """The smallest id made ``back_ms`` (default ``LOOKBACK_MS``) before ``position``."""
    ms = id_millis(position) if position else None
    return ids_after(ms - (LOOKBACK_MS if back_ms is None else back_ms)) if ms is not None else ""


class Watcher:
    """An iterable of :class:`Event` over a query's changes (see the module notes); made by ``Project.watch``."""

    def __init__(self, project, collection: Any, where: Mapping | None = None, *, consumer: str | None = None,
                 start: str = "now", poll: float | None = None, timeout: float | None = None, batch: int = BATCH):
        if where is not None and not isinstance(where, Mapping):
            raise QueryError(f"where must be a filter (a dict), not {type(where).__name__}")
        self.where = dict(where or {})
        validate_filter(self.where)
        try:
            self._where_key = json.dumps(self.where, sort_keys=True, default=repr)
        except (TypeError, ValueError) as exc:
            raise QueryError(f"where cannot be stored: {exc}") from None
        if consumer is not None and (not isinstance(consumer, str) or not 0 < len(consumer) <= 200
                                     or not consumer.isprintable()):
            raise QueryError(f"a consumer name must be 1 to 200 printable characters, not {consumer!r}")
        if start not in STARTS:
            raise QueryError(f"start must be one of {STARTS}, not {start!r}")
        for name, value in (("poll", poll), ("timeout", timeout)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= 0 or value == float("inf")):
                raise QueryError(f"{name} must be a number of seconds >= 0, not {value!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise QueryError(f"batch must be a positive integer, not {batch!r}")
        self.project = project
        self.source = _source(project, collection)
        self.consumer, self.timeout, self.batch = consumer, timeout, batch
        if poll is None:
            poll = NOTIFY_POLL_SECONDS if project.wakes_on_writes else POLL_SECONDS
        self.poll = float(poll)
        self.position = ""             # the newest change delivered
        self.delivered: set[str] = set()  # change ids delivered at or after the position's look-back floor
        self.unacked: dict[str, Event] = {}
        self.acked: set[str] = set()
        self._state_id: str | None = None
        self._windowed: float | None = None  # when a read last looked back over the whole window
        self.closed = False
        self.source.open()
        if consumer is None:
            self._start(start)
        else:
            self._load(start)

    @property
    def collection(self) -> str:
        return self.source.name

    def __repr__(self) -> str:
        who = f" consumer {self.consumer!r}" if self.consumer else ""
        return f"<Watcher {self.source.name!r}{who} where {self.where!r} at {self.position or 'the beginning'}>"

    # -- position ---------------------------------------------------------------------------------------------
    def _start(self, start: str) -> None:
        """Start now (every change already committed counts as seen) or at the beginning."""
        if start == "beginning":
            return
        now = ids_after(int(time.time() * 1000))
        seen = self._window(_floor(now), None)
        self.delivered = set(seen)
        self.position = max([now, *seen])

    def _load(self, start: str) -> None:
        project = self.project
        project.ensure(schema.WATCHES)
        key = {"source": self.source.key, "consumer": self.consumer}
        state = project.find_one(schema.WATCHES.name, key)
        if state is None:
            self._start(start)
            self.acked = set(self.delivered)
            try:
                state = project.insert(schema.WATCHES.name, {
                    **key, "collection": self.source.name, "where": self._where_key,
                    "resume": self.position, "acked": sorted(self.acked)})
            except DuplicateKey:  # another process made it first
                state = project.find_one(schema.WATCHES.name, key)
        if state["where"] != self._where_key:
            raise QueryError(f"consumer {self.consumer!r} of {self.source.name!r} watches where "
                             f"{state['where']}, not {self._where_key}: name another consumer for another filter")
        self._state_id = state["_id"]
        self.position = state["resume"]
        self.acked = set(state["acked"])
        self.delivered = set(self.acked)

    def ack(self, *events: Event) -> None:
        """Acknowledge events (one write for them all); a named consumer's position moves past them."""
        for event in events:
            if event.watcher is not self:
                raise QueryError("an event is acknowledged by the watch that delivered it")
            if self.unacked.pop(event.change, None) is not None:
                self.acked.add(event.change)
        if self._state_id is None or not events:
            return
        resume = min(self.unacked) if self.unacked else self.position
        floor = _floor(resume)
        self.acked = {c for c in self.acked if c >= floor}
        self.project.update(schema.WATCHES.name, {"_id": self._state_id},
                            {"$set": {"resume": resume, "acked": sorted(self.acked)}})

    def forget(self) -> None:
        """Delete a named consumer's stored position (its next watch starts afresh)."""
        if self._state_id is not None:
            self.project.delete(schema.WATCHES.name, {"_id": self._state_id})
            self._state_id = None

    # -- reading ----------------------------------------------------------------------------------------------
    def _and(self, condition: dict) -> dict:
        return {"$and": [self.where, condition]} if self.where else condition

    def _window(self, lower: str, upper: str | None) -> list[str]:
        """The change ids of matches from ``lower`` to ``upper`` (None: no end), ids only."""
        field_ = self.source.field
        rng: dict[str, str] = {"$gte": lower}
        if upper is not None:
            rng["$lte"] = upper
        return [d[field_] for d in self.source.find(self._and({field_: rng}), fields=True) if d.get(field_)]

    def _lookback(self) -> str | None:
        """Where this read looks back from: the whole window on the first read and every ``WINDOW_SECONDS``, the
        last ``RECENT_MS`` otherwise, and nothing when the position is far behind now (catching up: a change that
        old committed long ago, by the assumption, and was read then); None when there is nothing to look at."""
        if not self.position:
            return None
        now = time.monotonic()
        whole = self._windowed is None or now - self._windowed >= WINDOW_SECONDS
        lower = _floor(self.position, LOOKBACK_MS if whole else RECENT_MS)
        if self._windowed is not None:  # after the first read: not before what may still be in flight
            lower = max(lower, ids_after(int(time.time() * 1000) - 2 * LOOKBACK_MS))
        if whole:
            self._windowed = now
        return lower if lower <= self.position else None

    def read(self) -> list[Event]:
        """The changes not delivered yet, in change id order (one read, no waiting); delivered only as iterated."""
        field_ = self.source.field
        late: list[dict] = []
        lower = self._lookback()
        if lower is not None:
            missing = [c for c in self._window(lower, self.position) if c not in self.delivered]
            for start in range(0, len(missing), CHUNK):
                late += self.source.find(self._and({field_: {"$in": missing[start:start + CHUNK]}}))
        newer = self.source.find(self._and({field_: {"$gt": self.position}}) if self.position else self.where,
                                 sort=[(field_, 1)], limit=self.batch)
        docs = sorted(late + newer, key=lambda d: d[field_])
        return [Event(self.source.name, d[field_], d["_id"], self.source.decode(d), self) for d in docs]

    def _deliver(self, event: Event) -> None:
        self.delivered.add(event.change)
        if self._state_id is not None:
            self.unacked[event.change] = event
        if event.change > self.position:
            self.position = event.change
            if len(self.delivered) > 4 * self.batch:  # reads look back no further than the position's floor
                floor = _floor(self.position)
                self.delivered = {c for c in self.delivered if c >= floor}

    def __iter__(self) -> Iterator[Event]:
        idle_since = time.monotonic()
        while not self.closed:
            events = self.read()
            if events:
                for event in events:
                    if event.change in self.delivered:  # acknowledged before a restart, out of order
                        self.position = max(self.position, event.change)
                        continue
                    self._deliver(event)
                    yield event
                idle_since = time.monotonic()
                continue
            wait = self.poll
            if self.timeout is not None:
                left = self.timeout - (time.monotonic() - idle_since)
                if left <= 0:
                    return
                wait = min(wait, left)
            self.source.listen(wait)

    def close(self) -> None:
        """End the iteration (at its next read)."""
        self.closed = True

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
