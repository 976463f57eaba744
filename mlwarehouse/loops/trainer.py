"""The trainer: keep training one model on a collection (or an item dataset) as new documents arrive, and save it
every N steps for the evaluator to pick up.

``train_forever(wh, model, "collection:digits", inputs="x", target="y", name="mlp", save_every=200)`` trains in
*rounds*: a round is one shuffled pass over every document the query selects when the round starts (its ids, a
sorted snapshot, stored once as a blob), so documents inserted meanwhile join the next round. A new round starts
when at least ``min_new`` documents arrived since the last one began (``min_new=0``: rounds back to back, forever);
until then the trainer waits, woken by a write's NOTIFY on PostgreSQL and by polling elsewhere.

Every ``save_every`` steps, at the end of a round and when stopped, it saves the model (a final model named
``name``, so ``wh.models.best``, the evaluator and aliases see it) with ``step``, ``round``, ``position``, the mean
``loss`` since the last save and its own state: the optimizer's state and the round's ids, as blobs. That one
insert is the whole commit, so there is nothing to be half-written: a trainer killed at any moment and restarted
with the same ``key`` resumes from its newest save (weights, optimizer, the same round's order at the same
position) and at most ``save_every`` steps are computed again. ``keep_last`` prunes older saves, never one an
alias points at or one evaluations depend on. One process per key at a time.

Run it from a shell: ``mlw train --model mypkg.nets:MLP --config '{"hidden": 64}' --collection digits --inputs x
--target y --name mlp --save-every 200`` (SIGTERM or Ctrl-C finish the current step, save, then exit 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mlwarehouse import schema
from mlwarehouse.errors import DependencyError, NotFound, QueryError, TrainingError
from mlwarehouse.training.fit import load_optimizer, pack_ids, pack_optimizer, unpack_ids
from mlwarehouse.training.objectives import loss_of, metric_name, metric_of, optimizer_of
from mlwarehouse.training.sources import ItemSource, Source, batch_length, collate, source_of, spelling

__all__ = ["train_forever", "main"]

log = logging.getLogger(__name__)

#: how long one wait for new data lasts before the stop event is looked at again (seconds)
STOP_CHECK = 0.5
#: the default wait between looks for new documents where writes do not wake a listener
POLL_SECONDS = 0.5


class _State:
    """Where the trainer stands: the counters of its newest save, and the round in progress."""

    def __init__(self) -> None:
        self.step = 0          # optimizer steps since the trainer's first start
        self.seen = 0          # examples trained on
        self.round = -1        # the round in progress (-1: none yet)
        self.position = 0      # examples of the round already trained on
        self.ids: list[str] = []  # the round's snapshot, sorted
        self.ids_ref: Any = None  # that snapshot as stored
        self.source: str | None = None  # the round's source spelled out (an item dataset's version)
        self.started_with = 0  # how many documents the query selected when the round began
        self.model_id: str | None = None  # the newest save

    @property
    def round_done(self) -> bool:
        return self.round < 0 or self.position >= len(self.ids)


def train_forever(project, model: Any, data: Any, *, inputs: str | Sequence[str], target: str | None = None,
                  name: str, filter: dict | None = None, loss: Any = "cross_entropy", metrics: Sequence[Any] = (),
                  optimizer: Any = "adam", lr: float = 1e-3, optimizer_options: dict | None = None,
                  batch_size: int = 64, save_every: int = 200, min_new: int = 1, keep_last: int | None = None,
                  key: str | None = None, seed: int = 0, config: dict | None = None,
                  arch: str | Sequence[str] | None = None, forward: Callable | None = None, device: str = "cpu",
                  poll: float | None = None, stop: threading.Event | None = None, max_steps: int | None = None,
                  max_rounds: int | None = None, trusted: bool = False) -> dict:
    """Train ``model`` on ``data`` round after round as documents arrive, saving every ``save_every`` steps, until
    ``stop`` is set (the current step finishes, then a save), ``max_steps`` steps or ``max_rounds`` rounds are done.

    ``project``: a warehouse (its default project) or a project. ``model``: a torch module, a stored model (record
    or id) or ``"module:Class"`` (built with ``config``, seeded by ``seed``; importing it needs ``trusted=True``,
    which ``mlw train`` passes: its user named the class). ``data``: a Collection,
    ``"collection:NAME"``, or ``"items:NAME"`` (each round reads the dataset's newest version). ``inputs``,
    ``target``, ``loss``, ``metrics``, ``optimizer``: as :meth:`Training.fit <mlwarehouse.training.registry.
    Training.fit>`. ``key`` (default ``"trainer:<name>"``) names the trainer whose saves it resumes from.
    Returns counts: ``steps`` and ``rounds`` done by this call, ``saved`` models, ``step`` (the global step).
    """
    project = project.project() if callable(getattr(project, "project", None)) else project
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not inputs:
        raise QueryError("a trainer needs at least one input key")
    for label, value, least in (("batch_size", batch_size, 1), ("save_every", save_every, 1),
                                ("min_new", min_new, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise QueryError(f"{label} must be an integer >= {least}, not {value!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise QueryError(f"keep_last must be None or an integer >= 1, not {keep_last!r}")
    key = key or f"trainer:{name}"
    keys = inputs + ([target] if target is not None else [])
    spelling = _spelling(data)
    source = source_of(project, data, filter, keys)  # a bad collection, dataset or key fails here, before training
    module = project.training.module(model, config=config, trusted=trusted, seed=seed)
    loss_fn = loss_of(loss, trusted=trusted)
    metric_fns = {metric_name(m): metric_of(m, trusted=trusted) for m in metrics}
    module.to(device)
    opt = optimizer_of(optimizer, module.parameters(), lr=lr, options=optimizer_options, trusted=trusted)
    loop = _Loop(project, module, opt, source, spelling, filter, keys, inputs=inputs, target=target, name=name,
                 key=key, loss=loss_fn, metrics=metric_fns, batch_size=batch_size, save_every=save_every,
                 min_new=min_new, keep_last=keep_last, seed=seed, config=config, arch=arch, forward=forward,
                 device=device, poll=POLL_SECONDS if poll is None else float(poll), stop=stop or threading.Event())
    return loop.run(max_steps, max_rounds)


def _spelling(data: Any) -> str | None:
    """What to read again at each round: ``"items:NAME"`` (its newest version); None where the source stays."""
    if isinstance(data, str) and data.startswith("items:") and "@" not in data:
        return data
    return None


class _Loop:
    def __init__(self, project, module, optimizer, source: Source, spelling: str | None, filter, keys, *, inputs,
                 target, name, key, loss, metrics, batch_size, save_every, min_new, keep_last, seed, config, arch,
                 forward, device, poll: float, stop: threading.Event):
        self.project, self.module, self.optimizer = project, module, optimizer
        self.source, self.spelling, self.filter, self.keys = source, spelling, filter, keys
        self.inputs, self.target, self.name, self.key = inputs, target, name, key
        self.loss, self.metrics = loss, metrics
        self.batch_size, self.save_every, self.min_new, self.keep_last = batch_size, save_every, min_new, keep_last
        self.seed, self.config, self.arch, self.device = seed, config, arch, device
        self.forward = forward or self._forward
        self.poll, self.stop = poll, stop
        self.state = _State()
        self.since: dict[str, float] = {}  # sums of loss and metrics since the last save
        self.since_count = 0
        self.since_steps = 0
        self.counts = {"steps": 0, "rounds": 0, "saved": 0, "step": 0}

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, max_steps: int | None, max_rounds: int | None) -> dict:
        run = self.run_doc = self.project.runs.start(f"train {self.name}", trainer=self.key, tags=["trainer"])
        try:
            self._resume()
            self.project.lineage.record(self.source.node, run, "input", trainer=self.key,
                                        filter=self.source.filter_text)
            log.info("trainer %r on %s from step %d", self.key, self.source.describe(), self.state.step)
            while not self._done(max_steps, max_rounds):
                if self.state.round_done and not self._next_round():
                    continue  # no new data yet: waited; look at the stop event again
                self._train_round(max_steps)
            if self.since_steps:
                self._save()
        except BaseException as exc:
            run.fail(exc)
            raise
        run.finish()
        self.counts["step"] = self.state.step
        log.info("trainer %r stopped: %s", self.key, self.counts)
        return self.counts

    def _done(self, max_steps: int | None, max_rounds: int | None) -> bool:
        if self.stop.is_set():
            return True
        if max_steps is not None and self.counts["steps"] >= max_steps:
            return True
        return max_rounds is not None and self.counts["rounds"] >= max_rounds and self.state.round_done

    def _next_round(self) -> bool:
        """Start a round if enough documents arrived (counted: the query selects ``min_new`` more than when the
        last round began, or any for the first); else wait for writes and say False."""
        if self.spelling is not None:  # an item dataset: its newest version
            self.source = source_of(self.project, self.spelling, self.filter, self.keys)
        state = self.state
        needed = max(self.min_new, 1) if state.round < 0 else self.min_new
        if _count(self.source) - (state.started_with if state.round >= 0 else 0) < needed:
            self._wait()
            return False
        ids = [i for i, _ in self.source.ids()]
        if not ids:
            self._wait()
            return False
        state.round += 1
        state.position = 0
        state.ids = ids
        state.ids_ref = pack_ids(self.project, ids)
        state.started_with = len(ids)
        state.source = spelling(self.source)
        self.counts["rounds"] += 1
        log.info("trainer %r: round %d over %d documents", self.key, state.round, len(ids))
        return True

    def _wait(self) -> None:
        """Up to ``poll`` seconds (STOP_CHECK where a write's NOTIFY wakes us), or until stopped."""
        if self.project.wakes_on_writes:
            _listen(self.project, self.source, min(self.poll, STOP_CHECK))
        else:
            self.stop.wait(self.poll)

    def _train_round(self, max_steps: int | None) -> None:
        state = self.state
        rng = np.random.default_rng([self.seed, state.round])
        order = [state.ids[i] for i in rng.permutation(len(state.ids))]
        self.module.train()
        try:
            for batch in self.source.batches(order[state.position:], self.batch_size):
                self._step(batch)
                if self.since_steps >= self.save_every:
                    self._save()
                if self.stop.is_set() or (max_steps is not None and self.counts["steps"] >= max_steps):
                    return  # the save that ends run() keeps the position within the round
        except NotFound as gone:  # documents of the round's snapshot were deleted meanwhile: a new round
            log.warning("trainer %r: %s; the round ends here", self.key, gone)
            state.position = len(state.ids)
        if self.since_steps:
            self._save()  # the round's end: what it learnt from the newest documents is published now

    def _step(self, batch: dict) -> None:
        """One optimizer step on one batch, its loss and metrics added to the sums since the last save."""
        import torch
        state = self.state
        try:
            out, y = self.forward(self.module, batch)
            loss = self.loss(out, y)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise TrainingError(f"trainer {self.key!r}, step {state.step}: the model or loss raised "
                                f"{type(exc).__name__}: {exc}") from exc
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        size = batch_length(batch)
        state.step += 1
        state.position += size
        state.seen += size
        self.counts["steps"] += 1
        self.since_steps += 1
        self.since_count += size
        self.since["loss"] = self.since.get("loss", 0.0) + float(loss.detach()) * size
        with torch.no_grad():
            detached = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
            for metric, fn in self.metrics.items():
                self.since[metric] = self.since.get(metric, 0.0) + fn(detached, y, size)

    def _forward(self, model, batch: dict) -> tuple[Any, Any]:
        xs = [collate(batch[key]) for key in self.inputs]
        dtype = next((p.dtype for p in model.parameters()), None)
        xs = [_to(x, self.device, dtype) for x in xs]
        y = collate(batch[self.target]) if self.target is not None else None
        if y is not None and hasattr(y, "to"):
            y = y.to(self.device)
        return model(*xs), y

    # -- saving and resuming ----------------------------------------------------------------------------
    def _save(self) -> None:
        """One insert: the model with the trainer's whole state (see the module notes)."""
        state = self.state
        metrics = {k: v / self.since_count for k, v in self.since.items()} if self.since_count else {}
        trainer = {"key": self.key, "round": state.round, "position": state.position, "seen": state.seen,
                   "documents": state.started_with, "source": state.source,
                   "round_ids": state.ids_ref["ids"] if state.ids_ref else None,
                   "optimizer": pack_optimizer(self.project, self.optimizer)}
        record = self.project.models.save(self.module, self.name, step=state.step, run=self.run_doc,
                                          config=self.config, arch=self.arch, trainer=trainer, train=metrics)
        self.run_doc.log("train", step=state.step, round=state.round, **metrics)
        state.model_id = record.id
        self.since, self.since_count, self.since_steps = {}, 0, 0
        self.counts["saved"] += 1
        log.info("trainer %r: step %d saved as %s %s", self.key, state.step, record.id, metrics)
        if self.keep_last is not None:
            self._prune()

    def _resume(self) -> None:
        saves = self.project.models.find(self.name, where={"trainer.key": self.key}, sort=[("step", -1)], limit=1)
        if not saves:
            return
        record = saves[0]
        doc = record.doc
        trainer = doc["trainer"]
        try:
            self.module.load_state_dict(record.load().state_dict())
            load_optimizer(self.project, self.optimizer, trainer["optimizer"])
        except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
            raise TrainingError(f"trainer {self.key!r}: its newest save {record.id} does not fit this model or "
                                f"optimizer ({exc})") from exc
        state = self.state
        state.step, state.seen, state.model_id = int(doc["step"]), int(trainer["seen"]), record.id
        state.round, state.position = int(trainer["round"]), int(trainer["position"])
        state.ids = unpack_ids(self.project, trainer.get("round_ids"))
        state.ids_ref = {"count": len(state.ids), "ids": trainer.get("round_ids")}
        state.started_with = int(trainer.get("documents", len(state.ids)))
        state.source = trainer.get("source")
        if not state.round_done and self.spelling is not None and state.source:
            self.source = source_of(self.project, state.source, self.filter, self.keys)  # the round's version
        log.info("trainer %r resumes at step %d (round %d, %d/%d)", self.key, state.step, state.round,
                 state.position, len(state.ids))

    def _prune(self) -> None:
        older = self.project.models.find(self.name, where={"trainer.key": self.key}, sort=[("step", -1)])
        for record in older[self.keep_last:]:
            try:
                self.project.models.delete(where={"_id": record.id})
            except DependencyError:  # the champion, or what evaluations or listeners depend on: kept
                continue


def _count(source: Source) -> int:
    """How many documents the source selects now (a collection counts them in the index)."""
    if isinstance(source, ItemSource):
        return len(source.ids())
    return source.collection.count_documents(source.selection())


def _listen(project, source: Source, timeout: float) -> None:
    if isinstance(source, ItemSource):
        project.listen(schema.ITEMS.name, timeout)
    else:
        source.collection.table.listen(timeout)


def _to(x: Any, device: str, dtype: Any) -> Any:
    if not hasattr(x, "to"):
        return x
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)
    return x.to(device)


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m mlwarehouse.loops.trainer",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="'module:Class' (built with --config) or a stored model's id")
    p.add_argument("--config", default=None, help="the class's keyword arguments, as JSON")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--collection", help="the collection to train on")
    data.add_argument("--items", help="an item dataset to train on (its newest version at each round)")
    p.add_argument("--filter", default="{}", help="a JSON filter over the documents")
    p.add_argument("--inputs", action="append", required=True, help="an input key (repeat it for several)")
    p.add_argument("--target", help="the target's key")
    p.add_argument("--name", required=True, help="the name the models are saved under")
    p.add_argument("--loss", default="cross_entropy")
    p.add_argument("--metric", action="append", default=[], help="a metric to log (repeatable)")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--save-every", type=int, default=200, help="steps between saves")
    p.add_argument("--min-new", type=int, default=1, help="new documents a new round waits for (0: never wait)")
    p.add_argument("--keep-last", type=int, help="keep only this many newest saves (the champion is always kept)")
    p.add_argument("--key", help="the trainer's name, whose saves it resumes from (default trainer:NAME)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poll", type=float, help="seconds between looks for new documents")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-rounds", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--project", help="the project (default: MLW_PROJECT, else default)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line entry: SIGTERM and SIGINT set the stop event, so the current step finishes and is saved.
    The model class named on the command line is imported: the user asked for it."""
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    import mlwarehouse
    wh = mlwarehouse.connect(project=args.project)
    data = f"collection:{args.collection}" if args.collection is not None else f"items:{args.items}"
    try:
        train_forever(wh, args.model, data, inputs=args.inputs, target=args.target, name=args.name,
                      filter=json.loads(args.filter), loss=args.loss, metrics=args.metric, optimizer=args.optimizer,
                      lr=args.lr, batch_size=args.batch_size, save_every=args.save_every, min_new=args.min_new,
                      keep_last=args.keep_last, key=args.key, seed=args.seed,
                      config=json.loads(args.config) if args.config else None, device=args.device, poll=args.poll,
                      stop=stop, max_steps=args.max_steps, max_rounds=args.max_rounds, trusted=True)
    finally:
        wh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
