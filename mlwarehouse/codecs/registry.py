"""Leaf codecs: one value <-> bytes plus a small JSON-able meta dict, with a registry and compression.

A codec is chosen by :func:`encode_leaf` (highest priority first, among codecs whose type or predicate matches;
a codec that raises :class:`CodecError` passes the value on to the next one) and found again by the name that
the meta records (``meta["codec"]``). Built-ins, by priority:

- ``tensor``       torch.Tensor (dense): raw bytes + dtype + shape, so bfloat16 and float8 survive
- ``safetensors``  a dict of numpy arrays or of torch tensors, as one safetensors file (state dicts)
- ``npy``          numpy arrays and scalars, through ``numpy.lib.format`` without pickle
- ``bytes``        bytes, bytearray, memoryview
- ``json``         JSON values (chosen explicitly by :mod:`mlwarehouse.codecs.values` for large ones)
- ``pickle``       anything else, only with ``allow_pickle=True`` (to encode and to decode)

Payloads of 4 KiB or more are compressed with zstandard (level 1) when that saves at least 10%
(:mod:`mlwarehouse.codecs.compression`); the meta then holds ``"z": "zstd"`` and ``"raw"`` (the size before
compression). A payload over 256 KiB is probed first (three slices of a sixteenth of it, at most 256 KiB each):
trained float weights almost never shrink by 10%, and a full attempt at them costs more than writing them. Large
contiguous arrays are compressed from their own memory, without an ``.npy`` copy (:func:`encode_npy_compressed`);
they are decompressed as they are read by :mod:`mlwarehouse.codecs.streaming`. torch stays optional: it is imported
only when a tensor is met, or when a ``tensor`` blob is decoded.
"""

from __future__ import annotations

import functools
import io
import json
import math
import pickle
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlwarehouse.codecs.compression import (  # noqa: F401 (re-exported: the names codecs have always had here)
    COMPRESS_LEVEL,
    COMPRESS_MIN,
    COMPRESS_MIN_SAVING,
    _zstd,
    compress,
    decompress,
    decompress_into,
    max_decompressed,
    worth_compressing,
)
from mlwarehouse.errors import CodecError, PickleNotAllowed

__all__ = [
    "Codec", "register_codec", "unregister_codec", "get_codec", "codec_names",
    "encode_leaf", "decode_leaf", "compress", "decompress",
]

Buffer = bytes | bytearray | memoryview
#: meta keys that belong to the framework (and, in blob references, ``_blob`` and ``size``)
RESERVED_META = frozenset({"codec", "z", "raw", "_blob", "size"})


@dataclass(frozen=True)
class Codec:
    """A registered codec. ``unsafe`` codecs (pickle and the like) run only with ``allow_pickle=True``."""

    name: str
    matches: Callable[[Any], bool]
    encode: Callable[[Any], Any]   # value -> bytes-like, or (bytes-like, meta dict)
    decode: Callable[[memoryview, dict], Any]
    priority: int = 100
    unsafe: bool = False


_lock = threading.Lock()
_registry: dict[str, Codec] = {}
_ordered: tuple[Codec, ...] = ()  # by priority, highest first; among equals the latest registered first


def register_codec(name: str, type_or_predicate: type | tuple[type, ...] | Callable[[Any], bool],
                   encode: Callable[[Any], Any], decode: Callable[[memoryview, dict], Any], *,
                   priority: int = 100, unsafe: bool = False, replace: bool = False) -> Codec:
    """Register a codec for a type (or tuple of types) or for values where ``predicate(value)`` is true.

    ``encode(value)`` returns bytes-like or ``(bytes-like, meta)`` with a JSON-able meta dict; ``decode(data,
    meta)`` gets a memoryview and that meta back. The default priority (100) puts user codecs before every
    built-in. Re-registering a name raises unless ``replace=True``.
    """
    if not isinstance(name, str) or not name or not name.isprintable():
        raise CodecError(f"codec name must be a non-empty printable string, not {name!r}")
    if isinstance(type_or_predicate, type) or (
            isinstance(type_or_predicate, tuple) and all(isinstance(t, type) for t in type_or_predicate)):
        types = type_or_predicate
        matches = lambda value: isinstance(value, types)  # noqa: E731
    elif callable(type_or_predicate):
        matches = type_or_predicate
    else:
        raise CodecError(f"codec {name!r}: expected a type, a tuple of types or a predicate, "
                         f"not {type_or_predicate!r}")
    codec = Codec(name, matches, encode, decode, priority, unsafe)
    with _lock:
        if name in _registry and not replace:
            raise CodecError(f"a codec named {name!r} is already registered (pass replace=True to replace it)")
        _registry[name] = codec
        _reorder()
    return codec


