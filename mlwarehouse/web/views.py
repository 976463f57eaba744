"""Saved views of the list pages (``/api/p/<project>/views``): a name for a page's filter, text search, sort
and (runs, models) the param/metric columns shown.

A view is a document of the project's users' collection :data:`COLLECTION` (nothing is added to the schema):
``{name, page, q, text, sort, columns}``, one per (page, name): saving a name again replaces it. Every field is
checked the way the page itself would read it (the filter parsed, the words bounded, the sort's fields valid),
so a saved view always opens. Anyone can list views and open one (its ``url``); saving and deleting need a UI
started ``writable`` and the ``X-MLW: 1`` header, like the task board's changes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Body, Header, Request
from fastapi.responses import JSONResponse

from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.web import data

__all__ = ["router", "COLLECTION", "check_view", "view_url"]

router = APIRouter(prefix="/api")

#: the users' collection that holds saved views
COLLECTION = "_ui_views"
MAX_NAME, MAX_TEXT, MAX_COLUMNS = 100, 2000, 100
FIELDS = ("name", "page", "q", "text", "sort", "columns")


def check_view(body: Any) -> dict:
    """The view in a request's JSON body, with every field checked (QueryError naming the first problem)."""
    if not isinstance(body, dict):
        raise QueryError("a view is a JSON object {name, page, q, text, sort, columns}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise QueryError(f"unknown view field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise QueryError(f"a view's name is 1 to {MAX_NAME} printable characters, not {name!r}")
    page = body.get("page")
    if page not in data.TEXT_FIELDS:
        raise QueryError(f"a view's page is one of {', '.join(data.TEXT_FIELDS)}, not {page!r}")
    view = {"name": name.strip(), "page": page}
    for key in ("q", "text", "sort"):
        value = body.get(key) or ""
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise QueryError(f"a view's {key} is text of at most {MAX_TEXT} characters")
        view[key] = value.strip()
    data.text_filter(page, view["text"], data.parse_filter_text(view["q"]))  # raises as the page would
    data.parse_sort(view["sort"])
    columns = body.get("columns")
    if columns is not None and (not isinstance(columns, list) or len(columns) > MAX_COLUMNS
                                or not all(isinstance(c, str) and 0 < len(c) <= MAX_NAME for c in columns)):
        raise QueryError(f"a view's columns are a list of at most {MAX_COLUMNS} column names")
    view["columns"] = data.parse_columns(columns)  # names as the page reads them: no commas, printable
    if view["columns"] and page not in data.COLUMN_PAGES:
        raise QueryError(f"columns are chosen on the {', '.join(data.COLUMN_PAGES)} pages only, not {page!r}")
    return view


def view_url(project: str, view: dict) -> str:
    """The page a view opens: ``/p/<project>/<page>?q=...&text=...&sort=...&columns=a,b`` (empty parts left
    out), so the URL alone shows what the view shows and can be shared."""
    parts = {k: view[k] for k in ("q", "text", "sort") if view.get(k)}
    if view.get("columns"):
        parts["columns"] = ",".join(view["columns"])
    query = urlencode(parts)
    return f"/p/{quote(project, safe='')}/{view['page']}" + (f"?{query}" if query else "")


def _shown(project: str, doc: dict) -> dict:
    view = {k: doc.get(k) for k in FIELDS}
    return {"id": doc["_id"], **view, "url": view_url(project, view), "time": doc.get("time")}


def _refused(request: Request, x_mlw: str | None) -> JSONResponse | None:
    if not request.app.state.writable:
        return JSONResponse({"error": "this UI was started read-only; start it writable to save views"}, 403)
    if x_mlw != "1":
        return JSONResponse({"error": "changes need the X-MLW: 1 header"}, 403)
    return None


@router.get("/p/{project:path}/views")
def list_views(request: Request, project: str, page: str | None = None) -> dict:
    """The saved views of a project (of one page if ``page``), by page then name."""
    if page is not None and page not in data.TEXT_FIELDS:
        raise QueryError(f"page is one of {', '.join(data.TEXT_FIELDS)}, not {page!r}")
    views = request.app.state.warehouse.project(project).collection(COLLECTION)
    docs = views.find({"page": page} if page else {}, sort=[("page", 1), ("name", 1)], limit=1000)
    return {"views": [_shown(project, d) for d in docs], "writable": bool(request.app.state.writable)}


@router.post("/p/{project:path}/views")
def save_view(request: Request, project: str, body: Any = Body(None), x_mlw: str | None = Header(None)):
    """Save (or replace, by page and name) a view; 201 with the view and its ``url``."""
    refused = _refused(request, x_mlw)
    if refused is not None:
        return refused
    view = check_view(body)
    views = request.app.state.warehouse.project(project).collection(COLLECTION)
    views.replace_one({"page": view["page"], "name": view["name"]}, view, upsert=True)
    doc = views.find_one({"page": view["page"], "name": view["name"]})
    return JSONResponse({"view": _shown(project, doc)}, 201)


@router.delete("/p/{project:path}/views/{view_id}")
def delete_view(request: Request, project: str, view_id: str, x_mlw: str | None = Header(None)):
    refused = _refused(request, x_mlw)
    if refused is not None:
        return refused
    views = request.app.state.warehouse.project(project).collection(COLLECTION)
    if views.delete_one({"_id": view_id}).deleted_count != 1:
        raise NotFound(f"no saved view {view_id!r} in project {project!r}")
    return {"deleted": view_id}
