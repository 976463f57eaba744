"""The training loop of a fit: epochs over a fixed snapshot of ids, a checkpoint and a log point per epoch, early
stopping, and resuming after a crash from the last checkpoint with every epoch logged once.

The order of one epoch's writes is what makes a crash at any moment harmless:

1. the checkpoint (a model with ``checkpoint: true``, the epoch's metrics and the retention policy applied);
2. the fit document: ``epochs_done``, the checkpoint, the optimizer's state, the epoch's metrics in ``history``
   and the early-stopping state, in one update;
3. the epoch's ``train`` and ``valid`` log points, flushed.

A process killed before 2 leaves at most a checkpoint no fit names (removed when the fit resumes); killed after 2
but before 3 is durable, it leaves an epoch whose points are missing: a resumed fit logs the points of every epoch
of its history that no run of the fit holds, so each epoch is logged once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlwarehouse import schema
from mlwarehouse.codecs import values
from mlwarehouse.context import current_run
from mlwarehouse.errors import QueryError, TrainingError
from mlwarehouse.ids import utc_now
from mlwarehouse.training.sources import Source, batch_length, collate

__all__ = ["EarlyStopping", "Trainer", "TrainingError", "load_optimizer", "pack_ids", "pack_optimizer", "read_ids",
           "unpack_ids"]

FITS = schema.FITS.name
#: metric names (lower-cased) for which smaller is better when an early-stopping mode is not given
_SMALLER = ("loss", "mse", "mae", "error", "rmse", "perplexity")


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when ``metric`` ("valid.loss", "valid.accuracy"...) has not improved by ``min_delta`` for ``patience``
    epochs; ``restore_best`` makes the final model the best epoch's weights, not the last."""

    metric: str = "valid.loss"
    patience: int = 3
    mode: str | None = None  # "min" or "max"; None: min for losses and errors, max otherwise
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self) -> None:
        kind, _, name = self.metric.partition(".")
        if kind not in ("train", "valid") or not name:
            raise QueryError(f"early stopping watches 'train.<metric>' or 'valid.<metric>', not {self.metric!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise QueryError(f"patience must be an integer >= 1, not {self.patience!r}")
        if self.mode not in (None, "min", "max"):
            raise QueryError(f"mode must be 'min' or 'max', not {self.mode!r}")

    @property
    def direction(self) -> str:
        if self.mode is not None:
            return self.mode
        name = self.metric.partition(".")[2].lower()
        return "min" if any(word in name for word in _SMALLER) else "max"

    def to_doc(self) -> dict:
        return {"metric": self.metric, "patience": self.patience, "mode": self.direction,
                "min_delta": self.min_delta, "restore_best": self.restore_best}

    @classmethod
    def of(cls, value: Any) -> "EarlyStopping | None":
        if value is None or isinstance(value, EarlyStopping):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, str):
            return cls(metric=value)
        raise QueryError(f"early_stopping must be an EarlyStopping, a dict or a metric name, not {value!r}")


