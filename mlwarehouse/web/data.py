"""What the pages show, read through the Project API only: projections and limits, never whole collections.

Each function returns plain dicts and lists ready for a template or a JSON response. Filters and sorts typed by
the user arrive as text and are parsed by the parser every front end shares (:mod:`mlwarehouse.query.text`), so
malformed JSON and invalid filters both surface as :class:`~mlwarehouse.errors.QueryError` with a message that
names the problem, the same in the browser as in the shell.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from markupsafe import Markup, escape

from mlwarehouse import schema
from mlwarehouse.errors import NotFound, QueryError, WarehouseError
from mlwarehouse.models.registry import final_filter
from mlwarehouse.query import split_path
from mlwarehouse.query.text import parse_filter_text, parse_sort_text
from mlwarehouse.runs import blocks, summary
from mlwarehouse.web.downsample import minmax_downsample

__all__ = ["parse_filter_text", "parse_sort", "runs_table", "metric_series", "leaderboard", "tasks_board",
           "datasets_list", "project_exists", "metric_sort", "rank_metric", "HistoryCache", "TASK_STATUSES",
           "RUN_STATS", "text_filter", "TEXT_FIELDS", "parse_columns", "COLUMN_PAGES"]

RUNS, MODELS, TASKS, DATASETS, CATALOG = (c.name for c in (schema.RUNS, schema.MODELS, schema.TASKS, schema.DATASETS,
                                                           schema.CATALOG))
RUN_FIELDS = {"name": 1, "status": 1, "started": 1, "ended": 1, "hyper_parameters": 1, summary.ROOT: 1, "task": 1,
              "tags": 1}
#: the summary stats a run's page shows, with their column titles
RUN_STATS = ((summary.LAST, "last"), (summary.MIN, "min"), (summary.MAX, "max"), (summary.COUNT, "points"))
MODEL_HIDDEN = ("weights", "architecture", "value", "_blobs", "project")
MODEL_FIXED = ("name", "kind", "epoch", "step", "run", "dataset", "tags", "description", "checkpoint", "time", "_id")
TASK_FIELDS = {"task_name": 1, "status": 1, "attempts": 1, "max_attempts": 1, "hyper_parameters": 1, "result": 1,
               "error": 1, "output": 1, "worker": 1, "started": 1, "ended": 1, "created": 1, "priority": 1}
TASK_STATUSES = ("pending", "running", "finished", "failed", "cancelled")
TAIL = 2000
MAX_COLUMNS = 24
#: the list pages whose param/metric columns can be chosen (``columns=lr,valid.acc``), and the bounds of a choice
COLUMN_PAGES = ("runs", "models")
MAX_CHOSEN, MAX_COLUMN_NAME = 100, 100


def parse_columns(text: str | list | None) -> list[str] | None:
    """``"lr,valid.acc"`` (or a list of names) -> the chosen column names in order, repeats dropped; None for no
    choice (the page's default columns). A malformed choice is a QueryError; names that are no column of the page
    are left to the page (shown as ignored), since a saved view must still open when the rows change."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else text
    if not all(isinstance(n, str) for n in parts):
        raise QueryError("columns are column names, as the table heads name them")
    names = list(dict.fromkeys(n.strip() for n in parts if n.strip()))
    if len(names) > MAX_CHOSEN:
        raise QueryError(f"choose at most {MAX_CHOSEN} columns, not {len(names)}")
    bad = next((n for n in names if len(n) > MAX_COLUMN_NAME or not n.isprintable() or "," in n), None)
    if bad is not None:
        raise QueryError(f"a column name is 1 to {MAX_COLUMN_NAME} printable characters without a comma, "
                         f"not {bad[:MAX_COLUMN_NAME]!r}")
    return names or None


def choose_columns(available: list[str], chosen: list[str] | None) -> tuple[list[str], list[str]]:
    """The columns shown (the first :data:`MAX_COLUMNS` of ``available`` unless ``chosen``, else the chosen ones
    in their order) and the chosen names that are not available."""
    if chosen is None:
        return available[:MAX_COLUMNS], []
    known = set(available)
    return [n for n in chosen if n in known], [n for n in chosen if n not in known]


def parse_sort(text: str | None) -> list[tuple[str, int]] | None:
    """``"field:-1"`` or ``"field"`` (ascending) -> a sort list; several may be joined with commas."""
    return parse_sort_text(text, "sort")


def project_exists(project) -> bool:
    """True if the project holds any run, model, task, dataset or collection (used only to tell an empty page
    from a 404)."""
    return any(project.find_one(c, projection={"_id": 1}) for c in (RUNS, MODELS, TASKS, DATASETS, CATALOG))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value} if prefix else {}


