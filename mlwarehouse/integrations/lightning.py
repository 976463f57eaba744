"""PyTorch Lightning: a logger that writes every step and epoch into a warehouse run, and a callback that keeps the
module's checkpoints in the warehouse.

    logger = WarehouseLogger(wh, "mnist-mlp")                       # one run; version = the run id
    checkpoints = WarehouseCheckpoint(monitor="val_loss", mode="min", keep_last=1, keep_best=1)
    trainer = L.Trainer(max_epochs=10, logger=logger, callbacks=[checkpoints], enable_checkpointing=False)
    trainer.fit(module, train_loader, val_loader)
    wh.models.load("MyModule")                                     # the best epoch, a final model of that run

Metric names become log kinds by the rule of :mod:`mlwarehouse.integrations.common` (``train_loss`` -> kind
``train``, ``val_acc`` -> kind ``valid``, ``test/acc`` -> kind ``test``); the ``epoch`` Lightning adds to each
call is the points' epoch. The warehouse is the checkpoint store: ``enable_checkpointing=False`` turns
Lightning's own ``.ckpt`` files off; leave it on only to also keep files that resume a trainer's optimizer state.
The model is stored as ``models.save`` stores any ``nn.Module`` (a LightningModule that calls
``save_hyperparameters()`` is rebuilt from its importable class and ``hparams``).
"""

from __future__ import annotations

import sys
from argparse import Namespace
from collections.abc import Mapping, Sequence
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.loggers.logger import rank_zero_experiment
    from lightning.pytorch.utilities import rank_zero_only
    from torch import nn
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(f"mlwarehouse.integrations.lightning needs PyTorch Lightning: pip install "
                      f"'mlwarehouse[lightning]' ({exc})") from exc

from mlwarehouse.context import current_run
from mlwarehouse.errors import InvalidDocument, QueryError
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

__all__ = ["WarehouseLogger", "WarehouseCheckpoint"]


class WarehouseLogger(Logger):
    """Log hyper-parameters and metrics of a Lightning training into one warehouse run.

    ``warehouse`` is a Warehouse, a Project or None (the current run's project, else ``connect()``). ``run`` is a
    Run to log into (it is left running at the end: its owner ends it); without one, the current run of that
    project is used the same way, else a run ``name`` is started on first use (with ``hyper_parameters``,
    ``tags`` and extra ``fields``) and ended when training ends: complete, failed with the error, or cancelled on
    Ctrl-C. Metrics whose name has no kind prefix go to ``default_kind``.
    """

    def __init__(self, warehouse: Any = None, name: str | None = None, *, run: Any = None,
                 hyper_parameters: Mapping | None = None, tags: Sequence[str] = (), default_kind: str = "train",
                 **fields: Any):
        super().__init__()
        self._target = warehouse
        self._project = None
        self._run = run
        self._owns_run = False
        self._name = name
        self._start = {"hyper_parameters": plain(dict(hyper_parameters or {})), "tags": list(tags), **fields}
        self.default_kind = default_kind

    # -- where ---------------------------------------------------------------------------------------------
    @property
    def project(self):
        """The project the run is in."""
        if self._project is None:
            if self._target is None and self._run is not None and not isinstance(self._run, str):
                self._project = project_of(self._run)
            elif self._target is None and current_run() is not None:
                self._project = project_of(current_run())
            else:
                self._project = resolve_project(self._target)
        return self._project

    @property
    def run(self):
        """The run (started on first use unless one was given or is current)."""
        if isinstance(self._run, str):
            self._run = self.project.runs.get(self._run)
        if self._run is None:
            project = self.project
            current = current_run()
            if current is not None and same_store(current, project):
                self._run = current
            else:
                self._run = project.runs.start(self._name, **self._start)
                self._owns_run = True
        return self._run

    @property
    @rank_zero_experiment
    def experiment(self):
        """The run: Lightning calls a logger's backing object its experiment."""
        return self.run

    def _elsewhere(self) -> bool:
        """On a process other than rank 0 (distributed training) no run is started: rank 0 logs for all."""
        return self._run is None and getattr(rank_zero_only, "rank", 0) != 0

    @property
    def name(self) -> str | None:
        return self._name if self._elsewhere() else self.run.doc["name"]

    @property
    def version(self) -> str | None:
        return None if self._elsewhere() else self.run.id

    # -- logging -------------------------------------------------------------------------------------------
    @rank_zero_only
    def log_hyperparams(self, params: Mapping | Namespace | None = None, *args: Any, **kwargs: Any) -> None:
        """Merge ``params`` into the run's ``hyper_parameters`` (values that are not JSON are stored as text)."""
        if isinstance(params, Namespace):
            params = vars(params)
        params = plain(dict(params or {}))
        if params:
            run = self.run
            run.set(hyper_parameters={**(run.doc.get("hyper_parameters") or {}), **params})

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """One log point per kind found among ``metrics``, all at ``step``."""
        values = scalars(dict(metrics))
        epoch = values.pop("epoch", None)
        if isinstance(epoch, float):
            epoch = int(epoch) if epoch.is_integer() else None
        groups: dict[str, dict] = {}
        for key, value in values.items():
            kind, metric = split_metric(key, self.default_kind)
            groups.setdefault(kind, {})[metric] = value
        run = self.run
        for kind, points in groups.items():
            run.log(kind, step=step, epoch=epoch, **points)

    @rank_zero_only
    def save(self) -> None:
        if self._run is not None and not isinstance(self._run, str):
            self._run.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """End a run this logger started: ``success`` -> complete, ``failed`` -> failed with the error being
        handled (or cancelled for Ctrl-C); ``finished`` (a requeue) only flushes. A given run is only flushed."""
        run = self._run
        if run is None or isinstance(run, str):
            return
        if not self._owns_run or status not in ("success", "failed") or run.doc.get("status") != "running":
            run.flush()
            return
        if status == "success":
            run.finish()
            return
        error = sys.exc_info()[1]
        if isinstance(error, KeyboardInterrupt):
            run.finish("cancelled", error="KeyboardInterrupt")
        else:
            run.fail(error if error is not None else "training failed")


