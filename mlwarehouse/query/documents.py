"""What a storable document is, and projections of documents.

A document is a dict with a non-empty string ``_id`` whose values are JSON: dict (str keys not starting with
``$``, without ``.`` or NUL), list, str, bool, None, int within signed 64 bits, finite float. Other Python
values (numpy scalars, tuples, datetimes) are converted by the layer above (:mod:`mlwarehouse.query.fields`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from mlwarehouse.errors import InvalidDocument, QueryError
from mlwarehouse.query.jsonvalues import split_path
from mlwarehouse.query.limits import MAX_PATHS

__all__ = ["validate_document", "check_value", "plausible_document", "validate_projection", "project"]

_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1


def _bad_key(key: Any) -> str | None:
    if type(key) is not str and not isinstance(key, str):
        return f"key {key!r} is not a string"
    if key.startswith("$"):
        return f"key {key!r} starts with '$'"
    if "." in key:
        return f"key {key!r} contains '.'"
    if "\0" in key:
        return f"key {key!r} contains a NUL character"
    return None


def _check_str(s: str, path: str) -> None:
    if "\0" in s:  # SQLite's JSON functions end a string at NUL (and PostgreSQL refuses it): never stored
        raise InvalidDocument(f"{path}: string holds a NUL character (\\u0000), which cannot be stored")
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidDocument(f"{path}: string holds a lone surrogate and is not valid UTF-8") from None


def check_value(value: Any, path: str) -> None:
    """Raise InvalidDocument naming ``path`` if ``value`` (at any depth) cannot be stored."""
    t = type(value)
    if t is str:
        _check_str(value, path)
    elif value is None or t is bool:
        return
    elif t is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidDocument(f"{path}: integer {value} does not fit in signed 64 bits")
    elif t is float:
        if not math.isfinite(value):
            raise InvalidDocument(f"{path}: {value} is not a finite number")
    elif t is dict:
        for key, item in value.items():
            problem = _bad_key(key)
            if problem:
                raise InvalidDocument(f"{path}: {problem}")
            check_value(item, f"{path}.{key}")
    elif t is list:
        for i, item in enumerate(value):
            check_value(item, f"{path}.{i}")
    elif isinstance(value, (str, bool, int, float, dict, list)):  # subclasses: check as their base type
        base = next(b for b in (bool, str, int, float, dict, list) if isinstance(value, b))
        check_value(base(value), path)
    else:
        raise InvalidDocument(f"{path}: a {t.__name__} cannot be stored (JSON values only)")


_good_keys: set[str] = set()  # keys already checked: documents of one collection repeat their keys


def _plausible(obj: dict) -> bool:
    good = _good_keys
    for key in obj:
        if key not in good:
            if type(key) is not str or _bad_key(key):
                return False
            if len(good) < 100_000:
                good.add(key)
    return _plausible_values(obj.values())


def _plausible_values(items: Iterable[Any]) -> bool:
    for value in items:
        t = type(value)
        if t is str or t is float or t is bool or value is None:
            continue
        if t is int:
            if not _INT_MIN <= value <= _INT_MAX:
                return False
        elif t is dict:
            if not _plausible(value):
                return False
        elif t is list:
            if not _plausible_values(value):
                return False
        else:
            return False
    return True


def plausible_document(doc: Any) -> bool:
    """Fast check for bulk writes: True if ``doc`` is valid except, possibly, for non-finite floats and
    non-UTF-8 strings, which the JSON encoder (``allow_nan=False``) and the database driver refuse anyway.
    False means: call :func:`validate_document` for the precise error."""
    try:
        _id = doc["_id"]
        return type(_id) is str and _id != "" and type(doc) is dict and _plausible(doc)
    except (TypeError, KeyError, RecursionError):
        return False


def validate_document(doc: Any) -> None:
    """Raise InvalidDocument naming the field path of the first value that cannot be stored."""
    if not isinstance(doc, dict):
        raise InvalidDocument(f"a document must be a dict, not {type(doc).__name__}")
    _id = doc.get("_id")
    if not isinstance(_id, str) or not _id:
        raise InvalidDocument(f"_id must be a non-empty string, not {_id!r}")
    for key, value in doc.items():
        problem = _bad_key(key)
        if problem:
            raise InvalidDocument(problem)
        try:
            check_value(value, key)
        except RecursionError:
            raise InvalidDocument(f"{key}: nested too deeply (or refers to itself)") from None


# -- projections -------------------------------------------------------------------------------------------
def validate_projection(projection: Any) -> dict[str, bool] | None:
    """Validate ``{"a": 1, "b.c": 1}`` (inclusion) or ``{"a": 0}`` (exclusion); returns ``{path: keep}``."""
    if projection is None:
        return None
    if not isinstance(projection, dict):
        raise QueryError(f"projection must be a dict of field: 0 or 1, not {projection!r}")
    if len(projection) > MAX_PATHS:
        raise QueryError(f"projection has {len(projection)} paths; the limit is {MAX_PATHS} (MAX_PATHS)")
    out: dict[str, bool] = {}
    for path, flag in projection.items():
        split_path(path, "projection")
        if flag not in (0, 1) or not isinstance(flag, (int, bool)):
            raise QueryError(f"projection of {path!r} must be 0 or 1, not {flag!r}")
        out[path] = bool(flag)
    kinds = {keep for path, keep in out.items() if path != "_id"}
    if len(kinds) > 1:
        raise QueryError(f"projection {projection!r} mixes inclusion and exclusion (only _id: 0 may be mixed)")
    paths = sorted(out, key=lambda p: p.split("."))  # by components: "a-x" must not part "a" and "a.b"
    for a, b in zip(paths, paths[1:]):
        if b.startswith(a + "."):
            raise QueryError(f"projection paths {a!r} and {b!r} overlap")
    return out


def _include(src: dict, dst: dict, comps: list[str]) -> None:
    head = comps[0]
    if head not in src:
        return
    if len(comps) == 1:
        dst[head] = src[head]
    elif isinstance(src[head], dict):
        sub = dst.setdefault(head, {})
        _include(src[head], sub, comps[1:])
        if not sub:
            del dst[head]


def _exclude(doc: dict, comps: list[str]) -> None:
    for comp in comps[:-1]:
        doc = doc.get(comp)
        if not isinstance(doc, dict):
            return
    doc.pop(comps[-1], None)


def projector(projection: Any) -> Callable[[dict], dict]:
    """Validate a projection once and return the function that applies it to each document."""
    spec = validate_projection(projection)
    if not spec:
        return lambda doc: doc
    include = any(keep for path, keep in spec.items() if path != "_id") or spec == {"_id": True}
    keep_id = spec.get("_id", True)
    if include:
        paths = [path.split(".") for path, keep in spec.items() if keep and path != "_id"]

        def including(doc: dict) -> dict:
            out: dict = {"_id": doc["_id"]} if keep_id and "_id" in doc else {}
            for comps in paths:
                _include(doc, out, comps)
            return out
        return including
    dropped = [path.split(".") for path, keep in spec.items() if not keep]

    def excluding(doc: dict) -> dict:
        out = copy_json(doc)
        for comps in dropped:
            _exclude(out, comps)
        return out
    return excluding


def project(doc: dict, projection: Any) -> dict:
    """Apply a projection (validated here); paths follow objects only. Returns a new dict."""
    return projector(projection)(doc)


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (dicts and lists copied, scalars shared: they are immutable)."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    return value
