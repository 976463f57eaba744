"""The buffered log writer: training threads queue log points, one background thread writes them in batches.

``put()`` only appends to an in-memory list (no I/O on the caller's thread). A daemon thread drains the list
every ``interval`` seconds, or at once when ``batch_size`` points are waiting or someone calls ``flush()``, and
writes each drained batch as blocks (:mod:`mlwarehouse.runs.blocks`: one document per run, kind and field set,
the points packed in it) in one bulk insert (one transaction per ``chunk_size`` blocks), followed by one
update per run of the run's metric summaries (the layout of :mod:`mlwarehouse.runs.summary`), which the writer
keeps in memory so they are never re-read.

Guarantees:
- ``flush()`` returns once every point queued before it is durable.
- An error in the writer thread (disk full, a value the index refuses) is never swallowed: it is raised, as a
  :class:`~mlwarehouse.errors.WarehouseError`, by the next ``put()``, ``flush()`` or ``close()``.
- Memory is bounded: when ``max_pending`` points (1,000,000 by default) wait, ``put()`` blocks until the writer
  has drained them, so a training loop that outruns the disk slows down instead of exhausting memory.
- Pending points are flushed at interpreter exit (``atexit``) and in ``close()``; a forked child starts with an
  empty queue of its own (the parent writes what it queued).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
import weakref
from multiprocessing import util as mp_util
from typing import Any

from mlwarehouse import schema
from mlwarehouse.errors import BackendError, DuplicateKey, InvalidDocument, WarehouseError
from mlwarehouse.ids import ALPHABET, encode32
from mlwarehouse.query.fields import normalize_value
from mlwarehouse.runs import blocks, summary

__all__ = ["LogWriter", "LOG_FIELDS", "LOGS", "RUNS", "check_kind", "check_metric_name", "as_step"]

LOGS = schema.LOGS.name
RUNS = schema.RUNS.name
#: fields of a log document that are not metrics
LOG_FIELDS = frozenset(schema.LOG_FIELDS)

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
INT64 = 1 << 63

_LIVE: "weakref.WeakSet[LogWriter]" = weakref.WeakSet()


def check_kind(kind: Any) -> str:
    """A log kind is an identifier: it becomes part of summary paths (``summary.<kind>.<metric>``)."""
    if not isinstance(kind, str) or not NAME_RE.match(kind):
        raise InvalidDocument(f"log kind {kind!r} must be an identifier (letters, digits, '_' or '-')")
    return kind


def check_metric_name(key: str) -> str:
    """A metric name is an identifier that is not one of the log document's own fields."""
    if key in LOG_FIELDS or not NAME_RE.match(key):
        raise InvalidDocument(f"metric name {key!r} is reserved or invalid: use an identifier other than "
                              f"{', '.join(sorted(f for f in LOG_FIELDS if not f.startswith('_')))}")
    return key


def as_step(value: Any, what: str) -> int:
    """A step or epoch as a plain int (numpy and 0-d tensor integers accepted)."""
    value = normalize_value(value, what)
    if type(value) is not int:
        raise InvalidDocument(f"{what} must be an integer, not {value!r}")
    return value


_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]  # 10 bits -> 2 characters


