"""What the training-library integrations share: where to store, how metric names become log kinds, and how the
best checkpoint of a run becomes its final model.

**The kind rule.** A metric name is split into a log kind and a metric by its prefix, case-insensitively, when
the prefix is followed by ``_``, ``/``, ``-`` or ``.``:

- ``train``, ``training`` -> kind ``train`` (``train_loss``, ``train/loss`` -> ``loss``)
- ``val``, ``valid``, ``validation``, ``eval`` -> kind ``valid`` (``val_acc``, ``eval_loss`` -> ``acc``, ``loss``)
- ``test`` -> kind ``test`` (``test/acc`` -> ``acc``)
- anything else -> kind ``train``, name unchanged (``loss``, ``learning_rate``, ``grad_norm``, ``lr-Adam``)

so ``run.metric("valid", "loss")`` and ``wh.runs.best("valid.acc")`` work whatever the library called them.
What is left is made a valid metric name: characters other than letters, digits, ``_`` and ``-`` become ``_``,
a name that does not start with a letter gets ``m_`` in front, and a name a log document uses itself (``step``,
``epoch``, ``time``...) gets ``_`` after it. Checkpoint and model fields keep the library's own name (``val_loss``,
``eval_accuracy``), with the same character rule, since a model has no kind to tell train and valid apart.
"""

from __future__ import annotations

import copy
import enum
import json
import math
import re
from collections.abc import Callable
from typing import Any

from mlwarehouse.errors import InvalidDocument, NotFound
from mlwarehouse.models.registry import FIXED
from mlwarehouse.query.fields import RESERVED_FIELDS
from mlwarehouse.schema import LOG_FIELDS
from mlwarehouse.warehouse import Project, Warehouse, connect

__all__ = ["resolve_project", "split_metric", "field_name", "scalars", "plain", "run_fields", "save_best", "same_store",
           "project_of"]

_PREFIXES = (("validation", "valid"), ("valid", "valid"), ("val", "valid"), ("eval", "valid"),
             ("training", "train"), ("train", "train"), ("test", "test"))
_SEPARATORS = "_/-."
_BAD = re.compile(r"[^A-Za-z0-9_\-]")
#: names a metric may not have on a model: the registry's own fields and the keywords of ``models.save``
_MODEL_FIELDS = FIXED | RESERVED_FIELDS | {"model", "example_inputs", "config", "arch", "allow_pickle",
                                          "from_checkpoint"}


def resolve_project(target: Any) -> Project:
    """The project to store in: a Project as given, a Warehouse's default project, or ``connect()``'s for None."""
    if isinstance(target, Project):
        return target
    if isinstance(target, Warehouse):
        return target.project()
    if target is None:
        return connect().project()
    raise InvalidDocument(f"expected a Warehouse, a Project or None, not {type(target).__name__}")


def split_metric(name: str, default_kind: str = "train") -> tuple[str, str]:
    """``(kind, metric)`` for a library's metric name, by the kind rule of this module."""
    lowered = name.lower()
    for prefix, kind in _PREFIXES:
        if lowered.startswith(prefix) and len(name) > len(prefix) + 1 and name[len(prefix)] in _SEPARATORS:
            return kind, _metric_name(name[len(prefix) + 1:])
    return default_kind, _metric_name(name)


def _metric_name(name: str) -> str:
    name = _BAD.sub("_", name)
    if not name[:1].isalpha() or not name[:1].isascii():
        name = "m_" + name
    return name + "_" if name in LOG_FIELDS else name


def field_name(name: str) -> str:
    """A library's metric name as a model field: letters, digits and ``_``; never a field the registry sets nor a
    keyword of ``models.save`` (``_`` is appended)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not name[:1].isalpha() or not name[:1].isascii():
        name = "m_" + name
    return name + "_" if name in _MODEL_FIELDS else name


def scalars(metrics: dict) -> dict[str, float | int]:
    """The plain numbers among ``metrics`` (0-d tensors and numpy scalars included); NaN and infinities kept."""
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor or numpy scalar
            try:
                value = value.item()
            except (TypeError, ValueError, RuntimeError):
                continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = value
    return out


def plain(value: Any) -> Any:
    """``value`` as JSON (hyper-parameters): containers kept, NaN/infinity as their text, anything else ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", None) == 0:
        try:
            return plain(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(value, enum.Enum):
        return plain(value.value)
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def run_fields(doc: dict) -> dict:
    """The user fields (metrics...) of a model document: what its final model carries over."""
    return {k: v for k, v in doc.items() if k not in _MODEL_FIELDS and not k.startswith("_")}


def save_best(project: Project, module: Any, *, name: str, run: Any, metric: str | None, mode: str,
              live_is: str | None, wrap: Callable[[Any], Any] = lambda m: m, **save_options) -> Any:
    """Save the best checkpoint ``name`` of ``run`` (by ``metric``, else the newest) as the final model ``name``,
    with its epoch and fields and ``from_checkpoint`` = its id; the live ``module`` is saved if the run has no
    checkpoint. ``live_is`` is the id of the checkpoint the live module still equals (its weights need no copy);
    ``wrap`` turns the module into what ``models.save`` stores.
    """
    models = project.models
    run_id = getattr(run, "id", run)
    where = {"run": run_id, "checkpoint": True}
    best = None
    if metric is not None:
        try:
            best = models.best(metric, mode=mode, where=where, name=name, checkpoints=True)
        except NotFound:
            best = None
    if best is None:
        newest = models.find(name, where=where, sort=[("epoch", -1), ("time", -1)], limit=1)
        best = newest[0] if newest else None
    if best is None:
        return models.save(wrap(module), name, run=run_id, **save_options)
    chosen = module
    if best.id != live_is:  # an earlier epoch won: its stored weights go into a copy of the live module
        pairs = best.doc.get("weights") or []
        tensors = project.unpack([ref for _, ref in pairs])
        chosen = copy.deepcopy(module)
        chosen.load_state_dict({key: t for (key, _), t in zip(pairs, tensors)})
    return models.save(wrap(chosen), name, epoch=best.doc.get("epoch"), step=best.doc.get("step"), run=run_id,
                       from_checkpoint=best.id, **run_fields(best.doc), **save_options)


def same_store(run: Any, project: Project) -> bool:
    """Whether ``run`` (a Run) lives in ``project``: same warehouse settings and project name."""
    settings = getattr(run, "warehouse_settings", None)
    return settings is not None and settings == project.warehouse.settings and run.doc.get("project") == project.name


def project_of(run: Any) -> Project:
    """The project a Run object writes to."""
    return run._runs.project  # a Run knows its registry; Run has no public accessor for it
