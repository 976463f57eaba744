"""The web UI: a FastAPI app over one warehouse, HTML pages rendered on the server, charts drawn by uPlot.

Pages read only what they show (projections and limits) and long metric histories are downsampled on the server,
so a project with a thousand runs or a 100,000-point curve opens in well under a second. Every asset is served
from the package (no CDN: the UI works offline). The app is read-only unless created with ``writable=True``.

Errors never show a stack trace: a bad filter is shown inline (400), an unknown id or page is a 404 page, other
warehouse errors a 500 page with their message. Under ``/api`` the same errors are JSON ``{"error": ...}``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlwarehouse.errors import NotFound, QueryError, WarehouseError
from mlwarehouse.models.aliases import Aliases, split_alias
from mlwarehouse.models.evaluations import Evaluations
from mlwarehouse.query.jsonvalues import PATH_RE
from mlwarehouse.web import champions, data, downloads, items_view, sweep
from mlwarehouse.web import lineage as lineage_view
from mlwarehouse.web import views as saved_views
from mlwarehouse.web.api import router
from mlwarehouse.web.arrays import dataset_previews, describe, leaves
from mlwarehouse.web.collections import router as collections_router
from mlwarehouse.web.guard import HostGuard

__all__ = ["create_app"]

HERE = Path(__file__).parent
log = logging.getLogger("mlwarehouse.web")


#: modules the pages import on first use (a project's registries), imported as the server starts instead
_PAGE_MODULES = ("mlwarehouse.runs.registry", "mlwarehouse.tasks.queue", "mlwarehouse.datasets.items",
                 "mlwarehouse.collections.catalog", "mlwarehouse.lineage")


@contextlib.asynccontextmanager
async def _warm_up(app: FastAPI):
    """As the server starts, compile every page's template (about 10 ms each) and import what pages import on
    first use, so its first visitor waits for neither. A TestClient used without ``with`` skips this: the same
    happens on first use."""
    env = app.state.templates.env
    for name in env.list_templates(extensions=["html"]):
        env.get_template(name)
    for module in _PAGE_MODULES:
        importlib.import_module(module)
    yield


def create_app(warehouse, *, writable: bool = False, allowed_hosts: Iterable[str] | None = None) -> FastAPI:
    """The UI of ``warehouse`` as an ASGI app (serve it with uvicorn, or test it with a TestClient).

    ``allowed_hosts``: the ``Host`` names served (default: loopback names only; ``"*"`` for any), see
    :mod:`mlwarehouse.web.guard`."""
    app = FastAPI(title="mlwarehouse", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_warm_up)
    app.state.warehouse = warehouse
    app.state.writable = writable
    app.state.histories = data.HistoryCache()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(num=data.fmt, when=_when, urlpart=_urlpart)
    templates.env.tests.update(sortable=lambda field: bool(PATH_RE.match(str(field))))
    templates.env.globals.update(writable=writable, metric_sort=data.metric_sort, run_stats=data.RUN_STATS)
    app.state.templates = templates
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(GZipMiddleware, minimum_size=2048, compresslevel=1)  # level 9 took 15x longer for 8% less
    app.add_middleware(HostGuard, allowed_hosts=allowed_hosts)  # added last: runs first
    app.include_router(router)
    app.include_router(collections_router)  # before the pages: "/p/{project:path}" would match its routes
    app.include_router(champions.router)  # the same: the alias panel's API and the alias history page
    app.include_router(sweep.router)  # the same: the sweep view of a set of runs and its JSON
    app.include_router(downloads.router)  # the same: weights, arrays and task output as files
    app.include_router(saved_views.router)  # the same: saved views (filter, text, sort) of the list pages
    _error_handlers(app)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def listing(request: Request, project: str, tab: str, fetch, q: str, empty: dict, **extra: Any) -> HTMLResponse:
        """The page ``<tab>.html`` of what ``fetch(project, filter)`` returns: a bad filter is shown inline (400),
        an empty page of a project that holds nothing is a 404."""
        p = warehouse.project(project)
        context, status = _queried(lambda flt: fetch(p, flt), q, empty=empty)
        _require_project(p, context, q)
        return page(request, f"{tab}.html", status, project=project, tab=tab, q=q, **{**extra, **context})

    @app.get("/", response_class=HTMLResponse)
    def projects(request: Request):
        return page(request, "projects.html", projects=warehouse.projects())

    @app.get("/p/{project:path}/runs", response_class=HTMLResponse)
    def runs(request: Request, project: str, q: str = "", sort: str = "", limit: int = Query(1000, ge=1, le=10_000),
             skip: int = Query(0, ge=0), text: str = "", columns: str = ""):
        """The runs table; ``columns=lr,valid.acc`` chooses and orders its param/metric columns."""
        def fetch(p, flt):
            return data.runs_table(p, data.text_filter("runs", text, flt), data.parse_sort(sort), limit, skip,
                                   columns=data.parse_columns(columns))
        return listing(request, project, "runs", fetch, q, {"rows": [], "heads": [], "params": [], "metrics": [],
                                                            "total": 0}, sort=sort, text=text, columns=columns)

    @app.get("/p/{project:path}/runs/{run_id}", response_class=HTMLResponse)
    def run(request: Request, project: str, run_id: str):
        p = warehouse.project(project)
        doc = _one(p, data.RUNS, run_id, "run")
        table = data.runs_table(p, {"_id": run_id}, None, 1)
        return page(request, "run.html", project=project, tab="runs", run=doc, row=table["rows"][0],
                    metrics=table["metrics"], lineage=lineage_view.section(p, project, doc["_id"]))

    @app.get("/p/{project:path}/models", response_class=HTMLResponse)
    def models(request: Request, project: str, q: str = "", sort: str = "", limit: int = Query(500, ge=1, le=10_000),
               skip: int = Query(0, ge=0), checkpoints: bool = False, text: str = "", columns: str = ""):
        """The leaderboard: final models ranked by a metric; ``checkpoints=1`` shows checkpoints too. Above it,
        the live champion panel (every alias now, see :mod:`mlwarehouse.web.champions`); ``columns=`` chooses
        and orders its metric columns."""
        def fetch(p, flt):
            board = data.leaderboard(p, data.text_filter("models", text, flt), data.parse_sort(sort), limit, skip,
                                     checkpoints=checkpoints, columns=data.parse_columns(columns))
            return {**board, "sort": sort or board["ranked"] or ""}
        return listing(request, project, "models", fetch, q,
                       {"rows": [], "metrics": [], "total": 0, "hidden_checkpoints": 0}, sort=sort,
                       checkpoints=checkpoints, champions=champions.panel(warehouse.project(project)), text=text,
                       columns=columns)

    @app.get("/p/{project:path}/models/{model_id}", response_class=HTMLResponse)
    def model(request: Request, project: str, model_id: str):
        p = warehouse.project(project)
        aliases = Aliases(p)
        if split_alias(model_id) is not None and p.find_one(data.MODELS, {"_id": model_id}, projection={"_id": 1}) \
                is None:  # a page by alias: mlp@champion
            held = aliases.resolve(model_id)
            if held is None:
                raise NotFound(f"alias {model_id!r} points at no model in project {p.name!r}")
            model_id = held
        doc = _one(p, data.MODELS, model_id, "model", projection={"_blobs": 0, "project": 0})
        registry = _registry_view(p, aliases, doc["_id"])
        weights = doc.pop("weights", None)
        weights = [w for w in weights if isinstance(w, list) and len(w) == 2 and isinstance(w[1], dict)] \
            if isinstance(weights, list) else []
        if not isinstance(doc.get("architecture"), (dict, type(None))):
            doc["architecture"] = {"value": doc["architecture"]}
        lineage = lineage_view.section(p, project, doc["_id"])
        graph = lineage_view.graph_svg({"id": doc["_id"], "kind": "checkpoint" if doc.get("checkpoint") is True
                                        else "model", "name": doc.get("name")}, lineage)
        return page(request, "model.html", project=project, tab="models", model=doc, lineage=lineage, graph=graph,
                    registry=registry,
                    tensors=[(".".join(map(str, w[0])) if isinstance(w[0], list) else str(w[0]), w[1])
                             for w in weights])

    @app.get("/p/{project:path}/tasks", response_class=HTMLResponse)
    def tasks(request: Request, project: str, q: str = "", limit: int = Query(TASKS_PER_PAGE, ge=1, le=MAX_TASKS),
              before: str = "", after: str = "", text: str = ""):
        """The task board, one page of ``limit`` tasks (newest first; ``before``/``after`` an id: the next or
        the previous page), re-drawn by static/tasks.js from the JSON below."""
        return listing(request, project, "tasks",
                       lambda p, flt: task_page(p, data.text_filter("tasks", text, flt), limit, before, after), q,
                       {"rows": [], "counts": {}, "total": 0, "offset": 0, "older": None, "newer": None},
                       limit=limit, text=text)

    @app.get("/api/p/{project:path}/tasks/page")
    def tasks_json(project: str, q: str = "", limit: int = Query(TASKS_PER_PAGE, ge=1, le=MAX_TASKS),
                   before: str = "", after: str = "", text: str = "") -> dict:
        """The JSON the task board polls: :func:`task_page` (``text``: the page's text search)."""
        return task_page(warehouse.project(project), data.text_filter("tasks", text, data.parse_filter_text(q)),
                         limit, before, after)

    @app.get("/p/{project:path}/tasks/{task_id}", response_class=HTMLResponse)
    def task(request: Request, project: str, task_id: str):
        p = warehouse.project(project)
        doc = _one(p, data.TASKS, task_id, "task", projection={"_blobs": 0, "project": 0})
        output = doc.get("output") or ""
        if isinstance(doc.get("output_blob"), dict):
            try:
                output = bytes(p.unpack(doc["output_blob"])).decode("utf-8", "replace")
            except (WarehouseError, TypeError, ValueError) as exc:
                output = f"(the stored output cannot be read: {type(exc).__name__}: {exc})"
        return page(request, "task.html", project=project, tab="tasks", task=doc, output=output,
                    lineage=lineage_view.section(p, project, doc["_id"]))

    @app.get("/p/{project:path}/datasets", response_class=HTMLResponse)
    def datasets(request: Request, project: str, q: str = "", limit: int = Query(500, ge=1, le=10_000),
                 text: str = ""):
        def fetch(p, flt):
            rows = data.datasets_list(p, data.text_filter("datasets", text, flt), limit)
            items = {d["_id"]: d.get("count") for d in p.find(  # item datasets: their item count, not arrays
                data.DATASETS, {"_id": {"$in": [r["id"] for r in rows]}, "kind": "items"}, projection={"count": 1})}
            for row in rows:
                row["items"] = items.get(row["id"])
            return {"rows": rows}
        return listing(request, project, "datasets", fetch, q, {"rows": []}, text=text)

    @app.get("/p/{project:path}/datasets/{dataset_id}", response_class=HTMLResponse)
    def dataset(request: Request, project: str, dataset_id: str, q: str = "", skip: int = Query(0, ge=0),
                limit: int = Query(items_view.ITEMS_PER_PAGE, ge=1, le=items_view.MAX_ITEMS_PER_PAGE)):
        """A dataset version: its fields and versions; a whole value's arrays with image previews (captioned by
        their labels), or a page of an item dataset's items (``q`` filters them, ``skip``/``limit`` page)."""
        p = warehouse.project(project)
        doc = _one(p, data.DATASETS, dataset_id, "dataset", projection={"_blobs": 0, "project": 0})
        versions = p.find(data.DATASETS, {"name": doc.get("name")}, sort=[("time", -1)], limit=50,
                          projection={"version": 1, "time": 1, "description": 1})
        fields = {k: v for k, v in doc.items() if k not in ("value", "_id")}
        common = {"project": project, "tab": "datasets", "dataset": doc, "fields": fields, "versions": versions,
                  "lineage": lineage_view.section(p, project, doc["_id"]), "q": q}
        if doc.get("kind") == "items":
            context, status = _queried(lambda flt: {"items": items_view.item_page(p, doc, flt, skip, limit)}, q,
                                       empty={"items": None})
            return page(request, "dataset.html", status, **common, **context, leaves=[], previews=[],
                        item_fields=items_view.field_columns(doc))
        found = [describe(p.blobs, leaf) for leaf in leaves(doc.get("value"))]
        classes = doc.get("classes") if isinstance(doc.get("classes"), list) else None
        return page(request, "dataset.html", **common, leaves=found, previews=dataset_previews(p, found, classes),
                    items=None, item_fields=[], error=None)

    # last: "{project:path}" would also match every page above (a project name may hold "/", which Starlette
    # decodes from %2F before routing, so project routes take the rest of the path and end with the page name)
    @app.get("/p/{project:path}")
    def project_home(project: str):
        warehouse.project(project)
        return RedirectResponse(f"/p/{_urlpart(project)}/runs")

    return app


def _queried(fetch, q: str, *, empty: dict) -> tuple[dict, int]:
    """Run a page's query; a bad filter gives the empty page with the QueryError message (and status 400)."""
    try:
        return {**fetch(data.parse_filter_text(q)), "error": None}, 200
    except QueryError as exc:
        return {**empty, "error": str(exc)}, 400


def _require_project(p, context: dict, q: str) -> None:
    if not q and not context.get("error") and not context["rows"] and not data.project_exists(p):
        raise NotFound(f"there is no project {p.name!r} (no runs, models, tasks, datasets or collections)")


#: tasks on one page of the board by default, and at most
TASKS_PER_PAGE, MAX_TASKS = 100, 2000


def task_page(p, flt: dict | None, limit: int, before: str = "", after: str = "") -> dict:
    """One page of the task board, newest first, by keyset: the ``limit`` tasks older than the id ``before``
    (the next page), or newer than the id ``after`` (the previous page; the newest page when fewer are newer),
    else the newest. Pages hold still while tasks are added (ids are sortable by creation). With the rows:
    ``counts`` by status and ``total`` (of the whole filter), ``offset`` (tasks newer than the first row) and
    the cursors ``older`` and ``newer`` (None on the last and the first page)."""
    def within(extra: dict) -> dict:
        return {"$and": [flt, extra]} if flt else extra

    if before and after:
        raise QueryError("give before= or after=, not both")
    rows, counts, newer, older = None, None, None, None
    if after:
        board = data.tasks_board(p, within({"_id": {"$gt": after}}), [("_id", 1)], limit + 1)
        if len(board["rows"]) > limit:
            rows = board["rows"][:limit][::-1]
            newer, older = rows[0]["id"], rows[-1]["id"]
    if rows is None:
        board = data.tasks_board(p, within({"_id": {"$lt": before}}) if before else flt, None, limit + 1)
        rows = board["rows"][:limit]
        older = rows[-1]["id"] if len(board["rows"]) > limit else None
        newer = rows[0]["id"] if before and rows else None
        counts = None if before else board["counts"]
    if counts is None:  # the page's own counts are of its cursor's side only
        base = [flt] if flt else []
        counts = {s: p.count(data.TASKS, {"$and": [*base, {"status": s}]} if base else {"status": s})
                  for s in data.TASK_STATUSES}
    offset = p.count(data.TASKS, within({"_id": {"$gt": rows[0]["id"]}})) if newer and rows else 0
    return {"rows": rows, "counts": counts, "total": p.count(data.TASKS, flt), "offset": offset, "limit": limit,
            "older": older, "newer": newer}


def _registry_view(p, aliases: "Aliases", model_id: str, limit: int = 200) -> dict:
    """A model's aliases now, the history of every alias it ever held (newest change first) and its evaluations."""
    held = aliases.of(model_id)
    names = sorted({(c.doc["name"], c.doc["alias"]) for c in aliases.changes(model_id)})
    history = sorted((c.doc for n, a in names for c in aliases.history(n, a, limit=limit)),
                     key=lambda c: (c.get("changed") or "", c["version"]), reverse=True)[:limit]
    evaluations = [e.doc for e in Evaluations(p).find(model_id, sort=[("metric", 1), ("time", -1)], limit=limit)]
    return {"aliases": held, "history": history, "evaluations": evaluations}


def _one(p, collection: str, doc_id: str, what: str, projection: dict | None = None) -> dict:
    doc = p.find_one(collection, {"_id": doc_id}, projection=projection)
    if doc is None:
        raise NotFound(f"no {what} {doc_id!r} in project {p.name!r}")
    return doc


def _error_handlers(app: FastAPI) -> None:
    def respond(request: Request, status: int, message: str):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        return request.app.state.templates.TemplateResponse(
            request, "error.html", {"status": status, "message": message, "project": None, "tab": None},
            status_code=status)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return respond(request, 404, str(exc))

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError):
        return respond(request, 400, str(exc))

    @app.exception_handler(WarehouseError)
    async def warehouse_error(request: Request, exc: WarehouseError):
        log.error("%s failed: %s: %s", request.url.path, type(exc).__name__, exc)
        return respond(request, 500, f"{type(exc).__name__}: {exc}")

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())[1:]))}: {e.get('msg')}" for e in exc.errors())
        return respond(request, 400, f"bad parameter: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "no such page" if exc.status_code == 404 else str(exc.detail)
        return respond(request, exc.status_code, message)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("%s failed", request.url.path)
        return respond(request, 500, f"internal error ({type(exc).__name__}); the server log has the details")


def _urlpart(value: Any) -> str:
    """One path segment of a URL: every reserved character escaped, ``/`` included."""
    return quote(str(value), safe="")


def _when(value: Any) -> str:
    """An ISO time stamp as ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        except (OverflowError, OSError, ValueError):
            return str(value)
    if isinstance(value, str) and len(value) >= 19:
        return value[:19].replace("T", " ")
    return "" if value is None else str(value)