class WarehouseCheckpoint(Callback):
    """Checkpoint the module into the warehouse at the end of every ``every_n_epochs``-th epoch (after its
    validation), and at the end of fit save the best checkpoint as a final model of the run.

    The checkpoint (and final model) is called ``name`` (default: the module's class name) and holds the epoch,
    the global step and every scalar of ``trainer.callback_metrics`` (``val_loss``...). After each save the run's
    checkpoints outside ``keep_last`` newest ∪ ``keep_best`` best by ``monitor`` (``mode`` "min" or "max") are
    deleted (``None`` for both keeps all). ``module`` names an attribute holding the ``nn.Module`` to store instead
    of the LightningModule itself; ``example_inputs``, ``config``, ``arch`` and ``allow_pickle`` go to
    ``models.save`` (how the architecture is stored). The run is the WarehouseLogger's, else the current run, else
    one this callback starts and ends. ``best_model`` is the final model's record after fit.
    """

    def __init__(self, warehouse: Any = None, *, name: str | None = None, monitor: str | None = "val_loss",
                 mode: str = "min", keep_last: int | None = 1, keep_best: int | None = 1, every_n_epochs: int = 1,
                 module: str | None = None, save_final: bool = True, example_inputs: Any = None,
                 config: dict | None = None, arch: str | Sequence[str] | None = None, allow_pickle: bool = False):
        if mode not in ("min", "max"):
            raise QueryError(f"mode must be 'min' or 'max', not {mode!r}")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise QueryError(f"every_n_epochs must be a positive integer, not {every_n_epochs!r}")
        self._target = warehouse
        self.name = name
        self.monitor = monitor
        self.metric = field_name(monitor) if monitor else None
        self.mode = mode
        self.keep_last = keep_last
        self.keep_best = keep_best if monitor else None
        self.every_n_epochs = every_n_epochs
        self.module = module
        self.save_final = save_final
        self.options = {"example_inputs": example_inputs, "config": config, "arch": arch,
                        "allow_pickle": allow_pickle}
        self.project = None
        self.run = None
        self._owns_run = False
        self._last: tuple[str, int] | None = None  # (checkpoint id, global step when it was saved)
        self.last_checkpoint = None
        self.best_model = None

    def _model(self, pl_module) -> nn.Module:
        if self.module is None:
            return pl_module
        inner = getattr(pl_module, self.module, None)
        if not isinstance(inner, nn.Module):
            raise InvalidDocument(f"{type(pl_module).__name__}.{self.module} is not an nn.Module")
        return inner

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        self._last = None
        self.name = self.name or type(self._model(pl_module)).__name__
        ours = next((lg for lg in trainer.loggers if isinstance(lg, WarehouseLogger)), None)
        if ours is not None and self._target is None:
            self.project, self.run = ours.project, ours.run
            return
        current = current_run()
        if self._target is None and current is not None:
            self.project, self.run = project_of(current), current
            return
        self.project = resolve_project(self._target)
        if ours is not None and same_store(ours.run, self.project):
            self.run = ours.run
        elif current is not None and same_store(current, self.project):
            self.run = current
        else:
            self.run = self.project.runs.start(self.name, hyper_parameters=plain(dict(pl_module.hparams)))
            self._owns_run = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.run is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        metrics = {field_name(k): v for k, v in scalars(dict(trainer.callback_metrics)).items()}
        record = self.project.models.checkpoint(
            self._model(pl_module), epoch=epoch, step=trainer.global_step, run=self.run, metrics=metrics,
            name=self.name, keep_last=self.keep_last, keep_best=self.keep_best,
            best_metric=self.metric if self.keep_best else None, mode=self.mode, **self.options)
        self._last = (record.id, trainer.global_step)
        self.last_checkpoint = record

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.run is None or not trainer.is_global_zero:
            return
        if self.save_final:
            live = self._last[0] if self._last and self._last[1] == trainer.global_step else None
            self.best_model = save_best(self.project, self._model(pl_module), name=self.name, run=self.run,
                                        metric=self.metric, mode=self.mode, live_is=live, **self.options)
        if self._owns_run:
            self.run.finish()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._owns_run and self.run is not None and self.run.doc.get("status") == "running":
            if isinstance(exception, KeyboardInterrupt):
                self.run.finish("cancelled", error="KeyboardInterrupt")
            else:
                self.run.fail(exception)
