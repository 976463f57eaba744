"""Models: architecture + weights with a name, metrics, epoch/step, tags, and the run and dataset they came from.

A model document holds the user's fields at the top level (``test_accuracy=0.93`` is queried as
``{"test_accuracy": {"$gt": 0.9}}``), ``kind`` (``torch``, ``arrays`` or ``value``), and references to its bytes:

- ``weights``: ``[[name, ref], ...]``, one blob per tensor or array (content addressed, so a tensor that did not
  change between two checkpoints is stored once). For ``arrays`` models the name is the list of dict keys leading
  to the array, so nested dicts with any string keys come back as they were.
- ``architecture`` (torch): ``{"format": "export" | "script" | "class" | "pickle", ...}`` (see
  :mod:`mlwarehouse.models.torch_io`); ``value`` (anything else a codec stores, pickle only with ``allow_pickle=True``).

Blobs are put before the document is inserted (invariant 1), so a process killed while saving leaves at most
unreferenced blobs. :meth:`Models.checkpoint` saves one epoch and then applies a :class:`Retention` policy.

``name@alias`` (``"mlp@champion"``) names the model an alias points at wherever a model id is taken (``get``,
``load``); ``models.aliases`` and ``models.evaluations`` hold the aliases with their history and the evaluations.

Final models and checkpoints are told apart by ``checkpoint: true`` on checkpoints: ``find``, ``best`` and ``load``
see final models unless given ``checkpoints=True`` (``get(id)`` and ``delete`` see both).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from mlwarehouse import schema
from mlwarehouse.context import current_run
from mlwarehouse.errors import CodecError, DependencyError, InvalidDocument, NotFound, QueryError
from mlwarehouse.index.autoindex import QueryIndexes
from mlwarehouse.lineage.nodes import Ref, describe
from mlwarehouse.models.aliases import split_alias
from mlwarehouse.models.checkpoints import Retention
from mlwarehouse.query import PATH_RE
from mlwarehouse.query.fields import normalize_fields, normalize_value
from mlwarehouse.query.records import Record, check_name, find_by_id, name_filter

__all__ = ["Models", "ModelRecord", "Retention", "FINAL", "final_filter"]

COLLECTION = schema.MODELS.name
NEWEST = [("time", -1)]
#: fields the warehouse sets on a model document; keyword fields may not use these names
FIXED = frozenset({"name", "kind", "epoch", "step", "run", "dataset", "tags", "description", "checkpoint",
                   "architecture", "weights", "value"})
_BIG = sys.float_info.max
#: final models: checkpoints carry ``checkpoint: true``, anything else is a final model
FINAL = {"checkpoint": {"$ne": True}}
#: fields that queries do not get indexes of their own for: the schema's, bookkeeping, the model's bytes
_NOT_INDEXED = frozenset({"_id", "_blobs", "project", "time", "name", "kind", "run", "dataset", "checkpoint",
                          "architecture", "weights", "value", "description"})


def _open_field(path: str) -> bool:
    """Metrics and the user's other fields (epoch and step too): what ``find`` and ``best`` index on demand."""
    return path.split(".", 1)[0] not in _NOT_INDEXED


class ModelRecord(Record):
    """One saved model; ``load()`` rebuilds it (an nn.Module in eval mode, a dict of arrays, or the value)."""

    __slots__ = ("_models",)

    def __init__(self, doc: dict, models: "Models"):
        super().__init__(doc)
        object.__setattr__(self, "_models", models)

    def load(self, *, allow_pickle: bool = False) -> Any:
        return self._models._rebuild(self.doc, allow_pickle=allow_pickle)