def unregister_codec(name: str) -> None:
    """Remove a codec; CodecError if there is none by that name."""
    with _lock:
        if _registry.pop(name, None) is None:
            raise CodecError(f"no codec named {name!r} is registered")
        _reorder()


def _reorder() -> None:
    global _ordered
    order = {name: i for i, name in enumerate(_registry)}
    _ordered = tuple(sorted(_registry.values(), key=lambda c: (-c.priority, -order[c.name])))


def get_codec(name: str) -> Codec:
    """The codec registered under ``name``; CodecError if unknown."""
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}: register it with mlwarehouse.codecs.register_codec "
                         f"before decoding") from None


def codec_names() -> list[str]:
    """Registered codec names, in the order :func:`encode_leaf` tries them."""
    return [c.name for c in _ordered]


def _type_name(value: Any) -> str:
    t = type(value)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    if isinstance(value, np.ndarray):
        name += f" (dtype {value.dtype})"
    return name


def encode_leaf(value: Any, *, allow_pickle: bool = False, codec: str | None = None,
                compress_payload: bool = True) -> tuple[Buffer, dict]:
    """Encode one value to ``(payload, meta)``; ``meta["codec"]`` names the codec used.

    ``codec`` forces a codec by name instead of choosing one. The payload is bytes-like (bytes, bytearray or
    memoryview) and is what a blob store stores; meta is small and JSON-able, for the blob reference.
    """
    if codec is not None:
        candidates = [get_codec(codec)]
    else:
        candidates = [c for c in _ordered if c.matches(value)]
    refused: Codec | None = None
    error: CodecError | None = None
    for candidate in candidates:
        if candidate.unsafe and not allow_pickle:
            refused = refused or candidate
            continue
        if candidate.encode is _npy_encode and compress_payload:
            streamed = encode_npy_compressed(value)  # large arrays: compressed from their own memory, no copy
            if streamed is not None and streamed[0] is not None:
                return streamed[0], {"codec": "npy", **streamed[1]}
            compress_payload = streamed is None  # tried already: zstd does not pay
        try:
            out = candidate.encode(value)
        except PickleNotAllowed:
            raise
        except CodecError as exc:
            error = error or exc
            continue
        except Exception as exc:
            if codec is not None or candidate.name not in _BUILTIN:
                raise CodecError(f"codec {candidate.name!r} failed to encode {_type_name(value)}: {exc}") from exc
            error = error or CodecError(f"codec {candidate.name!r} cannot encode {_type_name(value)}: {exc}")
            continue
        data, meta = out if isinstance(out, tuple) else (out, {})
        if not isinstance(meta, dict) or RESERVED_META & meta.keys():
            raise CodecError(f"codec {candidate.name!r} returned a bad meta {meta!r}: it must be a dict that "
                             f"does not use the reserved keys {sorted(RESERVED_META)}")
        meta = {"codec": candidate.name, **meta}
        if compress_payload:
            data, zmeta = compress(data)
            meta.update(zmeta)
        return data, meta
    if refused is not None:
        raise PickleNotAllowed(f"{_type_name(value)} needs the {refused.name!r} codec, which can run code when "
                               f"loading: pass allow_pickle=True (trusted data only) or register a codec for it")
    if error is not None:
        raise error
    raise CodecError(f"no codec can encode {_type_name(value)}")


