"""Update operators (``$set $unset $inc $min $max $push $addToSet``): validation and the reference applier.

Backends apply updates with :func:`apply_update` (SQLite, PostgreSQL) or natively (MongoDB), so this module
defines the behaviour: dotted paths create missing intermediate objects (a canonical number on an array
indexes it, padding with nulls); ``$inc``, ``$push`` and ``$addToSet`` on a missing field create it; ``$min``
and ``$max`` compare with the sort order of :mod:`mlwarehouse.query`; ``_id`` cannot be changed; two operators
touching the same path, or a path and its prefix, are a conflict.
"""

from __future__ import annotations

from typing import Any

from mlwarehouse.errors import QueryError
from mlwarehouse.query.documents import check_value, copy_json
from mlwarehouse.query.jsonvalues import is_index, sort_value, split_path, type_rank, values_equal
from mlwarehouse.query.limits import MAX_PATHS

__all__ = ["UPDATE_OPERATORS", "validate_update", "apply_update"]

UPDATE_OPERATORS = ("$set", "$unset", "$inc", "$min", "$max", "$push", "$addToSet")


def _each(op: str, path: str, arg: Any) -> list:
    if isinstance(arg, dict) and any(isinstance(k, str) and k.startswith("$") for k in arg):
        if set(arg) != {"$each"}:
            raise QueryError(f"{op} on {path!r}: only the $each modifier is supported, got {sorted(arg)}")
        if not isinstance(arg["$each"], list):
            raise QueryError(f"{op} on {path!r}: $each takes a list")
        values = arg["$each"]
    else:
        values = [arg]
    for i, v in enumerate(values):
        _check(v, f"{path}.{i}")
    return values


def _check(value: Any, path: str) -> None:
    """:func:`check_value` as a QueryError for values nested too deeply to check (or referring to themselves)."""
    try:
        check_value(value, path)
    except RecursionError:
        raise QueryError(f"update of {path!r}: the value is nested too deeply (or refers to itself)") from None


def validate_update(update: Any) -> list[tuple[str, str, tuple[str, ...], Any]]:
    """Validate an update; returns ``[(op, path, components, argument), ...]`` (QueryError if malformed)."""
    if not isinstance(update, dict) or not update:
        raise QueryError(f"an update must be a non-empty dict of operators, not {update!r}")
    out = []
    for op, fields in update.items():
        if not isinstance(op, str) or not op.startswith("$"):
            raise QueryError(f"update key {op!r} is not an operator: use {{'$set': {{...}}}} "
                             "(replace_one replaces a whole document)")
        if op not in UPDATE_OPERATORS:
            raise QueryError(f"unknown update operator {op!r} (supported: {', '.join(UPDATE_OPERATORS)})")
        if not isinstance(fields, dict):
            raise QueryError(f"{op} takes a dict of field: value, not {fields!r}")
        for path, arg in fields.items():
            comps = split_path(path, f"{op}")
            if comps[0] == "_id":
                raise QueryError(f"{op} on {path!r}: _id cannot be modified")
            if op == "$inc":
                if isinstance(arg, bool) or not isinstance(arg, (int, float)):
                    raise QueryError(f"$inc on {path!r} takes a number, not {arg!r}")
                check_value(arg, path)
            elif op in ("$set", "$min", "$max"):
                _check(arg, path)
            elif op in ("$push", "$addToSet"):
                arg = _each(op, path, arg)
            out.append((op, path, comps, arg))
            if len(out) > MAX_PATHS:
                raise QueryError(f"the update names more than {MAX_PATHS} paths (MAX_PATHS)")
    paths = sorted((p for _, p, _, _ in out), key=lambda p: p.split("."))  # "a-x" must not part "a", "a.b"
    for a, b in zip(paths, paths[1:]):
        if a == b or b.startswith(a + "."):
            raise QueryError(f"update paths {a!r} and {b!r} conflict")
    return out


def _slot(container: Any, comp: str, path: str, create: bool) -> tuple[Any, Any] | None:
    """``(container, key)`` addressing ``comp`` inside ``container``, or None when it cannot exist."""
    if isinstance(container, dict):
        return container, comp
    if isinstance(container, list) and is_index(comp):
        i = int(comp)
        if i >= len(container):
            if not create:
                return None
            container.extend([None] * (i + 1 - len(container)))
        return container, i
    if not create:
        return None
    raise QueryError(f"cannot create field {comp!r} of {path!r} inside a {type(container).__name__}")


def _locate(doc: dict, comps: tuple[str, ...], path: str, create: bool) -> tuple[Any, Any] | None:
    node: Any = doc
    for comp in comps[:-1]:
        slot = _slot(node, comp, path, create)
        if slot is None:
            return None
        container, key = slot
        if isinstance(container, dict) and key not in container or container[key] is None and create:
            if not create:
                return None
            container[key] = {}
        node = container[key]
    return _slot(node, comps[-1], path, create)


def _has(container: Any, key: Any) -> bool:
    return key in container if isinstance(container, dict) else key < len(container)


def apply_update(doc: dict, update: Any) -> dict:
    """Return a new document: ``doc`` with ``update`` applied (the input is not modified)."""
    ops = update if isinstance(update, list) else validate_update(update)
    new = copy_json(doc)
    for op, path, comps, arg in ops:
        if op == "$unset":
            slot = _locate(new, comps, path, False)
            if slot is not None and _has(*slot):
                container, key = slot
                if isinstance(container, dict):
                    del container[key]
                else:
                    container[key] = None
            continue
        container, key = _locate(new, comps, path, True)
        present = _has(container, key)
        current = container[key] if present else None
        if op == "$set":
            container[key] = copy_json(arg)
        elif op == "$inc":
            if not present:
                container[key] = arg
            elif type_rank(current) != 1:
                raise QueryError(f"$inc on {path!r}: the field holds {current!r}, not a number")
            else:
                container[key] = current + arg
        elif op in ("$min", "$max"):
            if not present:
                container[key] = copy_json(arg)
            else:
                new_v, old_v = sort_value(arg), sort_value(current)
                if (new_v < old_v) if op == "$min" else (new_v > old_v):
                    container[key] = copy_json(arg)
        else:  # $push / $addToSet
            if not present:
                current = container[key] = []
            elif not isinstance(current, list):
                raise QueryError(f"{op} on {path!r}: the field holds {current!r}, not an array")
            for v in arg:
                if op == "$push" or not any(values_equal(v, old) for old in current):
                    current.append(copy_json(v))
    return new
