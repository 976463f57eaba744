"""The collection pages: users' documents with previews, listeners with their progress, failed outputs and why.

Routes take the collection's name (and a document's id and a field's path) as query parameters, so any name
reaches its page. Values are read raw (:mod:`mlwarehouse.web.documents`): users' types are never decoded, images
are served as thumbnails of at most 128 px, audio as 16-bit WAV. Everything shown goes through Jinja's escaping.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from mlwarehouse.collections.listeners import FAILED
from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.query import split_path
from mlwarehouse.query.jsonvalues import MISSING, get_path
from mlwarehouse.query.text import parse_filter_text, parse_sort_text
from mlwarehouse.web import documents as shown

__all__ = ["router"]

router = APIRouter()
MAX_COLUMNS = 24
#: failed documents listed per listener, and the end of each error shown
FAILED_SHOWN, ERROR_TAIL = 20, 4000


def _collection(request: Request, project: str, name: str):
    p = request.app.state.warehouse.project(project)
    if p.catalog.record(name) is None:
        raise NotFound(f"no collection {name!r} in project {project!r}")
    return p.collection(name)


def _media_url(project: str, what: str, name: str, doc_id: Any, field: str) -> str:
    query = urlencode({"name": name, "id": str(doc_id), "field": field})
    return f"/api/p/{quote(project, safe='')}/collection/{what}?{query}"


def _cell(project: str, name: str, doc: dict, path: str, value: Any) -> dict:
    what = shown.kind(value)
    cell = {"kind": what, "text": shown.cell_text(value), "url": None}
    if what in ("image", "audio") and "_id" in doc:
        cell["url"] = _media_url(project, what, name, doc["_id"], path)
    return cell


def _page(p, project: str, name: str, flt: dict, sort, limit: int, skip: int) -> dict:
    c = p.collection(name)
    docs = shown.read(c, flt, sort=sort, limit=limit, skip=skip)
    flat = [shown.flatten({k: v for k, v in d.items() if k not in ("_id", "_fold", "_error")}) for d in docs]
    columns: dict[str, None] = {}
    for f in flat:
        columns.update(dict.fromkeys(k for k in f if not k.startswith("_outputs.")))
    outputs: dict[str, None] = {}
    for f in flat:
        outputs.update(dict.fromkeys(k for k in f if k.startswith("_outputs.")))
    cols = list(columns)[:MAX_COLUMNS] + list(outputs)[:MAX_COLUMNS]
    rows = [{"id": d.get("_id"), "fold": d.get("_fold"), "error": d.get("_error"),
             "cells": [_cell(project, name, d, k, f[k]) if k in f else None for k in cols]}
            for d, f in zip(docs, flat)]
    listeners = []
    for x in c.listeners():
        failures = []
        progress = c.progress(x.name)
        if progress.get(FAILED):
            state = f"_listeners.{x.name}"
            for d in c.find({f"{state}.status": FAILED}, {"_id": 1, state: 1}, limit=FAILED_SHOWN, raw=True):
                error = str(((d.get("_listeners") or {}).get(x.name) or {}).get("error") or "")
                failures.append({"id": d["_id"], "error": error[-ERROR_TAIL:]})
        listeners.append({"name": x.name, "key": x.key, "compute": x.compute, "where": x.where,
                          "model": x.model.get("name") or x.model.get("target"), "upstream": list(x.upstream),
                          "progress": progress, "failures": failures})
    return {"rows": rows, "columns": cols, "listeners": listeners, "total": c.count_documents(flt)}


@router.get("/p/{project:path}/collections", response_class=HTMLResponse)
def collections_page(request: Request, project: str):
    p = request.app.state.warehouse.project(project)
    rows = shown.collections(p)
    if not rows and project not in request.app.state.warehouse.projects():
        raise NotFound(f"there is no project {project!r}")
    return request.app.state.templates.TemplateResponse(
        request, "collections.html", {"project": project, "tab": "collections", "rows": rows})


@router.get("/p/{project:path}/collection", response_class=HTMLResponse)
def collection_page(request: Request, project: str, name: str, q: str = "", sort: str = "",
                    limit: int = Query(50, ge=1, le=500), skip: int = Query(0, ge=0)):
    c = _collection(request, project, name)
    context: dict[str, Any] = {"project": project, "tab": "collections", "name": name, "q": q, "sort": sort,
                               "limit": limit, "skip": skip, "error": None}
    status = 200
    try:
        context.update(_page(c.project, project, name, parse_filter_text(q, "query") or {},
                             parse_sort_text(sort, "sort"), limit, skip))
    except QueryError as exc:
        context.update(rows=[], columns=[], listeners=[], total=0, error=str(exc))
        status = 400
    return request.app.state.templates.TemplateResponse(request, "collection.html", context, status_code=status)


def _value(request: Request, project: str, name: str, doc_id: str, field: str) -> Any:
    split_path(field, "field")
    c = _collection(request, project, name)
    found = shown.read(c, {"_id": doc_id}, projection={field: 1}, limit=1)
    if not found:
        raise NotFound(f"no document {doc_id!r} in collection {name!r}")
    doc = found[0]
    if "_error" in doc:
        raise QueryError(f"document {doc_id!r} cannot be read: {doc['_error']}")
    value = get_path(doc, field)
    if value is MISSING:
        raise NotFound(f"document {doc_id!r} has no field {field!r}")
    return value


@router.get("/api/p/{project:path}/collection/image")
def image(request: Request, project: str, name: str, id: str, field: str) -> Response:
    """A thumbnail (PNG, at most 128 px a side) of an image in a document."""
    return _media(request, project, name, id, field, "image")


@router.get("/api/p/{project:path}/collection/audio")
def audio(request: Request, project: str, name: str, id: str, field: str) -> Response:
    """An audio clip of a document as 16-bit WAV."""
    return _media(request, project, name, id, field, "audio")


#: what the media endpoints serve, by kind of value: how it is named, rendered and typed
_MEDIA = {"image": ("an image", shown.thumbnail_png, "image/png"), "audio": ("audio", shown.wav_bytes, "audio/wav")}


def _media(request: Request, project: str, name: str, doc_id: str, field: str, kind: str) -> Response:
    """A field of ``kind`` rendered as its media type (QueryError for a field of another kind)."""
    what, render, media_type = _MEDIA[kind]
    value = _value(request, project, name, doc_id, field)
    if shown.kind(value) != kind:
        raise QueryError(f"field {field!r} of document {doc_id!r} is not {what} ({shown.cell_text(value)})")
    return Response(render(value), media_type=media_type,
                    headers={"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"})
