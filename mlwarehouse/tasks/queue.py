"""The task queue: create tasks and sweeps, claim them with leases, finish them in one update, look at them.

States: ``pending -> running -> finished | failed | cancelled``. A worker claims the top pending task of its task
name atomically (one ``find_one_and_update``), which gives it a lease (``lease_until``, epoch seconds) that it
renews by heartbeats. A lease that expires puts the task back to pending, counted as an attempt; past
``max_attempts`` the task is failed with the last error. Status, result, output and end time are written in one
update guarded by ``worker`` and ``status``, so a worker that lost its task (cancelled, or taken over after its
lease expired) can never overwrite it, and a result is recorded once.

Scripts are stored with the task (the source as a blob, its sha256 recorded) or named as ``"module:function"``.
Nothing here runs them: only a :class:`mlwarehouse.tasks.worker.Worker`, started for that purpose, executes task code.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from mlwarehouse import schema
from mlwarehouse.context import TaskContext, current_task
from mlwarehouse.errors import InvalidDocument, NotFound, TaskError, TaskFailed
from mlwarehouse.ids import new_id, utc_now
from mlwarehouse.query.fields import normalize_fields
from mlwarehouse.query.records import Record, find_by_id, name_filter
from mlwarehouse.tasks.scripts import script_spec
from mlwarehouse.tasks.sweeps import config_hash, expand, normalize_config

__all__ = ["Tasks", "Task", "TaskContext", "current_task", "PENDING", "RUNNING", "FINISHED", "FAILED", "CANCELLED"]

COLLECTION = schema.TASKS.name
PENDING, RUNNING, FINISHED, FAILED, CANCELLED = "pending", "running", "finished", "failed", "cancelled"
UNFINISHED = [PENDING, RUNNING]
ENDED = [FINISHED, FAILED, CANCELLED]
#: captured output kept inline in the task document; longer output is stored whole as a blob
OUTPUT_TAIL = 64 * 1024
_TEXT_TAIL = 64 * 1024
_IDENT = re.compile(r"^[A-Za-z_]\w*$")
OWN_FIELDS = frozenset({
    "task_name", "status", "priority", "hyper_parameters", "config_hash", "script", "saved_result_keys",
    "max_attempts", "attempts", "timeout", "lease_until", "worker", "heartbeat", "result", "error", "output",
    "output_size", "output_blob", "created", "started", "ended", "run", "tags"})


class Task(Record):
    """A task document: ``task.status``, ``task.result``, ``task.error``, ``task.output`` (the last 64 KiB of
    its captured output; ``tasks.output(id)`` has all of it)..."""

    __slots__ = ("_tasks",)

    def __init__(self, doc: dict, tasks: "Tasks | None" = None):
        super().__init__(doc)
        object.__setattr__(self, "_tasks", tasks)

    @property
    def done(self) -> bool:
        return self.doc.get("status") in ENDED

    def refresh(self) -> "Task":
        """The task as it is stored now."""
        return self._tasks.get(self.id)


class Tasks:
    """The tasks of one project (``project.tasks``)."""

    def __init__(self, project):
        self.project = project
        self._ready = False

    def _ensure(self) -> None:
        if self._ready:
            return
        self.project.ensure(schema.TASKS)
        self._ready = True

    # -- creating ------------------------------------------------------------------------------------------
    def create(self, task_name: str, script: Any = None, *, hyper_parameters: Mapping | None = None,
               saved_result_keys: Iterable[str] | str = (), priority: float = 0, max_attempts: int = 3,
               timeout: float | None = None, tags: Iterable[str] | str = (), **fields) -> Task:
        """Create one pending task.

        ``script`` is the path of a ``.py`` file (its source is stored, so workers need no copy of it) or
        ``"module:function"`` (imported by the worker, called with the hyper-parameters as keyword arguments).
        A missing file or a syntax error raises TaskError here, not on a worker.
        """
        self._ensure()
        spec = script_spec(self.project, script)
        doc = self._new_doc(task_name, spec, normalize_config(hyper_parameters), saved_result_keys, priority,
                            max_attempts, timeout, tags, fields)
        return Task(self.project.insert(COLLECTION, doc), self)

    def sweep(self, task_name: str, script: Any = None, *, grid: Mapping[str, Iterable] | None = None,
              configs: Iterable[Mapping] | None = None, hyper_parameters: Mapping | None = None,
              saved_result_keys: Iterable[str] | str = (), priority: float = 0, max_attempts: int = 3,
              timeout: float | None = None, tags: Iterable[str] | str = (), **fields) -> list[Task]:
        """Create one task per config of a grid (dict of lists) or a list of configs; returns those created.

        Configs that already exist for ``task_name`` (same config hash, any status) are skipped, so running a
        dispatch script twice creates nothing new. ``hyper_parameters`` are shared by every config.
        """
        self._ensure()
        wanted = expand(grid, configs, normalize_config(hyper_parameters))
        spec = script_spec(self.project, script)
        existing: set[str] = set()
        hashes = [config_hash(c) for c in wanted]
        for start in range(0, len(hashes), 500):
            chunk = hashes[start:start + 500]
            for doc in self.project.find(COLLECTION, {"task_name": task_name, "config_hash": {"$in": chunk}},
                                         projection={"config_hash": 1}):
                existing.add(doc["config_hash"])
        docs = [self._new_doc(task_name, spec, config, saved_result_keys, priority, max_attempts, timeout, tags,
                              fields) for config, digest in zip(wanted, hashes) if digest not in existing]
        self.project.insert_many(COLLECTION, docs)
        return [Task(doc, self) for doc in docs]

    def _new_doc(self, task_name, spec, config, saved_result_keys, priority, max_attempts, timeout, tags,
                 fields) -> dict:
        if not isinstance(task_name, str) or not task_name:
            raise TaskError(f"task_name must be a non-empty string, not {task_name!r}")
        keys = [saved_result_keys] if isinstance(saved_result_keys, str) else list(saved_result_keys or ())
        for key in keys:
            if not isinstance(key, str) or not _IDENT.match(key):
                raise TaskError(f"saved result key {key!r} is not a Python identifier")
        if isinstance(priority, bool) or not isinstance(priority, (int, float)):
            raise TaskError(f"priority must be a number, not {priority!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise TaskError(f"max_attempts must be an integer >= 1, not {max_attempts!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise TaskError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        tags = [tags] if isinstance(tags, str) else list(tags or ())
        if not all(isinstance(t, str) for t in tags):
            raise InvalidDocument(f"tags must be strings: {tags!r}")
        extra = normalize_fields(fields)
        clash = sorted(OWN_FIELDS & set(extra))
        if clash:
            raise InvalidDocument(f"field {clash[0]!r} is set by the task queue; choose another name")
        return {"task_name": task_name, "status": PENDING, "priority": priority, "hyper_parameters": config,
                "config_hash": config_hash(config), "script": spec, "saved_result_keys": keys,
                "max_attempts": max_attempts, "attempts": 0, "timeout": timeout, "lease_until": None,
                "worker": None, "heartbeat": None, "result": None, "error": None, "output": None,
                "created": utc_now(), "started": None, "ended": None, "run": None, "tags": tags, **extra}

    # -- looking -------------------------------------------------------------------------------------------
    def get(self, id: str) -> Task:
        """The task with this id, whole or a unique prefix (NotFound otherwise)."""
        doc = find_by_id(self.project, COLLECTION, id, "task")
        if doc is None:
            raise NotFound(f"no task {id!r} in project {self.project.name!r}")
        return Task(doc, self)

    def find(self, task_name: str | None = None, *, where: Mapping | None = None,
             status: str | Iterable[str] | None = None, sort=None, limit: int | None = None,
             skip: int = 0) -> list[Task]:
        """Tasks of ``task_name`` (and ``status``) matching ``where``, oldest first unless ``sort`` says
        otherwise."""
        flt = self._filter(where, _task_name(task_name), status)
        return [Task(d, self) for d in self.project.find(COLLECTION, flt, sort=sort or [("_id", 1)], limit=limit,
                                                         skip=skip)]

    def has_unfinished(self, task_name: str | None = None, where: Mapping | None = None) -> bool:
        """True while a matching task is pending or running."""
        return self.project.count(COLLECTION, self._filter(where, task_name, UNFINISHED)) > 0

    def output(self, task_id: str) -> str:
        """The whole captured stdout/stderr of a task's last attempt."""
        doc = self.get(task_id).doc
        if doc.get("output_blob"):
            return bytes(self.project.unpack(doc["output_blob"])).decode("utf-8", "replace")
        return doc.get("output") or ""

    def wait(self, tasks: Any, *, timeout: float | None = None, progress: bool = True, poll: float = 0.5,
             raise_on_failure: bool = False) -> list[Task]:
        """Block until the tasks (ids, records, or a filter re-evaluated at each poll) have all ended.

        Shows a progress bar when ``progress`` and stdout is a terminal. Raises TaskError on ``timeout``, and
        TaskFailed for the first failed or cancelled task if ``raise_on_failure``.
        """
        ids, flt = self._wait_target(tasks)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Progress(len(ids) if ids is not None else None) if progress and sys.stdout.isatty() else None
        waiting = list(ids) if ids is not None else None
        try:
            while True:
                if waiting is not None:
                    # a poll reads the tasks not seen ended yet; once none is left, the last read takes them
                    # all, whole, and any that a retry put back meanwhile is waited for again
                    waiting = self._unended(waiting, projection={"status": 1})
                    if not waiting:
                        docs = self._by_ids(ids)
                        waiting = self._unended(ids, docs)
                    total, done = len(ids), len(ids) - len(waiting)
                else:
                    docs = self.project.find(COLLECTION, flt, projection={"status": 1})
                    total, done = len(docs), sum(d["status"] in ENDED for d in docs)
                if bar is not None:
                    bar.update(done, total)
                if done == total:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TaskError(f"{total - done} of {total} tasks still unfinished after {timeout} s")
                time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        finally:
            if bar is not None:
                bar.close()
        if ids is not None:
            by_id = {d["_id"]: d for d in docs}
            records = [Task(by_id[i], self) for i in ids]
        else:
            records = self.find(where=flt)
        if raise_on_failure:
            for task in records:
                if task.status != FINISHED:
                    tail = str(task.get("error") or "")[-2000:]
                    raise TaskFailed(f"task {task.id} ({task.task_name}) ended {task.status}: {tail}", task.doc)
        return records

    def _wait_target(self, tasks: Any) -> tuple[list[str] | None, dict | None]:
        if isinstance(tasks, Mapping):
            return None, dict(tasks)
        if isinstance(tasks, (str, Task)):
            tasks = [tasks]
        ids = list(dict.fromkeys(t.id if isinstance(t, Task) else t for t in tasks))
        if not all(isinstance(i, str) for i in ids):
            raise TaskError("wait() takes task ids, task records, or a filter dict")
        return ids, None

    # -- changing ------------------------------------------------------------------------------------------
    def cancel(self, where: Any = None) -> int:
        """Cancel pending and running tasks (a worker kills a cancelled task's process); returns how many."""
        flt = self._filter(self._where(where), None, UNFINISHED)
        return self.project.update(COLLECTION, flt, {"$set": {"status": CANCELLED, "ended": utc_now(),
                                                              "lease_until": None}})

    def retry(self, where: Any = None) -> int:
        """Put failed and cancelled tasks back to pending with their attempts reset; returns how many."""
        flt = self._filter(self._where(where), None, [FAILED, CANCELLED])
        return self.project.update(COLLECTION, flt, {"$set": {
            "status": PENDING, "attempts": 0, "worker": None, "lease_until": None, "result": None,
            "ended": None}})

    def delete(self, task_name: str | None = None, *, where: Mapping | None = None, force: bool = False) -> int:
        """Delete matching tasks (all of this project's if neither is given) and blobs only they used; a running
        one's worker kills it. Returns how many. A task whose run is still stored is refused (DependencyError)
        unless ``force``; lineage keeps a tombstone of each deleted task that ran a run."""
        flt = self._filter(where, _task_name(task_name), None)
        what = f"task {task_name!r}" if task_name else "these tasks"
        return len(self.project.lineage.delete(COLLECTION, flt, what, force=force))

    # -- the worker protocol -------------------------------------------------------------------------------
    def claim(self, task_name: str | None, worker: str, lease_seconds: float = 30.0, *,
              where: Mapping | None = None, sort=None) -> Task | None:
        """Atomically take the top pending task (highest priority, then oldest) and lease it to ``worker``."""
        # no _ensure() here: creating indexes (and the statistics the backend gathers then) is the creator's job
        flt = self._filter(where, task_name, PENDING)
        now = utc_now()
        doc = self.project.find_one_and_update(
            COLLECTION, flt,
            {"$set": {"status": RUNNING, "worker": worker, "lease_until": time.time() + lease_seconds,
                      "lease": new_id(), "started": now, "heartbeat": now}, "$inc": {"attempts": 1}},
            sort=sort or [("priority", -1), ("_id", 1)])
        return None if doc is None else Task(doc, self)

    def has_pending(self, task_name: str | None = None, where: Mapping | None = None) -> bool:
        """A cheap read (no write lock) that workers make before trying to claim while idle."""
        return self.project.find_one(COLLECTION, self._filter(where, task_name, PENDING),
                                     projection={"_id": 1}) is not None

    # Every claim draws a new ``lease`` token. The calls below take it (``lease=``) so that an attempt the
    # task has moved on from (cancelled and retried, requeued) cannot act for a later claim by the same worker.
    def heartbeat(self, task_id: str, worker: str, lease_seconds: float = 30.0, *, lease: str | None = None) -> bool:
        """Renew the lease; False if the task is no longer ours (cancelled, deleted or taken over)."""
        return self.project.update(COLLECTION, self._owned(task_id, worker, lease), {"$set": {
            "lease_until": time.time() + lease_seconds, "heartbeat": utc_now()}}) > 0

    def set_run(self, task_id: str, worker: str, run_id: str, *, lease: str | None = None) -> bool:
        """Record the run that the task's current attempt writes to."""
        return self.project.update(COLLECTION, self._owned(task_id, worker, lease), {"$set": {"run": run_id}}) > 0

    def finish(self, task_id: str, worker: str, result: Mapping | None = None, *, output: bytes | None = None,
               lease: str | None = None) -> bool:
        """Mark the task finished with its result, output and end time in one update; False if no longer ours."""
        update = self._output_update(output)
        update["$set"].update(status=FINISHED, result=dict(result or {}), ended=utc_now(), lease_until=None,
                              error=None)
        return self.project.update(COLLECTION, self._owned(task_id, worker, lease), update) > 0

    def fail(self, task_id: str, worker: str, error: str, *, retry: bool = True,
             output: bytes | None = None, lease: str | None = None) -> str | None:
        """End this attempt with an error: back to pending if attempts are left and ``retry``, else failed.

        Returns the new status, or None if the task was no longer ours.
        """
        doc = self.project.find_one(COLLECTION, self._owned(task_id, worker, lease),
                                    projection={"attempts": 1, "max_attempts": 1})
        if doc is None:
            return None
        status = PENDING if retry and doc.get("attempts", 0) < doc.get("max_attempts", 1) else FAILED
        update = self._output_update(output)
        update["$set"].update(status=status, error=str(error)[-_TEXT_TAIL:], lease_until=None)
        if status == FAILED:
            update["$set"]["ended"] = utc_now()
        else:
            update["$set"]["worker"] = None
        return status if self.project.update(COLLECTION, self._owned(task_id, worker, lease), update) else None

    def release(self, task_id: str, worker: str, *, lease: str | None = None) -> bool:
        """Give a claimed task back to pending without counting the attempt (a worker shutting down)."""
        return self.project.update(COLLECTION, self._owned(task_id, worker, lease), {
            "$set": {"status": PENDING, "worker": None, "lease_until": None}, "$inc": {"attempts": -1}}) > 0

    def requeue_expired(self, task_name: str | None = None) -> int:
        """Return running tasks whose lease expired to pending (an attempt is counted), or fail them if no
        attempts are left; returns how many were changed. Workers call this periodically."""
        flt = self._filter({"lease_until": {"$lt": time.time()}}, task_name, RUNNING)
        changed = 0
        for doc in self.project.find(COLLECTION, flt, projection={
                "attempts": 1, "max_attempts": 1, "worker": 1, "lease_until": 1, "error": 1, "run": 1}):
            attempts, worker = doc.get("attempts", 0), doc.get("worker")
            guard = {"_id": doc["_id"], "status": RUNNING, "worker": worker, "lease_until": doc.get("lease_until")}
            note = f"lease expired after {attempts} attempt{'s' * (attempts != 1)} (worker {worker} stopped " \
                   f"heartbeating)"
            if attempts < doc.get("max_attempts", 1):
                update = {"$set": {"status": PENDING, "worker": None, "lease_until": None}}
            else:
                previous = doc.get("error")
                error = note + (f"\n\nlast error:\n{previous}" if previous else "")
                update = {"$set": {"status": FAILED, "error": error[-_TEXT_TAIL:], "lease_until": None,
                                   "ended": utc_now()}}
            if self.project.update(COLLECTION, guard, update):
                changed += 1
                self.end_run(doc.get("run"), "failed", note)
        return changed

    def end_run(self, run_id: str | None, status: str, error: str) -> None:
        """Close a run that its task process could not close (killed, timed out, lease expired)."""
        if run_id:
            self.project.update(schema.RUNS.name, {"_id": run_id, "status": "running"},
                                {"$set": {"status": status, "error": error, "ended": utc_now()}})

    # -- helpers -------------------------------------------------------------------------------------------
    def _output_update(self, output: bytes | None) -> dict:
        update: dict = {"$set": {}}
        if output is None:
            return update
        data = bytes(output)
        update["$set"].update(output=data[-OUTPUT_TAIL:].decode("utf-8", "replace"), output_size=len(data),
                              output_blob=None)
        if len(data) > OUTPUT_TAIL:
            ref = self.project.pack(data)  # blob first, index second
            update["$set"]["output_blob"] = ref
            update["$addToSet"] = {"_blobs": ref["_blob"]}
        return update

    @staticmethod
    def _owned(task_id: str, worker: str, lease: str | None = None) -> dict:
        owned = {"_id": task_id, "worker": worker, "status": RUNNING}
        if lease is not None:
            owned["lease"] = lease
        return owned

    @staticmethod
    def _where(where: Any) -> dict | None:
        if where is None or isinstance(where, Mapping):
            return dict(where) if where else None
        if isinstance(where, str):
            return {"_id": where}
        if isinstance(where, Task):
            return {"_id": where.id}
        ids = [w.id if isinstance(w, Task) else w for w in where]
        return {"_id": {"$in": ids}}

    def _unended(self, ids: list[str], docs: list[dict] | None = None, projection: dict | None = None) -> list[str]:
        """Those of ``ids`` whose task has not ended (their ``docs``, read if not given); NotFound for a missing
        one."""
        docs = self._by_ids(ids, projection=projection) if docs is None else docs
        status = {d["_id"]: d["status"] for d in docs}
        for i in ids:
            if i not in status:
                raise NotFound(f"no task {i!r} in project {self.project.name!r}")
        return [i for i in ids if status[i] not in ENDED]

    def _by_ids(self, ids: list[str], projection: dict | None = None) -> list[dict]:
        """The tasks with these ids, read in chunks (a sweep's ids can outnumber one query's terms)."""
        return [doc for start in range(0, len(ids), 1000)
                for doc in self.project.find(COLLECTION, {"_id": {"$in": ids[start:start + 1000]}},
                                             projection=projection)]

    @staticmethod
    def _filter(where: Mapping | None, task_name: str | None, status: str | Iterable[str] | None) -> dict:
        flt: dict = {}
        if task_name is not None:
            flt["task_name"] = task_name
        if status is not None:
            flt["status"] = status if isinstance(status, str) else {"$in": list(status)}
        if not where:
            return flt
        if not isinstance(where, Mapping):
            raise TaskError(f"where must be a filter dict, not {type(where).__name__}")
        if set(where) & set(flt):
            return {"$and": [flt, dict(where)]} if flt else dict(where)
        return {**where, **flt}


def _task_name(task_name: Any) -> str | None:
    """A task name argument; a filter dict passed in its place (the old positional ``where``) says to use where=."""
    if task_name is None:
        return None
    name_filter("task", task_name, None, field="task_name")
    return task_name


class _Progress:
    """A rich progress bar of ended tasks (only drawn when stdout is a terminal)."""

    def __init__(self, total: int | None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn("tasks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bar.start()
        self.job = self.bar.add_task("tasks", total=total)

    def update(self, done: int, total: int) -> None:
        self.bar.update(self.job, completed=done, total=total)

    def close(self) -> None:
        self.bar.stop()