def improved(value: float | None, best: float | None, mode: str, min_delta: float) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class Trainer:
    """Runs (or resumes) one fit: its fit document is the state, the model and optimizer are the caller's."""

    def __init__(self, project, doc: dict, model, source: Source, *, inputs: Sequence[str], target: str | None,
                 loss: Callable, metrics: dict[str, Callable], optimizer, forward: Callable | None = None,
                 device: str = "cpu", say: Callable[[str], None] | None = None):
        self.project = project
        self.doc = doc
        self.model = model
        self.source = source
        self.inputs = list(inputs)
        self.target = target
        self.loss = loss
        self.metrics = metrics
        self.optimizer = optimizer
        self.forward = forward or self._forward
        self.device = device
        self.say = say or (lambda message: None)
        self.own_run = None  # the run this trainer started (the caller ends it), or None: someone else's
        self.current = None  # the run this attempt logs into
        spec = doc["spec"]
        self.epochs, self.batch_size, self.seed = spec["epochs"], spec["batch_size"], spec["seed"]
        self.stopping = EarlyStopping.of(spec.get("early_stopping"))
        self.monitor = self.stopping.metric if self.stopping else spec["monitor"]
        self.mode = self.stopping.direction if self.stopping else spec["monitor_mode"]

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train the remaining epochs; returns the fit document as it ends (status still "running")."""
        train_ids, valid_ids = self._ids("train"), self._ids("valid")
        if not train_ids:
            raise TrainingError(f"fit {self.doc['name']!r}: the query selects no training documents")
        run = self.current = self._run()
        self._resume(run)
        since = self.doc.get("since_best", 0)
        for epoch in range(self.doc.get("epochs_done", 0), self.epochs):
            if self.stopping and since >= self.stopping.patience:
                break
            started = time.monotonic()
            train = self._epoch(train_ids, epoch, learn=True)
            valid = self._epoch(valid_ids, epoch, learn=False) if valid_ids else {}
            entry = {"epoch": epoch, "run": run.id, "train": train, "valid": valid,
                     "seconds": round(time.monotonic() - started, 3)}
            since = self._commit(run, entry)
            self.say(f"epoch {epoch}: train {_short(train)}" + (f", valid {_short(valid)}" if valid else ""))
        return self.doc

    def _forward(self, model, batch: dict) -> tuple[Any, Any]:
        xs = [collate(batch[key]) for key in self.inputs]
        xs = [x.to(self.device) if hasattr(x, "to") else x for x in xs]
        y = collate(batch[self.target]) if self.target is not None else None
        if y is not None and hasattr(y, "to"):
            y = y.to(self.device)
        return model(*xs), y

    def _epoch(self, ids: list[str], epoch: int, *, learn: bool) -> dict:
        import torch
        model = self.model
        model.train(learn)
        order = ids
        if learn and self.doc["spec"].get("shuffle", True):
            rng = np.random.default_rng([self.seed, epoch])
            order = [ids[i] for i in rng.permutation(len(ids))]
        totals = {"loss": 0.0, **{name: 0.0 for name in self.metrics}}
        count = 0
        with torch.set_grad_enabled(learn):
            for batch in self.source.batches(order, self.batch_size):
                try:
                    out, y = self.forward(model, batch)
                    loss = self.loss(out, y)
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise TrainingError(f"fit {self.doc['name']!r}, epoch {epoch}: the model or loss raised "
                                        f"{type(exc).__name__}: {exc}") from exc
                size = batch_length(batch)
                if learn:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                totals["loss"] += float(loss.detach()) * size
                with torch.no_grad():
                    detached = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
                    for name, metric in self.metrics.items():
                        totals[name] += metric(detached, y, size)
                count += size
        return {name: (value / count if count else None) for name, value in totals.items()}

    # -- state ---------------------------------------------------------------------------------------------
    def _ids(self, fold: str) -> list[str]:
        return read_ids(self.project, self.doc, fold)

    def _run(self):
        """The run this attempt logs into: the current run (a task's, or the caller's), else a new one."""
        runs = self.project.runs
        run = current_run()
        if run is not None and run.doc.get("status") == "running" and run.doc.get("project") == self.project.name \
                and run.warehouse_settings == self.project.warehouse.settings:
            run.set(fit=self.doc["_id"])
        else:
            spec = self.doc["spec"]
            run = runs.start(self.doc["name"], fit=self.doc["_id"], tags=["fit"],
                             hyper_parameters={k: spec[k] for k in ("epochs", "batch_size", "lr", "optimizer",
                                                                    "loss", "seed") if k in spec})
            self.own_run = run
        if self.source.kind == "items":
            run.use_datasets(self.source.node)
        self.project.lineage.record(self.source.node, run, "input", fit=self.doc["_id"],
                                    filter=self.source.filter_text, folds=self.doc["spec"]["folds"])
        self.doc = self._update({"$addToSet": {"runs": run.id}})
        return run

    def _resume(self, run) -> None:
        """Put the model and the optimizer back where the last committed epoch left them; log what is missing."""
        done = self.doc.get("epochs_done", 0)
        models = self.project.models
        stray = models.find(self.doc["name"], where={"fit": self.doc["_id"], "epoch": {"$gte": done}},
                            checkpoints=True)
        stray = [m.id for m in stray if m.doc.get("checkpoint") and m.id != self.doc.get("checkpoint")]
        if stray:  # saved by an attempt killed before it recorded them
            self.project.delete(schema.MODELS.name, {"_id": {"$in": stray}})
        if not done:
            return
        self.say(f"resuming fit {self.doc['_id']} after epoch {done - 1}")
        state = models.get(self.doc["checkpoint"]).load()
        try:
            self.model.load_state_dict(state.state_dict())
            if self.doc.get("optimizer") is not None:
                load_optimizer(self.project, self.optimizer, self.doc["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrainingError(f"fit {self.doc['_id']}: the stored checkpoint does not fit this model or "
                                f"optimizer ({exc})") from exc
        self.project.runs.flush()
        logged = {(d.get("kind"), d.get("epoch")) for d in self.project.runs.find_logs(
            where={"run": {"$in": self.doc.get("runs", [])}, "kind": {"$in": ["train", "valid"]}})}
        for entry in self.doc.get("history", []):
            for kind in ("train", "valid"):
                if entry.get(kind) and (kind, entry["epoch"]) not in logged:
                    run.log(kind, step=entry["epoch"], epoch=entry["epoch"], **entry[kind])
        run.flush()

    def _commit(self, run, entry: dict) -> int:
        """Checkpoint, record, log one epoch (in that order: see the module notes); epochs since the best."""
        epoch = entry["epoch"]
        value = _metric(entry, self.monitor)
        best = self.doc.get("best") or {}
        better = improved(value, best.get("value"), self.mode, self.stopping.min_delta if self.stopping else 0.0)
        spec = self.doc["spec"]
        metrics = {"train": entry["train"], **({"valid": entry["valid"]} if entry["valid"] else {})}
        record = self.project.models.checkpoint(
            self.model, epoch=epoch, run=run, metrics=metrics, name=self.doc["name"], fit=self.doc["_id"],
            keep_last=spec["keep_last"], keep_best=spec["keep_best"], best_metric=self.monitor, mode=self.mode,
            **_arch(spec))
        since = 0 if better else self.doc.get("since_best", 0) + 1
        if better or (value is not None and value == best.get("value")):
            # a tie is no improvement for patience, but retention keeps the later of equal checkpoints: follow it
            best = {"epoch": epoch, "value": value, "checkpoint": record.id}
        optimizer = pack_optimizer(self.project, self.optimizer)
        old = set(self.doc.get("_blobs") or ())
        keys = sorted(set(self._data_keys()) | values.blob_keys(optimizer))
        self.doc = self._update({"$set": {"epochs_done": epoch + 1, "checkpoint": record.id, "optimizer": optimizer,
                                          "best": best, "since_best": since, "_blobs": keys},
                                 "$push": {"history": entry}})
        stale = old - set(keys)
        if stale:
            self.project.warehouse.release_blobs([{"_blobs": sorted(stale)}])
        for kind in ("train", "valid"):
            if entry[kind]:
                run.log(kind, step=epoch, epoch=epoch, **entry[kind])
        run.flush()
        return since

    def _data_keys(self) -> list[str]:
        data = self.doc["data"]
        return sorted(values.blob_keys([data["train"]["ids"], data["valid"]["ids"]]))

    def _update(self, update: dict) -> dict:
        doc = self.project.find_one_and_update(FITS, {"_id": self.doc["_id"]}, update)
        if doc is None:
            raise TrainingError(f"fit {self.doc['_id']} was deleted while it trained")
        return doc

    def finish(self, model_id: str | None, status: str = "complete", **fields) -> dict:
        self.doc = self._update({"$set": {"status": status, "model": model_id, "ended": utc_now(), **fields}})
        return self.doc


def pack_ids(project, ids: list[str]) -> dict:
    """A fold's ids as the fit document keeps them: one blob (newline-separated, sorted) and how many."""
    return {"count": len(ids), "ids": project.pack("\n".join(ids).encode("ascii")) if ids else None}


