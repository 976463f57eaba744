"""Evaluations: one value per (model, data, metric), with the run that computed it (``wh.models.evaluations``).

They hang off the model registry (``wh.models.evaluations``, not ``wh.evaluations``): an evaluation is always of a
model, ``name@alias`` spellings resolve through the registry, and the warehouse's front door stays small.

``data`` is what the model was evaluated on, normalized to a stable ``data`` key:

- a dataset (or item-dataset) version, as its record or id: the key is the version's id (so an import that gives
  the dataset a new id rewrites the key with it);
- a query spec ``{"collection": "products", "filter": {"split": "test"}}``: the key is ``q:`` + a digest of
  the collection and the filter, so the same query spelled with its keys in another order is the same key.

``fold`` (any JSON value, or a :class:`~mlwarehouse.training.folds.Folds`-like object with ``to_doc()``, e.g.
``{"valid": 0.2, "seed": 0, "part": "valid"}``) is stored as canonical JSON text (``""``: no fold) beside ``data``.
``record``, ``get`` and ``best`` take ``fold=None`` as "no fold"; ``find`` as "any fold".

The unique index on (project, model, data, fold, metric) means evaluating twice never duplicates: a second ``record`` of
the same key returns the stored evaluation unchanged (the first value is kept, as a re-run of a deterministic
evaluation would give it again), or overwrites value, run and fields with ``replace=True``. Racing writers of one
key end with one document (the insert that lost reads the winner's). Each evaluation records lineage edges
model -evaluated-> evaluation, dataset -evaluated_on-> evaluation and run -computed-> evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from mlwarehouse import schema
from mlwarehouse.context import current_run
from mlwarehouse.errors import DuplicateKey, InvalidDocument, NotFound, QueryError
from mlwarehouse.ids import utc_now
from mlwarehouse.lineage.nodes import Ref
from mlwarehouse.query import PATH_RE
from mlwarehouse.query.fields import normalize_fields
from mlwarehouse.query.records import Record, check_where

__all__ = ["Evaluations", "EvaluationRecord", "data_key"]

COLLECTION = schema.EVALUATIONS.name
#: fields the warehouse sets on an evaluation; keyword fields may not use these names
FIXED = frozenset({"model", "model_name", "data", "data_kind", "dataset", "query", "fold", "metric", "value", "run",
                   "updated"})
_KIND = "evaluation"


class EvaluationRecord(Record):
    """One stored evaluation: ``model``, ``data`` (the key), ``metric``, ``value``, ``run`` and the user's fields."""

    __slots__ = ()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _fold_doc(fold: Any) -> Any:
    to_doc = getattr(fold, "to_doc", None)
    if callable(to_doc):
        return to_doc()
    try:
        json.dumps(fold, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise QueryError(f"a fold is a JSON value or has to_doc(), not {type(fold).__name__}") from exc
    return fold


def data_key(data: Any, fold: Any = None) -> dict:
    """The stored description of what was evaluated: ``data`` (a dataset id or ``q:`` + a digest of a query
    spec), ``fold`` (canonical JSON text, ``""`` for none: part of the unique key, so never null), ``data_kind``
    and ``dataset`` or ``query`` (JSON text: a filter has ``$`` keys, which a stored field name may not have)."""
    fold = _fold_doc(fold) if fold is not None else None
    if isinstance(data, dict) and data.get("_id") is None:
        unknown = set(data) - {"collection", "filter", "fold"}
        collection = data.get("collection")
        if unknown or not isinstance(collection, str) or not collection:
            raise QueryError(f"a query spec is {{'collection': name, 'filter': {{...}}, 'fold': ...}}, not {data!r}")
        flt = check_where(data.get("filter")) or {}
        if "fold" in data and data["fold"] is not None:
            if fold is not None and _canonical(_fold_doc(data["fold"])) != _canonical(fold):
                raise QueryError("the query spec's fold and fold= differ; give one")
            fold = _fold_doc(data["fold"])
        query = _canonical({"collection": collection, "filter": flt})
        digest = hashlib.sha256(query.encode()).hexdigest()[:32]
        return {"data": f"q:{digest}", "fold": _fold_text(fold), "data_kind": "query", "query": query}
    ident = _id_of(data)
    return {"data": ident, "fold": _fold_text(fold), "data_kind": "dataset", "dataset": ident}


def _fold_text(fold: Any) -> str:
    return "" if fold is None else _canonical(fold)


def _id_of(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("_id"), str):
        return value["_id"]
    ident = getattr(value, "id", None)
    if isinstance(ident, str) and ident:
        return ident
    raise QueryError(f"data is a dataset record or id, or a query spec dict, not {type(value).__name__}")


def _check_metric(metric: Any) -> str:
    if not isinstance(metric, str) or not PATH_RE.match(metric) or len(metric) > 200:
        raise QueryError(f"invalid metric name {metric!r}")
    return metric


def check_mode(mode: Any) -> str:
    if mode not in ("max", "min"):
        raise QueryError(f"mode must be 'max' or 'min', not {mode!r}")
    return mode


class RegistryBook:
    """What the registry's books (evaluations, aliases) share: the project, the registry opened on first use and
    their collection created on the first write (reads of a book alone create nothing)."""

    collection: schema.Collection

    def __init__(self, project, models=None):
        self.project = project
        self._models = models
        self._ready = False

    @property
    def models(self):
        """The registry (``project.models``)."""
        if self._models is None:
            self._models = self.project.models
        return self._models

    def _ensure(self) -> None:
        if not self._ready:
            self.project.ensure(self.collection)
            self._ready = True


class Evaluations(RegistryBook):
    """The evaluations of one project's models (``wh.models.evaluations``)."""

    collection = schema.EVALUATIONS

    # -- writing -------------------------------------------------------------------------------------------
    def record(self, model: Any, data: Any, metric: str, value: float, *, run: Any = None, fold: Any = None,
               replace: bool = False, **fields) -> EvaluationRecord:
        """Store ``value`` of ``metric`` for ``model`` (a record, an id or ``name@alias``) on ``data``.

        ``run`` defaults to the current run. A second record of the same (model, data, fold, metric) returns the
        stored one unchanged unless ``replace`` (then value, run and fields are overwritten). NotFound for a model
        or dataset that does not exist; nothing is written then."""
        _check_metric(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise InvalidDocument(f"an evaluation's value is a finite number, not {value!r}")
        taken = FIXED & fields.keys()
        if taken:
            raise InvalidDocument(f"field(s) {sorted(taken)} are set by evaluations.record itself; use another name")
        extra = normalize_fields(fields, nonfinite="null")
        target = self.models.get(model if isinstance(model, str) else _id_of(model))  # deleted: NotFound
        key = data_key(data, fold)
        if key.get("dataset") is not None and \
                self.project.find_one(schema.DATASETS.name, {"_id": key["dataset"]}, projection={"_id": 1}) is None:
            raise NotFound(f"no dataset {key['dataset']!r} in project {self.project.name!r}")
        run = run if run is not None else current_run()
        run_id = None if run is None else _id_of(run)
        doc = {"model": target.id, "model_name": target.doc.get("name"), **key, "metric": metric,
               "value": float(value) if isinstance(value, float) else value, "run": run_id, **extra}
        self._ensure()
        flt = {"model": target.id, "data": key["data"], "fold": key["fold"], "metric": metric}
        try:
            stored = self.project.insert(COLLECTION, dict(doc))
        except DuplicateKey:
            old = self.project.find_one(COLLECTION, flt)
            if old is None:  # deleted in between: try once more
                return self.record(model, data, metric, value, run=run, fold=fold, replace=replace, **fields)
            if not replace:
                return EvaluationRecord(old)
            changes = {k: v for k, v in doc.items() if k not in flt}
            gone = [k for k in old if k not in doc and not k.startswith("_") and k not in ("project", "time")]
            update: dict = {"$set": {**changes, "updated": utc_now()}}
            if gone:
                update["$unset"] = {k: "" for k in gone}
            stored = self.project.find_one_and_update(COLLECTION, flt, update) or old
        self._lineage(stored, target, run, key)
        return EvaluationRecord(stored)

    def _lineage(self, doc: dict, model, run: Any, key: dict) -> None:
        node = Ref(doc["_id"], _KIND, f"{doc['metric']} of {doc.get('model_name')}")
        edges = [(Ref(model.id, "checkpoint" if model.doc.get("checkpoint") is True else "model",
                      model.doc.get("name")), node, "evaluated")]
        if key.get("dataset") is not None:
            edges.append((key["dataset"], node, "evaluated_on"))
        if doc.get("run") is not None:
            edges.append((run if hasattr(run, "doc") else doc["run"], node, "computed"))
        self.project.lineage.record_many(edges)

    def delete(self, model: Any = None, data: Any = None, metric: str | None = None, *, fold: Any = None) -> int:
        """Delete the matching evaluations (at least one criterion; ``fold=None``: any fold); returns how many."""
        flt = self._filter(model, data, metric, fold, None, any_fold=True)
        if not flt:
            raise QueryError("delete needs a model, data or metric (it never deletes every evaluation)")
        return len(self.project.delete(COLLECTION, flt))

    # -- reading -------------------------------------------------------------------------------------------
    def _filter(self, model, data, metric, fold, name, *, any_fold: bool = False) -> dict:
        flt: dict = {}
        if model is not None:
            if isinstance(model, str) and "@" in model:
                model = self.models.get(model)
            flt["model"] = _id_of(model)
        if data is not None:
            key = data_key(data, fold)
            flt["data"] = key["data"]
            if fold is not None or not any_fold:
                flt["fold"] = key["fold"]
        elif fold is not None or not any_fold:
            flt["fold"] = _fold_text(None if fold is None else _fold_doc(fold))
        if metric is not None:
            flt["metric"] = _check_metric(metric)
        if name is not None:
            flt["model_name"] = name
        return flt

    def find(self, model: Any = None, data: Any = None, metric: str | None = None, *, fold: Any = None,
             name: str | None = None, where: dict | None = None, sort=None,
             limit: int | None = None) -> list[EvaluationRecord]:
        """Matching evaluations ("every evaluation of this model": ``find(model)``), newest first unless ``sort``."""
        flt = self._filter(model, data, metric, fold, name, any_fold=True)
        if where:
            flt = {"$and": [flt, check_where(where)]}
        docs = self.project.find(COLLECTION, flt, sort=sort or [("time", -1)], limit=limit)
        return [EvaluationRecord(d) for d in docs]

    def get(self, model: Any, data: Any, metric: str, *, fold: Any = None) -> EvaluationRecord:
        """The evaluation of ``model`` on ``data`` by ``metric``; NotFound if there is none."""
        flt = self._filter(model, data, metric, fold, None)
        doc = self.project.find_one(COLLECTION, flt)
        if doc is None:
            raise NotFound(self._missing(flt, metric, f"model {flt['model']!r}"))
        return EvaluationRecord(doc)

    def _missing(self, flt: dict, metric: str, who: str) -> str:
        if not self.project.count(COLLECTION, {"metric": metric}):
            return f"no evaluation of any model has the metric {metric!r} in project {self.project.name!r}"
        if not self.project.count(COLLECTION, {"data": flt["data"], "metric": metric}):
            return f"no model was evaluated by {metric!r} on data {flt['data']!r} in project {self.project.name!r}"
        return f"{who} has no evaluation by {metric!r} on data {flt['data']!r}"

    def best(self, metric: str, *, data: Any, fold: Any = None, mode: str = "max", name: str | None = None):
        """The model with the highest (``mode="max"``) or lowest ``metric`` on ``data`` ("the best model on the
        March test set"), among those still stored; NotFound if none was evaluated so."""
        check_mode(mode)
        flt = self._filter(None, data, metric, fold, name)
        sort = [("value", -1 if mode == "max" else 1), ("time", -1)]
        skip = 0
        while True:
            docs = self.project.find(COLLECTION, flt, sort=sort, limit=50, skip=skip,
                                     projection={"model": 1})
            for doc in docs:
                try:
                    return self.models.get(doc["model"])
                except NotFound:  # evaluated, then deleted
                    continue
            if len(docs) < 50:
                break
            skip += 50
        label = f" named {name!r}" if name else ""
        raise NotFound(f"no stored model{label} was evaluated by {metric!r} on data {flt['data']!r} "
                       f"in project {self.project.name!r}")

    def __repr__(self) -> str:
        return f"<Evaluations of {self.project!r}>"
