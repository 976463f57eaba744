"""The collection pages: users' documents with previews, listeners with their progress, failed outputs and why,
and vector search (by a document's id, a text, or an uploaded image) over the collection's vector indexes.

Routes take the collection's name (and a document's id and a field's path) as query parameters, so any name
reaches its page. Values are read raw (:mod:`mlwarehouse.web.documents`): users' types are never decoded, images
are served as thumbnails of at most 128 px, audio as 16-bit WAV. Everything shown goes through Jinja's escaping.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from mlwarehouse.collections.listeners import FAILED
from mlwarehouse.errors import CodecError, ListenerError, NotFound, QueryError, VectorIndexError
from mlwarehouse.query import split_path
from mlwarehouse.query.jsonvalues import MISSING, get_path
from mlwarehouse.query.text import parse_filter_text, parse_sort_text
from mlwarehouse.web import documents as shown
from mlwarehouse.web import lineage as lineage_view
from mlwarehouse.web import search as vsearch

__all__ = ["router"]

router = APIRouter()
MAX_COLUMNS = 24
#: failed documents listed per listener, and the end of each error shown
FAILED_SHOWN, ERROR_TAIL = 20, 4000


def _collection(request: Request, project: str, name: str):
    return _collection_and_record(request, project, name)[0]


def _collection_and_record(request: Request, project: str, name: str) -> tuple[Any, dict]:
    """The collection and its catalog record (NotFound when the project has no such collection)."""
    p = request.app.state.warehouse.project(project)
    record = p.catalog.record(name)
    if record is None:
        raise NotFound(f"no collection {name!r} in project {project!r}")
    return p.collection(name), record


def _media_url(project: str, what: str, name: str, doc_id: Any, field: str) -> str:
    query = urlencode({"name": name, "id": str(doc_id), "field": field})
    return f"/api/p/{quote(project, safe='')}/collection/{what}?{query}"


def _cell(project: str, name: str, doc: dict, path: str, value: Any) -> dict:
    what = shown.kind(value)
    cell = {"kind": what, "text": shown.cell_text(value), "url": None}
    if what in ("image", "audio") and "_id" in doc:
        cell["url"] = _media_url(project, what, name, doc["_id"], path)
    return cell


def _table(project: str, name: str, docs: list[dict]) -> tuple[list[str], list[dict]]:
    """The columns and rows of documents as the pages show them: user fields first, then listeners' outputs."""
    hidden = ("_id", "_fold", "_error", "_score")
    flat = [shown.flatten({k: v for k, v in d.items() if k not in hidden}) for d in docs]
    columns: dict[str, None] = {}
    for f in flat:
        columns.update(dict.fromkeys(k for k in f if not k.startswith("_outputs.")))
    outputs: dict[str, None] = {}
    for f in flat:
        outputs.update(dict.fromkeys(k for k in f if k.startswith("_outputs.")))
    cols = list(columns)[:MAX_COLUMNS] + list(outputs)[:MAX_COLUMNS]
    rows = [{"id": d.get("_id"), "fold": d.get("_fold"), "error": d.get("_error"), "score": d.get("_score"),
             "cells": [_cell(project, name, d, k, f[k]) if k in f else None for k in cols]}
            for d, f in zip(docs, flat)]
    return cols, rows


def _page(p, project: str, name: str, flt: dict, sort, limit: int, skip: int) -> dict:
    c = p.collection(name)
    cols, rows = _table(project, name, shown.read(c, flt, sort=sort, limit=limit, skip=skip))
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
    c, record = _collection_and_record(request, project, name)
    context: dict[str, Any] = {"project": project, "tab": "collections", "name": name, "q": q, "sort": sort,
                               "limit": limit, "skip": skip, "error": None, "vindexes": vsearch.indexes(c),
                               "search": None, "max_n": vsearch.MAX_N,
                               "lineage": lineage_view.section(c.project, project, record["_id"])}
    status = 200
    try:
        context.update(_page(c.project, project, name, parse_filter_text(q, "query") or {},
                             parse_sort_text(sort, "sort"), limit, skip))
    except QueryError as exc:
        context.update(rows=[], columns=[], listeners=[], total=0, error=str(exc))
        status = 400
    return request.app.state.templates.TemplateResponse(request, "collection.html", context, status_code=status)


#: what a search can be refused for, shown on the page (400): a bad filter or n, an unknown document or index,
#: a listener model that may not be imported here or fails on the value
_REFUSED = (QueryError, VectorIndexError, NotFound, ListenerError, CodecError, ValueError, TypeError)


@router.get("/p/{project:path}/collection/search", response_class=HTMLResponse)
def search_page(request: Request, project: str, name: str, index: str = "", like: str = "", text: str = "",
                q: str = "", n: int = Query(10, ge=1, le=vsearch.MAX_N)):
    """The nearest documents to a stored document (``like``, its id) or a text (``text``, through the listener)."""
    c = _collection(request, project, name)
    query = {"_id": like} if like else text if text else None
    return _search(request, project, c, {"index": index, "like": like, "text": text, "q": q, "n": n}, query)


@router.post("/p/{project:path}/collection/search", response_class=HTMLResponse)
async def search_upload(request: Request, project: str):
    """The nearest documents to an uploaded image (a multipart form: name, index, image, q, n)."""
    fields = vsearch.form_parts(await _body(request), request.headers.get("content-type", ""))
    name = fields.get("name")
    if not isinstance(name, str) or not name:
        raise QueryError("the upload names no collection")
    c = await run_in_threadpool(_collection, request, project, name)
    asked = {k: fields.get(k) if isinstance(fields.get(k), str) else "" for k in ("index", "q")}
    upload = fields.get("image")
    try:
        asked["n"] = int(fields.get("n") or 10)
        if not isinstance(upload, tuple) or not upload[1]:
            raise QueryError("choose an image to search like")
        image = vsearch.read_image(upload[1])
    except (QueryError, ValueError) as exc:
        return await run_in_threadpool(_search, request, project, c, {"n": 10, **asked}, None, str(exc))
    return await run_in_threadpool(_search, request, project, c, asked, image)


async def _body(request: Request) -> bytes:
    """The request's body, refused (QueryError) as soon as it is over what an upload may be."""
    most = vsearch.MAX_UPLOAD_BYTES + 65536
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > most:
            raise QueryError(f"the upload is over the {vsearch.MAX_UPLOAD_BYTES} bytes accepted")
        chunks.append(chunk)
    return b"".join(chunks)


def _search(request: Request, project: str, c, asked: dict, query: Any, error: str | None = None):
    """The search page: the index's figures, the form, and the neighbours (or why there are none, with 400)."""
    name = c.name
    context: dict[str, Any] = {"project": project, "tab": "collections", "name": name, "search": asked,
                               "index": asked.get("index") or None, "max_n": vsearch.MAX_N, "error": error,
                               "vindexes": vsearch.indexes(c), "asked": query is not None, "rows": [],
                               "columns": [], "matched": None, "complete": True}
    if error is None and query is not None:
        try:
            flt = parse_filter_text(asked.get("q"), "filter") or {}
            found = vsearch.neighbours(c, like=query, flt=flt, n=asked["n"], index=asked.get("index") or None)
            context["columns"], context["rows"] = _table(project, name, found["docs"])
            context.update(matched=found["matched"], complete=found["complete"], index=found["index"])
        except _REFUSED as exc:
            context["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, QueryError) else str(exc)
    status = 400 if context["error"] else 200
    return request.app.state.templates.TemplateResponse(request, "search.html", context, status_code=status)


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