def decode_leaf(data: Buffer, meta: dict, *, allow_pickle: bool = False, writable: bool = False) -> Any:
    """Decode a payload written by :func:`encode_leaf` with its meta.

    numpy arrays are zero-copy views over ``data`` and read-only unless ``writable=True`` (which copies only when
    the buffer itself is read-only, e.g. ``bytes``).
    """
    if not isinstance(meta, dict):
        raise CodecError(f"blob meta must be a dict, not {type(meta).__name__}")
    codec = get_codec(meta.get("codec"))
    if codec.unsafe and not allow_pickle:
        raise PickleNotAllowed(f"this blob was stored with the {codec.name!r} codec"
                               f"{' (type ' + meta['type'] + ')' if isinstance(meta.get('type'), str) else ''}, "
                               f"which can run code when loading: pass allow_pickle=True for trusted data only")
    view = memoryview(decompress(data, meta) if meta.get("z") else data).cast("B")
    params = {**meta, "_writable": writable} if codec.name in _BUILTIN else meta
    try:
        return codec.decode(view, params)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"codec {codec.name!r} cannot decode this payload ({len(view)} bytes): {exc}") from exc


# -- built-in codecs -----------------------------------------------------------------------------------------

def _torch():
    import torch  # noqa: PLC0415 (optional dependency, imported only when needed)
    return torch


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _finish_array(arr: np.ndarray, meta: dict) -> np.ndarray:
    if meta.get("_writable"):
        return arr if arr.flags.writeable else arr.copy()
    arr.flags.writeable = False
    return arr


def _npy_matches(value: Any) -> bool:
    """Plain arrays only: a subclass (masked array, matrix) would lose what makes it one."""
    return (type(value) is np.ndarray or isinstance(value, np.generic)) and not value.dtype.hasobject


def npy_header_of(value: np.ndarray) -> tuple[bytes, bool]:
    """The ``.npy`` header of an array (format 1.0, or 2.0 past 64 KiB) and whether its data is in Fortran order."""
    fmt = np.lib.format
    header_data = fmt.header_data_from_array_1_0(value)
    head = io.BytesIO()
    try:
        fmt.write_array_header_1_0(head, header_data)
    except ValueError:  # header over 64 KiB (huge structured dtypes)
        head = io.BytesIO()
        fmt.write_array_header_2_0(head, header_data)
    return head.getvalue(), bool(header_data["fortran_order"])


def _npy_encode(value: Any) -> tuple[Buffer, dict]:
    meta = {}
    if isinstance(value, np.generic):
        value, meta = np.asarray(value), {"scalar": True}
    header, fortran = npy_header_of(value)
    out = bytearray(len(header) + value.nbytes)
    out[:len(header)] = header
    if value.nbytes:
        np.ndarray(value.shape, value.dtype, buffer=out, offset=len(header), order="F" if fortran else "C")[...] = value
    return out, meta


#: arrays from this size on are compressed from their own memory (:func:`encode_npy_compressed`)
STREAM_FROM = 4 << 20
_CHUNK = 1 << 20


def encode_npy_compressed(value: Any) -> tuple[Any, dict] | None:
    """``(compressed payload, meta)`` of a large contiguous array, compressed from its own memory: the ``.npy``
    header, then the array's memory a chunk at a time, through one streaming compressor (the frame records the
    content size), so nothing but the compressed output is held beside the array. ``(None, {})`` when zstd does
    not save :data:`COMPRESS_MIN_SAVING` on it (the caller stores the ``.npy`` bytes uncompressed); None when it
    is not such an array (the caller encodes it the ordinary way)."""
    if type(value) is not np.ndarray or value.nbytes < STREAM_FROM or value.dtype.hasobject:
        return None
    if not (value.flags.c_contiguous or value.flags.f_contiguous):
        return None
    header, fortran = npy_header_of(value)
    data = memoryview((value.T if fortran else value).reshape(-1).view(np.uint8)).cast("B")
    size = len(header) + len(data)
    cctx = _zstd()[0]
    if not worth_compressing(cctx, data):
        return None, {}
    out = bytearray()
    cobj = cctx.compressobj(size=size)
    out += cobj.compress(header)
    limit = (1 - COMPRESS_MIN_SAVING) * size
    for start in range(0, len(data), _CHUNK):
        out += cobj.compress(data[start:start + _CHUNK])
        if len(out) > limit:  # the probe was wrong about the rest: stop holding output that will not be used
            return None, {}
    out += cobj.flush()
    if len(out) > limit:
        return None, {}
    return out, {"z": "zstd", "raw": size}