log = logging.getLogger(__name__)


def _indexed(registry, flt: dict | None, sort) -> None:
    """Make the index that serves a page's query (as the registries' own finds do, within their bound), so a
    sort by a summary or a metric column is an index read; a page never fails for want of it."""
    try:
        registry.ensure_index(flt, sort)
    except WarehouseError as exc:  # a bad filter is reported by the query itself
        log.debug("no index for %s sorted by %s: %s", flt, sort, exc)


def runs_table(project, flt: dict | None, sort, limit: int, skip: int = 0, columns: list[str] | None = None) -> dict:
    """Runs with their hyper-parameters (flattened) and the last value of each metric (min/max kept for titles).

    ``heads`` are the param/metric columns shown, as ``(kind, name)``: the first 24 params then the first 24
    metrics by name, or the ``columns`` chosen (:func:`parse_columns`) in their order, a name being a param's
    before a metric's; ``ignored`` the chosen names no run shown has."""
    _indexed(project.runs, flt, sort or [("started", -1)])
    docs = project.find(RUNS, flt, sort=sort or [("started", -1)], limit=limit, skip=skip, projection=RUN_FIELDS)
    params: dict[str, None] = {}
    metrics: dict[str, None] = {}
    rows = []
    for doc in docs:
        hp = flatten(doc.get("hyper_parameters") if isinstance(doc.get("hyper_parameters"), dict) else {})
        stats = summary.metrics(doc)
        params.update(dict.fromkeys(hp))
        metrics.update(dict.fromkeys(stats))
        rows.append({"id": doc["_id"], "name": doc.get("name"), "status": doc.get("status"),
                     "started": doc.get("started"), "ended": doc.get("ended"), "task": doc.get("task"),
                     "params": hp, "summary": stats})
    if columns is None:
        heads = [("param", h) for h in sorted(params)[:MAX_COLUMNS]] + \
            [("metric", m) for m in sorted(metrics)[:MAX_COLUMNS]]
        ignored = []
    else:
        shown, ignored = choose_columns([*params, *metrics], columns)
        heads = [("param" if n in params else "metric", n) for n in shown]
    for row in rows:  # written here, once: a thousand rows of Jinja expressions took as long as reading them
        hp, stats = row["params"], row["summary"]
        row["cells"] = Markup("".join(
            f'<td class="num">{_html(fmt(hp.get(h)))}</td>' if kind == "param" else
            f'<td class="num" title="{_html(_stats_title(stats[h]))}">{_html(fmt(stats[h].get(summary.LAST)))}</td>'
            if h in stats else '<td class="num"></td>' for kind, h in heads))
    return {"rows": rows, "heads": heads, "params": [h for k, h in heads if k == "param"],
            "metrics": [h for k, h in heads if k == "metric"], "ignored": ignored,
            "available": sorted(params) + sorted(metrics), "total": project.count(RUNS, flt)}


def metric_sort(key: str) -> str:
    """The field that sorts runs by a metric column (``"valid.acc"``): its last value."""
    return summary.path(*summary.split_key(key), summary.LAST)


