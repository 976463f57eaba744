"""Runs, their logs and metric summaries.

A run (collection :data:`mlwarehouse.schema.RUNS`) has a status (``running``, ``complete``, ``failed``,
``cancelled``), hyper-parameters, the ids of the datasets it used, tags, and per-metric summaries
(``summary.<kind>.<metric>.<stat>``, see :mod:`mlwarehouse.runs.summary`) kept up to date while it logs, so "the
run with the best validation accuracy" is one indexed query (:meth:`Runs.best`). Logs (:data:`mlwarehouse.schema.LOGS`)
are flat documents ``{_id, project, time, run, kind, step, epoch, <metrics>}``; ``run.log()`` queues them for the
background writer (:mod:`mlwarehouse.runs.logwriter`) and returns at once. Reads in this module flush the writer
first, so they see everything logged before them.

    with wh.runs.start("mlp", hyper_parameters={"lr": 0.01}) as run:   # complete on exit, failed on error
        run.log("train", step=i, loss=loss)                            # never blocks training
    wh.runs.best("valid.accuracy")                                     # summary.valid.accuracy.max, indexed
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mlwarehouse import schema
from mlwarehouse.context import current_run, pop_run, push_run
from mlwarehouse.errors import InvalidDocument, NotFound, QueryError, WarehouseError
from mlwarehouse.ids import new_id, utc_now
from mlwarehouse.index.autoindex import QueryIndexes
from mlwarehouse.lineage.nodes import Ref, describe
from mlwarehouse.query import split_path
from mlwarehouse.query.documents import check_value
from mlwarehouse.query.fields import normalize_fields, normalize_value
from mlwarehouse.query.records import Record, find_by_id, name_filter
from mlwarehouse.runs import blocks, summary
from mlwarehouse.runs.logwriter import INT64, LogWriter, as_step, check_kind, check_metric_name

__all__ = ["Runs", "Run", "current_run", "STATUSES"]

STATUSES = ("running", "complete", "failed", "cancelled")
RUNS = schema.RUNS.name
LOGS = schema.LOGS.name
_RUN_FIELDS = frozenset({"status", "started", "ended", "host", "pid", summary.ROOT, "error", "traceback"})
#: the fields of a run document that queries do not get indexes of their own for (the schema's, or bookkeeping)
_NOT_INDEXED = frozenset({"_id", "_blobs", "project", "time", "name", "status", "started", "ended", "host", "pid",
                          "error", "traceback", "datasets", "tags", "task"})


def _open_field(path: str) -> bool:
    """Summaries, hyper-parameters and the user's own fields: what ``find`` and ``best`` index on demand."""
    return path.split(".", 1)[0] not in _NOT_INDEXED


def _user_fields(fields: dict) -> dict:
    """User fields of a run, normalized; InvalidDocument for those the run manages itself."""
    fields = normalize_fields(fields)
    bad = sorted(set(fields) & _RUN_FIELDS)
    if bad:
        raise InvalidDocument(f"run fields {bad} are managed by the run itself")
    return fields


def _run_id(run: Any) -> str | None:
    if run is None or isinstance(run, str):
        return run
    if isinstance(run, Record):
        return run.id
    raise InvalidDocument(f"run must be a Run or a run id, not {type(run).__name__}")


