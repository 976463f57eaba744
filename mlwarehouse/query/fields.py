"""Normalise user-supplied fields (tags, metrics, hyper-parameters) into JSON values the index can store.

ML code hands us numpy scalars (``np.float32(0.93)``), 0-d tensors (``loss`` instead of ``loss.item()``), tuples and
datetimes all the time; they are converted here, once, at the edge. Arrays and other large values are refused
with a message pointing to where they belong (a dataset, a model, an artifact), so they never bloat the index.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timezone
from typing import Any

from mlwarehouse.errors import InvalidDocument

__all__ = ["normalize_value", "normalize_fields", "RESERVED_FIELDS"]

#: fields stamped by the warehouse itself; users cannot set them through keyword fields
RESERVED_FIELDS = frozenset({"_id", "project", "time", "_blobs"})


def normalize_value(value: Any, path: str = "value", *, nonfinite: str = "raise") -> Any:
    """Return ``value`` as plain JSON types, or raise InvalidDocument naming ``path``.

    ``nonfinite`` says what to do with NaN and infinities: ``"raise"`` or ``"null"`` (metrics: a diverged loss
    is a fact worth keeping as a missing value, not a crash of the training loop).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 63):
            raise InvalidDocument(f"{path}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            if nonfinite == "null":
                return None
            raise InvalidDocument(f"{path}: {value} cannot be stored (NaN and infinity are not valid JSON)")
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidDocument(f"{path}: key {key!r} is not a string")
            out[key] = normalize_value(item, f"{path}.{key}", nonfinite=nonfinite)
        return out
    if isinstance(value, (list, tuple)):
        return [normalize_value(item, f"{path}.{i}", nonfinite=nonfinite) for i, item in enumerate(value)]
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidDocument(f"{path}: naive datetime {value}; give it a timezone (e.g. timezone.utc)")
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, date):
        return value.isoformat()
    item = getattr(value, "item", None)  # numpy scalars, 0-d arrays and 0-d tensors
    shape = getattr(value, "shape", None)
    if callable(item) and (shape == () or shape is None and hasattr(value, "dtype")):
        return normalize_value(item(), path, nonfinite=nonfinite)
    if shape is not None:
        raise InvalidDocument(
            f"{path}: an array of shape {tuple(shape)} cannot be a field; save it as a dataset or model value")
    raise InvalidDocument(f"{path}: a {type(value).__name__} cannot be stored as a field (JSON values only)")


def normalize_fields(fields: dict[str, Any], *, nonfinite: str = "raise") -> dict[str, Any]:
    """Normalise keyword fields given by a user, refusing the reserved names."""
    out = {}
    for key, value in fields.items():
        if key in RESERVED_FIELDS or key.startswith("_"):
            raise InvalidDocument(f"field {key!r} is reserved: the warehouse sets it")
        out[key] = normalize_value(value, key, nonfinite=nonfinite)
    return out