@functools.lru_cache(maxsize=256)
def _npy_header(head: bytes) -> tuple:
    """(shape, fortran order, dtype) of an .npy header, parsed once per distinct header: many small arrays of one
    shape (embeddings, items) share it, and numpy's parser (a ``literal_eval``) costs more than the copy."""
    fmt = np.lib.format
    stream = io.BytesIO(head)
    version = fmt.read_magic(stream)
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    return reader(stream, max_header_size=max(10000, len(head)))


def npy_header_length(start: bytes | memoryview) -> int:
    """The length of the ``.npy`` header that ``start`` (its first 10 bytes, 12 past format 1.0) begins."""
    if len(start) < 10 or bytes(start[:6]) != np.lib.format.MAGIC_PREFIX or (start[6] != 1 and len(start) < 12):
        raise CodecError("not an .npy payload (bad magic)")
    if start[6] == 1:
        return int.from_bytes(start[8:10], "little") + 10
    return int.from_bytes(start[8:12], "little") + 12


def npy_layout(head: bytes) -> tuple:
    """(shape, fortran order, dtype) of a whole ``.npy`` header; CodecError for a malformed one or Python objects."""
    try:
        shape, fortran, dtype = _npy_header(head)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise CodecError(f"not an .npy payload: {exc}") from None
    if dtype.hasobject:
        raise CodecError("this .npy payload holds Python objects, which the npy codec never unpickles")
    return shape, fortran, dtype


