"""The query language: MongoDB's everyday filters and sorts, validated, with a pure-Python reference matcher.

Every backend must return exactly what :func:`matches` and :func:`sort_docs` return; the SQL compiler
(:mod:`mlwarehouse.index.sql.compiler`) is tested against them. Updates live in :mod:`.updates`, document
validation and projections in :mod:`.documents`, value primitives in :mod:`.jsonvalues`; the package
(:mod:`mlwarehouse.query`) re-exports all of them.

Reference semantics
-------------------
Field paths follow ``^[A-Za-z_][A-Za-z0-9_-]*(\\.[A-Za-z0-9_-]+)*$``. Each component is looked up in an object;
a canonical decimal component (``0``, ``17``) on an array indexes it (``"shape.0"``); anything else on an array
or a scalar resolves to *missing*. Unlike MongoDB, a path does not fan out over an array of objects
(``"layers.kind"`` on ``{"layers": [{"kind": ...}]}`` is missing): use ``$elemMatch`` for that.

Type classes, in sort order: missing/null < numbers (int and float compare numerically; bool is not a number)
< strings (code point order) < objects < arrays < booleans (false < true). Objects and arrays compare and are
equal by their compact JSON text (so key order matters and ``[1] != [1.0]``). A sort on a field holding an
array sorts by the array as a whole value (MongoDB uses its smallest/largest element instead).

Matching on a field value ``v``: the *candidates* are ``v`` itself and, when ``v`` is an array, its elements.
``{"f": x}`` / ``$eq`` match if a candidate equals ``x`` (``null`` also matches missing); ``$gt $gte $lt $lte``
match if a candidate of the same type class as the operand compares true (``$gte/$lte null`` match null and
missing); ``$in`` is any ``$eq``, ``$all`` is every ``$eq`` (an empty list matches nothing); ``$ne``, ``$nin``
and ``$not`` are plain negations, so they match missing fields; ``$regex`` matches string candidates
(``re.search``, options ``imsx``); ``$exists`` tests presence (null is present); ``$size`` tests the length of
the array itself; ``$elemMatch`` needs an array and one element that satisfies every operator (applied to the
element itself, no further expansion) or, for a sub-filter, an object element that matches it.

Validation also bounds every filter (depth, size, string and pattern length) and refuses regular expressions that
can backtrack catastrophically: :mod:`mlwarehouse.query.limits` states the rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from mlwarehouse.errors import QueryError
from mlwarehouse.query.jsonvalues import (
    MISSING,
    get_path,
    sort_value,
    split_path,
)
from mlwarehouse.query.limits import (
    MAX_EXPRESSION,
    MAX_PREDICATES,
    MAX_SORT_KEYS,
    MAX_STRING,
    check_depth,
    check_regex_safe,
    check_terms,
)

__all__ = [
    "Field", "Logical", "ElemMatch", "parse_filter", "validate_filter", "matches", "validate_sort",
    "sort_key", "sort_docs", "distinct_values", "compile_regex", "top_fields",
]


def _candidates(value: Any, expand: bool) -> list:
    if expand and isinstance(value, list):
        return [value, *value]
    return [value]


# -- filter validation: a small AST shared by the matcher and the SQL compiler ---------------------------
class Field:
    """Operators applied to one field path: ``ops`` is a list of ``(op, argument)``."""

    __slots__ = ("path", "comps", "ops")

    def __init__(self, path: str, comps: tuple[str, ...], ops: list[tuple[str, Any]]):
        self.path, self.comps, self.ops = path, comps, ops


class Logical:
    """``$and`` / ``$or`` / ``$nor`` over sub-filters (a filter dict is an implicit ``$and``)."""

    __slots__ = ("op", "children")

    def __init__(self, op: str, children: list):
        self.op, self.children = op, children


class ElemMatch:
    """``$elemMatch`` argument: operators on each element (``ops``) or a sub-filter on object elements."""

    __slots__ = ("ops", "filter")

    def __init__(self, ops: list[tuple[str, Any]] | None = None, filter: Logical | None = None):
        self.ops, self.filter = ops, filter


_COMPARE = {"$gt", "$gte", "$lt", "$lte"}
_FIELD_OPS = {"$eq", "$ne", "$in", "$nin", "$exists", "$not", "$all", "$size", "$elemMatch", "$regex",
              "$options", *_COMPARE}
_LOGICAL = {"$and", "$or", "$nor"}
_REGEX_FLAGS = {"i": re.I, "m": re.M, "s": re.S, "x": re.X}


def _check_value(value: Any, where: str, depth: int = 0) -> Any:
    """A filter operand must be a JSON value (numbers may be infinite, never NaN or beyond 64 bits)."""
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise QueryError(f"{where}: a string of {len(value)} characters exceeds the limit of {MAX_STRING} "
                             "(MAX_STRING)")
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 63):
            raise QueryError(f"{where}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if math.isnan(value):
            raise QueryError(f"{where}: NaN cannot be compared")
        return value
    if isinstance(value, list):
        check_depth(depth + 1, where)
        for item in value:
            _check_nested(item, where, depth + 1)
        return value
    if isinstance(value, dict):
        check_depth(depth + 1, where)
        for key, item in value.items():
            if not isinstance(key, str):
                raise QueryError(f"{where}: object key {key!r} is not a string")
            _check_nested(item, where, depth + 1)
        return value
    hint = " (use a list)" if isinstance(value, tuple) else ""
    raise QueryError(f"{where}: a {type(value).__name__} is not a JSON value{hint}")


def _check_nested(value: Any, where: str, depth: int) -> Any:
    """A value inside an array or object operand: as :func:`_check_value`, but never infinite (it is compared
    as JSON text there, and JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        raise QueryError(f"{where}: {value} inside an array or object cannot be compared (JSON has no infinity)")
    return _check_value(value, where, depth)


@lru_cache(maxsize=512)
def compile_regex(pattern: str, flags: int) -> re.Pattern:
    return re.compile(pattern, flags)


def _regex(pattern: Any, options: Any, where: str) -> tuple[str, int]:
    if isinstance(pattern, re.Pattern):
        if options is not None:
            raise QueryError(f"{where}: give $options in the string form of $regex, not with a compiled pattern")
        if not isinstance(pattern.pattern, str):
            raise QueryError(f"{where}: a bytes pattern cannot match strings")
        flags = pattern.flags & (re.I | re.M | re.S | re.X)
        check_regex_safe(pattern.pattern, flags)
        return pattern.pattern, flags
    if not isinstance(pattern, str):
        raise QueryError(f"{where}: $regex takes a string or a compiled pattern, not {type(pattern).__name__}")
    check_regex_safe(pattern, 0)
    flags = 0
    if options is not None:
        if not isinstance(options, str) or any(c not in _REGEX_FLAGS for c in options):
            raise QueryError(f"{where}: $options {options!r} must be letters among 'imsx'")
        for c in options:
            flags |= _REGEX_FLAGS[c]
    try:
        compile_regex(pattern, flags)
    except re.error as exc:
        raise QueryError(f"{where}: invalid regular expression {pattern!r}: {exc}") from None
    return pattern, flags


def _is_operator_dict(value: Any, where: str) -> bool:
    if not isinstance(value, dict) or not value:
        return False
    dollar = [isinstance(k, str) and k.startswith("$") for k in value]
    if all(dollar):
        return True
    if any(dollar):
        raise QueryError(f"{where}: do not mix operators and fields in {value!r}")
    return False


def _parse_ops(ops: dict, where: str, depth: int) -> list[tuple[str, Any]]:
    check_depth(depth, where)
    out: list[tuple[str, Any]] = []
    for op, arg in ops.items():
        if op not in _FIELD_OPS:
            raise QueryError(f"unknown operator {op!r} on {where}")
        if op == "$options":
            if "$regex" not in ops:
                raise QueryError(f"{where}: $options needs $regex")
            continue
        if op in ("$eq", "$ne") or op in _COMPARE:
            out.append((op, _check_value(arg, f"{where} {op}", depth)))
        elif op in ("$in", "$nin", "$all"):
            if not isinstance(arg, list):
                raise QueryError(f"{where}: {op} takes a list, not {type(arg).__name__}")
            out.append((op, [_check_value(v, f"{where} {op}", depth) for v in arg]))
        elif op == "$exists":
            if not isinstance(arg, bool):
                raise QueryError(f"{where}: $exists takes true or false, not {arg!r}")
            out.append((op, arg))
        elif op == "$size":
            if isinstance(arg, bool) or not isinstance(arg, int) or not 0 <= arg < 1 << 63:
                raise QueryError(f"{where}: $size takes an integer from 0 to 2**63 - 1, not {arg!r}")
            out.append((op, arg))
        elif op == "$regex":
            out.append((op, _regex(arg, ops.get("$options"), where)))
        elif op == "$not":
            if isinstance(arg, re.Pattern):
                out.append((op, [("$regex", _regex(arg, None, where))]))
            elif _is_operator_dict(arg, f"{where} $not"):
                out.append((op, _parse_ops(arg, f"{where} $not", depth + 1)))
            else:
                raise QueryError(f"{where}: $not takes an operator dict or a regular expression, not {arg!r}")
        elif op == "$elemMatch":
            if not isinstance(arg, dict) or not arg:
                raise QueryError(f"{where}: $elemMatch takes a non-empty dict, not {arg!r}")
            if all(isinstance(k, str) and k.startswith("$") and k not in _LOGICAL for k in arg):
                out.append((op, ElemMatch(ops=_parse_ops(arg, f"{where} $elemMatch", depth + 1))))
            else:
                out.append((op, ElemMatch(filter=_parse(arg, f"{where} $elemMatch", depth + 1))))
    return out


def _parse(f: Any, where: str = "filter", depth: int = 0) -> Logical:
    check_depth(depth, where)
    if not isinstance(f, dict):
        raise QueryError(f"{where} must be a dict, not {type(f).__name__}")
    children: list = []
    for key, value in f.items():
        if not isinstance(key, str):
            raise QueryError(f"{where}: key {key!r} is not a string")
        if key.startswith("$"):
            if key not in _LOGICAL:
                raise QueryError(f"unknown operator {key!r} in {where}")
            if not isinstance(value, list) or not value:
                raise QueryError(f"{where}: {key} takes a non-empty list of filters")
            children.append(Logical(key, [_parse(sub, f"{where} {key}", depth + 1) for sub in value]))
            continue
        comps = split_path(key)
        if isinstance(value, re.Pattern):
            ops = [("$regex", _regex(value, None, key))]
        elif _is_operator_dict(value, key):
            ops = _parse_ops(value, key, depth + 1)
        else:
            ops = [("$eq", _check_value(value, key, depth + 1))]
        children.append(Field(key, comps, ops))
    return Logical("$and", children)


def parse_filter(f: dict | None) -> Logical:
    """Validate a filter and return its AST (QueryError naming the bad part, or the limit it exceeds)."""
    if f is None:
        return Logical("$and", [])
    node = _parse(f)
    terms, preds, cost = _size(node)
    check_terms(terms, "filter")
    if preds > MAX_PREDICATES:
        raise QueryError(f"filter: {preds} operator tests exceed the limit of {MAX_PREDICATES} (MAX_PREDICATES); "
                         "use $in for lists of values, or split the query")
    if cost > MAX_EXPRESSION:
        raise QueryError(f"filter: too large an expression (about {cost} nested terms, the limit is "
                         f"{MAX_EXPRESSION}: MAX_EXPRESSION); use $in instead of long $or lists, or split the query")
    return node


def top_fields(node: Logical) -> frozenset[str]:
    """The first component of every field path a parsed filter reads (``$elemMatch`` stays inside its field):
    what a backend fetches to evaluate it, and what a copy of some of a document's fields must hold to answer
    it."""
    out: set[str] = set()
    nodes: list = [node]
    while nodes:
        node = nodes.pop()
        if isinstance(node, Logical):
            nodes += node.children
        else:
            out.add(node.comps[0])
    return frozenset(out)


def _ops_size(ops: list[tuple[str, Any]]) -> tuple[int, int, int]:
    terms, preds, deepest = 0, 0, 0
    for op, arg in ops:
        if op in ("$in", "$nin", "$all"):
            terms += 1 + len(arg)
            preds += len(arg) if op == "$all" else 1
            deepest = max(deepest, 1 + (len(arg) if op == "$all" else 0))
        elif op == "$not" or op == "$elemMatch":
            inner = arg if op == "$not" else arg.ops
            t, p, c = _ops_size(inner) if inner is not None else _size(arg.filter)
            terms, preds, deepest = terms + t, preds + p, max(deepest, 2 + c)
        else:
            terms, preds = terms + 1, preds + 1
    return terms, preds, len(ops) + deepest


def _size(node: Logical) -> tuple[int, int, int]:
    """``(terms, predicates, estimated SQL expression depth)`` of a parsed filter: terms are operators and listed
    values, predicates the operator tests (each a SQL expression of its own), chains count their length."""
    terms, preds, deepest = 0, 0, 0
    for child in node.children:
        t, p, c = _ops_size(child.ops) if isinstance(child, Field) else _size(child)
        terms, preds, deepest = terms + t, preds + p, max(deepest, c)
    return terms, preds, len(node.children) + deepest


def validate_filter(f: dict | None) -> None:
    """Raise QueryError if ``f`` is not a valid filter."""
    parse_filter(f)


# -- the matcher -------------------------------------------------------------------------------------------
def _compare(candidate: Any, op: str, operand: Any) -> bool:
    a, b = sort_value(candidate), sort_value(operand)
    if a[0] != b[0]:
        return False
    if op == "$gt":
        return a > b
    if op == "$gte":
        return a >= b
    if op == "$lt":
        return a < b
    return a <= b


def _eq(value: Any, operand: Any, expand: bool) -> bool:
    target = sort_value(operand)
    return any(sort_value(c) == target for c in _candidates(value, expand))


def _match_ops(value: Any, ops: list[tuple[str, Any]], expand: bool) -> bool:
    for op, arg in ops:
        if op == "$eq":
            ok = _eq(value, arg, expand)
        elif op == "$ne":
            ok = not _eq(value, arg, expand)
        elif op in _COMPARE:
            ok = any(_compare(c, op, arg) for c in _candidates(value, expand))
        elif op == "$in":
            ok = any(_eq(value, v, expand) for v in arg)
        elif op == "$nin":
            ok = not any(_eq(value, v, expand) for v in arg)
        elif op == "$all":
            ok = bool(arg) and all(_eq(value, v, expand) for v in arg)
        elif op == "$exists":
            ok = (value is not MISSING) == arg
        elif op == "$size":
            ok = isinstance(value, list) and len(value) == arg
        elif op == "$regex":
            rx = compile_regex(*arg)
            ok = any(isinstance(c, str) and rx.search(c) is not None for c in _candidates(value, expand))
        elif op == "$not":
            ok = not _match_ops(value, arg, expand)
        elif op == "$elemMatch":
            ok = isinstance(value, list) and any(_elem_match(e, arg) for e in value)
        else:  # pragma: no cover - the parser only emits the operators above
            raise QueryError(f"unknown operator {op!r}")
        if not ok:
            return False
    return True


def _elem_match(element: Any, em: ElemMatch) -> bool:
    if em.ops is not None:
        return _match_ops(element, em.ops, False)
    return isinstance(element, dict) and _match_node(element, em.filter)


def _match_node(doc: dict, node: Any) -> bool:
    if isinstance(node, Field):
        return _match_ops(get_path(doc, node.comps), node.ops, True)
    if node.op == "$and":
        return all(_match_node(doc, c) for c in node.children)
    if node.op == "$or":
        return any(_match_node(doc, c) for c in node.children)
    return not any(_match_node(doc, c) for c in node.children)


def matches(doc: dict, filter: dict | Logical | None) -> bool:
    """True if ``doc`` satisfies ``filter`` (a dict, or an AST from :func:`parse_filter`)."""
    node = filter if isinstance(filter, Logical) else parse_filter(filter)
    return _match_node(doc, node)


# -- sorting -----------------------------------------------------------------------------------------------
def validate_sort(sort: Any) -> list[tuple[str, int]]:
    """A validated sort with ``("_id", 1)`` appended as the tie-breaker unless ``_id`` is already sorted."""
    if sort is None:
        sort = []
    if isinstance(sort, (str, bytes, dict)) or not isinstance(sort, (list, tuple)):
        raise QueryError(f"sort must be a list of (field, 1 or -1) pairs, not {sort!r}")
    if len(sort) > MAX_SORT_KEYS:
        raise QueryError(f"sort has {len(sort)} keys; the limit is {MAX_SORT_KEYS} (MAX_SORT_KEYS)")
    out: list[tuple[str, int]] = []
    seen = set()
    for item in sort:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise QueryError(f"sort item {item!r} must be a (field, 1 or -1) pair")
        field, direction = item
        split_path(field, "sort")
        if isinstance(direction, bool) or direction not in (1, -1):
            raise QueryError(f"sort direction for {field!r} must be 1 or -1, not {direction!r}")
        if field in seen:
            raise QueryError(f"sort names {field!r} twice")
        seen.add(field)
        out.append((field, int(direction)))
    if "_id" not in seen:
        out.append(("_id", 1))
    return out


class _Desc:
    """Inverts the order of a sort value (strings cannot be negated)."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __lt__(self, other):
        return other.v < self.v

    def __gt__(self, other):
        return other.v > self.v

    def __eq__(self, other):
        return self.v == other.v


def sort_key(doc: dict, sort: Any) -> tuple:
    """A key ordering documents like the backends do for ``sort`` (validated, tie-breaker included)."""
    key = []
    for field, direction in validate_sort(sort):
        v = sort_value(get_path(doc, split_path(field)))
        key.append(v if direction == 1 else _Desc(v))
    return tuple(key)


def sort_docs(docs: Iterable[dict], sort: Any) -> list[dict]:
    """The documents in ``sort`` order."""
    spec = validate_sort(sort)
    return sorted(docs, key=lambda d: sort_key(d, spec))


def distinct_values(docs: Iterable[dict], field: str) -> list:
    """Distinct values of ``field`` (array values contribute their elements), in sort order; missing skipped."""
    comps = split_path(field)
    seen: dict[tuple, Any] = {}
    for doc in docs:
        value = get_path(doc, comps)
        if value is MISSING:
            continue
        for v in (value if isinstance(value, list) else [value]):
            seen.setdefault(sort_value(v), v)
    return [seen[k] for k in sorted(seen)]

