"""Users' documents for display (``mlw find`` and the collection pages): values summarised, never trusted.

Documents are read with ``raw=True``, so a user type is never decoded (its decoder's module is not imported: it
shows as ``Encoded(datatype, n bytes)``), and a leaf that cannot be read (a pickle, a corrupt image) becomes an
:class:`Unreadable` in place of failing its document. Arrays and tensors are summarised by shape and dtype,
images by size and mode, audio by rate and length, bytes by length. Thumbnails are at most
:data:`THUMBNAIL_PX` pixels (Pillow's decompression-bomb limit stays on) and WAV files at most :data:`MAX_WAV_BYTES`.
"""

from __future__ import annotations

import io
import json
import math
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlwarehouse.codecs.datatypes import Audio, Encoded
from mlwarehouse.errors import QueryError

__all__ = ["Unreadable", "collections", "read", "summary", "describe", "kind", "flatten", "cell_text", "thumbnail_png",
           "wav_bytes", "THUMBNAIL_PX", "MAX_WAV_BYTES"]

#: the largest side of a thumbnail
THUMBNAIL_PX = 128
#: the largest WAV file served (16-bit samples)
MAX_WAV_BYTES = 64 << 20
_TEXT = 80


@dataclass(frozen=True)
class Unreadable:
    """A stored value this process cannot (or may not) decode, with the reason."""
    codec: str
    error: str

    def __repr__(self) -> str:
        return f"Unreadable({self.codec!r}: {self.error})"


def _decoder(collection):
    base = collection.codecs.decoder(raw=True)

    def decode(data: Any, meta: dict) -> Any:
        try:
            return base(data, meta)
        except Exception as exc:  # noqa: BLE001 - whatever a crafted leaf makes a codec raise, shown in its place
            return Unreadable(str(meta.get("codec")), f"{type(exc).__name__}: {str(exc)[:300]}")
    return decode