def _npy_decode(data: memoryview, meta: dict) -> Any:
    hlen = npy_header_length(data[:12])
    shape, fortran, dtype = npy_layout(bytes(data[:hlen]))
    count = math.prod(shape)
    if len(data) - hlen != count * dtype.itemsize:
        raise CodecError(f".npy payload holds {len(data) - hlen} data bytes, expected {count * dtype.itemsize} "
                         f"for shape {shape} and dtype {dtype}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=hlen) if count else np.empty(0, dtype)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    if meta.get("scalar"):
        return arr[()]
    return _finish_array(arr, meta)


def _tensor_matches(value: Any) -> bool:
    return _is_tensor(value) and value.layout == _torch().strided


def _tensor_encode(value: Any) -> tuple[Buffer, dict]:
    t = value.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    raw = t.reshape(-1).view(_torch().uint8).numpy() if t.numel() else np.empty(0, np.uint8)
    meta = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if value.requires_grad:
        meta["grad"] = True
    return memoryview(raw), meta


def _tensor_decode(data: memoryview, meta: dict) -> Any:
    torch = _torch()
    dtype = getattr(torch, str(meta.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise CodecError(f"unknown torch dtype {meta.get('dtype')!r}")
    shape = meta.get("shape")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise CodecError(f"tensor meta has a bad shape {str(shape)[:60]}")
    shape = tuple(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize != len(data):  # checked before anything is allocated for the claimed shape
        raise CodecError(f"tensor payload holds {len(data)} bytes, its shape {list(shape)} of {meta['dtype']} "
                         f"needs {math.prod(shape) * itemsize}")
    if len(data) == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        # a writable buffer (one the blob store read for us) becomes the tensor's memory as it is; a read-only one
        # is copied once, since torch has no read-only tensors
        buf = data if not data.readonly else bytearray(data)
        t = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
    if meta.get("grad"):
        t.requires_grad_(True)
    return t


_SAFETENSORS_NUMPY = {np.dtype(t) for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                             "uint32", "uint64", "float16", "float32", "float64")}


def _safetensors_kind(value: Any) -> str | None:
    if not isinstance(value, dict) or not value:
        return None
    if not all(isinstance(k, str) for k in value):
        return None
    items = list(value.values())
    if all(isinstance(v, np.ndarray) and v.dtype in _SAFETENSORS_NUMPY and v.dtype.isnative for v in items):
        return "numpy"
    if all(_is_tensor(v) for v in items):
        return "torch"
    return None


def _safetensors_encode(value: dict) -> tuple[Buffer, dict]:
    kind = _safetensors_kind(value)
    order = {"mlw_order": json.dumps(list(value))}
    if kind == "numpy":
        from safetensors.numpy import save  # noqa: PLC0415
        arrays = {k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in value.items()}
        return save(arrays, metadata=order), {"kind": kind}
    if kind != "torch":
        raise CodecError("safetensors needs a non-empty dict of str -> numpy arrays (or -> torch tensors)")
    from safetensors.torch import save  # noqa: PLC0415
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in value.items()}
    if any(t.layout != _torch().strided for t in tensors.values()):
        raise CodecError("safetensors cannot hold sparse tensors")
    try:
        return save(tensors, metadata=order), {"kind": kind}
    except RuntimeError:  # tensors sharing memory (tied weights): store each one on its own
        return save({k: t.clone() for k, t in tensors.items()}, metadata=order), {"kind": kind}


def _safetensors_decode(data: memoryview, meta: dict) -> dict:
    raw = bytes(data)
    hlen = int.from_bytes(raw[:8], "little")
    order = json.loads(raw[8:8 + hlen]).get("__metadata__", {}).get("mlw_order")
    if meta.get("kind") == "torch":
        from safetensors.torch import load  # noqa: PLC0415
    else:
        from safetensors.numpy import load  # noqa: PLC0415
    loaded = load(raw)
    return {k: loaded[k] for k in json.loads(order)} if order else loaded


def _bytes_encode(value: Any) -> tuple[Buffer, dict]:
    if isinstance(value, memoryview):
        return value.cast("B") if value.c_contiguous else value.tobytes(), {}
    return value, ({"type": "bytearray"} if isinstance(value, bytearray) else {})


def _bytes_decode(data: memoryview, meta: dict) -> bytes | bytearray:
    return bytearray(data) if meta.get("type") == "bytearray" else bytes(data)


def _json_encode(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as exc:
        raise CodecError(f"not a JSON value: {exc}") from exc


def _json_decode(data: memoryview, meta: dict) -> Any:
    return json.loads(bytes(data))


def _pickle_encode(value: Any) -> tuple[Buffer, dict]:
    t = type(value)
    try:
        return pickle.dumps(value, protocol=5), {"type": f"{t.__module__}.{t.__qualname__}"}
    except Exception as exc:
        raise CodecError(f"cannot pickle {_type_name(value)}: {exc}") from exc


def _pickle_decode(data: memoryview, meta: dict) -> Any:
    return pickle.loads(data)


_BUILTIN = ("tensor", "safetensors", "npy", "bytes", "json", "pickle")
register_codec("pickle", lambda v: True, _pickle_encode, _pickle_decode, priority=-1000, unsafe=True)
register_codec("json", (dict, list, str, int, float, bool, type(None)), _json_encode, _json_decode, priority=10)
register_codec("bytes", (bytes, bytearray, memoryview), _bytes_encode, _bytes_decode, priority=20)
register_codec("npy", _npy_matches, _npy_encode, _npy_decode, priority=30)
register_codec("safetensors", lambda v: _safetensors_kind(v) is not None, _safetensors_encode,
               _safetensors_decode, priority=40)
register_codec("tensor", _tensor_matches, _tensor_encode, _tensor_decode, priority=50)