class Run(Record):
    """One run: its document's fields as attributes (``run.status``, ``run.summary``), and logging."""

    def __init__(self, runs: "Runs", doc: dict):
        super().__init__(doc)
        object.__setattr__(self, "_runs", runs)
        object.__setattr__(self, "_steps", {})
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_kinds", set())
        object.__setattr__(self, "_names", set())
        object.__setattr__(self, "nonfinite", 0)
        object.__setattr__(self, "_fresh", False)  # started by this object: no stored steps to continue after

    # -- logging -------------------------------------------------------------------------------------------
    def log(self, kind: str = "train", *, step: int | None = None, epoch: int | None = None, **metrics) -> None:
        """Queue one log point and return at once.

        ``step`` defaults to one more than the last step of this kind; NaN and infinities are stored as null and
        counted (``run.nonfinite``, and ``nulls`` in the summary). Numpy scalars and 0-d tensors are accepted.
        """
        if kind not in self._kinds:
            self._kinds.add(check_kind(kind))
        checked = self._names
        doc: dict[str, Any] = {"run": self.doc["_id"], "kind": kind, "step": None, "epoch": None}
        if epoch is not None:
            doc["epoch"] = _in_range(epoch if type(epoch) is int else as_step(epoch, "epoch"), "epoch")
        nonfinite = 0
        for key, value in metrics.items():
            t = type(value)
            if t is float:
                if value - value != 0.0:  # NaN or infinity
                    value = None
                    nonfinite += 1
            elif t is int:
                if not -INT64 <= value < INT64:
                    raise InvalidDocument(f"{key}: integer {value} does not fit in 64 bits")
            elif t is str:
                if "\0" in value or not value.isascii():
                    check_value(value, key)  # NUL or a lone surrogate: refused here, not in the writer's batch
            elif t is not bool and value is not None:
                new = normalize_value(value, key, nonfinite="null")
                if new is None:
                    nonfinite += 1
                elif isinstance(new, float):  # np.float64 is a float subclass: summaries want plain floats
                    new = float(new)
                value = new
            if key not in checked:
                checked.add(check_metric_name(key))
            doc[key] = value
        with self._lock:
            if step is None:
                step = self._next_step(kind)
            elif type(step) is not int or not -INT64 <= step < INT64 - 1:
                step = _in_range(as_step(step, "step"), "step")
            self._steps[kind] = step + 1
            if nonfinite:
                object.__setattr__(self, "nonfinite", self.nonfinite + nonfinite)
        doc["step"] = step
        doc["time"] = time.time_ns() // 1000  # microseconds: what a block stores (mlwarehouse.runs.blocks)
        self._runs.writer.put(doc)

    def log_train(self, *, step: int | None = None, epoch: int | None = None, **metrics) -> None:
        self.log("train", step=step, epoch=epoch, **metrics)

    def log_valid(self, *, step: int | None = None, epoch: int | None = None, **metrics) -> None:
        self.log("valid", step=step, epoch=epoch, **metrics)

    def log_test(self, *, step: int | None = None, epoch: int | None = None, **metrics) -> None:
        self.log("test", step=step, epoch=epoch, **metrics)

    def _next_step(self, kind: str) -> int:
        step = self._steps.get(kind)
        if step is None and self._fresh:
            step = 0
        elif step is None:  # a run picked up again: continue after its highest stored step of this kind
            self._runs.flush()
            top = blocks.last_step(self._runs.project, self.id, kind)
            step = top + 1 if top is not None else 0
        return step

    def flush(self) -> "Run":
        """Block until every point logged so far is durable."""
        self._runs.flush()
        return self

    # -- state ---------------------------------------------------------------------------------------------
    def set(self, **fields) -> "Run":
        """Set user fields on the run's document (``run.set(notes="...", test_accuracy=0.91)``)."""
        fields = _user_fields(fields)
        if fields:
            self._runs.project.update(RUNS, {"_id": self.id}, {"$set": fields})
            self.doc.update(fields)
        return self

    @property
    def warehouse_settings(self):
        """Where this run is stored (the URIs), to tell whether another handle points at the same warehouse."""
        return self._runs.project.warehouse.settings

    def use_datasets(self, *datasets) -> "Run":
        """Record datasets (records or ids) this run used: the lineage run -> dataset. ``datasets.load`` inside
        a run records what it loads by itself."""
        ids = [_dataset_id(d) for d in datasets]
        new = [i for i in ids if i not in self.doc.get("datasets", [])]
        if new:
            self._runs.project.update(RUNS, {"_id": self.id}, {"$addToSet": {"datasets": {"$each": new}}})
            self.doc.setdefault("datasets", []).extend(new)
            given = {_dataset_id(d): d for d in datasets}
            self._runs.project.lineage.record_many(
                [(_dataset_ref(given[i]), describe(RUNS, self.doc), "input") for i in dict.fromkeys(new)])
        return self

    def finish(self, status: str = "complete", **fields) -> "Run":
        """End the run with ``status`` after flushing its logs; a writer error marks it failed and is raised."""
        if status not in STATUSES or status == "running":
            raise QueryError(f"a run finishes as one of {STATUSES[1:]}, not {status!r}")
        try:
            self._runs.flush()
        except WarehouseError as exc:
            self._end("failed", {"error": f"{type(exc).__name__}: {exc}"})
            raise
        self._end(status, normalize_fields(fields) if fields else {})
        return self

    def fail(self, error: BaseException | str) -> "Run":
        """End the run as failed, keeping the error text (and the traceback of an exception)."""
        fields: dict[str, Any] = {}
        if isinstance(error, BaseException):
            fields["error"] = f"{type(error).__name__}: {error}"
            if error.__traceback__ is not None:
                fields["traceback"] = "".join(traceback.format_exception(error))
        else:
            fields["error"] = str(error)
        try:
            self._runs.flush()
        except WarehouseError as exc:
            fields["error"] += f" (and the log writer failed: {exc})"
            self._end("failed", fields)
            raise
        self._end("failed", fields)
        return self

    def _end(self, status: str, fields: dict) -> None:
        update = {"status": status, "ended": utc_now(), **fields}
        # only a running run ends: finish() after fail() (or a second finish) leaves the first ending as it is
        self._runs.project.update(RUNS, {"_id": self.id, "status": "running"}, {"$set": update})
        self._runs.writer.forget([self.id])
        pop_run(self)
        self.refresh()

    def refresh(self) -> "Run":
        """Re-read the run's document (status, summaries) from the index."""
        doc = self._runs.project.find_one(RUNS, {"_id": self.id})
        if doc is None:
            raise NotFound(f"run {self.id!r} was deleted")
        object.__setattr__(self, "doc", doc)
        return self

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.doc.get("status") != "running":
            return
        if exc is None:
            self.finish()
        elif isinstance(exc, KeyboardInterrupt):
            self.finish("cancelled", error="KeyboardInterrupt")
        else:
            self.fail(exc)

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Run) and other.id == self.id)

    def __hash__(self) -> int:
        return hash(self.id)

    # -- reading back --------------------------------------------------------------------------------------
    def history(self, kind: str = "train", metrics: Sequence[str] | None = None) -> list[dict]:
        """The points of one kind in step order: ``{"step", "epoch", "time", <metrics>}`` each."""
        self._runs.flush()
        points = blocks.read_points(self._runs.project, {"run": self.id, "kind": check_kind(kind)}, bare=True)
        if metrics is not None:
            keep = {"step", "epoch", "time", *metrics}
            points = [{k: v for k, v in p.items() if k in keep} for p in points]
        return points

    def metric(self, kind: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One metric's history as ``(steps int64, values float64)`` arrays; null values are NaN."""
        self._runs.flush()
        split_path(name, "metric")
        col_steps, col_values = blocks.read_columns(self._runs.project, self.id, check_kind(kind), ["step", name],
                                                    require=name)
        steps = np.fromiter((s if type(s) is int else -1 for s in col_steps), np.int64, len(col_steps))
        values = np.fromiter((v if type(v) is float or type(v) is int else math.nan for v in col_values),
                             np.float64, len(col_values))
        return steps, values


class Runs:
    """The runs and logs of one project (``wh.runs``)."""

    def __init__(self, project):
        self.project = project
        self._writer: LogWriter | None = None
        self._writer_lock = threading.Lock()
        #: the indexes made on demand for find and best (see :mod:`mlwarehouse.index.autoindex`)
        self.queries = QueryIndexes(project, RUNS, eligible=_open_field, scalar_fields=schema.RUNS.scalar_fields,
                                    declared=len(schema.RUNS.indexes))
        project.ensure(schema.RUNS)
        project.ensure(schema.LOGS)

    @property
    def writer(self) -> LogWriter:
        """The background log writer of this project (started on first use)."""
        if self._writer is None:
            with self._writer_lock:
                if self._writer is None:
                    self._writer = LogWriter(self.project)
        return self._writer

    def flush(self) -> None:
        """Block until every queued log point is durable (raises the writer's error, if any)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and stop the writer (``wh.close()`` does this); this project's runs stop being current."""
        pop_run(where=lambda r: r._runs is self)
        if self._writer is not None:
            self._writer.close()

    # -- runs ----------------------------------------------------------------------------------------------
    def start(self, name: str | None = None, *, hyper_parameters: dict | None = None, datasets: Iterable = (),
              tags: Iterable[str] = (), task: Any = None, **fields) -> Run:
        """Start a run (status "running") and make it the current run until it finishes.

        Use it as a context manager: complete on normal exit, failed (with the error) on an exception,
        cancelled on Ctrl-C. ``datasets`` takes dataset records or ids; extra keyword fields are stored too.
        """
        return self._start(name, hyper_parameters, datasets, tags, task, fields, current=True)

    def _start(self, name, hyper_parameters, datasets, tags, task, fields: dict, *, current: bool) -> Run:
        if name is not None and not isinstance(name, str):
            raise InvalidDocument(f"a run name must be a string, not {type(name).__name__}")
        extra = _user_fields(fields)
        datasets = list(datasets)  # read twice: the document's ids, then the lineage edges
        if isinstance(tags, str):
            tags = [tags]
        tags = list(tags)
        if not all(isinstance(t, str) for t in tags):
            raise InvalidDocument(f"tags must be strings, got {tags!r}")
        run_id = new_id()
        doc = {
            "_id": run_id,
            "name": name if name is not None else f"run-{run_id[-8:].lower()}",
            "status": "running",
            "started": utc_now(),
            "ended": None,
            "hyper_parameters": normalize_value(dict(hyper_parameters or {}), "hyper_parameters"),
            "datasets": [_dataset_id(d) for d in datasets],
            "tags": tags,
            "task": _run_id(task),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            summary.ROOT: {},
            **extra,
        }
        self.project.insert(RUNS, doc)
        me = describe(RUNS, doc)
        edges = [(_dataset_ref(d), me, "input") for d in datasets]
        if doc["task"] is not None:
            edges.append((_task_ref(task, doc["task"]), me, "ran"))
        if edges:
            self.project.lineage.record_many(edges)
        run = Run(self, doc)
        object.__setattr__(run, "_fresh", True)
        if current:
            push_run(run)
        return run

    def get(self, id: str) -> Run:
        """The run with this id, whole or a unique prefix (NotFound otherwise)."""
        doc = find_by_id(self.project, RUNS, id, "run")
        if doc is None:
            raise NotFound(f"no run {id!r} in project {self.project.name!r}")
        return Run(self, doc)

    def find(self, name: str | None = None, *, where: dict | None = None, sort=None, limit: int | None = None,
             skip: int = 0) -> list[Run]:
        """Runs named ``name`` and matching ``where``, newest first unless ``sort`` says otherwise.

        A filter or sort on summaries, hyper-parameters or the user's fields gets an index the first time this
        process asks (:meth:`ensure_index`)."""
        flt = name_filter("run", name, where)
        sort = sort or [("started", -1)]
        self.queries.ensure(flt, sort)
        self.flush()
        return [Run(self, d) for d in self.project.find(RUNS, flt, sort=sort, limit=limit, skip=skip)]

    def ensure_index(self, where: dict | None = None, sort=None) -> list[tuple[str, int]] | None:
        """Create the index that serves ``find(where=where, sort=sort)`` (what ``find`` does by itself), e.g. for
        the sorts a page offers before anyone asks; returns its keys, or None if the query needs none of its own.
        At most :data:`mlwarehouse.index.autoindex.MAX_AUTO_INDEXES` are made; past that, a warning is logged."""
        return self.queries.ensure(where, sort or [("started", -1)])

    def best(self, metric: str | tuple[str, str], mode: str = "max", where: dict | None = None) -> Run:
        """The run with the best summary of a metric: ``"valid.accuracy"`` or ``("valid", "accuracy")``
        compares ``summary.valid.accuracy.<mode>``; a full ``"summary.<kind>.<metric>.<stat>"`` path is used as
        given. ``mode`` is "max" or "min". NotFound if no run has that metric."""
        if mode not in summary.BEST:
            raise QueryError(f"mode must be 'max' or 'min', not {mode!r}")
        if isinstance(metric, tuple) and len(metric) == 2:
            path = summary.path(check_kind(metric[0]), check_metric_name(metric[1]), mode)
        elif isinstance(metric, str) and metric.startswith(summary.ROOT + "."):
            path = summary.path(*summary.parse(metric))
        elif isinstance(metric, str) and metric.count(".") == 1:
            path = summary.path(*summary.split_key(metric), mode)
        else:
            raise QueryError(f"metric {metric!r}: write 'kind.metric', (kind, metric) or 'summary.kind.metric.stat'")
        split_path(path, "metric")
        direction = -1 if mode == "max" else 1
        keys = self.queries.keys_for(where, [(path, direction)])
        if keys is None or keys == [("project", 1), (path, direction)]:
            keys = [(path, direction)]  # the index best has always made: a warehouse seldom holds many projects
        self.queries.ensure_keys(keys)
        self.flush()
        flt = {path: {"$exists": True}}
        if where:
            flt = {"$and": [where, flt]}
        doc = self.project.find_one(RUNS, flt, sort=[(path, direction)])
        if doc is None:
            raise NotFound(f"no run in project {self.project.name!r} has {path!r}"
                           + (f" and matches {where!r}" if where else ""))
        return Run(self, doc)

    def delete(self, name: str | None = None, *, where: dict | None = None, force: bool = False) -> int:
        """Delete matching runs (all of this project's runs if neither is given) and their logs.

        A run that produced a final model (or anything else still stored, checkpoints aside) is refused with
        DependencyError unless ``force``; lineage keeps a tombstone of each deleted run that has edges."""
        flt = name_filter("run", name, where)
        self.flush()
        deleted = self.project.lineage.delete(RUNS, flt, f"run {name!r}" if name else "these runs", force=force)
        ids = [d["_id"] for d in deleted]
        for start in range(0, len(ids), 500):
            self.project.delete(LOGS, {"run": {"$in": ids[start:start + 500]}})
        if ids and self._writer is not None:
            self._writer.forget(ids)
        gone = set(ids)
        pop_run(where=lambda r: r.id in gone)
        return len(ids)

    # -- logs without (or outside) a run object -------------------------------------------------------------
    def log_point(self, kind: str, run: Any = None, **fields) -> dict:
        """Write one log document now (TensorHub's ``save_training_log``); returns it once durable."""
        doc: dict[str, Any] = {"run": _run_id(run), "kind": check_kind(kind)}
        for key, value in normalize_fields(fields, nonfinite="null").items():
            if key in ("step", "epoch"):
                doc[key] = value
            else:
                doc[check_metric_name(key)] = value
        doc["time"] = time.time_ns() // 1000
        self.writer.put_named(doc)
        self.writer.flush()
        stored = {"_id": doc.pop("_id"), "project": self.project.name, **doc}
        stored["time"] = blocks.utc_text(stored["time"])
        return stored

    def find_logs(self, kind: str | None = None, where: dict | None = None, sort=None,
                  limit: int | None = None, run: Any = None) -> list[dict]:
        """Logged points (of one kind, one run, matching ``where``) as documents, oldest first unless ``sort``
        says otherwise (see :mod:`mlwarehouse.runs.blocks` for how they are stored)."""
        self.flush()
        return blocks.read_points(self.project, self._log_filter(kind, where, run), sort=sort or [("time", 1)],
                                  limit=limit)

    def count_logs(self, kind: str | None = None, where: dict | None = None, run: Any = None) -> int:
        """How many logged points match (of one kind, one run, matching ``where``)."""
        self.flush()
        return blocks.count_points(self.project, self._log_filter(kind, where, run))

    def delete_logs(self, kind: str | None = None, where: dict | None = None, run: Any = None) -> int:
        """Delete matching logged points; returns how many. Run summaries are left as they were."""
        self.flush()
        return blocks.delete_points(self.project, self._log_filter(kind, where, run))

    @staticmethod
    def _log_filter(kind: str | None, where: dict | None, run: Any) -> dict:
        parts = [dict(where)] if where else []
        if kind is not None:
            parts.append({"kind": check_kind(kind)})
        if run is not None:
            parts.append({"run": _run_id(run)})
        if not parts:
            return {}
        return parts[0] if len(parts) == 1 else {"$and": parts}

    def __repr__(self) -> str:
        return f"<Runs of {self.project.name!r}>"


def _dataset_id(dataset: Any) -> str:
    if isinstance(dataset, str):
        return dataset
    if isinstance(dataset, Record):
        return dataset.id
    if isinstance(dataset, dict) and isinstance(dataset.get("_id"), str):
        return dataset["_id"]
    raise InvalidDocument(f"datasets takes dataset records or ids, not {type(dataset).__name__}")


def _dataset_ref(dataset: Any) -> Ref:
    """The lineage node of a dataset given as a record (name and version known) or an id (looked up)."""
    doc = dataset.doc if isinstance(dataset, Record) else dataset if isinstance(dataset, dict) else None
    if isinstance(doc, dict) and isinstance(doc.get("_id"), str) and doc.get("name") is not None:
        return describe(schema.DATASETS.name, doc)
    return Ref(_dataset_id(dataset), "dataset")


def _task_ref(task: Any, ident: str) -> Ref:
    doc = task.doc if isinstance(task, Record) else None
    if isinstance(doc, dict) and doc.get("_id") == ident and doc.get("task_name") is not None:
        return describe(schema.TASKS.name, doc)
    return Ref(ident, "task")


def _in_range(value: int, what: str) -> int:
    """Steps and epochs are stored as 64-bit integers (the next default step must fit too)."""
    if not -INT64 <= value < INT64 - 1:
        raise InvalidDocument(f"{what} {value} does not fit in 64 bits")
    return value
