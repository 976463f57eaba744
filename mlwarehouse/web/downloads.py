"""Downloads from the UI: a model's weights and a dataset's arrays as ``.safetensors``, one array or one item field
as ``.npy``, a task's output as text.

Every download is a GET (a read-only UI serves them too), streamed in chunks of :data:`CHUNK` bytes with its
``Content-Length`` known before the first byte (a cut connection is a short file, never a wrong one) and a
``Content-Disposition`` whose file name holds only ``[A-Za-z0-9._-]``; binary files are sent as they are
(``Content-Encoding: identity``: not gzipped, their length stays known). Values are read through the verified path
(:meth:`Project.unpack`, or whole shards checked against their hash), one array at a time, so memory holds at most
one array; a download larger than :data:`MAX_DOWNLOAD_BYTES` is refused before anything is read. Nothing is
unpickled: only array leaves (``npy``, ``tensor``) are served, arrays of Python objects are refused.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from mlwarehouse import schema
from mlwarehouse.errors import CodecError, IntegrityError, NotFound, QueryError, WarehouseError
from mlwarehouse.web.arrays import Leaf, describe, leaves

__all__ = ["router", "safe_filename", "content_disposition", "safetensors_header", "MAX_DOWNLOAD_BYTES", "CHUNK"]

#: the largest download the UI serves (bigger ones: the Python API or ``mlw``)
MAX_DOWNLOAD_BYTES = 8 << 30
#: bytes per streamed chunk
CHUNK = 1 << 20
MODELS, DATASETS, TASKS, SHARDS = (c.name for c in (schema.MODELS, schema.DATASETS, schema.TASKS,
                                                      schema.ITEM_SHARDS))
_ARRAY_CODECS = ("npy", "tensor")
#: numpy dtype kind + item size -> safetensors dtype
_NUMPY_ST = {("b", 1): "BOOL", ("u", 1): "U8", ("i", 1): "I8", ("i", 2): "I16", ("u", 2): "U16", ("i", 4): "I32",
             ("u", 4): "U32", ("i", 8): "I64", ("u", 8): "U64", ("f", 2): "F16", ("f", 4): "F32", ("f", 8): "F64"}
#: torch dtype name -> (safetensors dtype, bytes per element)
_TORCH_ST = {"bool": ("BOOL", 1), "uint8": ("U8", 1), "int8": ("I8", 1), "int16": ("I16", 2), "uint16": ("U16", 2),
             "int32": ("I32", 4), "uint32": ("U32", 4), "int64": ("I64", 8), "uint64": ("U64", 8),
             "float16": ("F16", 2), "bfloat16": ("BF16", 2), "float32": ("F32", 4), "float64": ("F64", 8),
             "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1)}

router = APIRouter()


# -- names and headers ----------------------------------------------------------------------------------------
def safe_filename(*parts: Any, suffix: str) -> str:
    """A file name from ``parts`` (joined by ``-``) with only letters, digits, ``.``, ``_`` and ``-``: no path,
    no quote, no control character can reach the header or the user's disk."""
    stem = "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", str(p)).strip("._-") for p in parts if p not in (None, ""))
    stem = re.sub(r"\.{2,}", ".", re.sub(r"_+", "_", stem)).strip("._-")[:120] or "download"
    return stem + suffix