def read_ids(project, doc: dict, fold: str) -> list[str]:
    """The ids of a fit's ``fold`` ("train" or "valid"), as :func:`pack_ids` stored them."""
    return unpack_ids(project, doc["data"][fold]["ids"])


def unpack_ids(project, ref: Any) -> list[str]:
    """The ids of one blob :func:`pack_ids` wrote (its ``ids``; None for none)."""
    text = project.unpack(ref) if ref is not None else b""
    return text.decode("ascii").split("\n") if text else []


def _metric(entry: dict, path: str) -> float | None:
    kind, _, name = path.partition(".")
    value = (entry.get(kind) or {}).get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _short(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))


def _arch(spec: dict) -> dict:
    """How checkpoints store the architecture: the spec's ``arch`` (a format or formats), when it names one."""
    return {"arch": spec["arch"]} if spec.get("arch") else {}


def pack_optimizer(project, optimizer) -> dict:
    """An optimizer's state as a document keeps it: a JSON tree, its tensors stored as blobs."""
    state = optimizer.state_dict()
    return project.pack({"state": [[int(k), v] for k, v in state["state"].items()],
                         "param_groups": [_plain(group) for group in state["param_groups"]]})


def load_optimizer(project, optimizer, tree: dict) -> None:
    """Put back into ``optimizer`` a state :func:`pack_optimizer` stored (ValueError or KeyError if it does not fit)."""
    import torch
    tree = project.unpack(tree, writable=True)
    state = {}
    for key, entry in tree["state"]:
        state[int(key)] = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": tree["param_groups"]})


def _plain(value: Any) -> Any:
    """JSON objects have no integer keys, and tuples come back as lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