class Models:
    """The models of one project."""

    def __init__(self, project):
        self.project = project
        project.ensure(schema.MODELS)
        #: the indexes made on demand for metrics, find and best (see :mod:`mlwarehouse.index.autoindex`)
        self.queries = QueryIndexes(project, COLLECTION, eligible=_open_field,
                                    scalar_fields=schema.MODELS.scalar_fields, declared=len(schema.MODELS.indexes))
        self._indexed: set[str] = set()

    # -- writing -------------------------------------------------------------------------------------------
    def save(self, model: Any, name: str = "model", *, epoch: int | None = None, step: int | None = None,
             run: Any = None, dataset: Any = None, tags: Sequence[str] = (), description: str | None = None,
             example_inputs: Any = None, config: dict | None = None, arch: str | Sequence[str] | None = None,
             allow_pickle: bool = False, **fields) -> ModelRecord:
        """Store ``model`` with its fields (metrics, hyper-parameters...) and return its record.

        ``model`` is a torch ``nn.Module`` (architecture + weights; ``example_inputs`` enables torch.export,
        ``config`` the importable-class format, ``arch`` forces a format or an order of formats), a dict (nested
        or not) of numpy arrays or tensors, or any value a codec stores. ``run`` (default: the current run) and
        ``dataset`` are ids or records.
        """
        return self._save(model, name, epoch=epoch, step=step, run=run, dataset=dataset, tags=tags,
                          description=description, example_inputs=example_inputs, config=config, arch=arch,
                          allow_pickle=allow_pickle, checkpoint=False, fields=fields)

    def checkpoint(self, model: Any, *, epoch: int, run: Any = None, metrics: dict | None = None,
                   name: str = "checkpoint", keep_last: int | None = None, keep_best: int | None = None,
                   best_metric: str | None = None, mode: str = "max", step: int | None = None,
                   example_inputs: Any = None, config: dict | None = None, arch: str | Sequence[str] | None = None,
                   allow_pickle: bool = False, **fields) -> ModelRecord:
        """Save the model of one epoch (``checkpoint: true``), then delete the run's checkpoints of this name that
        fall outside the policy: the ``keep_last`` newest epochs ∪ the ``keep_best`` best by ``best_metric``.

        ``None`` for both keeps every checkpoint. Deleted checkpoints release the blobs only they used.
        """
        policy = Retention(keep_last, keep_best, best_metric, mode)
        fields = {**(metrics or {}), **fields}
        record = self._save(model, name, epoch=epoch, step=step, run=run, dataset=None, tags=(),
                            description=None, example_inputs=example_inputs, config=config, arch=arch,
                            allow_pickle=allow_pickle, checkpoint=True, fields=fields)
        if policy.active:
            flt = {"name": name, "checkpoint": True, "run": record.doc.get("run")}
            wanted = {"epoch": 1, "time": 1, **({policy.metric: 1} if policy.metric else {})}
            doomed = policy.doomed(self.project.find(COLLECTION, flt, projection=wanted))
            if doomed:  # never refused, and forgotten by lineage: pruning is what the policy asked for
                self.project.delete(COLLECTION, {"_id": {"$in": doomed}})
                self.project.lineage.forget(doomed)
        return record

    def _save(self, model: Any, name: str, *, epoch, step, run, dataset, tags, description, example_inputs,
              config, arch, allow_pickle: bool, checkpoint: bool, fields: dict) -> ModelRecord:
        check_name("model", name)
        taken = FIXED & fields.keys()
        if taken:
            raise InvalidDocument(f"field(s) {sorted(taken)} are set by models.save itself; use another name")
        extra = normalize_fields(fields, nonfinite="null")
        counters: dict[str, int | None] = {}
        for label, value in (("epoch", epoch), ("step", step)):
            number = None if value is None else normalize_value(value)
            if value is not None and (isinstance(value, bool) or not isinstance(number, int)):
                raise InvalidDocument(f"{label} must be an integer, not {value!r}")
            counters[label] = None if number is None else int(number)
        doc: dict[str, Any] = {
            "name": name,
            **counters,
            "run": _id_of(run if run is not None else current_run(), "run"),
            "dataset": _id_of(dataset, "dataset"),
            "tags": normalize_value(list(tags), "tags"),
            "description": description,
        }
        if checkpoint:
            doc["checkpoint"] = True
        doc.update(extra)
        doc.update(self._pack_model(model, example_inputs=example_inputs, config=config, arch=arch,
                                    allow_pickle=allow_pickle))
        self._ensure_metric_indexes(extra)
        record = ModelRecord(self.project.insert(COLLECTION, doc), self)
        self._record_lineage(record.doc, run if run is not None else current_run(), dataset)
        return record

    def _record_lineage(self, doc: dict, run: Any, dataset: Any) -> None:
        """Edges run -> model ("produced") and dataset -> model ("trained_on")."""
        model = describe(COLLECTION, doc)
        edges = []
        if doc.get("run") is not None:
            edges.append((_ref(run, doc["run"], "run"), model, "produced"))
        if doc.get("dataset") is not None:
            edges.append((_ref(dataset, doc["dataset"], "dataset"), model, "trained_on"))
        if edges:
            self.project.lineage.record_many(edges)

    def _pack_model(self, model: Any, *, example_inputs, config, arch, allow_pickle: bool) -> dict:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(model, torch.nn.Module):
            from mlwarehouse.models import torch_io
            formats = [arch] if isinstance(arch, str) else arch
            found = torch_io.describe(model, example_inputs=example_inputs, config=config, formats=formats,
                                      allow_pickle=allow_pickle)
            state = torch_io.state_dict_of(model)
            refs = self.project.pack(list(state.values()))
            architecture: dict[str, Any] = {"format": found.format, "torch": torch.__version__.split("+")[0]}
            if found.payload is not None:
                architecture["archive"] = self.project.pack(found.payload)
            if found.format == "class":
                architecture.update({"class": found.target, "config": found.config})
            return {"kind": "torch", "architecture": architecture, "weights": [list(p) for p in zip(state, refs)]}
        if arch is not None or example_inputs is not None or config is not None:
            raise CodecError(f"arch, example_inputs and config apply to torch modules, not {type(model).__name__}")
        if isinstance(model, dict):
            leaves = list(_flatten(model, ()))
            # one pack per leaf: a packed list of many plain numbers would become a single JSON blob
            return {"kind": "arrays", "weights": [[list(path), self.project.pack(leaf, allow_pickle=allow_pickle)]
                                                  for path, leaf in leaves]}
        return {"kind": "value", "value": self.project.pack(model, allow_pickle=allow_pickle)}

    def _ensure_metric_indexes(self, fields: dict) -> None:
        """Indexes for a numeric field, the first time this process saves it: ``best`` (highest first) then reads
        one entry, with or without a name in its filter. Bounded with the other indexes made for queries
        (:class:`~mlwarehouse.index.autoindex.QueryIndexes`): past the bound, a warning is logged instead."""
        for key, value in fields.items():
            if key in self._indexed or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if PATH_RE.match(key):
                self.queries.ensure_keys([("project", 1), ("name", 1), (key, -1)])
                self.queries.ensure_keys([("project", 1), (key, -1)])
            self._indexed.add(key)

    def delete(self, name: str | None = None, *, where: dict | None = None, force: bool = False) -> int:
        """Delete matching models, checkpoints included, and the blobs only they used; returns how many.

        A model that live things were derived from (a listener computing with it...) is refused with
        DependencyError unless ``force``, as is a model an alias points at now (``mlp@champion``: move the alias
        first); lineage keeps a tombstone of each deleted model that has edges."""
        flt = name_filter("model", name, where)
        what = f"model {name!r}" if name else "these models"
        if not force:
            self._refuse_aliased(flt, what)
        return len(self.project.lineage.delete(COLLECTION, flt, what, force=force))

    def _refuse_aliased(self, flt: dict, what: str) -> None:
        docs = self.project.find(COLLECTION, flt, projection={"name": 1})
        if not docs or not self.project.count(schema.ALIASES.name):
            return
        doomed = {d["_id"] for d in docs}
        held = sorted(f"{spelling} -> {model}" for n in {d.get("name") for d in docs if d.get("name")}
                      for spelling, model in self.aliases.list(n).items() if model in doomed)
        if held:
            raise DependencyError(f"cannot delete {what}: alias {', '.join(held[:5])} points at it; move or remove "
                                  f"the alias first, or pass force=True")

    # -- reading -------------------------------------------------------------------------------------------
    @staticmethod
    def _filter(name: str | None, where: dict | None, checkpoints: bool) -> dict:
        return final_filter(name_filter("model", name, where), checkpoints)

    def find(self, name: str | None = None, *, where: dict | None = None, checkpoints: bool = False, sort=None,
             limit: int | None = None, skip: int = 0) -> list[ModelRecord]:
        """Matching final models (and checkpoints if ``checkpoints``), newest first unless ``sort`` says
        otherwise. A filter or sort on metrics (or other fields of the user's) gets an index the first time this
        process asks (:meth:`ensure_index`)."""
        flt = self._filter(name, where, checkpoints)
        sort = sort or NEWEST
        self.queries.ensure(flt, sort)
        docs = self.project.find(COLLECTION, flt, sort=sort, limit=limit, skip=skip)
        return [ModelRecord(doc, self) for doc in docs]

    def ensure_index(self, where: dict | None = None, sort=None) -> list[tuple[str, int]] | None:
        """Create the index that serves ``find(where=where, sort=sort)`` (what ``find`` does by itself), e.g. for
        the sorts a page offers before anyone asks; returns its keys, or None if the query needs none of its own."""
        return self.queries.ensure(where, sort or NEWEST)

    def get(self, id: str) -> ModelRecord:
        """The model (or checkpoint) with this id, whole or a unique prefix, or that an alias names
        (``get("mlp@champion")``); NotFound if there is none."""
        doc = find_by_id(self.project, COLLECTION, id, "model")
        if doc is None:
            if split_alias(id) is not None:
                return self.aliases.get(id)
            raise NotFound(f"no model with id {id!r} in project {self.project.name!r}")
        return ModelRecord(doc, self)

    @cached_property
    def aliases(self):
        """The aliases of these models, with their history (see :mod:`mlwarehouse.models.aliases`)."""
        from mlwarehouse.models.aliases import Aliases
        return Aliases(self.project, self)

    @cached_property
    def evaluations(self):
        """The evaluations of these models (see :mod:`mlwarehouse.models.evaluations`)."""
        from mlwarehouse.models.evaluations import Evaluations
        return Evaluations(self.project, self)

    def best(self, metric: str, *, mode: str = "max", where: dict | None = None, name: str | None = None,
             checkpoints: bool = False) -> ModelRecord:
        """The final model (or checkpoint too if ``checkpoints``) with the highest (``mode="max"``) or lowest
        numeric ``metric``; NotFound if none has one."""
        if mode not in ("max", "min"):
            raise QueryError(f"mode must be 'max' or 'min', not {mode!r}")
        if not isinstance(metric, str) or not PATH_RE.match(metric):
            raise QueryError(f"invalid metric field {metric!r}")
        direction = -1 if mode == "max" else 1
        bound = {"$gte": -_BIG} if mode == "max" else {"$lte": _BIG}  # numbers only: strings sort above them
        flt = self._filter(name, where, checkpoints)
        # (project, [name], metric) in the mode's direction: models written by others (or imported) may lack it
        self.queries.ensure(flt, [(metric, direction)])
        flt = {"$and": [flt, {metric: bound}]} if metric in flt or "$and" in flt else {**flt, metric: bound}
        doc = self.project.find_one(COLLECTION, flt, sort=[(metric, direction), ("time", -1)])
        if doc is None:
            raise NotFound(self._missing(f"with a numeric {metric!r}", name, where, checkpoints, {metric: bound}))
        return ModelRecord(doc, self)

    def load(self, name: str | None = None, *, id: str | None = None, where: dict | None = None, sort=None,
             checkpoints: bool = False, allow_pickle: bool = False) -> Any:
        """The top matching final model (newest unless ``sort`` says otherwise), or the model ``id``, rebuilt.

        A ``name`` that no model has but that is a model id (or a unique id prefix) or an alias (``"mlp@champion"``)
        loads that model, so ``load(ID)`` works as ``load(id=ID)`` does. NotFound if nothing matches.
        """
        if id is not None:
            if name is not None:
                raise QueryError("give a model name or id=, not both")
            return self.get(id).load(allow_pickle=allow_pickle)
        found = self.find(name, where=where, checkpoints=checkpoints, sort=sort, limit=1)
        if not found and isinstance(name, str) and where is None \
                and not self.project.count(COLLECTION, {"name": name}):
            doc = find_by_id(self.project, COLLECTION, name, "model")
            if doc is None and split_alias(name) is not None:
                return self.aliases.get(name).load(allow_pickle=allow_pickle)
            found = [ModelRecord(doc, self)] if doc is not None else []
        if not found:
            raise NotFound(self._missing("", name, where, checkpoints))
        return found[0].load(allow_pickle=allow_pickle)

    def _missing(self, what: str, name, where, checkpoints: bool, extra: dict | None = None) -> str:
        """Why nothing matched, pointing at ``checkpoints=True`` when checkpoints would have."""
        label = f"model {name!r}" if name else "model"
        text = f"no {label}{f' {what}' if what else ''}{f' matching {where!r}' if where else ''} " \
               f"in project {self.project.name!r}"
        if not checkpoints and "checkpoint" not in (where or {}):
            parts = [name_filter("model", name, where), {"checkpoint": True}, *([extra] if extra else [])]
            if self.project.count(COLLECTION, {"$and": parts}):
                text += " (checkpoints match: pass checkpoints=True to include them)"
        return text

    def follow(self, spelling: str, **options):
        """A callable serving the model that holds ``spelling`` (``"mlp@champion"``) now, swapping to the new holder
        when the alias moves, never mid-call (see :mod:`mlwarehouse.loops.follow`)."""
        from mlwarehouse.loops.follow import follow
        return follow(self.project, spelling, **options)

    def names(self) -> list[str]:
        return self.project.distinct(COLLECTION, "name")

    def _rebuild(self, doc: dict, *, allow_pickle: bool) -> Any:
        kind = doc.get("kind")
        unpack = self.project.unpack
        if kind == "value":
            return unpack(doc["value"], allow_pickle=allow_pickle)
        pairs = doc.get("weights") or []
        if kind == "arrays":
            tree: dict = {}
            for (path, _), leaf in zip(pairs, unpack([ref for _, ref in pairs], allow_pickle=allow_pickle)):
                node = tree
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = leaf
            return tree
        if kind != "torch":
            raise CodecError(f"model {doc.get('_id')!r} has an unknown kind {kind!r}")
        from mlwarehouse.models import torch_io
        spec = doc["architecture"]
        tensors = unpack([ref for _, ref in pairs], allow_pickle=allow_pickle)
        weights = {name: t for (name, _), t in zip(pairs, tensors)}
        payload = unpack(spec["archive"], allow_pickle=allow_pickle) if "archive" in spec else None
        arch = torch_io.Architecture(spec["format"], payload, spec.get("class"), spec.get("config"))
        return torch_io.build(arch, weights, allow_pickle=allow_pickle)