def content_disposition(filename: str) -> str:
    return f"attachment; filename=\"{filename}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _response(chunks: Iterator[bytes], size: int, filename: str, media_type: str) -> StreamingResponse:
    if size > MAX_DOWNLOAD_BYTES:
        raise QueryError(f"this download would be {size} bytes, more than the UI serves ({MAX_DOWNLOAD_BYTES} "
                         f"bytes); read it with the Python API")
    headers = {"Content-Disposition": content_disposition(filename), "Content-Length": str(size),
               "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if not media_type.startswith("text/"):
        headers["Content-Encoding"] = "identity"  # arrays as they are: the UI's gzip would cost more than it saves
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


def _chunks(data: memoryview) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield bytes(data[start:start + CHUNK])


# -- arrays as bytes ------------------------------------------------------------------------------------------
def _is_tensor(value: Any) -> bool:
    return hasattr(value, "detach") and hasattr(value, "dtype") and not isinstance(value, np.ndarray)


def _as_numpy(value: Any, what: str) -> np.ndarray:
    """An array value as numpy (torch tensors of a dtype numpy has; others are refused, named)."""
    if _is_tensor(value):
        name = str(value.dtype).removeprefix("torch.")
        if name not in _TORCH_ST or name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            raise CodecError(f"{what} is a {name} tensor, which .npy cannot hold: download the .safetensors")
        value = value.detach().cpu().numpy()
    if isinstance(value, (bool, int, float, np.generic)):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise CodecError(f"{what} is a {type(value).__name__}, not an array")
    if value.dtype.hasobject:
        raise CodecError(f"{what} holds Python objects, which are never served (they would need pickle)")
    return value


def _st_raw(value: Any, what: str) -> tuple[str, list[int], memoryview]:
    """(safetensors dtype, shape, little-endian C-order bytes) of an array or tensor."""
    if _is_tensor(value):
        import torch  # a tensor was decoded, so torch is there
        name = str(value.dtype).removeprefix("torch.")
        if name not in _TORCH_ST:
            raise CodecError(f"{what} is a {name} tensor, which safetensors cannot hold")
        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        return _TORCH_ST[name][0], list(t.shape), memoryview(raw).cast("B")
    arr = _as_numpy(value, what)
    code = _NUMPY_ST.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None or arr.dtype.fields is not None:
        raise CodecError(f"{what} has dtype {arr.dtype}, which safetensors cannot hold")
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return code, list(arr.shape), memoryview(arr.reshape(-1).view(np.uint8)).cast("B")


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], fortran: bool = False) -> bytes:
    """The ``.npy`` header of an array (format 1.0, or 2.0 when the header needs it)."""
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran, "shape": tuple(shape)}
    try:
        np.lib.format.write_array_header_1_0(out, header)
    except ValueError:
        out = io.BytesIO()
        np.lib.format.write_array_header_2_0(out, header)
    return out.getvalue()


def safetensors_header(entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str] | None = None) \
        -> bytes:
    """The safetensors prefix (8-byte length + JSON, padded to 8 bytes) for ``(name, dtype, shape, nbytes)``
    entries laid out one after the other in that order."""
    head: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _ref_spec(blobs, ref: dict) -> tuple[str, list[int], int] | None:
    """(safetensors dtype, shape, bytes) from a reference alone, or None when the value must be read to know."""
    if "_blob" not in ref:
        return None
    if ref.get("codec") == "tensor":
        code = _TORCH_ST.get(str(ref.get("dtype")))
        shape = ref.get("shape")
        if code is None or not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            return None
        return code[0], shape, math.prod(shape) * code[1]
    leaf = describe(blobs, Leaf(0, "", ref))
    if leaf.shape is None or leaf.dtype is None:
        return None
    dtype = np.dtype(leaf.dtype)
    code = _NUMPY_ST.get((dtype.kind, dtype.itemsize))
    if code is None or dtype.fields is not None:
        return None
    return code, list(leaf.shape), math.prod(leaf.shape) * dtype.itemsize


def _safetensors(project, named: list[tuple[str, dict]], filename: str, metadata: dict[str, str]) \
        -> StreamingResponse:
    """Stream ``(name, reference)`` pairs as one safetensors file: the header from the references (a value whose
    reference does not say its shape is read first), then each value read, verified and sent in turn."""
    entries, loaded = [], {}
    for i, (name, ref) in enumerate(named):
        spec = _ref_spec(project.blobs, ref)
        if spec is None:
            if int(ref.get("raw") or ref.get("size") or 0) > MAX_DOWNLOAD_BYTES:
                raise QueryError(f"{name} holds more than the UI serves ({MAX_DOWNLOAD_BYTES} bytes)")
            code, shape, raw = _st_raw(project.unpack(ref), name)
            loaded[i] = (code, shape, raw)
            spec = code, shape, len(raw)
        entries.append((name, *spec))
    head = safetensors_header(entries, metadata)

    def body() -> Iterator[bytes]:
        yield head
        for i, (name, ref) in enumerate(named):
            code, shape, raw = loaded.pop(i, None) or _st_raw(project.unpack(ref), name)
            if (code, shape, len(raw)) != tuple(entries[i][1:]):
                raise IntegrityError(f"{name} changed while it was sent ({entries[i][1:]} -> {code} {shape})")
            yield from _chunks(raw)
    return _response(body(), len(head) + sum(e[3] for e in entries), filename, "application/octet-stream")


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}#{n}")
    return out


# -- routes ---------------------------------------------------------------------------------------------------
def _project(request: Request, name: str):
    return request.app.state.warehouse.project(name)