class _BatchIds:
    """ULIDs for a batch of log documents, like :func:`mlwarehouse.ids.new_id` but at a fraction of the cost.

    Each batch takes the current millisecond and a fresh 80-bit random number and counts up from it (the
    monotonic ULID scheme), encoding only the low 30 bits per id; ids stay unique and strictly increasing.
    """

    def __init__(self) -> None:
        self._ms = -1

    def __call__(self, n: int) -> list[str]:
        ms = max(time.time_ns() // 1_000_000, self._ms + 1)
        self._ms = ms  # one millisecond prefix per batch: ids increase from batch to batch
        high = int.from_bytes(os.urandom(7), "big") >> 6  # 50 bits
        low = int.from_bytes(os.urandom(4), "big") >> 3  # 29 bits: room to count up without a carry
        ids = []
        pairs = _PAIRS
        while n > 0:
            take = min(n, (1 << 30) - low)
            prefix = encode32(ms, 10) + encode32(high, 10)
            ids.extend(prefix + pairs[(x >> 20) & 1023] + pairs[(x >> 10) & 1023] + pairs[x & 1023]
                       for x in range(low, low + take))
            n -= take
            high, low = high + 1, 0
        return ids


class LogWriter:
    """Writes queued log documents of a :class:`~mlwarehouse.warehouse.Project` in the background. Safe to
    share between threads."""

    def __init__(self, project, *, interval: float = 0.2, batch_size: int = 5000, chunk_size: int = 5000,
                 max_pending: int = 1_000_000):
        self.project = project
        self.interval = interval
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.max_pending = max_pending
        self._reset()
        self._closed = False
        _LIVE.add(self)

    def _reset(self) -> None:
        """A fresh queue, thread and summaries (at start, and in a forked child: the parent's are not ours)."""
        self._mutex = threading.Lock()  # the condition's own lock: put() takes it directly (Condition's
        self._cond = threading.Condition(self._mutex)  # __enter__ is Python code, a tenth of a put's cost)
        self._pending: list[dict] = []
        self._forgotten: set[str] = set()
        self._named: set[int] = set()  # id() of queued points that want their stored id back
        self._queued = 0  # points ever queued
        self._done = 0  # points written (or lost to an error)
        self._wake = False
        self._error: BaseException | None = None
        self._lost = 0
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._summaries: dict[str, dict[str, dict[str, dict]]] = {}

    # -- the caller's side ---------------------------------------------------------------------------------
    def put(self, doc: dict) -> None:
        """Queue one point: ``{"run", "kind", "step"?, "epoch"?, "time"?, <metrics>}``, ``time`` in microseconds
        since 1970 (``time.time_ns() // 1000``) or as a ``time.time()`` float; ``step``/``epoch`` may be None."""
        if self._error is not None or self._closed:
            self._check()
        cond = self._cond
        with self._mutex:
            pending = self._pending
            if len(pending) >= self.max_pending:
                self._wake = True
                cond.notify_all()
                while len(self._pending) >= self.max_pending and self._error is None:
                    cond.wait()
                pending = self._pending
            pending.append(doc)
            self._queued += 1
            if self._thread is None:
                self._start()
            if len(pending) == self.batch_size:
                cond.notify_all()

    def put_named(self, doc: dict) -> None:
        """:meth:`put`, and once written the point gets its id (``doc["_id"]``) as :func:`blocks.points_of` names it."""
        with self._cond:
            self._named.add(id(doc))
        self.put(doc)

    def flush(self) -> None:
        """Block until every point queued so far is durable; raise the writer's error if it had one."""
        self._check()
        cond = self._cond
        with cond:
            target = self._queued
            if self._done < target:
                self._wake = True
                cond.notify_all()
                while self._done < target:
                    cond.wait()
        self._check()

    def close(self) -> None:
        """Flush, stop the thread, and raise the writer's error if it had one."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            with self._cond:
                self._cond.notify_all()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=30)
            _LIVE.discard(self)

    def forget(self, run_ids) -> None:
        """Drop the in-memory summaries of runs (finished or deleted); they are reloaded if logged again."""
        with self._cond:
            self._forgotten.update(run_ids)

    @property
    def pending(self) -> int:
        """How many points are queued and not yet durable."""
        return self._queued - self._done

    def _check(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's thread and queue are not ours
            self._reset()
        if self._closed:
            raise BackendError("the log writer is closed (the warehouse was closed)")
        if self._error is not None:
            with self._cond:
                error, lost = self._error, self._lost
                self._error, self._lost = None, 0
            if error is not None:
                message = f"the background log writer failed; {lost} log points were not written: {error}"
                wrapped = type(error)(message) if isinstance(error, WarehouseError) else BackendError(message)
                raise wrapped from error

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"mlwarehouse-logs-{self.project.name}", daemon=True)
        self._thread.start()

    # -- the writer's side ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        cond = self._cond
        ids = _BatchIds()
        while True:
            with cond:
                while not self._pending and not self._closed:
                    cond.wait()
                if not (self._wake or self._closed or len(self._pending) >= self.batch_size):
                    cond.wait(self.interval)
                batch, self._pending = self._pending, []
                self._wake = False
                if not batch and self._closed:
                    return
                cond.notify_all()  # producers waiting for room
            try:
                self._write(batch, ids)
            except BaseException as exc:  # kept and raised on the caller's next call
                with cond:
                    self._error = exc
                    self._lost += getattr(exc, "lost", len(batch))
            with cond:
                self._done += len(batch)
                cond.notify_all()

    def _write(self, batch: list[dict], ids: _BatchIds) -> None:
        with self._cond:
            forgotten, self._forgotten = self._forgotten, set()
        for run_id in forgotten:
            self._summaries.pop(run_id, None)
        dropped: list[tuple[dict, InvalidDocument]] = []
        project = self.project.name
        groups = blocks.group(batch)
        block_ids = ids(len(groups))
        try:
            self._insert([blocks.block(members, _id, project) for members, _id in zip(groups, block_ids)])
            if self._named:
                for members, _id in zip(groups, block_ids):
                    self._name(members, _id)
        except InvalidDocument:  # a bad point: write the others, drop only the bad ones
            written, dropped = self._one_by_one(groups, block_ids, ids)
            groups = blocks.group(written)
        changed = self._summarize(groups)  # after the insert: a failed batch leaves the summaries as they were
        for run_id, kinds in changed.items():
            sums = self._summaries[run_id]
            update = {summary.path(kind, metric): dict(sums[kind][metric])
                      for kind, names in kinds.items() for metric in names}
            self.project.update(RUNS, {"_id": run_id}, {"$set": update})
        if dropped:
            error = InvalidDocument(f"{len(dropped)} log point(s) could not be stored and were dropped, e.g. run "
                                    f"{dropped[0][0].get('run')} step {dropped[0][0].get('step')}: {dropped[0][1]}")
            error.lost = len(dropped)
            raise error

    def _name(self, members: list[dict], block_id: str) -> None:
        """Give the points of a stored block that :meth:`put_named` queued their ids (``<block id>.<i>``)."""
        with self._cond:
            for i, point in enumerate(members):
                if id(point) in self._named:
                    point["_id"] = f"{block_id}.{i}"
                    self._named.discard(id(point))

    def _insert(self, docs: list[dict]) -> None:
        """One bulk insert of blocks this writer stamped itself (``_id``, ``project``, ``time``).

        ``Project.insert_stamped``, not ``insert_many``: that one stamps again, and would replace each block's
        time (when its first point was logged) by the time of the write, draw one ``new_id()`` per block instead of
        a batch of ids and scan every block for blob references (logs have none)."""
        self.project.insert_stamped(LOGS, docs, chunk_size=self.chunk_size)

    def _one_by_one(self, groups: list[list[dict]], block_ids: list[str],
                    ids: _BatchIds) -> tuple[list[dict], list[tuple[dict, InvalidDocument]]]:
        """Insert each block alone, and the points of a refused block each in a block of its own: (the points now
        stored, the points refused with their errors). A block an earlier chunk already committed counts as
        stored."""
        written, dropped = [], []
        project = self.project.name
        for members, block_id in zip(groups, block_ids):
            try:
                self.project.insert_stamped(LOGS, [blocks.block(members, block_id, project)])
            except DuplicateKey:
                pass
            except InvalidDocument:
                for point, _id in zip(members, ids(len(members))):
                    try:
                        self.project.insert_stamped(LOGS, [blocks.block([point], _id, project)])
                    except InvalidDocument as exc:
                        dropped.append((point, exc))
                        continue
                    self._name([point], _id)
                    written.append(point)
                continue
            self._name(members, block_id)
            written.extend(members)
        return written, dropped

    def _load(self, run_id: str) -> dict:
        doc = self.project.find_one(RUNS, {"_id": run_id}, projection={summary.ROOT: 1})
        stored = (doc or {}).get(summary.ROOT)
        return {k: {m: dict(s) for m, s in v.items() if isinstance(s, dict)}
                for k, v in stored.items() if isinstance(v, dict)} if isinstance(stored, dict) else {}

    def _summarize(self, groups: list[list[dict]]) -> dict[str, dict[str, set[str]]]:
        """Fold groups of points (each of one run, kind and field set: :func:`blocks.group`) into the running
        summaries, a metric's column at a time; returns the metrics changed per run and kind."""
        changed: dict[str, dict[str, set[str]]] = {}
        summaries = self._summaries
        for members in groups:
            first = members[0]
            run_id = first.get("run")
            if run_id is None:
                continue
            runs = summaries.get(run_id)
            if runs is None:
                runs = summaries[run_id] = self._load(run_id)
            kind = first["kind"]
            sums = runs.setdefault(kind, {})
            touched = changed.setdefault(run_id, {}).setdefault(kind, set())
            steps = [p.get("step") for p in members]
            for name in first:
                if name not in LOG_FIELDS:
                    summary.fold_column(sums, name, [p[name] for p in members], steps, touched)
        return changed


def _flush_all_at_exit() -> None:
    for writer in list(_LIVE):
        try:
            writer.close()
        except Exception as exc:  # at exit there is nobody left to raise to: say it loudly
            print(f"mlwarehouse: log points were lost at exit: {exc}", file=sys.stderr)


def _after_fork_in_child() -> None:
    for writer in list(_LIVE):
        writer._reset()


def _flush_at_multiprocessing_exit(_) -> None:
    """A multiprocessing child ends with os._exit, which skips atexit; its finalizers (registered here, after
    multiprocessing has cleared the parent's) still run, so they flush the child's writers."""
    mp_util.Finalize(None, _flush_all_at_exit, exitpriority=10)


atexit.register(_flush_all_at_exit)
mp_util.register_after_fork(_flush_all_at_exit, _flush_at_multiprocessing_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
