"""What the run page and the run comparison draw: every metric of a set of runs on a chosen x axis, run labels made
of the hyper-parameters that tell the runs apart, and a side-by-side diff of their parameters and summaries.

One request carries every metric of every selected run (``/api/p/<project>/runs/points``), each curve downsampled
on the server (min and max per bucket, :mod:`mlwarehouse.web.downsample`), so a small-multiples page costs one
round trip whatever its number of charts. Two caches, both checked against the run's summary of the metric (its
point count and last step change with every batch the log writer writes): the downsampled curves, which answer
repeated requests (a page refreshing a finished run's charts, several pages open) without touching the index, and
the full histories (:class:`Histories`), from which a running run's next request reads only the points logged
after the stored last step. Smoothing (an EMA) and the log scale are the browser's: they change no request.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.query import split_path
from mlwarehouse.runs import blocks, summary
from mlwarehouse.web.data import RUNS, HistoryCache, flatten, fmt
from mlwarehouse.web.downsample import minmax_downsample

__all__ = ["X_AXES", "MAX_RUNS", "MAX_METRICS", "order_metrics", "run_labels", "compare", "points", "Histories"]

#: the x axes a chart may use: the log step, the epoch (spread evenly over the points of each epoch), or the
#: wall time in seconds since the run started
X_AXES = ("step", "epoch", "time")
MAX_RUNS = 200
MAX_METRICS = 100
#: order of the usual kinds on a page; other kinds come after them, by name
KIND_ORDER = {"train": 0, "valid": 1, "val": 1, "validation": 1, "eval": 2, "test": 3}
RUN_FIELDS = {"name": 1, "status": 1, "started": 1, "ended": 1, "hyper_parameters": 1, summary.ROOT: 1}


def order_metrics(keys) -> list[str]:
    """Metric keys (``"valid.loss"``) as a page lists them: losses first, each metric's kinds side by side
    (train, valid, test, then others), then by name."""
    def rank(key: str) -> tuple:
        kind, _, metric = key.partition(".")
        return ("loss" not in metric.lower(), metric.lower(), KIND_ORDER.get(kind, 9), kind)
    return sorted(dict.fromkeys(keys), key=rank)


def run_labels(docs: list[dict]) -> dict[str, str]:
    """A short label for each run: the hyper-parameters that differ between ``docs`` (``n_hidden=128 lr=0.01``),
    preceded by the name where names differ too; runs that still look alike get the end of their id."""
    params = [_params(d) for d in docs]
    differing = _differing(params)
    names = {d.get("name") for d in docs}
    labels = {}
    for doc, hp in zip(docs, params):
        parts = [str(doc.get("name"))] if len(names) > 1 or not differing else []
        parts += [f"{k}={_text(hp.get(k))}" for k in differing]
        labels[doc["_id"]] = " ".join(parts)
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    return {i: f"{label} ·{i[-6:]}" if seen[label] > 1 else label for i, label in labels.items()}


def compare(project, ids: list[str]) -> dict:
    """The diff of ``ids`` (in that order): each run with its label, every hyper-parameter and every metric's
    summary side by side, each row marked ``differs`` when the runs do not all agree."""
    docs = _runs(project, ids)
    labels = run_labels(docs)
    params = [_params(d) for d in docs]
    keys = list(dict.fromkeys(k for hp in params for k in hp))
    param_rows = [{"key": k, "values": [_text(hp.get(k)) if k in hp else None for hp in params],
                   "differs": k in _differing(params, [k])} for k in keys]
    stats = [summary.metrics(d) for d in docs]
    metric_rows = []
    for key in order_metrics(k for s in stats for k in s):
        cells = [{stat: s[key].get(stat) for stat in (summary.LAST, summary.MIN, summary.MAX, summary.COUNT)}
                 if key in s else None for s in stats]
        lasts = [fmt(c[summary.LAST]) if c else None for c in cells]
        metric_rows.append({"key": key, "stats": cells, "differs": len(set(lasts)) > 1})
    return {"runs": [_run_info(d, labels) for d in docs], "params": param_rows, "metrics": metric_rows}


def points(project, ids: list[str], metrics: list[str] | None, x: str = "step", points: int = 1000, *,
           histories: "Histories | None" = None, curves: HistoryCache | None = None) -> dict:
    """Every metric in ``metrics`` (default: all that the runs logged, :func:`order_metrics` order) of the runs
    ``ids``, on the ``x`` axis, each curve downsampled to at most ``points`` points.

    A metric is ``single`` when no run has more than one point of it (a page shows it as a number). Points
    without the chosen x (no epoch logged, an unreadable time) are left out and counted in ``missing_x``."""
    if x not in X_AXES:
        raise QueryError(f"x must be one of {', '.join(X_AXES)}, not {x!r}")
    if not 4 <= points <= 1_000_000:
        raise QueryError(f"points must be between 4 and 1000000, not {points}")
    docs = _runs(project, ids)
    by_run = [summary.metrics(d) for d in docs]
    if metrics is None:
        keys = order_metrics(k for s in by_run for k in s)[:MAX_METRICS]
    else:
        keys = list(dict.fromkeys(metrics))
        if len(keys) > MAX_METRICS:
            raise QueryError(f"at most {MAX_METRICS} metrics can be charted at once, not {len(keys)}")
    out = []
    for key in keys:
        kind, metric = summary.split_key(key)
        split_path(kind, "kind")
        split_path(metric, "metric")
        series = []
        for doc, stats in zip(docs, by_run):
            s = stats.get(key)
            if metrics is None and s is None:
                continue
            version = (s.get(summary.COUNT), s.get(summary.LAST_STEP), s.get(summary.NULLS)) if s else None
            xs, ys, count, missing = _curve(project, doc, kind, metric, x, points, version, histories, curves)
            series.append({"id": doc["_id"], "count": count, "missing_x": missing, "x": xs, "y": ys,
                           "last": s.get(summary.LAST) if s else None})
        out.append({"key": key, "kind": kind, "metric": metric, "series": series,
                    "single": all(c["count"] <= 1 for c in series)})
    labels = run_labels(docs)
    return {"x": x, "points": points, "runs": [_run_info(d, labels) for d in docs], "metrics": out}


class Histories:
    """Full histories read for charts, each with the summary version it was read at and its last step, so that a
    live run's next request reads only its new points. Bounded by the bytes of its arrays, least recently used
    entries go first."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple | None:
        """``(version, x, y, last step)``, whatever its version, or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple, version: tuple, x: np.ndarray, y: np.ndarray, last: float) -> None:
        size = x.nbytes + y.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes + old[2].nbytes
            if size > self.max_bytes:
                return
            self._entries[key] = (version, x, y, last)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, ox, oy, _) = self._entries.popitem(last=False)
                self._bytes -= ox.nbytes + oy.nbytes


# -- reading and shaping curves ---------------------------------------------------------------------------------
def _curve(project, doc: dict, kind: str, metric: str, x: str, points: int, version, histories, curves):
    """One run's curve of one metric, downsampled: (x list, y list, points stored, points without an x)."""
    key = (project.name, doc["_id"], kind, metric, x)
    if curves is not None and version is not None:
        found = curves.get((*key, points), version)
        if found is not None:
            return _lists(found[0], x), _lists(found[1][:-2], "y"), int(found[1][-2]), int(found[1][-1])
    xs, ys = _full(project, doc, kind, metric, x, key, version, histories)
    total, missing = int(xs.size), int(np.isnan(xs).sum())
    keep = ~np.isnan(xs)
    dx, dy = minmax_downsample(xs[keep], ys[keep], points)
    if curves is not None and version is not None:
        # the counts ride along as two trailing elements of y, so one cache entry holds the whole answer
        curves.put((*key, points), version, dx, np.concatenate([dy, [total, missing]]))
    return _lists(dx, x), _lists(dy, "y"), total, missing


