"""Hugging Face Transformers: a ``TrainerCallback`` that logs every step into a warehouse run, checkpoints the model
into the warehouse with retention, and saves the best checkpoint as a final model.

    trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., callbacks=[WarehouseCallback(wh)])
    trainer.train()
    wh.models.load("BertForSequenceClassification")   # the best epoch's model, a PreTrainedModel in eval mode

Logs: ``loss``, ``learning_rate``, ``grad_norm`` are kind ``train``; ``eval_*`` kind ``valid`` without the prefix
(``eval_loss`` -> ``loss``); ``test_*`` kind ``test`` (the rule of :mod:`mlwarehouse.integrations.common`). A
point's step is the trainer's global step, its epoch the 0-based index of the epoch it belongs to. The trainer's
closing summary (``train_runtime``, ``train_loss``...) is set on the run document instead of logged.

A model is stored in the ``class`` architecture format through :class:`PretrainedModule`: the model's class and its
config as JSON, rebuilt with ``cls(config_class.from_dict(config))`` and its weights put back. Loading it in another
process needs this module trusted (``trust_modules("mlwarehouse.integrations.transformers")`` or
``$MLW_TRUSTED_MODULES``); it then builds model classes of the installed ``transformers`` package, and others only
from trusted modules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

try:
    from torch import nn
    from transformers import PreTrainedModel, TrainerCallback
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(f"mlwarehouse.integrations.transformers needs Hugging Face Transformers: pip install "
                      f"'mlwarehouse[transformers]' ({exc})") from exc

from mlwarehouse.codecs.imports import resolve, split_target
from mlwarehouse.context import current_run
from mlwarehouse.errors import CodecError, InvalidDocument, QueryError
from mlwarehouse.integrations.common import (
    field_name,
    plain,
    project_of,
    resolve_project,
    same_store,
    save_best,
    scalars,
    split_metric,
)

__all__ = ["WarehouseCallback", "PretrainedModule", "storable"]

#: keys of the trainer's closing log (``Trainer.train``'s summary): run fields, not curve points
_SUMMARY_KEY = "train_runtime"


class PretrainedModule(nn.Module):
    """The storable form of a Hugging Face model (``storable(model)``): ``models.save`` sees an importable class
    whose ``config`` is ``{"model_class", "config"}`` and whose state dict is the model's own; calling the class
    with that config (what loading does) returns the Hugging Face model itself, not a PretrainedModule."""

    def __new__(cls, model_class: str | None = None, config: dict | None = None, *, model: Any = None):
        if model is None:
            return build_pretrained(model_class, config)
        return super().__new__(cls)

    def __init__(self, model_class: str | None = None, config: dict | None = None, *, model: Any = None):
        super().__init__()
        if not isinstance(model, PreTrainedModel):
            raise InvalidDocument(f"expected a transformers PreTrainedModel, not {type(model).__name__}")
        kind = type(model)
        self.__dict__["model"] = model  # not a submodule: the state dict keys stay the model's own
        self.config = {"model_class": f"{kind.__module__}:{kind.__qualname__}",
                       "config": json.loads(model.config.to_json_string(use_diff=False))}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        return self.model.state_dict(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def extra_repr(self) -> str:
        return repr(self.model)


def storable(model: Any) -> PretrainedModule:
    """``model`` ready for ``models.save(storable(model), arch="class")``."""
    return PretrainedModule(model=model)


def build_pretrained(model_class: str | None, config: dict | None) -> Any:
    """A fresh ``model_class`` built from its ``config`` dict (weights are put back by the caller)."""
    parts = split_target(model_class)
    if parts is None or not isinstance(config, dict):
        raise CodecError(f"a stored Hugging Face model needs a 'module:Class' and a config dict, not {model_class!r}")
    library = parts[0] == "transformers" or parts[0].startswith("transformers.")
    cls = resolve(model_class, "the Hugging Face model class", trusted=library)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise CodecError(f"{model_class!r} is not an importable transformers PreTrainedModel subclass")
    if cls.config_class is None:
        raise CodecError(f"{model_class!r} has no config_class to rebuild its config with")
    return cls(cls.config_class.from_dict(config))


def _epoch_index(epoch: float | None) -> int | None:
    """The 0-based epoch a step belongs to (the trainer counts 0.5 halfway through the first, 1.0 at its end)."""
    if epoch is None:
        return None
    return max(math.ceil(round(float(epoch), 6)) - 1, 0)


class WarehouseCallback(TrainerCallback):
    """Log a ``Trainer``'s training into a run and keep its checkpoints in the warehouse.

    ``warehouse`` is a Warehouse, a Project or None (the current run's project, else ``connect()``). The run is
    ``run`` if given, else the current run of that project, else one started at ``on_train_begin`` (named
    ``run_name`` or ``args.run_name``, with ``tags`` and extra ``fields``) and finished at ``on_train_end``; the
    ``TrainingArguments`` are merged into its ``hyper_parameters`` either way. A checkpoint ``name`` (default: the
    model's class name) holding the latest eval metrics (``eval_loss``...) and the last ``train_loss`` is saved
    whenever the trainer saves (``save_on="save"``, the default when ``args.save_strategy`` is not "no") or
    evaluates (``save_on="evaluate"``, the default otherwise; ``save_strategy="no"`` then leaves the warehouse the
    only store). After each save the run's checkpoints outside ``keep_last`` newest ∪ ``keep_best`` best are
    deleted; best is by ``best_metric`` (default ``args.metric_for_best_model`` with its ``eval_`` prefix, else
    ``eval_loss``) and ``mode`` (default from ``args.greater_is_better``, else "min" for a loss). At the end the best
    checkpoint is saved as the final model ``name``; ``best_model`` is its record.
    """

    def __init__(self, warehouse: Any = None, *, run: Any = None, run_name: str | None = None,
                 name: str | None = None, keep_last: int | None = 1, keep_best: int | None = 1,
                 best_metric: str | None = None, mode: str | None = None, save_on: str | None = None,
                 save_final: bool = True, tags: Sequence[str] = (), **fields: Any):
        if save_on not in (None, "save", "evaluate"):
            raise QueryError(f"save_on must be 'save', 'evaluate' or None, not {save_on!r}")
        if mode not in (None, "min", "max"):
            raise QueryError(f"mode must be 'min' or 'max', not {mode!r}")
        self._target = warehouse
        self.run = run
        self.run_name = run_name
        self.name = name
        self.keep_last, self.keep_best = keep_last, keep_best
        self.best_metric, self.mode, self.save_on = best_metric, mode, save_on
        self.save_final = save_final
        self._start = {"tags": list(tags), **fields}
        self.project = None
        self._owns_run = False
        self._training = False
        self._eval: dict = {}
        self._train_loss: float | None = None
        self._last: tuple[str, int] | None = None  # (checkpoint id, global step when it was saved)
        self.last_checkpoint = None
        self.best_model = None

    # -- run -----------------------------------------------------------------------------------------------
    def _resolve(self, args) -> None:
        if self._owns_run:  # trained again: the run of the last training has ended, a new one starts
            self.run, self._owns_run = None, False
        current = current_run()
        if isinstance(self.run, str):
            self.project = resolve_project(self._target)
            self.run = self.project.runs.get(self.run)
        elif self.run is not None:
            self.project = project_of(self.run) if self._target is None else resolve_project(self._target)
        elif self._target is None and current is not None:
            self.project, self.run = project_of(current), current
        else:
            self.project = resolve_project(self._target)
            if current is not None and same_store(current, self.project):
                self.run = current
            else:
                self.run = self.project.runs.start(self.run_name or getattr(args, "run_name", None), **self._start)
                self._owns_run = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self._resolve(args)
        hyper = plain(args.to_dict())
        self.run.set(hyper_parameters={**(self.run.doc.get("hyper_parameters") or {}), **hyper})
        if self.best_metric is None:
            chosen = args.metric_for_best_model or "loss"
            self.best_metric = chosen if chosen.startswith("eval_") else f"eval_{chosen}"
        if self.mode is None:
            greater = args.greater_is_better
            self.mode = ("min" if self.best_metric.endswith("loss") else "max") if greater is None \
                else ("max" if greater else "min")
        if self.save_on is None:
            self.save_on = "evaluate" if str(getattr(args.save_strategy, "value", args.save_strategy)) == "no" \
                else "save"
        self.name = self.name or type(model).__name__
        self._training, self._eval, self._train_loss, self._last = True, {}, None, None

    # -- logs ----------------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.run is None or isinstance(self.run, str) or not logs:
            return
        values = scalars(dict(logs))
        values.pop("epoch", None)
        if _SUMMARY_KEY in logs:
            self.run.set(**{field_name(k): v for k, v in values.items()})
            return
        groups: dict[str, dict] = {}
        for key, value in values.items():
            kind, metric = split_metric(key)
            groups.setdefault(kind, {})[metric] = value
        for kind, points in groups.items():
            self.run.log(kind, step=state.global_step, epoch=_epoch_index(state.epoch), **points)
        if "loss" in values:
            self._train_loss = values["loss"]

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self._training or not state.is_world_process_zero:
            return
        self._eval = {field_name(k): v for k, v in scalars(dict(metrics or {})).items() if k != "epoch"}
        if self.save_on == "evaluate":
            self._checkpoint(state, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self._training and state.is_world_process_zero and self.save_on == "save":
            self._checkpoint(state, model)

    def _checkpoint(self, state, model) -> None:
        metrics = dict(self._eval)
        if self._train_loss is not None:
            metrics["train_loss"] = self._train_loss
        keep_best = self.keep_best if self.best_metric else None
        record = self.project.models.checkpoint(
            storable(model), epoch=_epoch_index(state.epoch) or 0, step=state.global_step, run=self.run,
            metrics=metrics, name=self.name, keep_last=self.keep_last, keep_best=keep_best,
            best_metric=self.best_metric if keep_best else None, mode=self.mode, arch="class")
        self._last = (record.id, state.global_step)
        self.last_checkpoint = record

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._training or not state.is_world_process_zero:
            return
        self._training = False
        if self.save_final:
            live = self._last[0] if self._last and self._last[1] == state.global_step else None
            self.best_model = save_best(self.project, model, name=self.name, run=self.run, metric=self.best_metric,
                                        mode=self.mode, live_is=live, wrap=storable, arch="class")
        if self._owns_run:
            self.run.finish()
