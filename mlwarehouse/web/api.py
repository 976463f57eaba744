"""The JSON API behind the pages (``/api/...``): runs, metric series for charts (``runs/points``: every metric of a
selection at once, see :mod:`mlwarehouse.web.runs_view`), models, tasks, image previews.

Errors are JSON with an ``error`` message: 400 for a bad query (the QueryError text), 404 for an unknown id,
403 for a change asked of a read-only UI. Changes (cancel and retry a task) need ``writable=True`` and the
``X-MLW`` header, which a cross-site form cannot send.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.web import data, runs_view
from mlwarehouse.web.arrays import describe, leaves, preview_images, to_png

__all__ = ["router"]

router = APIRouter(prefix="/api")


def _project(request: Request, name: str):
    return request.app.state.warehouse.project(name)


@router.get("/projects")
def projects(request: Request) -> dict:
    return {"projects": request.app.state.warehouse.projects()}


@router.get("/p/{project:path}/runs")
def runs(request: Request, project: str, q: str | None = None, sort: str | None = None,
         limit: int = Query(1000, ge=1, le=10_000), skip: int = Query(0, ge=0)) -> dict:
    p = _project(request, project)
    table = data.runs_table(p, data.parse_filter_text(q), data.parse_sort(sort), limit, skip)
    for row in table["rows"]:
        del row["cells"]  # the page's pre-formatted text; JSON clients have the values
    return table


@router.get("/p/{project:path}/runs/metric")
def run_metric(request: Request, project: str, ids: str, metric: str, kind: str = "train",
               points: int = 1000) -> dict:
    """Curves of one metric for the runs in ``ids`` (comma-separated), downsampled on the server."""
    run_ids = [i for i in (part.strip() for part in ids.split(",")) if i]
    return data.metric_series(_project(request, project), run_ids, kind, metric, points,
                              cache=request.app.state.histories)


def _ids(text: str) -> list[str]:
    return [i for i in (part.strip() for part in text.split(",")) if i]


@router.get("/p/{project:path}/runs/points")
def run_points(request: Request, project: str, ids: str, metrics: str | None = None, x: str = "step",
               points: int = 1000) -> Response:
    """Every metric (or those in ``metrics``, comma-separated ``kind.metric`` keys) of the runs in ``ids``, on
    the ``x`` axis (step, epoch or time), downsampled on the server; the runs come with their labels."""
    state = request.app.state
    if not hasattr(state, "curves"):  # full histories (read again only in part for a live run), and the
        state.run_histories = runs_view.Histories()  # downsampled curves a live page asks for again and again
        state.curves = data.HistoryCache(16 << 20)
    keys = _ids(metrics) if metrics is not None else None
    body = runs_view.points(_project(request, project), _ids(ids), keys, x, points, histories=state.run_histories,
                            curves=state.curves)
    # plain lists of numbers: json.dumps directly, not FastAPI's per-element encoder (10x slower on 100k points)
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


@router.get("/p/{project:path}/runs/compare")
def run_compare(request: Request, project: str, ids: str) -> dict:
    """The runs in ``ids`` side by side: labels, hyper-parameters and metric summaries, differences marked."""
    return runs_view.compare(_project(request, project), _ids(ids))


@router.get("/p/{project:path}/models")
def models(request: Request, project: str, q: str | None = None, sort: str | None = None,
           limit: int = Query(500, ge=1, le=10_000), skip: int = Query(0, ge=0), checkpoints: bool = False) -> dict:
    """The leaderboard (final models ranked by a metric; ``checkpoints=true`` includes checkpoints)."""
    p = _project(request, project)
    return data.leaderboard(p, data.parse_filter_text(q), data.parse_sort(sort), limit, skip,
                            checkpoints=checkpoints)


@router.get("/p/{project:path}/tasks")
def tasks(request: Request, project: str, q: str | None = None, sort: str | None = None,
          limit: int = Query(500, ge=1, le=10_000)) -> dict:
    p = _project(request, project)
    return data.tasks_board(p, data.parse_filter_text(q), data.parse_sort(sort), limit)


@router.post("/p/{project:path}/tasks/{task_id}/{action}")
def change_task(request: Request, project: str, task_id: str, action: str,
                x_mlw: str | None = Header(None)) -> JSONResponse:
    if not request.app.state.writable:
        return JSONResponse({"error": "this UI was started read-only; start it writable to change tasks"}, 403)
    if x_mlw != "1":
        return JSONResponse({"error": "changes need the X-MLW: 1 header"}, 403)
    if action not in ("cancel", "retry"):
        raise NotFound(f"unknown task action {action!r} (cancel or retry)")
    p = _project(request, project)
    if p.find_one(data.TASKS, {"_id": task_id}, projection={"_id": 1}) is None:
        raise NotFound(f"no task {task_id!r} in project {project!r}")
    changed = getattr(p.tasks, action)({"_id": task_id})
    return JSONResponse({"changed": changed})


@router.get("/p/{project:path}/datasets/{dataset_id}/preview.png")
def preview_png(request: Request, project: str, dataset_id: str, leaf: int = Query(0, ge=0),
                index: int = Query(0, ge=0, le=15)) -> Response:
    """Item ``index`` (of the first 16) of array ``leaf`` of a dataset, as a PNG."""
    p = _project(request, project)
    doc = p.find_one(data.DATASETS, {"_id": dataset_id}, projection={"value": 1})
    if doc is None:
        raise NotFound(f"no dataset {dataset_id!r} in project {project!r}")
    found = leaves(doc.get("value"))
    if leaf >= len(found):
        raise NotFound(f"dataset {dataset_id!r} has {len(found)} arrays; there is no array {leaf}")
    images, _ = preview_images(p, describe(p.blobs, found[leaf]))
    if index >= len(images):
        raise QueryError(f"the array holds {len(images)} items; there is no item {index}")
    return Response(to_png(images[index]), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600"})
