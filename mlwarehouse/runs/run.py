"""One run (:class:`Run`): logging, its state (finish, fail, fields, datasets used) and reading its logs back.

``run.log()`` queues a point for the background writer (:mod:`mlwarehouse.runs.logwriter`, which stores points in
blocks: :mod:`mlwarehouse.runs.blocks`) and returns at once; reads flush the writer first, so they see everything
logged before them. The collection of runs, starting and finding them: :mod:`mlwarehouse.runs.registry`.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlwarehouse import schema
from mlwarehouse.context import pop_run
from mlwarehouse.errors import InvalidDocument, NotFound, QueryError, WarehouseError
from mlwarehouse.ids import utc_now
from mlwarehouse.lineage.nodes import Ref, describe
from mlwarehouse.query import split_path
from mlwarehouse.query.documents import check_value
from mlwarehouse.query.fields import normalize_fields, normalize_value
from mlwarehouse.query.records import Record
from mlwarehouse.runs import blocks
from mlwarehouse.runs.logwriter import INT64, as_step, check_kind, check_metric_name
from mlwarehouse.runs.summary import ROOT

__all__ = ["Run", "STATUSES", "id_of_run", "user_fields", "dataset_id", "dataset_ref"]

STATUSES = ("running", "complete", "failed", "cancelled")
RUNS = schema.RUNS.name
_RUN_FIELDS = frozenset({"status", "started", "ended", "host", "pid", ROOT, "error", "traceback"})


def user_fields(fields: dict) -> dict:
    """User fields of a run, normalized; InvalidDocument for those the run manages itself."""
    fields = normalize_fields(fields)
    bad = sorted(set(fields) & _RUN_FIELDS)
    if bad:
        raise InvalidDocument(f"run fields {bad} are managed by the run itself")
    return fields


def id_of_run(run: Any) -> str | None:
    if run is None or isinstance(run, str):
        return run
    if isinstance(run, Record):
        return run.id
    raise InvalidDocument(f"run must be a Run or a run id, not {type(run).__name__}")


class Run(Record):
    """One run: its document's fields as attributes (``run.status``, ``run.summary``), and logging."""

    def __init__(self, runs: Any, doc: dict):  # runs: the project's Runs (mlwarehouse.runs.registry)
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
        (self._runs._writer or self._runs.writer).put(doc)  # the property only until the writer exists

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
        fields = user_fields(fields)
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
        ids = [dataset_id(d) for d in datasets]
        new = [i for i in ids if i not in self.doc.get("datasets", [])]
        if new:
            self._runs.project.update(RUNS, {"_id": self.id}, {"$addToSet": {"datasets": {"$each": new}}})
            self.doc.setdefault("datasets", []).extend(new)
            given = {dataset_id(d): d for d in datasets}
            self._runs.project.lineage.record_many(
                [(dataset_ref(given[i]), describe(RUNS, self.doc), "input") for i in dict.fromkeys(new)])
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


def dataset_id(dataset: Any) -> str:
    if isinstance(dataset, str):
        return dataset
    if isinstance(dataset, Record):
        return dataset.id
    if isinstance(dataset, dict) and isinstance(dataset.get("_id"), str):
        return dataset["_id"]
    raise InvalidDocument(f"datasets takes dataset records or ids, not {type(dataset).__name__}")


def dataset_ref(dataset: Any) -> Ref:
    """The lineage node of a dataset given as a record (name and version known) or an id (looked up)."""
    doc = dataset.doc if isinstance(dataset, Record) else dataset if isinstance(dataset, dict) else None
    if isinstance(doc, dict) and isinstance(doc.get("_id"), str) and doc.get("name") is not None:
        return describe(schema.DATASETS.name, doc)
    return Ref(dataset_id(dataset), "dataset")


def _in_range(value: int, what: str) -> int:
    """Steps and epochs are stored as 64-bit integers (the next default step must fit too)."""
    if not -INT64 <= value < INT64 - 1:
        raise InvalidDocument(f"{what} {value} does not fit in 64 bits")
    return value
