"""Listener work on workers: batches of documents through the leased task queue, computed where the GPUs are.

A write to a collection with a ``compute="workers"`` listener queues a task (``schema.LISTENER_TASK``) naming the
listener and up to ``batch_size`` document ids; attaching one, or a sweep, queues whatever is pending and not
queued yet. A :class:`ListenerWorker` (run by ``mlw worker`` beside the script worker) claims those tasks with a
lease it renews, computes the batch in its own process with the model loaded once, and finishes the task. A worker
killed mid-batch loses nothing: the lease expires, the task is claimed again, and documents already written are
skipped (outputs are written once, by compare-and-set). A model that raises marks the batch's documents failed with
its traceback and fails the task with the same traceback (``mlw show TASK``). Every ``sweep_seconds`` the worker
also queues pending documents no task covers (writes by processes that did not know the listener yet) and
computes the pending documents of inline listeners.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from mlwarehouse import schema
from mlwarehouse.collections import listeners as engine
from mlwarehouse.collections import outputs
from mlwarehouse.collections.queueing import enqueue_pending
from mlwarehouse.errors import BackendError, NotFound
from mlwarehouse.ids import new_id

__all__ = ["ListenerWorker"]

TASK = schema.LISTENER_TASK


class ListenerWorker:
    """Claims listener tasks of a project and computes them in this process until stopped."""

    def __init__(self, project, *, lease_seconds: float = 30.0, poll_interval: float = 0.2,
                 sweep_seconds: float = 10.0, verbose: bool = False, once: bool = False):
        self.project = project
        self.tasks = project.tasks
        self.lease_seconds = float(lease_seconds)
        self.poll_interval = poll_interval
        self.sweep_seconds = sweep_seconds
        self.verbose = verbose
        self.once = once
        self.id = f"{socket.gethostname()}:{os.getpid()}:{new_id()[-6:]}:listeners"
        self.processed = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Work until stopped (with ``once``, until nothing is pending); returns the batches computed."""
        next_sweep, next_requeue = 0.0, 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_requeue:
                    self.tasks.requeue_expired(TASK)
                    next_requeue = now + self.lease_seconds / 2
                if now >= next_sweep:
                    self.sweep()
                    next_sweep = now + self.sweep_seconds
                task = self.tasks.claim(TASK, self.id, self.lease_seconds)
            except BackendError as exc:
                self._say(f"warehouse error, retrying: {exc}")
                self._stop.wait(1.0)
                continue
            if task is not None:
                self.run_task(task)
                continue
            if self.once:
                if self.sweep():  # work the finished batches made pending (listeners reading their outputs)
                    continue
                break
            if self.project.wakes_on_writes:
                self.project.listen(schema.TASKS, min(1.0, self.sweep_seconds))
            else:
                self._stop.wait(self.poll_interval)
        return self.processed

    def sweep(self) -> int:
        """Queue what no task covers, and compute inline listeners' pending documents (trusted: a worker);
        returns the tasks queued and outputs written."""
        found = 0
        for name in self.project.catalog.names():
            collection = self.project.collection(name)
            for listener in engine.ordered(engine.active(collection)):
                if listener.compute == "workers":
                    found += enqueue_pending(collection, listener)
                else:
                    found += outputs.catch_up(collection, listener.name, trusted=True, raise_failures=False)
        return found

    def run_task(self, task) -> None:
        lease = task.doc.get("lease")
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(task.id, lease, done), daemon=True)
        beat.start()
        try:
            hp = task.doc.get("hyper_parameters") or {}
            collection = self.project.collection(hp.get("collection"))
            try:
                listener = engine.get(collection, hp.get("listener"))
            except NotFound as exc:
                self.tasks.finish(task.id, self.id, {"skipped": str(exc)}, lease=lease)
                return
            ids = list(hp.get("ids") or ())
            docs = list(collection.table.find({"_id": {"$in": ids}}, sort=[("_id", 1)]))
            outcome = outputs.process(collection, listener, docs, trusted=True)
            if outcome.errors:
                self.tasks.fail(task.id, self.id, outcome.errors[0], retry=False, lease=lease)
            else:
                self.tasks.finish(task.id, self.id, {"written": outcome.written, "documents": len(ids)},
                                  lease=lease)
            self.processed += 1
            self._say(f"listener {listener.name!r} of {collection.name!r}: {outcome.written} written, "
                      f"{outcome.failed} failed")
        except Exception as exc:  # anything else (the store, a model that cannot load): the task says why
            self.tasks.fail(task.id, self.id, outputs.traceback_tail(exc), retry=True, lease=lease)
        finally:
            done.set()

    def _heartbeat(self, task_id: str, lease: str | None, done: threading.Event) -> None:
        while not done.wait(self.lease_seconds / 3):
            try:
                self.tasks.heartbeat(task_id, self.id, self.lease_seconds, lease=lease)
            except BackendError:
                pass

    def _say(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)