def _doc(project, collection: str, doc_id: str, what: str, projection: dict | None = None) -> dict:
    doc = project.find_one(collection, {"_id": doc_id}, projection=projection)
    if doc is None:
        raise NotFound(f"no {what} {doc_id!r} in project {project.name!r}")
    return doc


def weight_pairs(doc: dict) -> list[tuple[str, dict]]:
    """A model document's stored tensors as ``(name, reference)``: ``layer.weight`` names, unique."""
    weights = doc.get("weights")
    pairs = [w for w in weights if isinstance(w, list) and len(w) == 2 and isinstance(w[1], dict)] \
        if isinstance(weights, list) else []
    names = _unique([".".join(map(str, w[0])) if isinstance(w[0], list) else str(w[0]) for w in pairs])
    return [(name, w[1]) for name, w in zip(names, pairs)]


def leaf_name(leaf: Leaf) -> str:
    """An array's name in a download: its keys in the value joined by dots (``images``, ``0``), or ``value``."""
    return ".".join(map(str, leaf.keys)) or "value"


@router.get("/p/{project:path}/models/{model_id}/weights.safetensors")
def model_weights(request: Request, project: str, model_id: str) -> StreamingResponse:
    """A model's weights as one safetensors file (``safetensors.torch.load_file`` or ``.numpy``), names as in the
    model's state dict; an alias (``mlp@champion``) names its model."""
    p = _project(request, project)
    doc = p.find_one(MODELS, {"_id": model_id}, projection={"name": 1, "weights": 1, "kind": 1})
    if doc is None and "@" in model_id:
        from mlwarehouse.models.aliases import Aliases
        held = Aliases(p).resolve(model_id)
        doc = p.find_one(MODELS, {"_id": held}, projection={"name": 1, "weights": 1, "kind": 1}) if held else None
    if doc is None:
        raise NotFound(f"no model {model_id!r} in project {p.name!r}")
    pairs = weight_pairs(doc)
    if not pairs:
        raise NotFound(f"model {doc['_id']!r} stores no weights (its value is one object: load it with the API)")
    return _safetensors(p, pairs, safe_filename(doc.get("name"), doc["_id"], suffix=".safetensors"),
                        {"model": str(doc["_id"]), "name": str(doc.get("name"))})


def _dataset_leaves(p, dataset_id: str) -> tuple[dict, list[Leaf]]:
    doc = _doc(p, DATASETS, dataset_id, "dataset", projection={"name": 1, "version": 1, "value": 1, "kind": 1})
    return doc, [leaf for leaf in leaves(doc.get("value")) if leaf.codec in _ARRAY_CODECS]


@router.get("/p/{project:path}/datasets/{dataset_id}/arrays.safetensors")
def dataset_arrays(request: Request, project: str, dataset_id: str) -> StreamingResponse:
    """Every array of a dataset's value in one safetensors file, named by their keys (``0``, ``1`` for a tuple
    ``(X, y)``; ``images``, ``labels`` for a dict)."""
    p = _project(request, project)
    doc, found = _dataset_leaves(p, dataset_id)
    if not found:
        raise NotFound(f"dataset {dataset_id!r} stores no arrays as blobs")
    names = _unique([leaf_name(leaf) for leaf in found])
    return _safetensors(p, [(n, leaf.ref) for n, leaf in zip(names, found)],
                        safe_filename(doc.get("name"), f"v{doc.get('version')}", suffix=".safetensors"),
                        {"dataset": str(doc["_id"]), "name": str(doc.get("name")), "version": str(doc.get("version"))})


@router.get("/p/{project:path}/datasets/{dataset_id}/arrays/{leaf}.npy")
def dataset_array(request: Request, project: str, dataset_id: str, leaf: int) -> StreamingResponse:
    """Array ``leaf`` (its ``#`` on the dataset page) as a ``.npy`` file (``np.load(..., allow_pickle=False)``)."""
    p = _project(request, project)
    doc, found = _dataset_leaves(p, dataset_id)
    chosen = next((x for x in found if x.index == leaf), None)
    if chosen is None:
        raise NotFound(f"dataset {dataset_id!r} has no array {leaf}")
    if chosen.nbytes > MAX_DOWNLOAD_BYTES:
        raise QueryError(f"{chosen.path} holds {chosen.nbytes} bytes, more than the UI serves "
                         f"({MAX_DOWNLOAD_BYTES} bytes); read it with the Python API")
    arr = _as_numpy(p.unpack(chosen.ref), chosen.path)
    fortran = bool(arr.flags.f_contiguous and not arr.flags.c_contiguous and arr.ndim > 1)
    if not (arr.flags.c_contiguous or fortran):
        arr = np.ascontiguousarray(arr)
    head = _npy_header(arr.dtype, arr.shape, fortran)
    data = memoryview((arr.T if fortran else arr).reshape(-1).view(np.uint8))  # memory order, any byte order
    filename = safe_filename(doc.get("name"), f"v{doc.get('version')}", leaf_name(chosen), suffix=".npy")

    def body() -> Iterator[bytes]:
        yield head
        yield from _chunks(data)
    return _response(body(), len(head) + len(data), filename, "application/octet-stream")