def _full(project, doc: dict, kind: str, metric: str, x: str, key: tuple, version, histories):
    """The whole history: from the store if its version is current; else, for a run that only appended points
    since (the usual live run: more points, a later last step, the same count once joined), the stored part
    plus the points after its last step; else read again."""
    entry = histories.get(key) if histories is not None and version is not None else None
    if entry is not None and entry[0] == version:
        return entry[1], entry[2]
    full = None
    if entry is not None and x != "epoch" and entry[0][0] is not None and version[0] is not None \
            and version[0] > entry[0][0]:
        old_x, old_y, last = entry[1], entry[2], entry[3]
        new_x, new_y, new_last = _history(project, doc, kind, metric, x, after=last)
        if old_y.size + new_y.size == version[0]:  # nothing was logged at or before the stored last step
            full = np.concatenate([old_x, new_x]), np.concatenate([old_y, new_y]), max(last, new_last)
            if x == "time" and full[0].size and not np.all(full[0][:-1] <= full[0][1:]):
                order = np.argsort(full[0], kind="stable")
                full = full[0][order], full[1][order], full[2]
    if full is None:
        full = _history(project, doc, kind, metric, x)
    if histories is not None and version is not None:
        histories.put(key, version, *full)
    return full[0], full[1]


def _lists(values: np.ndarray, what: str) -> list:
    """JSON numbers: steps as integers, the rest rounded to 7 significant digits (what a chart can show; the
    shortest repr of such a double is short), which makes the payload about half the size of full reprs."""
    if what == "step":
        return values.astype(np.int64).tolist()
    with np.errstate(divide="ignore", invalid="ignore"):
        digits = 6 - np.floor(np.log10(np.abs(values)))
        scale = np.power(10.0, np.where(np.isfinite(digits), np.clip(digits, -300, 300), 0))
        rounded = np.round(values * scale) / scale
    return np.where(np.isfinite(rounded), rounded, values).tolist()


