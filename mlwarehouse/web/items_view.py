"""An item dataset's page: one page of its items (a filter on their scalar fields, skip and limit), each with its
fields; image fields (uint8 or numeric arrays H x W[ x C], or encoded image bytes) as PNG thumbnails captioned
with the item's label.

Scalar fields come from the items' index documents; array and bytes fields are read by range and verified, only
for the items shown. Encoded images are decoded by Pillow within bounds (:data:`MAX_IMAGE_BYTES`,
:data:`MAX_IMAGE_PIXELS`) and re-encoded as PNG, so the page never embeds stored bytes as they are. An item that
cannot be read shows why in its row; the other rows are shown.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from mlwarehouse.errors import QueryError, WarehouseError
from mlwarehouse.web.arrays import LABEL_NAMES, item_image, label_text, png_data_uri

__all__ = ["item_page", "field_columns", "label_field", "thumbnail", "ITEMS_PER_PAGE", "MAX_ITEMS_PER_PAGE",
           "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS"]

ITEMS_PER_PAGE = 48
MAX_ITEMS_PER_PAGE = 500
#: thumbnails are at most this many pixels on their longer side (smaller images are scaled up by whole factors)
THUMB = 96
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 64 << 20
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def field_columns(doc: dict) -> list[dict]:
    """The fields of an item dataset as the page lists them: name, kind, dtype, shape, and whether one ``.npy``
    can hold it (an array of one shape in every item)."""
    out = []
    for name, spec in (doc.get("fields") or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        dtype = spec.get("dtype")
        try:
            dtype = str(np.dtype(dtype)) if dtype else None
        except TypeError:
            pass
        shape = spec.get("shape")
        out.append({"name": str(name), "kind": spec.get("kind"), "dtype": dtype,
                    "shape": list(shape) if isinstance(shape, list) else None,
                    "downloadable": spec.get("kind") == "array" and isinstance(shape, list)})
    return out


def label_field(doc: dict) -> str | None:
    """The scalar field that labels items (``label``, ``class``, ``target``, ``y``...), if there is one."""
    fields = doc.get("fields") or {}
    for wanted in LABEL_NAMES:
        for name, spec in fields.items():
            if str(name).lower() == wanted and isinstance(spec, dict) and spec.get("kind") == "scalar":
                return name
    return None


def item_page(project, doc: dict, flt: dict | None, skip: int = 0, limit: int = ITEMS_PER_PAGE) -> dict:
    """Items ``skip`` to ``skip + limit`` of the version ``doc`` that match ``flt``, in the order they were
    appended: ``{"columns", "rows", "total", "skip", "limit", "label"}``; each row has ``id``, ``index`` (its
    position among the matching items), ``label`` and one cell per field (``kind`` image, value or error)."""
    from mlwarehouse.datasets.items import ItemDataset, ItemDatasets
    if type(skip) is not int or skip < 0:
        raise QueryError(f"skip must be an integer >= 0, not {skip!r}")
    if type(limit) is not int or not 1 <= limit <= MAX_ITEMS_PER_PAGE:
        raise QueryError(f"limit must be between 1 and {MAX_ITEMS_PER_PAGE}, not {limit!r}")
    ds = ItemDataset(doc, ItemDatasets(project))
    columns = field_columns(doc)
    data_fields = [c["name"] for c in columns if c["kind"] in ("array", "bytes")]
    labelled = label_field(doc)
    classes = doc.get("classes") if isinstance(doc.get("classes"), list) else None
    total = ds.count(flt)
    records = ds.find(flt, sort=[("_id", 1)], skip=skip, limit=limit) if skip < total else []
    reader = ds.reader()
    rows = []
    for i, record in enumerate(records):
        item = record.doc
        label = label_text(item.get(labelled), classes) if labelled else ""
        try:
            values = reader.item(item["shard"], item["row"], data_fields) if data_fields else {}
            problem = None
        except (WarehouseError, KeyError, TypeError, ValueError) as exc:
            values, problem = {}, f"cannot be read: {type(exc).__name__}: {exc}"
        cells = []
        for column in columns:
            name = column["name"]
            if column["kind"] in ("array", "bytes"):
                cells.append({"kind": "error", "text": problem} if problem else _data_cell(values.get(name)))
            else:
                value = item.get(name)
                cells.append({"kind": "value", "text": label_text(value, classes if name == labelled else None)
                              if not isinstance(value, (list, dict)) else _short(value)})
        rows.append({"id": item["_id"], "index": skip + i, "label": label, "cells": cells})
    return {"columns": columns, "rows": rows, "total": total, "skip": skip, "limit": limit, "label": labelled}


def _data_cell(value: Any) -> dict:
    """How one array or bytes value shows: a thumbnail if it is an image, else its shape and first values."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        src = thumbnail(bytes(value))
        if src is not None:
            return {"kind": "image", "src": src, "text": f"{len(value)} bytes"}
        return {"kind": "value", "text": f"{len(value)} bytes"}
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        image = item_image(value)
        shape = " × ".join(map(str, value.shape))
        if image is not None:
            return {"kind": "image", "src": png_data_uri(_shrink(image)), "text": f"{shape} {value.dtype}"}
        text = np.array2string(value, threshold=8, edgeitems=2, precision=4, max_line_width=80)
        return {"kind": "value", "text": f"{shape} {value.dtype}: {_clip(text)}" if value.ndim else _clip(text)}
    return {"kind": "value", "text": _short(value)}


def _shrink(image: np.ndarray) -> np.ndarray:
    """An image no larger than twice :data:`THUMB` on its longer side (Pillow's area filter), else as it is."""
    if max(image.shape[:2]) <= 2 * THUMB:
        return image
    from PIL import Image
    picture = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    picture.thumbnail((2 * THUMB, 2 * THUMB), Image.Resampling.BOX)
    return np.asarray(picture)


def thumbnail(data: bytes) -> str | None:
    """An encoded image (PNG, JPEG, GIF, BMP, TIFF, WebP) as a PNG data URI at most ``2 * THUMB`` pixels on its
    longer side, or None if it is not one of those, too large or does not decode."""
    if len(data) > MAX_IMAGE_BYTES or not (data.startswith(_IMAGE_MAGIC) or
                                           (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        return None
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as picture:
            width, height = picture.size
            if width * height > MAX_IMAGE_PIXELS:
                return None
            picture.draft("RGB", (2 * THUMB, 2 * THUMB))  # JPEG: decode at a reduced size
            picture.thumbnail((2 * THUMB, 2 * THUMB))
            if picture.mode not in ("L", "RGB", "RGBA"):
                picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
            out = io.BytesIO()
            picture.save(out, format="PNG")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, EOFError):
        return None
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _short(value: Any) -> str:
    import json
    try:
        return _clip(json.dumps(value, ensure_ascii=False, default=str))
    except (TypeError, ValueError):
        return _clip(repr(value))
