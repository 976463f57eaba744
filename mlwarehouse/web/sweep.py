"""The sweep view of a set of runs (a filter, or the runs of a task sweep): parallel coordinates of the
hyper-parameters that vary and a chosen metric, a scatter of any parameter against any metric, runs grouped over a
field (the seeds) with their mean and min/max band, and a table of the runs that brushing an axis filters.

The page (``/p/{project}/sweep?q=<filter>&task=<task name>``) is a shell; its script reads
``GET /api/p/{project}/sweep`` once and draws everything in the browser with plain SVG, so brushing, switching the
metric or the scatter's axes and grouping need no further request (only another summary stat does). The JSON is
columnar: one list per parameter and per metric with a value per run, read in one query with a projection (1,000
runs with 7 random-float parameters and 8 metrics are 340 KB, 150 KB gzip; a grid's few values take far less).

Parameters are the runs' flattened ``hyper_parameters``: numeric when every value present is a number (a log scale
when all are positive and span two decades or more), else categories (their JSON text, sorted; values are sent as
codes into that list). Metrics are the runs' summaries (``<kind>.<metric>``, one stat of them) and, for runs of
tasks, the numbers in the task's result (``result.<key>``). Missing and non-finite values are ``null``.
"""

from __future__ import annotations

import gzip
import json
import math
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from mlwarehouse import schema
from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.query.text import parse_filter_text
from mlwarehouse.runs import summary
from mlwarehouse.web.champions import direction
from mlwarehouse.web.data import flatten, project_exists

__all__ = ["router", "sweep_data", "select_runs", "default_metric", "STATS", "MAX_RUNS"]

router = APIRouter()
RUNS, TASKS = schema.RUNS.name, schema.TASKS.name
#: the summary stats a sweep view can show of each metric
STATS = (summary.LAST, summary.MIN, summary.MAX)
#: the most runs one view reads (and the default), parameters and metrics sent
MAX_RUNS, DEFAULT_RUNS, MAX_PARAMS, MAX_METRICS = 10_000, 5_000, 32, 48
#: JSON bodies from this size on are sent gzipped (at level 1) to a client that accepts it
GZIP_FROM = 2048
#: task ids per query when reading the runs or the results of a sweep's tasks
CHUNK = 1000
RESULT = "result"
RUN_FIELDS = {"name": 1, "status": 1, "started": 1, "task": 1, "hyper_parameters": 1, summary.ROOT: 1}
_PREFERRED = (f"{RESULT}.test_", "test.", f"{RESULT}.valid_", f"{RESULT}.val_", "valid.", "val.", "eval.", f"{RESULT}.")
_SCORES = ("accuracy", "acc", "f1", "auc", "score", "precision", "recall")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _check_task(task: str | None) -> str | None:
    if task is None or task == "":
        return None
    if not isinstance(task, str) or len(task) > 200:
        raise QueryError(f"task= is a task name of 1 to 200 characters, not {task!r}")
    return task


def _check_stat(stat: Any) -> None:
    if stat not in STATS:
        raise QueryError(f"stat must be one of {', '.join(STATS)}, not {stat!r}")


def _and(flt: dict | None, extra: dict) -> dict:
    return {"$and": [flt, extra]} if flt else extra


def select_runs(p, flt: dict | None, task: str | None = None, limit: int = DEFAULT_RUNS) -> tuple[list[dict], int]:
    """The runs of a view, oldest first, and how many match: those matching ``flt`` and, with ``task``, run by a
    task of that name (NotFound when the project has no task of that name)."""
    task = _check_task(task)
    if not 1 <= limit <= MAX_RUNS:
        raise QueryError(f"limit must be between 1 and {MAX_RUNS}, not {limit}")
    order = [("started", 1), ("_id", 1)]
    if task is None:
        return p.find(RUNS, flt, sort=order, limit=limit, projection=RUN_FIELDS), p.count(RUNS, flt)
    ids = [row[0] for row in p.values(TASKS, {"task_name": task}, ["_id"])]
    if not ids:
        raise NotFound(f"no task named {task!r} in project {p.name!r}")
    docs, total = [], 0
    for start in range(0, len(ids), CHUNK):  # each chunk's first ``limit``; merged, the first ``limit`` of all
        scope = _and(flt, {"task": {"$in": ids[start:start + CHUNK]}})
        found = p.find(RUNS, scope, sort=order, limit=limit, projection=RUN_FIELDS)
        docs += found
        total += len(found) if len(found) < limit else p.count(RUNS, scope)
    docs.sort(key=lambda d: (str(d.get("started") or ""), d["_id"]))
    return docs[:limit], total


def _results(p, docs: list[dict]) -> dict[str, dict[str, float]]:
    """The numbers in the results of the tasks that ran ``docs``, flattened, by task id."""
    ids = sorted({d["task"] for d in docs if isinstance(d.get("task"), str)})
    out: dict[str, dict[str, float]] = {}
    for start in range(0, len(ids), CHUNK):
        for task_id, result in p.values(TASKS, {"_id": {"$in": ids[start:start + CHUNK]}}, ["_id", RESULT]):
            numbers = {k: v for k, v in flatten(result).items() if _number(v) is not None} \
                if isinstance(result, dict) else {}
            if numbers:
                out[task_id] = numbers
    return out


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def _param(name: str, values: list[Any]) -> dict:
    """One parameter's column: numbers as they are, or category codes into a sorted list of labels."""
    present = [v for v in values if v is not None]
    numeric = bool(present) and all(_number(v) is not None for v in present)
    if numeric:
        distinct = len(set(present))
        low, high = min(present), max(present)
        scale = "log" if low > 0 and high / low >= 100 else "linear"
        column = {"type": "number", "values": values, "min": low, "max": high, "scale": scale}
    else:
        labels = [None if v is None else _label(v) for v in values]
        categories = sorted({t for t in labels if t is not None})
        code = {t: i for i, t in enumerate(categories)}
        distinct = len(categories)
        column = {"type": "category", "categories": categories,
                  "values": [None if t is None else code[t] for t in labels]}
    missing = len(values) - len(present)
    return {"name": name, **column, "distinct": distinct, "missing": missing,
            "varies": distinct > 1 or (distinct == 1 and missing > 0)}


