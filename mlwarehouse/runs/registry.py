"""The runs of a project (``wh.runs``): starting, finding, ranking and deleting them, and logs outside a run object.

A run (collection :data:`mlwarehouse.schema.RUNS`, one :class:`~mlwarehouse.runs.run.Run` each) has a status
(``running``, ``complete``, ``failed``, ``cancelled``), hyper-parameters, the ids of the datasets it used, tags,
and per-metric summaries (``summary.<kind>.<metric>.<stat>``, see :mod:`mlwarehouse.runs.summary`) kept up to
date while it logs, so "the run with the best validation accuracy" is one indexed query (:meth:`Runs.best`).
Logged points are stored in blocks (:mod:`mlwarehouse.runs.blocks`) by the background writer
(:mod:`mlwarehouse.runs.logwriter`); reads here flush the writer first, so they see everything logged before them.

    with wh.runs.start("mlp", hyper_parameters={"lr": 0.01}) as run:   # complete on exit, failed on error
        run.log("train", step=i, loss=loss)                            # never blocks training
    wh.runs.best("valid.accuracy")                                     # summary.valid.accuracy.max, indexed
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from mlwarehouse import schema
from mlwarehouse.context import current_run, pop_run, push_run
from mlwarehouse.errors import InvalidDocument, NotFound, QueryError
from mlwarehouse.ids import new_id, utc_now
from mlwarehouse.index.autoindex import QueryIndexes
from mlwarehouse.lineage.nodes import Ref, describe
from mlwarehouse.query import split_path
from mlwarehouse.query.fields import normalize_fields, normalize_value
from mlwarehouse.query.records import Record, find_by_id, name_filter
from mlwarehouse.runs import blocks, summary
from mlwarehouse.runs.logwriter import LogWriter, check_kind, check_metric_name
from mlwarehouse.runs.run import STATUSES, Run, dataset_id, dataset_ref, id_of_run, user_fields

__all__ = ["Runs", "Run", "current_run", "STATUSES"]

RUNS = schema.RUNS.name
LOGS = schema.LOGS.name
#: the fields of a run document that queries do not get indexes of their own for (the schema's, or bookkeeping)
_NOT_INDEXED = frozenset({"_id", "_blobs", "project", "time", "name", "status", "started", "ended", "host", "pid",
                          "error", "traceback", "datasets", "tags", "task"})


def _open_field(path: str) -> bool:
    """Summaries, hyper-parameters and the user's own fields: what ``find`` and ``best`` index on demand."""
    return path.split(".", 1)[0] not in _NOT_INDEXED


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
        extra = user_fields(fields)
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
            "datasets": [dataset_id(d) for d in datasets],
            "tags": tags,
            "task": id_of_run(task),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            summary.ROOT: {},
            **extra,
        }
        self.project.insert(RUNS, doc)
        me = describe(RUNS, doc)
        edges = [(dataset_ref(d), me, "input") for d in datasets]
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
        doc: dict[str, Any] = {"run": id_of_run(run), "kind": check_kind(kind)}
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
            parts.append({"run": id_of_run(run)})
        if not parts:
            return {}
        return parts[0] if len(parts) == 1 else {"$and": parts}

    def __repr__(self) -> str:
        return f"<Runs of {self.project.name!r}>"


def _task_ref(task: Any, ident: str) -> Ref:
    doc = task.doc if isinstance(task, Record) else None
    if isinstance(doc, dict) and doc.get("_id") == ident and doc.get("task_name") is not None:
        return describe(schema.TASKS.name, doc)
    return Ref(ident, "task")


