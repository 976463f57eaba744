"""TensorDB's ``DBLogger`` training callback: batch logs as training logs, each epoch's params saved with a
validation log, through a :class:`mlwarehouse.compat.tensordb.TensorDB` (any object with its ``train_log``,
``valid_log`` and ``save_params``)."""

from __future__ import annotations

import sys
import time
from typing import Any

from mlwarehouse.errors import InvalidDocument

__all__ = ["DBLogger"]


class DBLogger:
    """TensorDB's training callback, framework-neutral (Keras-style method names, or call them from a loop).

    Every ``batch_every``-th ``on_batch_end(batch, logs)`` writes a training log (the logs, ``epoch``, ``batch``,
    ``step`` and ``step_time``); ``on_epoch_end(epoch, logs)`` saves the params of ``model`` (if given) and writes
    a validation log with the logs, ``epoch``, ``stepTime`` (the epoch's seconds) and ``params`` (their id).
    ``model`` is what to save: a list or dict of arrays, a torch module (its state dict), an object with the
    original's ``Params`` attribute, or a function returning params.
    """

    def __init__(self, db: Any, model: Any = None, *, batch_every: int = 1):
        if isinstance(batch_every, bool) or not isinstance(batch_every, int) or batch_every < 1:
            raise InvalidDocument(f"batch_every must be an integer >= 1, not {batch_every!r}")
        self.db, self.model, self.batch_every = db, model, batch_every
        self.epoch, self.batch, self.step = 0, 0, 0
        self._epoch_started = self._batch_started = time.perf_counter()

    def set_model(self, model: Any) -> None:
        """Keras hands its model over here; an explicit ``model`` given to the logger wins."""
        if self.model is None:
            self.model = model

    def set_params(self, params: dict) -> None:
        """Keras's fit settings: not needed."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.step = 0

    def on_train_end(self, logs: dict | None = None) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch
        self._epoch_started = time.perf_counter()

    def on_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.batch = batch
        self._batch_started = time.perf_counter()

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        if (self.step - 1) % self.batch_every:
            return
        self.db.train_log({**(logs or {}), "epoch": self.epoch, "batch": batch, "step": self.step,
                           "step_time": time.perf_counter() - self._batch_started})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        fields = {**(logs or {}), "epoch": epoch, "stepTime": time.perf_counter() - self._epoch_started}
        if self.model is not None:
            fields["params"] = self.db.save_params(_params_of(self.model), fields)
        self.db.valid_log(fields)

    on_train_batch_begin = on_batch_begin  # Keras 2.2+ names
    on_train_batch_end = on_batch_end


def _params_of(model: Any) -> Any:
    """The params to save for ``model`` (see :class:`DBLogger`)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if hasattr(model, "Params"):
        return model.Params
    if callable(model) and not isinstance(model, (list, tuple, dict)):
        return model()
    return model