def fmt(value: Any) -> str:
    """Numbers for tables: integers as they are, floats with 4 significant digits, None as nothing."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_MARKUP = re.compile(r"[<>&\"']")


def _html(text: str) -> str:
    """``text`` escaped for HTML text and attributes (most cells are numbers, which need no escaping)."""
    return escape(text) if _MARKUP.search(text) else text


def _stats_title(stats: dict) -> str:
    return (f"min {fmt(stats.get(summary.MIN))} (step {stats.get(summary.MIN_STEP)}), "
            f"max {fmt(stats.get(summary.MAX))} (step {stats.get(summary.MAX_STEP)}), "
            f"{stats.get(summary.COUNT)} points")


class HistoryCache:
    """Full metric histories recently charted, so that switching metrics or runs does not re-read them.

    An entry is valid while the run's summary of that metric has the same point count and last step (the log
    writer updates both with every batch), so a run that is still logging is re-read when it has new points.
    Bounded by the bytes of the arrays it holds; least recently used entries go first.
    """

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[tuple, np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, version: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != version:
                return None
            self._entries.move_to_end(key)
            return entry[1], entry[2]

    def put(self, key: tuple, version: tuple, steps: np.ndarray, values: np.ndarray) -> None:
        size = steps.nbytes + values.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes + old[2].nbytes
            self._entries[key] = (version, steps, values)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, s, v) = self._entries.popitem(last=False)
                self._bytes -= s.nbytes + v.nbytes


def metric_series(project, ids: list[str], kind: str, metric: str, points: int = 1000,
                  cache: HistoryCache | None = None) -> dict:
    """One metric of several runs, each downsampled to at most ``points`` (min and max per bucket)."""
    if not ids:
        raise QueryError("select at least one run (ids=...)")
    if len(ids) > 50:
        raise QueryError(f"at most 50 runs can be compared at once, not {len(ids)}")
    if not 4 <= points <= 1_000_000:
        raise QueryError(f"points must be between 4 and 1000000, not {points}")
    split_path(kind, "kind")
    split_path(metric, "metric")
    runs = {d["_id"]: d for d in project.find(RUNS, {"_id": {"$in": ids}},
                                              projection={"name": 1, summary.path(kind, metric): 1})}
    missing = [i for i in ids if i not in runs]
    if missing:
        raise NotFound(f"no run {missing[0]!r} in project {project.name!r}")
    series = []
    for run_id in ids:
        stats = summary.of(runs[run_id], kind, metric)
        version = (stats.get(summary.COUNT), stats.get(summary.LAST_STEP)) if stats is not None else None
        key = (project.name, run_id, kind, metric)
        found = cache.get(key, version) if cache is not None and version else None
        if found is None:
            found = _history(project, run_id, kind, metric)
            if cache is not None and version:
                cache.put(key, version, *found)
        steps, values = found
        x, y = minmax_downsample(steps, values, points)
        series.append({"id": run_id, "name": runs[run_id].get("name"), "count": len(steps), "steps": x.tolist(),
                       "values": y.tolist()})
    return {"kind": kind, "metric": metric, "points": points, "series": series}


def _history(project, run_id: str, kind: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values (finite numbers only) of one metric of one run, in step order."""
    col_steps, col_values = blocks.read_columns(project, run_id, kind, ["step", metric])
    steps = np.fromiter((s if type(s) is int else -1 for s in col_steps), np.float64, len(col_steps))
    values = np.fromiter((_number(v) for v in col_values), np.float64, len(col_values))
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


#: prefixes of the fields a leaderboard ranks by when no sort is asked for, in order of preference
RANK_PREFIXES = ("test_", "valid_", "val_", "eval_")
#: words that mark a metric where lower is better (ranked ascending)
LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "rmse", "perplexity")
_SCORES = ("accuracy", "acc", "f1", "auc", "score", "precision", "recall")


def rank_metric(metrics: list[str]) -> tuple[str, int] | None:
    """The metric a leaderboard ranks by when none is chosen: the first ``test_*`` field (then ``valid_*``,
    ``val_*``, ``eval_*``, then any accuracy/score-like field), descending unless its name says lower is better."""
    def direction(name: str) -> int:
        return 1 if any(word in name.lower() for word in LOWER_IS_BETTER) else -1
    for prefix in RANK_PREFIXES:
        for name in metrics:
            if name.startswith(prefix):
                return name, direction(name)
    for name in metrics:
        if any(word in name.lower() for word in _SCORES):
            return name, direction(name)
    return None


def leaderboard(project, flt: dict | None, sort, limit: int, skip: int = 0, *, checkpoints: bool = False,
                columns: list[str] | None = None) -> dict:
    """Final models (checkpoints too if ``checkpoints``) with every numeric field as a sortable column (metrics
    and numeric hyper-parameters alike), ranked by ``sort`` or else by :func:`rank_metric` (newest first when
    no field looks like a metric). ``ranked`` is the sort applied, as ``field:-1`` text. The columns shown are
    the first 24 by name, or the ``columns`` chosen in their order (``ignored``: those no model shown has)."""
    shown = final_filter(flt, checkpoints)
    hidden = {f: 0 for f in MODEL_HIDDEN}
    ranked = None
    if sort:
        ties = [] if any(key == "time" for key, _ in sort) else [("time", -1)]
        _indexed(project.models, shown, [*sort, *ties])
        docs = project.find(MODELS, shown, sort=[*sort, *ties], limit=limit, skip=skip, projection=hidden)
        if len(sort) == 1:
            ranked = f"{sort[0][0]}:{sort[0][1]}"
    else:
        docs = project.find(MODELS, shown, sort=[("time", -1)], limit=limit, skip=skip, projection=hidden)
        top = rank_metric(_metric_columns(docs))
        if top is not None:
            ranked = f"{top[0]}:{top[1]}"
            _indexed(project.models, shown, [top, ("time", -1)])
            docs = project.find(MODELS, shown, sort=[top, ("time", -1)], limit=limit, skip=skip, projection=hidden)
    hidden_checkpoints = 0 if checkpoints or "checkpoint" in (flt or {}) else \
        project.count(MODELS, {"$and": [dict(flt or {}), {"checkpoint": True}]})
    available = _metric_columns(docs)
    shown_columns, ignored = choose_columns(available, columns)
    return {"rows": docs, "metrics": shown_columns, "ignored": ignored, "available": available,
            "total": project.count(MODELS, shown),
            "ranked": ranked, "checkpoints": checkpoints, "hidden_checkpoints": hidden_checkpoints}