@router.get("/p/{project:path}/datasets/{dataset_id}/fields/{field}.npy")
def item_field(request: Request, project: str, dataset_id: str, field: str) -> StreamingResponse:
    """One array field of an item dataset (the same shape and dtype in every item) as one ``(N, ...)`` ``.npy``,
    items in the order they were appended; read shard by shard (each verified whole), so memory holds one."""
    from mlwarehouse.datasets.shardmemory import DecodedShards
    from mlwarehouse.datasets.stream import ShardReader
    p = _project(request, project)
    doc = _doc(p, DATASETS, dataset_id, "dataset", projection={"name": 1, "version": 1, "kind": 1, "fields": 1})
    if doc.get("kind") != "items" or field not in (doc.get("fields") or {}):
        raise NotFound(f"dataset {dataset_id!r} has no item field {field!r}")
    shards = p.find(SHARDS, {"dataset": doc["name"], "version": doc["version"]}, sort=[("_id", 1)],
                    projection={"shard": 1, "count": 1, "rows": 1})
    reader = ShardReader(p.blobs, memory=DecodedShards(0))  # one shard at a time, not kept
    headers = [reader.header(d["shard"]).fields for d in shards]
    specs = {(f[field].spec.kind, f[field].spec.dtype, f[field].spec.shape) if field in f else ("missing",)
             for f in headers}
    if len(specs) != 1 or next(iter(specs))[0] != "array" or next(iter(specs))[2] is None:
        raise QueryError(f"field {field!r} is not one array of a fixed shape and dtype in every item "
                         f"({sorted(map(str, specs)) or 'no shard has it'}): it cannot be one .npy")
    _, dtype, shape = next(iter(specs))
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise CodecError(f"field {field!r} holds Python objects, which are never served")
    rows = [d["rows"] if isinstance(d.get("rows"), list) else None for d in shards]
    count = sum(len(r) if r is not None else int(d["count"]) for r, d in zip(rows, shards))
    head = _npy_header(dtype, (count, *shape))
    size = len(head) + count * math.prod(shape) * dtype.itemsize

    def body() -> Iterator[bytes]:
        yield head
        for d, subset in zip(shards, rows):
            column = reader.shard(d["shard"], [field]).column(field)
            part = np.ascontiguousarray(column if subset is None else column[np.asarray(subset, np.int64)])
            if part.dtype != dtype or part.shape[1:] != tuple(shape):
                raise IntegrityError(f"shard {d['shard'][:12]} holds {field!r} as {part.dtype} {part.shape[1:]}")
            yield from _chunks(memoryview(part.reshape(-1).view(np.uint8)).cast("B"))
    return _response(body(), size, safe_filename(doc.get("name"), f"v{doc.get('version')}", field, suffix=".npy"),
                     "application/octet-stream")


@router.get("/p/{project:path}/tasks/{task_id}/output.txt")
def task_output(request: Request, project: str, task_id: str) -> StreamingResponse:
    """A task's captured output (stdout and stderr as the worker stored them), as UTF-8 text."""
    p = _project(request, project)
    doc = _doc(p, TASKS, task_id, "task", projection={"task_name": 1, "output": 1, "output_blob": 1})
    if isinstance(doc.get("output_blob"), dict):
        try:
            value = p.unpack(doc["output_blob"])
        except (WarehouseError, TypeError, ValueError) as exc:
            raise IntegrityError(f"the stored output of task {task_id!r} cannot be read: {exc}") from exc
        data = value.encode() if isinstance(value, str) else bytes(value)
    else:
        output = doc.get("output")
        data = (output if isinstance(output, str) else "" if output is None else str(output)).encode()
    return _response(_chunks(memoryview(data)), len(data), safe_filename(doc.get("task_name"), doc["_id"],
                                                                        "output", suffix=".txt"),
                     "text/plain; charset=utf-8")