def final_filter(flt: dict | None, checkpoints: bool = False) -> dict:
    """``flt`` narrowed to final models (no ``checkpoint: true``) unless ``checkpoints``, or unless ``flt`` names
    the ``checkpoint`` field itself (``{"checkpoint": True}`` lists checkpoints only)."""
    flt = dict(flt or {})
    if checkpoints or "checkpoint" in flt:
        return flt
    return {"$and": [flt, FINAL]} if "$and" in flt else {**flt, **FINAL}


def _flatten(tree: dict, path: tuple):
    """(key path, leaf) pairs of a nested dict; a non-dict value or an empty dict is a leaf."""
    for key, value in tree.items():
        if not isinstance(key, str):
            raise CodecError(f"model dict keys must be strings, not {key!r} at {'.'.join(path) or 'the top'}")
        if isinstance(value, dict) and value:
            yield from _flatten(value, (*path, key))
        else:
            yield (*path, key), value


def _ref(given: Any, ident: str, kind: str) -> Ref:
    """The lineage node of a run or dataset given as a record (its name known) or an id (looked up)."""
    doc = getattr(given, "doc", None)
    name = doc.get("name") if isinstance(doc, dict) and doc.get("_id") == ident else None
    if kind == "dataset" and name is not None and doc.get("version") is not None:
        name = f"{name} v{doc['version']}"
    return Ref(ident, kind, name)


def _id_of(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    ident = getattr(value, "id", None)
    if isinstance(ident, str):
        return ident
    raise InvalidDocument(f"{what} must be an id string or a record with .id, not {type(value).__name__}")