def read(collection, flt: Mapping | None = None, *, projection: Mapping | None = None, sort=None,
         limit: int | None = 20, skip: int = 0) -> list[dict]:
    """Matching documents decoded with ``raw=True`` (hidden fields left out unless projected); a document that
    cannot be read at all is ``{"_id": ..., "_error": message}``."""
    from mlwarehouse.collections.documents import strip
    cursor = collection.find(flt, projection, sort=sort, limit=limit, skip=skip, raw=True)  # validates both
    projection = cursor._projection
    if projection and any(projection.values()):
        projection = {**projection, "_id": projection.get("_id", 1)}
    decode = _decoder(collection)
    docs = []
    for tree in collection.table.find(dict(flt or {}), sort=sort or [("_id", 1)], limit=limit, skip=skip,
                                      projection=projection):
        try:
            docs.append(strip(collection.project.unpack(tree, decode=decode), projection))
        except Exception as exc:  # noqa: BLE001 - a missing blob, a corrupt tree: the page still opens
            docs.append({"_id": tree.get("_id"), "_error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    return docs


def collections(p) -> list[dict]:
    """Each collection of project ``p`` with its document count and listeners (name, key, compute, progress)."""
    rows = []
    for name in p.catalog.names():
        c = p.collection(name)
        listeners = [{"name": x.name, "key": x.key, "compute": x.compute, "where": x.where,
                      "progress": c.progress(x.name)} for x in c.listeners()]
        rows.append({"collection": name, "documents": c.count_documents(), "listeners": listeners})
    return rows


def _is_tensor(value: Any) -> bool:
    import sys
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _is_image(value: Any) -> bool:
    import sys
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


def describe(value: Any) -> dict | None:
    """What a special value is, as JSON (None for plain JSON values and containers)."""
    if isinstance(value, np.ndarray):
        return {"array": {"shape": list(value.shape), "dtype": str(value.dtype)}}
    if _is_tensor(value):
        return {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}}
    if _is_image(value):
        return {"image": {"width": value.width, "height": value.height, "mode": value.mode,
                          "format": value.format}}
    if isinstance(value, Audio):
        samples = value.samples
        return {"audio": {"sample_rate": value.sample_rate, "frames": int(samples.shape[0]),
                          "channels": 1 if samples.ndim == 1 else int(samples.shape[1]),
                          "seconds": round(value.seconds, 3), "dtype": str(samples.dtype)}}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": len(value)}
    if isinstance(value, Encoded):
        return {"encoded": {"datatype": value.datatype, "bytes": len(value.data)}}
    if isinstance(value, Unreadable):
        return {"unreadable": {"codec": value.codec, "error": value.error}}
    if isinstance(value, np.generic):
        return {"scalar": {"dtype": str(value.dtype), "value": value.item() if value.dtype.kind in "biuf" else
                           str(value)}}
    return None


def kind(value: Any) -> str | None:
    found = describe(value)
    return next(iter(found)) if found else None


def summary(value: Any) -> Any:
    """A JSON value for ``value``: special leaves by :func:`describe`, containers walked, the rest as is."""
    found = describe(value)
    if found is not None:
        return found
    if isinstance(value, Mapping):
        return {str(k): summary(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [summary(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return {"object": type(value).__name__}


def cell_text(value: Any, most: int = _TEXT) -> str:
    """One line for a table cell: ``float32[3, 4]``, ``image 300x200 RGB``, ``12 bytes``, short JSON."""
    found = describe(value)
    if found is not None:
        (what, info), = found.items()
        if what in ("array", "tensor"):
            return f"{what} {info['dtype']}[{', '.join(map(str, info['shape']))}]"
        if what == "image":
            return f"image {info['width']}x{info['height']} {info['mode']}"
        if what == "audio":
            return f"audio {info['seconds']:g} s, {info['sample_rate']} Hz, {info['channels']} ch, {info['dtype']}"
        if what == "bytes":
            return f"{info} bytes"
        if what == "encoded":
            return repr(value)
        if what == "scalar":
            return f"{info['dtype']} {info['value']}"
        return f"unreadable {info['codec']}: {info['error']}"[:300]
    if isinstance(value, str):
        text = value
    elif value is None:
        return ""
    else:
        text = json.dumps(summary(value), separators=(",", ":"), default=str)
    return text if len(text) <= most else text[:most - 3] + "..."


def flatten(doc: Mapping, depth: int = 4) -> dict[str, Any]:
    """``{"a.b": leaf}`` for nested dicts (at most ``depth`` levels; deeper dicts are leaves)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str, level: int) -> None:
        if isinstance(node, Mapping) and node and level < depth:
            for key, item in node.items():
                walk(item, f"{prefix}{key}.", level + 1)
        elif prefix:
            out[prefix[:-1]] = node
    walk(doc, "", 0)
    return out


def thumbnail_png(image: Any, most: int = THUMBNAIL_PX) -> bytes:
    """A PNG of ``image`` scaled down to at most ``most`` pixels a side."""
    small = image.copy()
    small.thumbnail((most, most))
    if small.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        small = small.convert("RGBA" if "A" in small.getbands() else "RGB")
    out = io.BytesIO()
    small.save(out, format="PNG")
    return out.getvalue()


def wav_bytes(audio: Audio) -> bytes:
    """A 16-bit PCM WAV file of a clip (float samples are taken as -1..1, integers scaled from their range)."""
    samples = np.asarray(audio.samples)
    frames = samples.shape[0]
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    if not 1 <= channels <= 16:
        raise QueryError(f"a clip of {channels} channels cannot be played (at most 16)")
    if frames * channels * 2 > MAX_WAV_BYTES:
        raise QueryError(f"the clip is {frames * channels * 2} bytes as WAV, over the {MAX_WAV_BYTES} served")
    if samples.dtype.kind == "f":
        pcm = (np.clip(np.nan_to_num(samples.astype(np.float64)), -1.0, 1.0) * 32767).astype("<i2")
    elif samples.dtype.kind in "iu":
        info = np.iinfo(samples.dtype)
        scaled = (samples.astype(np.float64) - (info.min + info.max + 1) / 2) / ((info.max - info.min + 1) / 2)
        pcm = np.clip(scaled * 32768, -32768, 32767).astype("<i2")
    elif samples.dtype.kind == "b":
        pcm = (samples.astype("<i2") * 32767).astype("<i2")
    else:
        raise QueryError(f"audio samples of dtype {samples.dtype} cannot be played")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(min(int(audio.sample_rate), 0x7FFFFFFF))
        w.writeframes(np.ascontiguousarray(pcm).tobytes())
    return out.getvalue()