def _metric_columns(docs: list[dict]) -> list[str]:
    columns: dict[str, None] = {}
    for doc in docs:
        for key, value in doc.items():
            if key not in MODEL_FIXED and isinstance(value, (int, float)) and not isinstance(value, bool):
                columns[key] = None
    return sorted(columns)


def tasks_board(project, flt: dict | None, sort, limit: int) -> dict:
    """Tasks (newest first) with the tails of their output and error, and the count of each status."""
    docs = project.find(TASKS, flt, sort=sort or [("_id", -1)], limit=limit, projection=TASK_FIELDS)
    rows = []
    for doc in docs:
        output = doc.get("output") or ""
        error = doc.get("error") or ""
        rows.append({"id": doc["_id"], "task_name": doc.get("task_name"), "status": doc.get("status"),
                     "attempts": doc.get("attempts"), "max_attempts": doc.get("max_attempts"),
                     "hyper_parameters": doc.get("hyper_parameters") or {}, "result": doc.get("result"),
                     "worker": doc.get("worker"), "started": doc.get("started"), "ended": doc.get("ended"),
                     "error_tail": str(error)[-TAIL:], "output_tail": str(output)[-TAIL:]})
    base = [flt] if flt else []
    counts = {s: project.count(TASKS, {"$and": [*base, {"status": s}]} if base else {"status": s})
              for s in TASK_STATUSES}
    return {"rows": rows, "counts": counts}


def datasets_list(project, flt: dict | None, limit: int) -> list[dict]:
    """Dataset versions, newest first, with the number of arrays each value holds (no blob is read)."""
    from mlwarehouse.web.arrays import leaves
    docs = project.find(DATASETS, flt, sort=[("name", 1), ("time", -1)], limit=limit,
                        projection={"_blobs": 0})
    return [{"id": d["_id"], "name": d.get("name"), "version": d.get("version"), "time": d.get("time"),
             "description": d.get("description"), "tags": d["tags"] if isinstance(d.get("tags"), list) else [],
             "arrays": len(leaves(d.get("value")))} for d in docs]



#: the fields a page's text search looks in, per page (a run started by a task is named after the task, and its
#: ``task`` is the task's id, so both find it)
TEXT_FIELDS = {"runs": ("name", "tags", "description", "task"), "models": ("name", "tags", "description"),
               "tasks": ("task_name", "tags", "description"), "datasets": ("name", "tags", "description")}
MAX_TEXT_WORDS, MAX_TEXT_WORD = 16, 100


def text_filter(page: str, text: str | None, flt: dict | None = None) -> dict | None:
    """``flt`` AND the search typed in a page's text box: every word (split on white space) must occur, in any
    case, in one of the page's :data:`TEXT_FIELDS` (an element of ``tags``). Words are matched literally
    (``re.escape``: a ``.`` or ``(`` is itself), through the query language's bounded ``$regex``."""
    if page not in TEXT_FIELDS:
        raise QueryError(f"no text search on page {page!r} (one of {', '.join(TEXT_FIELDS)})")
    words = (text or "").split()
    if len(words) > MAX_TEXT_WORDS:
        raise QueryError(f"search for at most {MAX_TEXT_WORDS} words, not {len(words)}")
    long = next((w for w in words if len(w) > MAX_TEXT_WORD), None)
    if long is not None:
        raise QueryError(f"a searched word has at most {MAX_TEXT_WORD} characters, not {len(long)}")
    clauses = [{"$or": [{field: {"$regex": re.escape(w), "$options": "i"}} for field in TEXT_FIELDS[page]]}
               for w in words]
    if flt:
        clauses.insert(0, flt)
    if not clauses:
        return flt
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}
