"""Fits: train a model on the documents a query selects, in this process or as a task on workers.

    fit = wh.training.fit(net, wh.collection("digits"), inputs="image", target="label", loss="cross_entropy",
                          metrics=["accuracy"], epochs=10, folds={"valid": 0.2, "seed": 0},
                          early_stopping="valid.loss")
    fit.model            # the final model (a ModelRecord), its metrics as fields: valid.accuracy...
    fit.train_ids()      # exactly the documents it learned from
    wh.training.submit(record, "collection:digits", ...)   # the same fit as a task: `mlw worker --task mlw.fit`

A fit is a document (:data:`mlwarehouse.schema.FITS`) holding its spec (JSON: names, not objects, so a task
carries it), the ids of its two folds as blobs (the snapshot taken when it started: documents that arrive later are
not read, and every epoch sees the same set), its runs (one per attempt), the epoch history, the last and the best
checkpoint, the optimizer's state and the final model. A fit with a ``key`` that already exists resumes it from
its last checkpoint (a fit run as a task is keyed by its task, so a worker that takes over a killed task goes on
where the killed one stopped), or returns it when it completed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mlwarehouse import schema
from mlwarehouse.codecs.imports import resolve
from mlwarehouse.context import current_task
from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.ids import new_id, utc_now
from mlwarehouse.query.records import Record, find_by_id, name_filter
from mlwarehouse.training.fit import EarlyStopping, Trainer, TrainingError, pack_ids, read_ids
from mlwarehouse.training.folds import Folds
from mlwarehouse.training.objectives import loss_of, metric_name, metric_of, name_of, optimizer_of
from mlwarehouse.training.sources import Source, source_of, spelling

__all__ = ["Training", "Fit", "FIT_TASK", "TrainingError"]

FITS = schema.FITS.name
#: the task name of fits run by workers (``mlw worker --task mlw.fit``)
FIT_TASK = "mlw.fit"
#: spec entries that may change when a fit is resumed (training longer, or with another batch size)
_RESUMABLE = ("epochs",)


class Fit(Record):
    """One fit: ``fit.status``, ``fit.spec``, ``fit.history`` (one entry per epoch), ``fit.runs``..."""

    __slots__ = ("_training",)

    def __init__(self, doc: dict, training: "Training"):
        super().__init__(doc)
        object.__setattr__(self, "_training", training)

    @property
    def model(self):
        """The final model (a ModelRecord), or None before the fit completes."""
        model_id = self.doc.get("model")
        return self._training.project.models.get(model_id) if model_id else None

    @property
    def best_checkpoint(self):
        best = (self.doc.get("best") or {}).get("checkpoint")
        return self._training.project.models.get(best) if best else None

    def train_ids(self) -> list[str]:
        """The ids of the documents this fit trained on, sorted."""
        return self._ids("train")

    def valid_ids(self) -> list[str]:
        """The ids of the documents this fit validated on, sorted."""
        return self._ids("valid")

    def _ids(self, fold: str) -> list[str]:
        return read_ids(self._training.project, self.doc, fold)

    def refresh(self) -> "Fit":
        return self._training.get(self.id)


class Training:
    """The fits of one project (``wh.training``)."""

    def __init__(self, project):
        self.project = project
        project.ensure(schema.FITS)

    # -- fitting -------------------------------------------------------------------------------------------
    def fit(self, model: Any, data: Any, *, inputs: str | Sequence[str], target: str | None = None,
            filter: dict | None = None, loss: Any = "cross_entropy", metrics: Iterable[Any] = (),
            epochs: int = 10, batch_size: int = 32, optimizer: Any = "adam", lr: float = 1e-3,
            optimizer_options: dict | None = None, folds: Any = None, early_stopping: Any = None,
            keep_last: int = 2, keep_best: int = 1, name: str | None = None, seed: int = 0, shuffle: bool = True,
            key: str | None = None, device: str = "cpu", config: dict | None = None,
            arch: str | Sequence[str] | None = None, forward: Callable | None = None, trusted: bool = False,
            verbose: bool = False, description: str | None = None) -> Fit:
        """Train ``model`` on ``data``'s documents that ``filter`` selects and hold every key; see the module.

        ``model``: a torch module, a ModelRecord or model id (its stored architecture and weights), or
        ``"module:Class"`` (built with ``config``). ``data``: a Collection, an ItemDataset, ``"collection:NAME"`` or
        ``"items:NAME[@VERSION]"``. ``inputs`` are passed to the model in order, ``target`` (a field, or another
        listener's output ``"_outputs.<key>.<listener>"``) to the loss with the model's output. ``loss``,
        ``metrics`` and ``optimizer`` are names (see :mod:`mlwarehouse.training.objectives`), callables or import
        paths. ``folds``: a :class:`Folds`, a dict or the valid fraction (default 0.1, seed 0).
        ``early_stopping``: an :class:`EarlyStopping`, a dict or the metric to watch (``"valid.loss"``).
        Checkpoints keep the ``keep_last`` newest epochs and the ``keep_best`` best by the watched metric.
        """
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        if not inputs:
            raise QueryError("a fit needs at least one input key")
        keys = inputs + ([target] if target is not None else [])
        source = source_of(self.project, data, filter, keys)
        trusted = trusted or current_task() is not None
        module = self._module(model, config, trusted, seed)
        spec = self._spec(source, inputs, target, loss, metrics, epochs, batch_size, optimizer, lr,
                          optimizer_options, Folds.of(folds), EarlyStopping.of(early_stopping), keep_last, keep_best,
                          seed, shuffle, arch, name or _default_name(module))
        loss_fn = loss_of(loss, trusted=trusted)  # everything resolved before the fit document is written
        metric_fns = {metric_name(m): metric_of(m, trusted=trusted) for m in metrics}
        module.to(device)
        opt = optimizer_of(optimizer, module.parameters(), lr=lr, options=optimizer_options, trusted=trusted)
        if key is None and current_task() is not None:
            key = f"task:{current_task().id}"
        doc = self._open(source, spec, key, description)
        if doc["status"] == "complete":
            return Fit(doc, self)
        trainer = Trainer(self.project, doc, module, source, inputs=inputs, target=target, loss=loss_fn,
                          metrics=metric_fns, optimizer=opt, forward=forward, device=device,
                          say=print if verbose else None)
        try:
            trainer.run()
            self._final(trainer, module, source)
        except BaseException as exc:
            trainer.doc = trainer._update({"$set": {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}})
            if trainer.own_run is not None:
                trainer.own_run.fail(exc)
            raise
        if trainer.own_run is not None:
            trainer.own_run.finish()
        return Fit(trainer.doc, self)

    def submit(self, model: Any, data: Any, *, inputs: str | Sequence[str], target: str | None = None,
               config: dict | None = None, task_name: str = FIT_TASK, max_attempts: int = 3,
               timeout: float | None = None, priority: float = 0, **options):
        """The same fit as a task for workers (``mlw worker --task mlw.fit``): ``model`` is a ModelRecord or id
        (an architecture stored in the registry) or ``"module:Class"`` with ``config``; ``data`` a Collection,
        ItemDataset or its spelling; the other options as :meth:`fit` takes them, as names (JSON). The task's
        result holds the fit and model ids; a retried attempt resumes the fit from its last checkpoint."""
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        keys = inputs + ([target] if target is not None else [])
        source = source_of(self.project, data, options.get("filter"), keys)
        for what in ("loss", "optimizer"):
            if what in options and not isinstance(options[what], str):
                options[what] = name_of(options[what], what)
        if "metrics" in options:
            options["metrics"] = [m if isinstance(m, str) else name_of(m, "metric") for m in options["metrics"]]
        for what in ("folds", "early_stopping"):
            value = options.get(what)
            if isinstance(value, (Folds, EarlyStopping)):
                options[what] = value.to_doc()
        if options.get("filter") is not None:
            options["filter"] = source.filter_text  # JSON text: "$" keys cannot be document fields
        bad = sorted(k for k in options if k in ("forward", "verbose"))
        if bad:
            raise QueryError(f"{bad[0]!r} cannot travel in a task: fit in this process instead")
        hyper = {"model": _model_ref(model), "config": config, "data": spelling(source), "inputs": inputs,
                 "target": target, "options": options}
        return self.project.tasks.create(task_name, "mlwarehouse.training.task:run_fit", hyper_parameters=hyper,
                                         max_attempts=max_attempts, timeout=timeout, priority=priority,
                                         saved_result_keys=["fit", "model", "epochs"])

    def impute(self, collection, name: str, model: Any, *, input: str, target: str, **options):
        """Fit ``model`` to predict ``target`` from ``input`` and attach it as listener ``name`` (see
        :mod:`mlwarehouse.training.imputation`)."""
        from mlwarehouse.training.imputation import impute
        return impute(self, collection, name, model, input=input, target=target, **options)

    def represent(self, collection, model: Any, *, views: Sequence[str], listener: str | None = None, **options):
        """Train an embedding model contrastively on two views, then serve it behind ``listener`` and rebuild
        its vector indexes (see :mod:`mlwarehouse.training.representation`)."""
        from mlwarehouse.training.representation import represent
        return represent(self, collection, model, views=views, listener=listener, **options)

    def split(self, data: Any, *, filter: dict | None = None, keys: Sequence[str] = (),
              folds: Any = None) -> tuple[list[str], list[str]]:
        """``(train ids, valid ids)`` that a fit of ``data``'s documents matching ``filter`` (and holding ``keys``)
        with these ``folds`` would read now, each sorted, without training anything."""
        source = source_of(self.project, data, filter, list(keys))
        return _split(source, Folds.of(folds))

    # -- reading -------------------------------------------------------------------------------------------
    def get(self, id: str) -> Fit:
        doc = find_by_id(self.project, FITS, id, "fit")
        if doc is None:
            raise NotFound(f"no fit {id!r} in project {self.project.name!r}")
        return Fit(doc, self)

    def find(self, name: str | None = None, *, where: dict | None = None, limit: int | None = None) -> list[Fit]:
        docs = self.project.find(FITS, name_filter("fit", name, where), sort=[("time", -1)], limit=limit)
        return [Fit(doc, self) for doc in docs]

    def of_model(self, model: Any) -> Fit:
        """The fit that made a model or checkpoint (what exactly it saw: ``.train_ids()``)."""
        record = self.project.models.get(model if isinstance(model, str) else model.id)
        fit_id = record.doc.get("fit")
        if not fit_id:
            raise NotFound(f"model {record.id} was not made by a fit")
        return self.get(fit_id)

    def module(self, model: Any, *, config: dict | None = None, trusted: bool = False, seed: int = 0):
        """The torch module a fit (or the trainer loop) trains: ``model`` itself, a stored model's architecture and
        weights (a record or id), or ``"module:Class"`` built with ``config`` under ``seed`` (the same initial
        weights in every process); importing a class needs ``trusted``."""
        return self._module(model, config, trusted, seed)

    # -- internals -----------------------------------------------------------------------------------------
    def _module(self, model: Any, config: dict | None, trusted: bool, seed: int):
        import torch
        if isinstance(model, torch.nn.Module):
            return model
        if isinstance(model, Record) or (isinstance(model, str) and ":" not in model):
            loaded = self.project.models.get(model if isinstance(model, str) else model.id).load()
            if not isinstance(loaded, torch.nn.Module):
                raise QueryError(f"model {model!r} is not a torch module: a fit trains torch modules")
            try:
                loaded.train()
            except NotImplementedError:  # torch.export's graphs run, but cannot be put in training mode
                raise QueryError(f"model {model!r} is stored as an exported graph (torch.export), which cannot be "
                                 f"trained: save the module with arch='script' or 'class' to train it") from None
            return loaded
        if isinstance(model, str):
            cls = resolve(model, "fit model", trusted=trusted)
            if cls is None:
                raise QueryError(f"model class {model!r} cannot be imported")
            with torch.random.fork_rng():  # the same initial weights in every process that builds it
                torch.manual_seed(seed)
                return cls(**(config or {}))
        raise QueryError(f"a fit trains a torch module, a stored model or 'module:Class', not {type(model).__name__}")

    @staticmethod
    def _spec(source: Source, inputs, target, loss, metrics, epochs, batch_size, optimizer, lr, optimizer_options,
              folds: Folds, stopping: EarlyStopping | None, keep_last, keep_best, seed, shuffle, arch, name) -> dict:
        for label, value, least in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise QueryError(f"{label} must be an integer >= {least}, not {value!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise QueryError(f"lr must be a positive number, not {lr!r}")
        if not keep_best and not keep_last:
            raise QueryError("keep_last or keep_best must keep at least one checkpoint (a fit resumes from one)")
        if stopping and stopping.restore_best and not keep_best:
            raise QueryError("early stopping restores the best epoch: keep_best must be at least 1")
        monitor = stopping.metric if stopping else ("valid.loss" if folds.valid > 0 or folds.field else "train.loss")
        return {"name": name, "data": source.describe(), "inputs": inputs, "target": target,
                "loss": name_of(loss, "loss"), "metrics": [name_of(m, "metric") for m in metrics],
                "epochs": epochs, "batch_size": batch_size, "optimizer": name_of(optimizer, "optimizer"),
                "lr": float(lr), "optimizer_options": dict(optimizer_options or {}), "folds": folds.to_doc(),
                "early_stopping": stopping.to_doc() if stopping else None, "monitor": monitor,
                "monitor_mode": stopping.direction if stopping else "min", "keep_last": keep_last,
                "keep_best": keep_best, "seed": seed, "shuffle": bool(shuffle), "arch": arch}

    def _open(self, source: Source, spec: dict, key: str | None, description: str | None) -> dict:
        """The fit document: the one ``key`` names (resumed, with the same spec), else a new one."""
        if key is not None:
            found = self.project.find_one(FITS, {"key": key}, sort=[("time", -1)])
            if found is not None:
                same = {k: v for k, v in found["spec"].items() if k not in _RESUMABLE}
                if same != {k: v for k, v in spec.items() if k not in _RESUMABLE}:
                    raise QueryError(f"fit key {key!r} names fit {found['_id']} with another spec; use a new key")
                if found["status"] == "complete":
                    return found
                update = {"status": "running", "error": None, "spec.epochs": spec["epochs"]}
                return self.project.find_one_and_update(FITS, {"_id": found["_id"]}, {"$set": update})
        train, valid = _split(source, Folds.of(spec["folds"]))
        data = {"source": source.describe(), "train": pack_ids(self.project, train),
                "valid": pack_ids(self.project, valid)}
        doc = {"_id": new_id(), "name": spec["name"], "key": key, "status": "running", "spec": spec, "data": data,
               "task": current_task().id if current_task() else None, "runs": [], "epochs_done": 0,
               "history": [], "checkpoint": None, "best": None, "since_best": 0, "optimizer": None, "model": None,
               "started": utc_now(), "ended": None, "error": None, "description": description}
        return self.project.insert(FITS, doc)

    def _final(self, trainer: Trainer, module, source: Source):
        """Save the final model (the best epoch's weights when early stopping restores them) and end the fit."""
        doc = trainer.doc
        best = doc.get("best") or {}
        stopping = trainer.stopping
        chosen = doc["history"][-1]
        if stopping and stopping.restore_best and best.get("checkpoint") and best["epoch"] != chosen["epoch"]:
            module.load_state_dict(self.project.models.get(best["checkpoint"]).load().state_dict())
            chosen = next(h for h in doc["history"] if h["epoch"] == best["epoch"])
        metrics = {"train": chosen["train"], **({"valid": chosen["valid"]} if chosen["valid"] else {})}
        record = self.project.models.save(
            module, doc["name"], epoch=chosen["epoch"], run=trainer.current.id,
            dataset=source.node if source.kind == "items" else None, fit=doc["_id"],
            description=doc.get("description"), **metrics, **({"arch": doc["spec"]["arch"]}
                                                                  if doc["spec"].get("arch") else {}))
        self.project.lineage.record(source.node, record, "trained_on", fit=doc["_id"])
        stopped = stopping is not None and doc["epochs_done"] < doc["spec"]["epochs"]
        trainer.finish(record.id, stopped_early=stopped)
        return record


def _split(source: Source, folds: Folds) -> tuple[list[str], list[str]]:
    rows = source.ids(folds.field)
    train = [i for i, stored in rows if folds.fold(i, stored) == "train"]
    valid = [i for i, stored in rows if folds.fold(i, stored) == "valid"]
    return train, valid


def _model_ref(model: Any) -> dict:
    if isinstance(model, Record):
        return {"id": model.id}
    if isinstance(model, str) and ":" in model:
        return {"class": model}
    if isinstance(model, str):
        return {"id": model}
    raise QueryError("a fit task takes a stored model (record or id) or 'module:Class': save the module first "
                     "(wh.models.save(net, 'init')) so a worker can rebuild it")


def _default_name(module) -> str:
    return type(module).__name__.lower()

