"""Vector search for display (``mlw search`` and the collection page's search box): indexes with their figures,
the neighbours of a query read as :mod:`mlwarehouse.web.documents` reads documents, uploads decoded safely.

The query vector comes from the index (a stored document's own vector, a value through the listener's model, or a
given vector); the neighbours' ids and scores from the index's fast path (as of its last refresh, at most a second
old for other processes' writes), and the documents are then read raw by id through the filter, so every result
matches it and a stored value that cannot be decoded shows in its place instead of failing the search. Nothing here
imports FastAPI: the CLI uses it too.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
from typing import Any

from mlwarehouse.errors import QueryError, VectorIndexError
from mlwarehouse.web import documents as shown

__all__ = ["MAX_N", "MAX_UPLOAD_BYTES", "form_parts", "indexes", "input_kind", "neighbours", "read_image"]

#: the largest upload accepted (an image to search like)
MAX_UPLOAD_BYTES = 16 << 20
#: the most neighbours asked for at once
MAX_N = 1000
_STATS = ("engine", "kind", "vectors", "dead", "dims", "metric", "memory_bytes", "loaded_from", "filters")


def indexes(c) -> list[dict]:
    """Each vector index of collection ``c``: its definition and its figures (opening an index builds or loads
    it; one that cannot be opened says why in ``error``)."""
    rows = []
    for spec in c.vector_indexes():
        row = {**spec, "source": f"listener {spec['listener']}" if spec.get("listener") else f"field {spec['path']}",
               "input": None, "error": None}
        try:
            index = c.vector_index(spec["name"])
            stats = index.stats()
            row.update({k: stats.get(k) for k in _STATS if k in stats})
            row["input"] = input_kind(c, index)
        except Exception as exc:  # noqa: BLE001 - one broken index must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
    return rows


def input_kind(c, index) -> str | None:
    """What a value to search like is, for an index over a listener: ``"image"`` or ``"text"`` by what the first
    document holding the listener's input key holds there (another kind, or a field index: None)."""
    if not index.spec.listener:
        return None
    from mlwarehouse.collections import listeners
    key = listeners.get(c, index.spec.listener).key
    from mlwarehouse.query.jsonvalues import MISSING, get_path
    for doc in shown.read(c, {key: {"$exists": True}}, projection={key: 1}, limit=1):
        value = get_path(doc, key)
        if value is not MISSING:
            return "image" if shown.kind(value) == "image" else "text" if isinstance(value, str) else None
    return None


def neighbours(c, *, like: Any = None, vector: Any = None, flt: dict | None = None, n: int = 10,
               index: str | None = None) -> dict:
    """The ``n`` documents matching ``flt`` nearest the query, nearest first, read raw, each with ``_score``;
    with ``matched`` (documents matching the filter, None without one), ``complete`` (False when fewer than
    ``n`` match), the plan and the index's name."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_N:
        raise VectorIndexError(f"n must be an integer from 1 to {MAX_N}, not {n!r}")
    vi = c.vector_index(index)
    flt = dict(flt or {})
    query = _query(vi, like, vector)
    (results,) = vi.search(query, n, flt)
    ids = [h.id for h in results.hits]
    scope = {"_id": {"$in": ids}}
    found = {d.get("_id"): d for d in shown.read(c, {"$and": [scope, flt]} if flt else scope, limit=None)} \
        if ids else {}
    docs = []
    for hit in results.hits:
        doc = found.get(hit.id)
        if doc is not None:  # else deleted, or out of the filter, since the index last looked
            docs.append({**doc, "_score": float(hit.score) + 0.0})  # + 0.0: no -0.0
    return {"docs": docs, "matched": results.matched, "complete": results.complete, "plan": results.plan,
            "index": vi.name}


def _query(vi, like: Any, vector: Any):
    """The query vector (a value the listener's model fails on is a VectorIndexError naming the model's error)."""
    return vi.query_vector(like=like, vector=vector)


def read_image(data: bytes):
    """An uploaded image decoded by Pillow (its decompression-bomb limit on), or QueryError."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise QueryError(f"the upload is {len(data)} bytes, over the {MAX_UPLOAD_BYTES} accepted")
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise QueryError(f"the upload is not an image Pillow can read ({type(exc).__name__}: {exc})") from None
    return image


def form_parts(body: bytes, content_type: str) -> dict[str, Any]:
    """The fields of a ``multipart/form-data`` body: text fields as ``str``, files as ``(filename, bytes)``
    (parsed with the standard library's MIME parser, so that no multipart package is needed)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise QueryError(f"expected a multipart/form-data upload, not {content_type or 'no content type'!r}")
    if len(body) > MAX_UPLOAD_BYTES + 65536:
        raise QueryError(f"the upload is over the {MAX_UPLOAD_BYTES} bytes accepted")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise QueryError("the upload is not a readable multipart/form-data body")
    parts: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        parts[name] = (filename, data) if filename is not None else data.decode("utf-8", "replace")
    return parts
