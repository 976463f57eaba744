"""The layout of a run's metric summaries, defined once: ``summary.<kind>.<metric>.<stat>`` on the run document.

The log writer keeps them up to date (:func:`fold`), ``runs.best`` sorts on them (:func:`path`), the ``runs`` SQL
view exposes them (:data:`ROOT`, declared in :mod:`mlwarehouse.schema` so that the index layer can read it) and the
web pages show them (:func:`metrics`). Each ``<kind>.<metric>`` holds the stats below; a metric that has only
ever logged nulls holds just ``count`` (0) and ``nulls``.

    {"last": 0.31, "last_step": 99, "min": 0.30, "min_step": 97, "max": 2.3, "max_step": 0, "count": 100, "nulls": 0}
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from mlwarehouse import schema
from mlwarehouse.errors import QueryError

__all__ = ["ROOT", "LAST", "LAST_STEP", "MIN", "MIN_STEP", "MAX", "MAX_STEP", "COUNT", "NULLS", "STATS", "BEST",
           "path", "parse", "key", "split_key", "metrics", "of", "fold", "fold_column"]

#: the field of the run document that holds every summary (declared with the collections)
ROOT = schema.SUMMARY_FIELD
#: the stats of one metric: the last value, the smallest and the largest, each with its step; the number of
#: numeric points and of null (NaN, infinite or None) points
LAST, LAST_STEP, MIN, MIN_STEP, MAX, MAX_STEP, COUNT, NULLS = (
    "last", "last_step", "min", "min_step", "max", "max_step", "count", "nulls")
STATS = (LAST, LAST_STEP, MIN, MIN_STEP, MAX, MAX_STEP, COUNT, NULLS)
#: the stats that "best" may compare (``runs.best(..., mode=...)``)
BEST = (MAX, MIN)


def path(kind: str, metric: str | None = None, stat: str | None = None) -> str:
    """The dotted field path of a kind's summaries, one metric's, or one stat (``summary.valid.acc.max``)."""
    if stat is not None and stat not in STATS:
        raise QueryError(f"unknown summary stat {stat!r}: one of {', '.join(STATS)}")
    return ".".join(p for p in (ROOT, kind, metric, stat) if p is not None)


def parse(text: str) -> tuple[str, str, str]:
    """``"summary.<kind>.<metric>.<stat>"`` -> ``(kind, metric, stat)``; QueryError for anything else."""
    parts = text.split(".") if isinstance(text, str) else []
    if len(parts) != 4 or parts[0] != ROOT or not all(parts) or parts[3] not in STATS:
        raise QueryError(f"{text!r} is not a summary path: write '{ROOT}.<kind>.<metric>.<stat>' with a stat "
                         f"among {', '.join(STATS)}")
    return parts[1], parts[2], parts[3]


def key(kind: str, metric: str) -> str:
    """The short name of a metric of a kind, as the pages and the CLI show it: ``"valid.acc"``."""
    return f"{kind}.{metric}"


def split_key(text: str) -> tuple[str, str]:
    """``"valid.acc"`` -> ``("valid", "acc")`` (kinds never hold a dot; metric names may, in foreign documents)."""
    kind, dot, metric = text.partition(".")
    if not dot or not kind or not metric:
        raise QueryError(f"{text!r} is not a metric of a kind: write '<kind>.<metric>'")
    return kind, metric


def metrics(doc: dict) -> dict[str, dict]:
    """Every summary of a run document by :func:`key`, in stored order; foreign shapes are skipped."""
    out: dict[str, dict] = {}
    for kind, by_metric in _dict(doc.get(ROOT)).items():
        for metric, stats in _dict(by_metric).items():
            if isinstance(stats, dict):
                out[key(kind, metric)] = stats
    return out


def of(doc: dict, kind: str, metric: str) -> dict | None:
    """One metric's stats in a run document (None if it has none)."""
    stats = _dict(_dict(doc.get(ROOT)).get(kind)).get(metric)
    return stats if isinstance(stats, dict) else None


def fold(by_metric: dict[str, dict], point: dict, step: Any, skip: Collection[str], touched: set[str]) -> None:
    """Fold one log point into the summaries of its kind (in place), adding the metrics it changed to ``touched``.

    Numbers update last/min/max (with their steps) and ``count``; None counts in ``nulls``; other values
    (strings, booleans) and the fields in ``skip`` are not metrics. This runs once per logged point on the
    writer's thread, so it is written for speed (string literals are the names above).
    """
    for name, value in point.items():
        if name in skip:
            continue
        t = type(value)
        if t is not float and t is not int and value is not None:
            continue
        s = by_metric.get(name)
        touched.add(name)
        if value is None:
            if s is None:
                s = by_metric[name] = {"count": 0, "nulls": 0}
            s["nulls"] = s.get("nulls", 0) + 1
            continue
        if s is None or "min" not in s:
            first = {"last": value, "last_step": step, "min": value, "min_step": step, "max": value,
                     "max_step": step, "count": 1, "nulls": 0}
            if s is not None:
                first["count"] += s.get("count", 0)
                first["nulls"] = s.get("nulls", 0)
            by_metric[name] = first
            continue
        s["last"] = value
        s["last_step"] = step
        s["count"] += 1
        if value < s["min"]:
            s["min"] = value
            s["min_step"] = step
        if value > s["max"]:
            s["max"] = value
            s["max_step"] = step


_EXACT = float(2 ** 53)  # integers up to this size compare exactly as doubles
_NUMERIC = frozenset({float, int, type(None)})


def fold_column(by_metric: dict[str, dict], name: str, values: Sequence, steps: Sequence,
                touched: set[str]) -> None:
    """:func:`fold` of one metric over many points at once (``values[i]`` logged at ``steps[i]``), with numpy: the
    same stats as folding the points one by one, first minimum and maximum kept. A column holding other values
    (strings, booleans) or integers too large for a double is folded point by point."""
    if not values:
        return
    if not set(map(type, values)) <= _NUMERIC:
        for value, step in zip(values, steps):
            fold(by_metric, {name: value}, step, (), touched)
        return
    a = np.array(values, dtype=np.float64)  # None -> NaN (no NaN is logged: log() stores them as None)
    null = np.isnan(a)
    nulls = int(np.count_nonzero(null))
    count = len(values) - nulls
    if count and float(np.nanmax(np.abs(a))) > _EXACT:
        for value, step in zip(values, steps):
            fold(by_metric, {name: value}, step, (), touched)
        return
    touched.add(name)
    s = by_metric.get(name)
    if s is None:
        s = by_metric[name] = {"count": 0, "nulls": 0}
    s["nulls"] = s.get("nulls", 0) + nulls
    if not count:
        return
    lo, hi = int(np.nanargmin(a)), int(np.nanargmax(a))
    last = len(values) - 1 if not nulls else int(np.flatnonzero(~null)[-1])
    if "min" not in s:
        s.update({"min": values[lo], "min_step": steps[lo], "max": values[hi], "max_step": steps[hi]})
    else:
        if values[lo] < s["min"]:
            s["min"], s["min_step"] = values[lo], steps[lo]
        if values[hi] > s["max"]:
            s["max"], s["max_step"] = values[hi], steps[hi]
    s["last"], s["last_step"] = values[last], steps[last]
    s["count"] = s.get("count", 0) + count
    by_metric[name] = {k: s[k] for k in STATS if k in s}  # the stored order of fold()


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}
