"""How TensorHub's keyword fields map onto mlwarehouse documents, and back.

The original stored every keyword argument as a document field under its own name. Ours share documents with
fields the warehouse sets itself (a model's ``name``, ``kind``, ``run``...), so a user field that takes one of
those names is stored under :data:`PREFIX` (``save_model(net, model_name="mlp", name="64-64")`` stores
``name: "mlp", th_name: "64-64"``). Every TensorHub find, delete and sort maps names the same way, and records read
back through TensorHub show each field under the original's name:

- ``model_name`` / ``dataset_name`` are our ``name``; ``project_name`` is our ``project`` (queries are always
  scoped to the hub's project, as the original's were);
- a user field named like one of ours, or starting with the prefix itself, is ``th_<field>`` when stored;
- fields that mean the same thing in both are shared: ``description``; ``tags`` when they are a string or a list
  of strings (kept as a list); a dataset's ``version`` when it is a string or an integer (other values are user
  fields); a log's ``step`` and ``epoch``; a task's ``task_name``, ``hyper_parameters``, ``saved_result_keys``,
  ``status`` and ``result``;
- ``time`` and ``project_name`` are stamped by the hub, and a task's ``status`` and ``result`` by the queue: a value
  passed for them when saving is replaced, as the original replaced it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mlwarehouse import schema
from mlwarehouse.datasets.whole import Datasets
from mlwarehouse.models import registry as models_registry
from mlwarehouse.runs.registry import Runs
from mlwarehouse.tasks import queue as tasks_queue

__all__ = ["DATASET", "LOG", "MODEL", "PREFIX", "TASK", "Fields"]

#: where a user field whose name we use ourselves is stored
PREFIX = "th_"
_STAMPED = frozenset({"time", "project_name", "_id"})
_LOGICAL = ("$and", "$or", "$nor")


def _params(function: Callable, *skip: str) -> set[str]:
    """The keyword parameters of one of our save methods: a user field of that name must not reach them."""
    return {p.name for p in inspect.signature(function).parameters.values()
            if p.kind is not p.VAR_KEYWORD and p.name not in ("self", *skip)}


@dataclass(frozen=True)
class Fields:
    """The mapping for one kind of document (models, datasets, tasks, logs)."""

    name_field: str | None
    ours: frozenset[str]
    shared: frozenset[str] = frozenset()
    dropped: frozenset[str] = _STAMPED
    typed: dict[str, Callable[[Any], bool]] = field(default_factory=dict)  # shared for the values it accepts

    def key(self, key: str, value: Any = None, *, query: bool = False) -> str:
        """Our name for the field ``key`` (a dotted path maps by its first part)."""
        if key == self.name_field:
            return "name"
        if key == "project_name":
            return "project"
        head = key.split(".", 1)[0]
        accepts = self.typed.get(head)
        if accepts is not None and head == key:
            if query and isinstance(value, dict):
                return key
            return key if accepts(value) or (value is None and not query) else PREFIX + key
        if head in self.shared:
            return key
        if head in self.ours or head.startswith((PREFIX, "_")):
            return PREFIX + key
        return key

    def to_store(self, fields: dict) -> dict:
        """User keyword fields as the fields to store (stamped ones left out)."""
        return {self.key(k, v): v for k, v in fields.items() if k not in self.dropped}

    def to_filter(self, fields: dict) -> dict:
        """A TensorHub filter (keyword fields, maybe with ``$or``...) in our names."""
        out: dict = {}
        for k, v in fields.items():
            if k in _LOGICAL and isinstance(v, list):
                out[k] = [self.to_filter(x) if isinstance(x, dict) else x for x in v]
            elif k == "project_name":
                continue  # every query is scoped to the hub's project already, as the original's were
            elif k.startswith("$") or k == "_id":
                out[k] = v
            else:
                out[self.key(k, v, query=True)] = v
        return out

    def to_sort(self, sort: Any) -> Any:
        """A pymongo sort (``[("test_accuracy", -1)]``) in our names."""
        if not isinstance(sort, (list, tuple)):
            return sort
        return [(self.key(k), d) if isinstance(k, str) else (k, d) for k, d in sort]

    def to_hub(self, doc: dict) -> dict:
        """A stored document as the original would have shown it: user fields under their own names."""
        out: dict = {}
        users: dict = {}
        for k, v in doc.items():
            if k.startswith(PREFIX):
                users[k[len(PREFIX):]] = v
            elif k == "name" and self.name_field:
                out[self.name_field] = v
            elif k == "project":
                out["project_name"] = v
            else:
                out[k] = v
        out.update(users)
        return out


def _union(*sets: Iterable[str]) -> frozenset[str]:
    return frozenset().union(*map(set, sets))


_BOOKKEEPING = set(schema.BOOKKEEPING_FIELDS) - {"time"}  # the save time, as the original's `time`


def _version(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _tags(value: Any) -> bool:
    """Tags we keep as ours (listed and shown as tags): a string or a list of strings."""
    return isinstance(value, str) or _strings(value)


MODEL = Fields(
    "model_name",
    _union(models_registry.FIXED, _params(models_registry.Models.save, "model"), {"kind", "checkpoint"},
           _BOOKKEEPING) - {"description", "tags"},
    shared=frozenset({"description"}), typed={"tags": _tags})

DATASET = Fields(
    "dataset_name",
    _union({"name", "value", "kind", "state", "fields", "count"}, _params(Datasets.save, "value"),
           _BOOKKEEPING) - {"description", "version", "tags"},
    shared=frozenset({"description"}), typed={"version": _version, "tags": _tags})

_TASK_SHARED = frozenset({"task_name", "hyper_parameters", "saved_result_keys", "status", "result", "script"})
TASK = Fields(
    None,
    _union(tasks_queue.OWN_FIELDS, _params(tasks_queue.Tasks.create), {"lease"},
           _BOOKKEEPING) - _TASK_SHARED - {"tags"},
    shared=_TASK_SHARED, dropped=_STAMPED | {"status", "result"}, typed={"tags": _tags})

LOG = Fields(
    None,
    _union(schema.LOG_FIELDS, _params(Runs.log_point), _BOOKKEEPING) - {"step", "epoch", "time"},
    shared=frozenset({"step", "epoch"}))