def default_metric(names: list[str]) -> str | None:
    """The metric a view opens on: a test result or metric, else a validation one (a score-like name first:
    accuracy, f1...), else any task result, else the first."""
    for prefix in _PREFERRED:
        found = [n for n in names if n.startswith(prefix)]
        if found:
            scored = [n for n in found if any(word in n.rsplit(".", 1)[-1].lower() for word in _SCORES)]
            return (scored or found)[0]
    return names[0] if names else None


def sweep_data(p, flt: dict | None = None, *, task: str | None = None, stat: str = summary.LAST,
               limit: int = DEFAULT_RUNS) -> dict:
    """The view's data: ``runs`` (ids, names, status, task ids), ``params`` (varying ones first, each with
    ``values`` per run) and ``metrics`` (each ``stat`` of each summary and each task result number, with its
    ``direction``), ``metric`` (the one to open on), ``total`` (runs matching; ``count`` are read)."""
    _check_stat(stat)
    docs, total = select_runs(p, flt, task, limit)
    results = _results(p, docs)
    flat = [flatten(d["hyper_parameters"]) if isinstance(d.get("hyper_parameters"), dict) else {} for d in docs]
    names: dict[str, None] = {}
    for hp in flat:
        names.update(dict.fromkeys(hp))
    params = [_param(n, [_plain(hp.get(n)) for hp in flat]) for n in sorted(names)]
    params.sort(key=lambda c: not c["varies"])  # stable: varying ones first, each group by name
    metric_values: dict[str, list] = {}
    for i, doc in enumerate(docs):
        numbers = [(key, _number(stats.get(stat))) for key, stats in summary.metrics(doc).items()]
        numbers += [(f"{RESULT}.{key}", value) for key, value in results.get(doc.get("task"), {}).items()]
        for key, value in numbers:
            values = metric_values.get(key)
            if values is None:
                values = metric_values[key] = [None] * len(docs)
            values[i] = value
    metric_names = sorted(metric_values)
    metrics = [{"name": m, "values": metric_values[m], "direction": direction(m.rsplit(".", 1)[-1])}
               for m in metric_names[:MAX_METRICS]]
    return {"project": p.name, "task": _check_task(task), "stat": stat, "total": total, "count": len(docs),
            "runs": {"id": [d["_id"] for d in docs], "name": [d.get("name") for d in docs],
                     "status": [d.get("status") for d in docs], "task": [d.get("task") for d in docs]},
            "params": params[:MAX_PARAMS], "more_params": max(0, len(params) - MAX_PARAMS),
            "metrics": metrics, "more_metrics": max(0, len(metric_names) - MAX_METRICS),
            "metric": default_metric(metric_names[:MAX_METRICS])}


def _plain(value: Any) -> Any:
    """A parameter's value as JSON can carry it (a non-finite float is missing)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@router.get("/api/p/{project:path}/sweep")
def sweep_api(request: Request, project: str, q: str | None = None, task: str | None = None,
              stat: str = summary.LAST, limit: int = Query(DEFAULT_RUNS, ge=1, le=MAX_RUNS)) -> Response:
    """The runs of a filter (``q``) or of a task sweep (``task``), columnar (see :func:`sweep_data`).

    Encoded and compressed here: FastAPI's generic encoder walks each of the tens of thousands of values, and the
    app's gzip level 9 spends ~15x the time of level 1 on this payload (mostly float digits, which neither level
    compresses much: level 1 is 8% larger). The middleware passes a response already encoded through."""
    p = request.app.state.warehouse.project(project)
    found = sweep_data(p, parse_filter_text(q), task=task, stat=stat, limit=limit)
    body = json.dumps(found, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    headers = {"Vary": "Accept-Encoding"}
    if len(body) >= GZIP_FROM and "gzip" in request.headers.get("accept-encoding", ""):
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type="application/json", headers=headers)


@router.get("/p/{project:path}/sweep", response_class=HTMLResponse)
def sweep_page(request: Request, project: str, q: str = "", task: str = "", stat: str = summary.LAST,
               limit: int = Query(DEFAULT_RUNS, ge=1, le=MAX_RUNS)):
    """The page: a filter box, a task-name box, and the views its script draws. A bad filter is shown inline
    (400), an unknown task name is a 404, a project that holds nothing a 404."""
    p = request.app.state.warehouse.project(project)
    error, total, status = None, 0, 200
    try:
        _check_stat(stat)
        flt = parse_filter_text(q)
        _check_task(task)
        total = select_runs(p, flt, task or None, 1)[1]
    except QueryError as exc:
        error, status = str(exc), 400
    if not q and not task and not error and not total and not project_exists(p):
        raise NotFound(f"there is no project {p.name!r} (no runs, models, tasks, datasets or collections)")
    task_names = [t for t in p.distinct(TASKS, "task_name") if isinstance(t, str)][:500]
    return request.app.state.templates.TemplateResponse(
        request, "sweep.html", {"project": project, "tab": "runs", "q": q, "task": task, "stat": stat,
                                "limit": limit, "stats": STATS, "total": total, "error": error,
                                "task_names": task_names}, status_code=status)
