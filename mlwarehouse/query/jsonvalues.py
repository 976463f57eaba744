"""JSON values as the query language sees them: field paths, type classes, order, equality, JSON text.

The rules are those of :mod:`mlwarehouse.query.filters` (see its docstring); this module holds the primitives that
the matcher, the update applier, document validation and the SQL compiler share.

(Named jsonvalues, not values: mlwarehouse/codecs/values.py is the module that packs values into blob references.)
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import orjson

from mlwarehouse.errors import QueryError

__all__ = ["MISSING", "PATH_RE", "split_path", "is_index", "get_path", "NULL", "NUMBER", "STRING", "OBJECT",
           "ARRAY", "BOOL", "type_rank", "json_text", "json_value", "sort_value", "values_equal"]


class _Missing:
    """The value of a path that does not resolve (distinct from JSON null)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()
PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*\Z")  # \Z, not $: no final newline
MAX_PATH_LENGTH = 1_000  # characters of a field path (each component becomes SQL text)
_INDEX_RE = re.compile(r"^(0|[1-9][0-9]{0,8})\Z")


@lru_cache(maxsize=4096)
def _split(path: str) -> tuple[str, ...] | None:
    return tuple(path.split(".")) if PATH_RE.match(path) else None


def split_path(path: Any, what: str = "field") -> tuple[str, ...]:
    """The components of a valid field path; QueryError naming the path otherwise."""
    if isinstance(path, str) and len(path) > MAX_PATH_LENGTH:
        raise QueryError(f"{what} path of {len(path)} characters exceeds the limit of {MAX_PATH_LENGTH} "
                         "(MAX_PATH_LENGTH)")
    comps = _split(path) if isinstance(path, str) else None
    if comps is None:
        raise QueryError(f"invalid {what} path {path!r}: use letters, digits, '_' and '-' joined by dots")
    return comps


def is_index(comp: str) -> bool:
    """True if a path component indexes arrays (a canonical decimal number)."""
    return _INDEX_RE.match(comp) is not None


def get_path(doc: Any, path: str | tuple[str, ...], default: Any = MISSING) -> Any:
    """The value at a dotted path (see the module rules), or ``default`` when it does not resolve."""
    comps = split_path(path) if isinstance(path, str) else path
    value = doc
    for comp in comps:
        if isinstance(value, dict):
            if comp not in value:
                return default
            value = value[comp]
        elif isinstance(value, list) and is_index(comp):
            i = int(comp)
            if i >= len(value):
                return default
            value = value[i]
        else:
            return default
    return value


# -- values: type classes, equality, order ---------------------------------------------------------------
NULL, NUMBER, STRING, OBJECT, ARRAY, BOOL = range(6)


def type_rank(value: Any) -> int:
    """Sort class of a JSON value (missing and null share class 0)."""
    if value is None or value is MISSING:
        return NULL
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, (int, float)):
        return NUMBER
    if isinstance(value, str):
        return STRING
    if isinstance(value, dict):
        return OBJECT
    if isinstance(value, list):
        return ARRAY
    raise QueryError(f"{type(value).__name__} is not a JSON value")


def _not_json(value: Any) -> Any:
    raise TypeError(f"a {type(value).__name__} is not a JSON value")


_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False,
                            default=_not_json)
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_encoder is not None:  # the C encoder without JSONEncoder.encode's wrapping: bulk inserts call this a lot
    _c_encoder = _c_encoder(None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False)


def json_text(value: Any) -> str:
    """Compact JSON text: the stored form, and the order/equality of objects and arrays."""
    if _c_encoder is not None and isinstance(value, (dict, list)):
        return "".join(_c_encoder(value, 0))
    return _encoder.encode(value)


def json_value(text: str | bytes) -> Any:
    """The value of stored JSON text: read by orjson (about 3x the standard library on documents, most of a page's
    read), or by the standard library where orjson refuses the text (a lone surrogate). The same values as the
    standard library's for every document the index accepts; an integer beyond 64 bits, which validation refuses
    to store, would read as a float."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def sort_value(value: Any) -> tuple[int, Any]:
    """``(type class, comparable value)``: tuples order values exactly like the backends do."""
    rank = type_rank(value)
    if rank == NULL:
        return (NULL, 0)
    if rank == OBJECT or rank == ARRAY:
        return (rank, json_text(value))
    if rank == BOOL:
        return (BOOL, int(value))
    return (rank, value)


def values_equal(a: Any, b: Any) -> bool:
    """Equality under the reference rules (missing equals null)."""
    return sort_value(a) == sort_value(b)
