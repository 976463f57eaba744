"""Losses, metrics and optimizers by name, so a fit spec stays JSON (and a task can carry it).

Each may also be given as a callable (in the process that fits) or as an importable ``"module:function"``: a
name read from a stored task is resolved only where the code is trusted (a worker's task, or
``$MLW_TRUSTED_MODULES``), as everything named by import path is (:mod:`mlwarehouse.codecs.imports`).

Metrics are averaged over a whole fold, not over batches: a named metric sums over its batch, and a callable
metric's batch mean (``fn(output, target) -> number``) is weighted by the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlwarehouse.codecs.imports import resolve
from mlwarehouse.errors import QueryError

__all__ = ["loss_of", "metric_of", "optimizer_of", "LOSSES", "METRICS", "OPTIMIZERS", "name_of"]


def _losses() -> dict[str, Callable]:
    from torch.nn import functional as F
    return {
        "cross_entropy": F.cross_entropy,
        "nll": F.nll_loss,
        "mse": lambda out, y: F.mse_loss(out.reshape(y.shape) if out.numel() == y.numel() else out, y.float()),
        "l1": lambda out, y: F.l1_loss(out.reshape(y.shape) if out.numel() == y.numel() else out, y.float()),
        "smooth_l1": lambda out, y: F.smooth_l1_loss(out.reshape(y.shape) if out.numel() == y.numel() else out,
                                                     y.float()),
        "bce": lambda out, y: F.binary_cross_entropy_with_logits(out.reshape(y.shape), y.float()),
    }


LOSSES = ("cross_entropy", "nll", "mse", "l1", "smooth_l1", "bce")
METRICS = ("accuracy", "mse", "mae")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


def _predicted(out, y):
    """Class predictions of a batch: argmax over classes, or the sign of one logit per document."""
    if out.dim() > y.dim():
        return out.argmax(dim=-1)
    return (out.reshape(y.shape) > 0).to(y.dtype)


def _accuracy(out, y, size: int) -> float:
    return float((_predicted(out, y) == y).sum())


def _squared(out, y, size: int) -> float:
    out = out.reshape(y.shape) if out.numel() == y.numel() else out
    return float(((out.float() - y.float()) ** 2).reshape(y.shape[0], -1).mean(dim=1).sum())


def _absolute(out, y, size: int) -> float:
    out = out.reshape(y.shape) if out.numel() == y.numel() else out
    return float((out.float() - y.float()).abs().reshape(y.shape[0], -1).mean(dim=1).sum())


_NAMED_METRICS = {"accuracy": _accuracy, "mse": _squared, "mae": _absolute}


def name_of(value: Any, what: str) -> str:
    """How a loss, metric or optimizer is written in a stored spec: its name or import path."""
    if isinstance(value, str):
        return value
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        return f"{module}:{qualname}"
    return f"<{what} {type(value).__name__}>"


def _imported(target: str, what: str, trusted: bool) -> Callable:
    fn = resolve(target, what, trusted=trusted)
    if fn is None or not callable(fn):
        raise QueryError(f"{what} {target!r} is not a known name ({', '.join(_known(what))}) nor an importable "
                         f"'module:function'")
    return fn


def _known(what: str) -> tuple[str, ...]:
    return {"loss": LOSSES, "metric": METRICS, "optimizer": OPTIMIZERS}.get(what, ())


def loss_of(loss: Any, *, trusted: bool = False) -> Callable:
    """A loss function ``(output, target) -> scalar tensor``."""
    if callable(loss):
        return loss
    if isinstance(loss, str):
        named = _losses()
        if loss in named:
            return named[loss]
        if ":" in loss:
            return _imported(loss, "loss", trusted)
    raise QueryError(f"loss must be one of {', '.join(LOSSES)}, a callable or 'module:function', not {loss!r}")


def metric_of(metric: Any, *, trusted: bool = False) -> Callable[[Any, Any, int], float]:
    """A metric as ``(output, target, batch size) -> the sum of its values over the batch``."""
    if isinstance(metric, str) and metric in _NAMED_METRICS:
        return _NAMED_METRICS[metric]
    fn = metric if callable(metric) else None
    if fn is None and isinstance(metric, str) and ":" in metric:
        fn = _imported(metric, "metric", trusted)
    if fn is None:
        raise QueryError(f"a metric is one of {', '.join(_NAMED_METRICS)}, a callable or 'module:function', "
                         f"not {metric!r}")

    def weighted(out, y, size: int) -> float:
        return float(fn(out, y)) * size
    return weighted


def metric_name(metric: Any) -> str:
    """The name a metric is logged under: its own name, or the function's name."""
    if isinstance(metric, str):
        return metric.rpartition(":")[2].rpartition(".")[2]
    return getattr(metric, "__name__", type(metric).__name__)


def optimizer_of(optimizer: Any, parameters, *, lr: float, options: dict | None = None, trusted: bool = False):
    """A torch optimizer over ``parameters``: a name, a callable ``(parameters, lr=..., **options)``, or an
    importable optimizer class."""
    import torch
    options = dict(options or {})
    named = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
             "rmsprop": torch.optim.RMSprop}
    if isinstance(optimizer, str) and optimizer in named:
        factory = named[optimizer]
    elif callable(optimizer):
        factory = optimizer
    elif isinstance(optimizer, str) and ":" in optimizer:
        factory = _imported(optimizer, "optimizer", trusted)
    else:
        raise QueryError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, a callable or 'module:Class', "
                         f"not {optimizer!r}")
    try:
        return factory(parameters, lr=lr, **options)
    except TypeError as exc:
        raise QueryError(f"optimizer {name_of(optimizer, 'optimizer')!r} does not take these options: {exc}") from None
