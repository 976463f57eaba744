"""The evaluator: evaluate every new model (or checkpoint) matching a filter, record it, and apply the promotion gate.

``evaluate_forever(wh, models={"name": "mlp"}, data="test-set", metrics=["accuracy"], alias="champion")`` watches
the warehouse's ``models`` collection as a named consumer (:mod:`mlwarehouse.collections.watch`) and, for each
model event in order: evaluates it by every metric it has no evaluation of yet (torch, ``no_grad``, in batches)
within a run of its own (one run per evaluated model: each evaluation names the run that computed it, and a run
killed midway stays "running", the trace of the attempt), records the values (:mod:`mlwarehouse.models.evaluations`),
then tries ``promote`` on the gate (:mod:`mlwarehouse.models.aliases`; a refusal is logged, not an error) and
acknowledges the event last.

Why it may be killed at any moment: the watch redelivers every event not acknowledged; the evaluations are unique
per (model, data, fold, metric) and checked before computing, so a redelivered model computes only what is missing;
promotion is idempotent (a candidate that holds the alias already changes nothing). So a restart loses no event and
evaluates no model twice. One process per consumer name at a time.

Run it from a shell: ``python -m mlwarehouse.loops.evaluator --models '{"name": "mlp"}' --dataset test-set
--metric accuracy --alias champion`` (SIGTERM or Ctrl-C finish the current model, then exit 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from mlwarehouse.errors import NotFound, PromotionRefused, QueryError
from mlwarehouse.models.registry import final_filter
from mlwarehouse.training.objectives import metric_of
from mlwarehouse.training.sources import collate, source_of

__all__ = ["evaluate_forever", "main"]

log = logging.getLogger(__name__)

#: how often an idle loop looks at its stop event (seconds)
STOP_CHECK = 0.5
#: metrics where lower is better (the gate's default mode for them)
LOWER_IS_BETTER = frozenset({"mse", "mae"})


class _Data:
    """The evaluation data, resolved once: the key evaluations are recorded under, and (inputs, target) batches."""

    def __init__(self, project, data: Any, inputs: str | None, target: str | None):
        self.project = project
        if isinstance(data, dict) and "collection" in data:  # {"collection", "filter", "inputs", "target"}
            inputs, target = data.get("inputs", inputs), data.get("target", target)
            if not inputs or not target:
                raise QueryError("a collection to evaluate on needs its 'inputs' and 'target' keys")
            flt = dict(data.get("filter") or {})
            self.key = {"collection": data["collection"], "filter": flt}
            self.source = source_of(project, f"collection:{data['collection']}", flt, [inputs, target])
            self.ids = [i for i, _ in self.source.ids()]
            self.inputs, self.target, self.arrays = inputs, target, None
            return
        record = data if hasattr(data, "load") else project.datasets.get(data)
        self.key, self.source = record, None
        value = record.load()
        if isinstance(value, dict):
            if not inputs or not target:
                raise QueryError("a dataset stored as a dict needs inputs= and target= (its keys)")
            value = (value[inputs], value[target])
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise QueryError("a dataset to evaluate on is (inputs, target), or a dict with inputs=/target= keys")
        self.arrays = (collate(value[0]), collate(value[1]))

    def batches(self, size: int):
        if self.arrays is not None:
            x, y = self.arrays
            for start in range(0, len(y), size):
                yield x[start:start + size], y[start:start + size]
            return
        for batch in self.source.batches(self.ids, size):
            yield collate(batch[self.inputs]), collate(batch[self.target])


def _compute(model, data: _Data, metrics: Sequence[str], batch_size: int, device: str) -> dict[str, float]:
    """The mean of each metric over the data (metrics are sums per batch, :func:`metric_of`)."""
    import torch
    fns = {m: metric_of(m) for m in metrics}
    totals, count = dict.fromkeys(metrics, 0.0), 0
    model = model.to(device).eval()
    dtype = next((p.dtype for p in model.parameters()), None)
    with torch.no_grad():
        for x, y in data.batches(batch_size):
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
            x, y = x.to(device), y.to(device)
            out = model(x)
            size = len(y)
            for name, fn in fns.items():
                totals[name] += fn(out, y, size)
            count += size
    if not count:
        raise QueryError("the evaluation data is empty")
    return {name: total / count for name, total in totals.items()}


def evaluate_forever(project, *, models: dict | None = None, data: Any, metrics: Sequence[str] = ("accuracy",),
                     alias: str | None = "champion", gate: tuple | None = None, checkpoints: bool = False,
                     inputs: str | None = None, target: str | None = None, consumer: str = "evaluator",
                     start: str = "beginning", poll: float | None = None, stop: threading.Event | None = None,
                     max_models: int | None = None, batch_size: int = 1024, device: str = "cpu") -> dict:
    """Evaluate each new model matching ``models`` on ``data`` by ``metrics``, record it and promote it to
    ``alias`` through the gate, until ``stop`` is set (the current model finishes) or ``max_models`` are handled.

    ``project``: a warehouse (its default project) or a project. ``models``: a filter over models (default
    ``{"name": "mlp"}``), checkpoints included if ``checkpoints``. ``data``: a dataset record, id or name (pinned
    to its newest version at start), or ``{"collection": name, "filter": {...}, "inputs": key, "target": key}``.
    ``gate``: ``(metric, margin, mode)`` (default: the first metric, margin 0, "min" for mse/mae, else "max");
    ``alias=None`` promotes nothing. ``start``: where a consumer's first run begins ("beginning" or "now").
    Returns counts: ``evaluated``, ``skipped`` (every metric there already), ``failed``, ``promoted``, ``refused``.
    """
    project = project.project() if callable(getattr(project, "project", None)) else project
    metrics = list(metrics)
    if not metrics:
        raise QueryError("evaluate_forever needs at least one metric")
    for metric in metrics:
        metric_of(metric)
    metric0 = gate[0] if gate else metrics[0]
    margin = float(gate[1]) if gate and len(gate) > 1 else 0.0
    mode = gate[2] if gate and len(gate) > 2 else ("min" if metric0 in LOWER_IS_BETTER else "max")
    if alias is not None and metric0 not in metrics:
        raise QueryError(f"the gate's metric {metric0!r} is not among the metrics evaluated {metrics}")
    where = final_filter({"name": "mlp"} if models is None else models, checkpoints)
    stop = stop or threading.Event()
    source = _Data(project, data, inputs, target)
    evaluations = project.models.evaluations
    counts = dict.fromkeys(("evaluated", "skipped", "failed", "promoted", "refused"), 0)
    handled = 0
    watch = project.watch("models", where, consumer=consumer, start=start, poll=poll,
                          timeout=max(STOP_CHECK, poll or 0))
    log.info("evaluator %r watching models %s for %s on %s", consumer, where, metrics, source.key)
    while not stop.is_set() and (max_models is None or handled < max_models):
        for event in watch:  # ends after STOP_CHECK idle seconds, to look at the stop event
            _handle(project, event.id, source, metrics, evaluations, alias, (metric0, margin, mode), consumer,
                    batch_size, device, counts)
            event.ack()
            handled += 1
            if stop.is_set() or (max_models is not None and handled >= max_models):
                break
    log.info("evaluator %r stopped: %s", consumer, counts)
    return counts


def _handle(project, model_id: str, source: _Data, metrics: list[str], evaluations, alias, gate, consumer: str,
            batch_size: int, device: str, counts: dict) -> None:
    """Evaluate one model by the metrics it lacks, then try to promote it."""
    try:
        record = project.models.get(model_id)
    except NotFound:  # deleted since (a pruned checkpoint): nothing to evaluate
        log.info("model %s is gone; skipped", model_id)
        counts["skipped"] += 1
        return
    missing = [m for m in metrics if not evaluations.find(record, source.key, m, fold=None, limit=1)]
    if not missing:
        counts["skipped"] += 1
    else:
        try:
            values = _compute(record.load(), source, missing, batch_size, device)
        except Exception:  # the model's fault (not a module, wrong shapes...): logged, never retried
            log.exception("cannot evaluate model %s", model_id)
            counts["failed"] += 1
            return
        with project.runs.start(f"evaluate {record.doc.get('name')}", evaluated=model_id, by=consumer) as run:
            for metric, value in values.items():
                evaluations.record(record, source.key, metric, value, run=run)
        counts["evaluated"] += 1
        log.info("model %s: %s", model_id, values)
    if alias is None:
        return
    metric, margin, mode = gate
    try:
        change = project.models.aliases.promote(record.doc["name"], alias, record, evaluation=(source.key, metric),
                                                margin=margin, mode=mode, by=consumer)
        if change.doc.get("model") == record.id:
            counts["promoted"] += 1
            log.info("model %s is %s@%s", model_id, record.doc["name"], alias)
    except PromotionRefused as refusal:
        counts["refused"] += 1
        log.info("%s", refusal)


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m mlwarehouse.loops.evaluator",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", default='{"name": "mlp"}', help="a JSON filter over models")
    p.add_argument("--checkpoints", action="store_true", help="evaluate checkpoints too")
    p.add_argument("--dataset", help="a dataset name or id (its newest version)")
    p.add_argument("--collection", help="a collection to evaluate on (with --filter, --inputs, --target)")
    p.add_argument("--filter", default="{}", help="a JSON filter over the collection")
    p.add_argument("--inputs", help="the inputs' key (a collection, or a dataset stored as a dict)")
    p.add_argument("--target", help="the target's key")
    p.add_argument("--metric", action="append", help="a metric (repeat it for several; default accuracy)")
    p.add_argument("--alias", default="champion", help="the alias to promote to (default champion)")
    p.add_argument("--no-alias", action="store_true", help="record evaluations, promote nothing")
    p.add_argument("--gate-metric", help="the gate's metric (default: the first)")
    p.add_argument("--margin", type=float, default=0.0, help="the gain over the holder a promotion needs")
    p.add_argument("--mode", choices=("max", "min"), help="higher or lower is better (default by the metric)")
    p.add_argument("--consumer", default="evaluator", help="the watch's consumer name (one process per name)")
    p.add_argument("--start", choices=("beginning", "now"), default="beginning")
    p.add_argument("--poll", type=float, help="seconds between reads (default: the watch's)")
    p.add_argument("--project", help="the project (default: MLW_PROJECT, else default)")
    p.add_argument("--max-models", type=int, help="stop after this many models")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line entry: SIGTERM and SIGINT set the stop event, so the current model finishes."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if (args.dataset is None) == (args.collection is None):
        parser.error("give one of --dataset and --collection")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    data: Any = args.dataset
    if args.collection is not None:
        data = {"collection": args.collection, "filter": json.loads(args.filter), "inputs": args.inputs,
                "target": args.target}
    metrics = args.metric or ["accuracy"]
    metric = args.gate_metric or metrics[0]
    gate = (metric, args.margin, args.mode or ("min" if metric in LOWER_IS_BETTER else "max"))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    import mlwarehouse
    wh = mlwarehouse.connect(project=args.project)
    try:
        evaluate_forever(wh, models=json.loads(args.models), data=data, metrics=metrics,
                         alias=None if args.no_alias else args.alias, gate=gate, checkpoints=args.checkpoints,
                         inputs=args.inputs, target=args.target, consumer=args.consumer, start=args.start,
                         poll=args.poll, stop=stop, max_models=args.max_models, batch_size=args.batch_size,
                         device=args.device)
    finally:
        wh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