def _history(project, doc: dict, kind: str, metric: str, x: str, after: float | None = None):
    """A metric's finite points (after step ``after``, if given) in x order: (x, y, the last step read), x NaN
    where the point has no such x."""
    names = ["step", metric] if x == "step" else ["step", x, metric]
    since = int(after) if after is not None and math.isfinite(after) else None
    columns = blocks.read_columns(project, doc["_id"], kind, names, after=since)
    n = len(columns[0])
    y = np.fromiter((_number(v) for v in columns[-1]), np.float64, n)
    steps = np.fromiter((_number(v) for v in columns[0]), np.float64, n)
    last = float(np.nanmax(steps)) if np.isfinite(steps).any() else (after if after is not None else -math.inf)
    if x == "step":
        xs = steps
    elif x == "epoch":
        xs = _spread_epochs(np.fromiter((_number(v) for v in columns[1]), np.float64, n))
    else:
        xs = _seconds(columns[1])
        xs -= _start(doc.get("started"), xs)
    keep = np.isfinite(y) & ~np.isinf(xs)  # NaN x stays: counted as missing
    xs, y = xs[keep], y[keep]
    if x != "step":
        order = np.argsort(xs, kind="stable")
        xs, y = xs[order], y[order]  # NaN x (no epoch, no time) sort last and are counted there
    return xs, y, last


def _spread_epochs(epochs: np.ndarray) -> np.ndarray:
    """Epoch numbers -> an x axis: the k-th of an epoch's n points (in step order) at ``epoch + k / n``, so that
    one point per epoch sits on the epoch itself and many points per epoch spread across it."""
    out = np.full(epochs.shape, np.nan)
    have = np.flatnonzero(np.isfinite(epochs))
    if not have.size:
        return out
    e = epochs[have]
    _, inverse, counts = np.unique(e, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # grouped by epoch, step order inside each group
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rank = np.empty(e.size, np.int64)
    rank[order] = np.arange(e.size) - starts[inverse[order]]
    out[have] = e + rank / counts[inverse]
    return out


def _seconds(values: list) -> np.ndarray:
    """UTC time stamps (``2024-05-01T10:00:00.123456Z``; also numbers of seconds) as epoch seconds, NaN where
    unreadable."""
    out = np.full(len(values), np.nan)
    text = [i for i, v in enumerate(values) if isinstance(v, str)]
    if text:
        stamps = [values[i][:-1] if values[i].endswith("Z") else values[i] for i in text]
        try:
            parsed = np.array(stamps, dtype="datetime64[us]")
        except ValueError:
            parsed = np.array([_stamp(s) for s in stamps], dtype="datetime64[us]")
        good = ~np.isnat(parsed)
        out[np.array(text)[good]] = parsed[good].astype(np.int64) / 1e6
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def _stamp(text: str):
    try:
        return np.datetime64(text, "us")
    except ValueError:
        return np.datetime64("NaT")


def _start(started: Any, xs: np.ndarray) -> float:
    """Time zero of a run's wall-time axis: its start, else its first point."""
    t0 = _seconds([started])[0]
    if not math.isfinite(t0):
        finite = xs[np.isfinite(xs)]
        t0 = float(finite.min()) if finite.size else 0.0
    return t0


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


# -- runs and their parameters ----------------------------------------------------------------------------------
def _runs(project, ids: list[str]) -> list[dict]:
    if not ids:
        raise QueryError("select at least one run (ids=...)")
    ids = list(dict.fromkeys(ids))
    if len(ids) > MAX_RUNS:
        raise QueryError(f"at most {MAX_RUNS} runs can be compared at once, not {len(ids)}")
    found = {d["_id"]: d for d in project.find(RUNS, {"_id": {"$in": ids}}, projection=RUN_FIELDS)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise NotFound(f"no run {missing[0]!r} in project {project.name!r}")
    return [found[i] for i in ids]


def _run_info(doc: dict, labels: dict) -> dict:
    return {"id": doc["_id"], "name": doc.get("name"), "status": doc.get("status"), "label": labels[doc["_id"]],
            "started": doc.get("started"), "ended": doc.get("ended")}


def _params(doc: dict) -> dict:
    hp = doc.get("hyper_parameters")
    return flatten(hp) if isinstance(hp, dict) else {}


def _differing(params: list[dict], keys=None) -> list[str]:
    """The keys (in first-seen order) whose values are not the same in every run (missing counts as a value)."""
    keys = keys if keys is not None else dict.fromkeys(k for hp in params for k in hp)
    return [k for k in keys if len({_text(hp[k]) if k in hp else "\0missing" for hp in params}) > 1]


def _text(value: Any) -> str:
    """A parameter value as a label shows it: numbers with 4 significant digits, lists and dicts as JSON-ish."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    return fmt(value)
