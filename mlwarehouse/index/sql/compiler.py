"""Compile validated filters and sorts to SQL over a table whose ``doc`` column holds a document's JSON text.

The output must select exactly what :func:`mlwarehouse.query.matches` accepts, in exactly the order of
:func:`mlwarehouse.query.sort_docs`. Values are always bound parameters; only validated field paths are inlined,
so that expression indexes (:func:`index_expressions`) match the expressions of queries.

Each value is seen through a *type rank* expression (0 null/missing, 1 number, 2 string, 3 object, 4 array,
5 bool) and a *value* expression (``json_extract``: numbers, text, 1/0 for booleans, compact JSON text for
objects and arrays). Sorting is ``ORDER BY rank, value`` per field; a comparison is ``rank = R AND value op ?``
(type bracketing). Array candidates (elements of an array field) are tested with ``EXISTS`` over ``json_each``,
skipped for ``scalar_fields`` so that filters on them are plain index lookups. Element-level JSON functions
sit behind ``CASE`` so they never see a value that is not JSON.

SQL text that differs between databases lives in a :class:`Dialect` (placeholders included):
:class:`SQLiteDialect` (JSON text with JSON1 functions) and
:class:`mlwarehouse.index.sql.postgres_dialect.PostgresDialect` (the ``json`` type; its docstring says why not
``jsonb``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from mlwarehouse.query import (
    ARRAY,
    BOOL,
    NULL,
    NUMBER,
    OBJECT,
    STRING,
    ElemMatch,
    Field,
    Logical,
    is_index,
    json_text,
    parse_filter,
    split_path,
    type_rank,
    validate_sort,
)

__all__ = ["Dialect", "SQLiteDialect", "SQLITE", "Compiler", "sort_expressions", "index_expressions",
           "REGEX_FUNCTION"]

REGEX_FUNCTION = "mlw_regex"  # (pattern, flags, value) -> 1/0, registered by the backend


class Dialect:
    """The SQL spelling of JSON access; a new database subclasses this and overrides what differs."""

    id_column = "id"
    doc_column = "doc"
    true, false = "1", "0"  # boolean literals; the compiler simplifies on them
    placeholder = "?"  # the driver's parameter marker
    no_limit = -1  # the LIMIT parameter that means "no limit"

    def bind(self, rank: int | None = None) -> str:
        """The placeholder of a parameter compared with values of class ``rank``."""
        return self.placeholder

    def not_(self, part: str) -> str:
        return f"NOT ifnull({part}, 0)"  # NULL means "no match" everywhere; negation must keep it so

    def is_type(self, type_expr: str, kind: str) -> str:
        return f"{type_expr} IS '{kind}'"

    def in_class(self, doc: str, path: str, rank: int) -> str:
        return f"{self.rank(doc, path)} = {rank}"

    def value(self, doc: str, path: str, rank: int) -> str:
        """The expression compared with a parameter of class ``rank`` (guarded: never fails on other types)."""
        return self.extract(doc, path)

    def sort_keys(self, doc: str, path: str) -> list[str]:
        return [self.rank(doc, path), self.extract(doc, path)]

    def index_keys(self, keys: list[str], unique: bool) -> list[str]:
        """A field's sort keys as ``CREATE INDEX`` terms (of a unique index if ``unique``)."""
        return keys

    def regex_params(self, pattern: str, flags: int) -> list:
        return [pattern, flags]

    def path(self, doc: str, comps: tuple[str, ...]) -> str:
        raise NotImplementedError

    def type_of(self, doc: str, path: str) -> str:
        raise NotImplementedError

    def extract(self, doc: str, path: str) -> str:
        raise NotImplementedError

    def rank(self, doc: str, path: str) -> str:
        raise NotImplementedError

    def each(self, json_expr: str, path: str | None) -> str:
        raise NotImplementedError

    def elem_in_class(self, alias: str, rank: int) -> str:
        raise NotImplementedError

    def elem_value(self, alias: str, rank: int | None = None) -> str:
        """The element's comparison value for class ``rank``, or (``rank=None``) the element as JSON."""
        raise NotImplementedError

    def elem_is(self, alias: str, kind: str) -> str:
        raise NotImplementedError

    def array_length(self, json_expr: str, path: str | None) -> str:
        raise NotImplementedError

    def regex(self, value: str) -> str:
        raise NotImplementedError

    def param(self, value: Any) -> Any:
        """A Python operand as bound to the value expressions (booleans as 1/0, containers as JSON text)."""
        rank = type_rank(value)
        if rank == BOOL:
            return int(value)
        if rank in (OBJECT, ARRAY):
            return json_text(value)
        return value


_SQLITE_TYPES = {NULL: ("null",), NUMBER: ("integer", "real"), STRING: ("text",), OBJECT: ("object",),
                 ARRAY: ("array",), BOOL: ("true", "false")}


class SQLiteDialect(Dialect):
    """SQLite 3.38+ JSON1 functions (json_extract, json_type, json_each)."""

    def path(self, doc: str, comps: tuple[str, ...]) -> str:
        dynamic, literal = None, "$"
        for comp in comps:
            if not is_index(comp):
                literal += f'."{comp}"'
                continue
            prefix = f"'{literal}'" if dynamic is None else f"{dynamic} || '{literal}'"
            dynamic = (f"{prefix} || CASE json_type({doc}, {prefix}) WHEN 'array' THEN '[{comp}]' "
                       f"ELSE '.\"{comp}\"' END")
            literal = ""
        if dynamic is None:
            return f"'{literal}'"
        return f"({dynamic} || '{literal}')" if literal else f"({dynamic})"

    def type_of(self, doc: str, path: str) -> str:
        return f"json_type({doc}, {path})"

    def extract(self, doc: str, path: str) -> str:
        return f"json_extract({doc}, {path})"

    def rank(self, doc: str, path: str) -> str:
        return (f"CASE json_type({doc}, {path}) WHEN 'integer' THEN 1 WHEN 'real' THEN 1 WHEN 'text' THEN 2 "
                "WHEN 'object' THEN 3 WHEN 'array' THEN 4 WHEN 'true' THEN 5 WHEN 'false' THEN 5 ELSE 0 END")

    def each(self, json_expr: str, path: str | None) -> str:
        return f"json_each({json_expr}, {path})" if path else f"json_each({json_expr})"

    def elem_in_class(self, alias: str, rank: int) -> str:
        names = _SQLITE_TYPES[rank]
        if len(names) == 1:
            return f"{alias}.type = '{names[0]}'"
        return f"{alias}.type IN ({', '.join(repr(n) for n in names)})"

    def elem_value(self, alias: str, rank: int | None = None) -> str:
        return f"{alias}.value"

    def elem_is(self, alias: str, kind: str) -> str:
        return f"{alias}.type = '{kind}'"

    def array_length(self, json_expr: str, path: str | None) -> str:
        return f"json_array_length({json_expr}, {path})" if path else f"json_array_length({json_expr})"

    def regex(self, value: str) -> str:
        return f"{REGEX_FUNCTION}(?, ?, {value})"


SQLITE = SQLiteDialect()


class _PathTarget:
    """A field of the document (or of an object element, for ``$elemMatch`` sub-filters)."""

    def __init__(self, d: Dialect, doc: str, comps: tuple[str, ...], expandable: bool):
        self.d, self.doc = d, doc
        self.path = d.path(doc, comps)
        self.type = d.type_of(doc, self.path)
        self.expandable = expandable

    def cls(self, rank: int) -> str:
        return self.d.in_class(self.doc, self.path, rank)

    def value(self, rank: int) -> str:
        return self.d.value(self.doc, self.path, rank)

    def exists(self) -> str:
        return f"{self.type} IS NOT NULL"

    def is_array(self) -> str:
        return self.d.is_type(self.type, "array")

    def array_length(self) -> str:
        return self.d.array_length(self.doc, self.path)

    def each(self) -> str:
        return self.d.each(self.doc, self.path)


class _IdTarget:
    """The ``_id`` of a stored document: always a string, held in the indexed ``id`` column."""

    expandable = False

    def __init__(self, d: Dialect):
        self.d = d

    def cls(self, rank: int) -> str:
        return self.d.true if rank == STRING else self.d.false

    def value(self, rank: int) -> str:
        return self.d.id_column

    def exists(self) -> str:
        return self.d.true

    def is_array(self) -> str:
        return self.d.false

    def array_length(self) -> str:  # pragma: no cover - guarded by is_array()
        raise AssertionError("_id is never an array")

    def each(self) -> str:  # pragma: no cover - guarded by is_array()
        raise AssertionError("_id is never an array")


class _ElemTarget:
    """One element of an array (a ``json_each`` row)."""

    expandable = False

    def __init__(self, d: Dialect, alias: str):
        self.d, self.alias = d, alias
        self.json = d.elem_value(alias)

    def cls(self, rank: int) -> str:
        return self.d.elem_in_class(self.alias, rank)

    def value(self, rank: int) -> str:
        return self.d.elem_value(self.alias, rank)

    def exists(self) -> str:
        return self.d.true

    def is_array(self) -> str:
        return self.d.elem_is(self.alias, "array")

    def array_length(self) -> str:
        return self.d.array_length(self.json, None)

    def each(self) -> str:
        return self.d.each(self.json, None)


def _and(d: Dialect, parts: list[str]) -> str:
    parts = [p for p in parts if p != d.true]  # an absorbing false stays: its siblings may hold parameters
    if not parts:
        return d.true
    return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"


def _or(d: Dialect, parts: list[str]) -> str:
    parts = [p for p in parts if p != d.false]
    if not parts:
        return d.false
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def _not(d: Dialect, part: str) -> str:
    if part in (d.true, d.false):
        return d.true if part == d.false else d.false
    return d.not_(part)


_OPS_SQL = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


class Compiler:
    """Compiles one statement's filter and sort; collects bound parameters in text order.

    ``branch`` is ``(field, "whole" | "elements")``, for the halves of a split query (see
    :func:`mlwarehouse.index.sql.plans.split_field`): that one conjunct then matches only documents whose value
    itself passes, or only those with an array that holds passing elements.
    """

    def __init__(self, dialect: Dialect = SQLITE, scalar_fields: Collection[str] = (),
                 branch: tuple[Field, str] | None = None):
        self.d = dialect
        self.scalar_fields = frozenset(scalar_fields)
        self.params: list[Any] = []
        #: for each parameter, the top-level field (its number in filter order) whose operand it binds
        self.sources: list[int] = []
        self._fields = 0
        self._aliases = 0
        self.branch = branch

    def _alias(self) -> str:
        self._aliases += 1
        return f"j{self._aliases}"

    # -- predicates on one target ----------------------------------------------------------------------
    def _in_set(self, t, values: list) -> str:
        d = self.d
        by_rank: dict[int, list] = {}
        for v in values:
            by_rank.setdefault(type_rank(v), []).append(v)
        parts = []
        for rank, group in by_rank.items():
            cls = t.cls(rank)
            if rank == NULL or cls == d.false:
                parts.append(cls)
                continue
            params = list(dict.fromkeys(d.param(v) for v in group))
            self.params.extend(params)
            value, ph = t.value(rank), d.bind(rank)
            test = f"{value} = {ph}" if len(params) == 1 else f"{value} IN ({', '.join([ph] * len(params))})"
            parts.append(_and(d, [cls, test]))
        return _or(d, parts)

    def _compare(self, t, op: str, operand: Any) -> str:
        rank = type_rank(operand)
        if rank == NULL:
            return t.cls(NULL) if op in ("$gte", "$lte") else self.d.false
        cls = t.cls(rank)
        if cls == self.d.false:
            return cls
        self.params.append(self.d.param(operand))
        return _and(self.d, [cls, f"{t.value(rank)} {_OPS_SQL[op]} {self.d.bind(rank)}"])

    def _regex(self, t, arg: tuple[str, int]) -> str:
        cls = t.cls(STRING)
        if cls == self.d.false:
            return cls
        self.params.extend(self.d.regex_params(*arg))
        return _and(self.d, [cls, self.d.regex(t.value(STRING))])

    def _candidates(self, t, expand: bool, pred) -> str:
        """``pred`` on the value, or (for array values) on any of its elements."""
        d = self.d
        whole = pred(t)
        if not (expand and t.expandable):
            return whole
        alias = self._alias()
        inner = pred(_ElemTarget(d, alias))
        if inner == d.false:
            return whole
        return _or(d, [whole, f"CASE WHEN {t.is_array()} THEN EXISTS (SELECT 1 FROM {t.each()} AS {alias} "
                              f"WHERE {inner}) ELSE {d.false} END"])

    def _ops(self, t, ops: list[tuple[str, Any]], expand: bool) -> str:
        d = self.d
        parts = []
        for op, arg in ops:
            if op in ("$eq", "$ne"):
                s = self._candidates(t, expand, lambda x, a=arg: self._in_set(x, [a]))
                parts.append(s if op == "$eq" else _not(d, s))
            elif op in ("$in", "$nin"):
                s = self._candidates(t, expand, lambda x, a=arg: self._in_set(x, a)) if arg else d.false
                parts.append(s if op == "$in" else _not(d, s))
            elif op in _OPS_SQL:
                parts.append(self._candidates(t, expand, lambda x, o=op, a=arg: self._compare(x, o, a)))
            elif op == "$all":
                parts.append(_and(d, [self._candidates(t, expand, lambda x, a=v: self._in_set(x, [a]))
                                      for v in arg]) if arg else d.false)
            elif op == "$exists":
                parts.append(t.exists() if arg else _not(d, t.exists()))
            elif op == "$size":
                if t.is_array() == d.false:
                    parts.append(d.false)
                else:
                    self.params.append(arg)
                    parts.append(f"CASE WHEN {t.is_array()} THEN {t.array_length()} = {d.bind(NUMBER)} "
                                 f"ELSE {d.false} END")
            elif op == "$regex":
                parts.append(self._candidates(t, expand, lambda x, a=arg: self._regex(x, a)))
            elif op == "$not":
                parts.append(_not(d, self._ops(t, arg, expand)))
            elif op == "$elemMatch":
                parts.append(self._elem_match(t, arg))
            else:  # pragma: no cover - the parser only emits the operators above
                raise AssertionError(op)
        return _and(d, parts)

    def _elem_match(self, t, em: ElemMatch) -> str:
        d = self.d
        if t.is_array() == d.false:
            return d.false
        alias = self._alias()
        elem = _ElemTarget(d, alias)
        if em.ops is not None:
            inner = self._ops(elem, em.ops, False)
        else:
            sub = self._node(em.filter, elem.json, top=False)
            inner = f"CASE WHEN {d.elem_is(alias, 'object')} THEN {sub} ELSE {d.false} END"
        return (f"CASE WHEN {t.is_array()} THEN EXISTS (SELECT 1 FROM {t.each()} AS {alias} WHERE {inner}) "
                f"ELSE {d.false} END")

    # -- filters ---------------------------------------------------------------------------------------
    def _target(self, field: Field, doc: str, top: bool):
        if top and field.comps == ("_id",):
            return _IdTarget(self.d)
        return _PathTarget(self.d, doc, field.comps, expandable=not (top and field.path in self.scalar_fields))

    def _node(self, node: Any, doc: str, top: bool) -> str:
        if isinstance(node, Field):
            start = len(self.params)
            if self.branch is not None and node is self.branch[0]:
                text = self._half(self._target(node, doc, top), node.ops, self.branch[1])
            else:
                text = self._ops(self._target(node, doc, top), node.ops, True)
            if top:
                self.sources.extend([self._fields] * (len(self.params) - start))
                self._fields += 1
            return text
        parts = [self._node(c, doc, top) for c in node.children]
        if node.op == "$and":
            return _and(self.d, parts)
        if node.op == "$or":
            return _or(self.d, parts)
        return _not(self.d, _or(self.d, parts))

    def _half(self, t, ops: list[tuple[str, Any]], half: str) -> str:
        """One half of a split conjunct (see :func:`mlwarehouse.index.sql.plans.split_field`): the value itself
        (``whole``: conditions on its rank and value, which indexes serve), or an array with elements that pass
        (``elements``: rank 4 first)."""
        d = self.d
        if half == "whole":
            return self._ops(t, ops, False)
        parts = [t.cls(ARRAY)]
        for op, arg in ops:  # as _candidates does for each operator: each may be met by a different element
            alias = self._alias()
            elem = _ElemTarget(d, alias)
            inner = self._in_set(elem, [arg] if op == "$eq" else arg) if op in ("$eq", "$in") \
                else self._compare(elem, op, arg)
            parts.append(f"CASE WHEN {t.is_array()} THEN EXISTS (SELECT 1 FROM {t.each()} AS {alias} "
                         f"WHERE {inner}) ELSE {d.false} END")
        return _and(d, parts)

    def where(self, filter: dict | Logical | None) -> str:
        """SQL boolean expression for a filter (dict or parsed AST)."""
        node = filter if isinstance(filter, Logical) else parse_filter(filter)
        return self._node(node, self.d.doc_column, top=True)

    def order_by(self, sort: Any) -> str:
        """ORDER BY terms (without the keywords) for a sort; the ``_id`` tie-breaker included."""
        terms = []
        for field, direction in validate_sort(sort):
            suffix = "" if direction == 1 else " DESC"
            terms.extend(e + suffix for e in sort_expressions(field, self.d))
        return ", ".join(terms)


def sort_expressions(field: str, dialect: Dialect = SQLITE) -> list[str]:
    """The expressions a sort on ``field`` orders by: ``[rank, value]`` (``[id]`` for ``_id``)."""
    comps = split_path(field)
    if comps == ("_id",):
        return [dialect.id_column]
    return dialect.sort_keys(dialect.doc_column, dialect.path(dialect.doc_column, comps))


def index_expressions(keys: list[tuple[str, int]], dialect: Dialect = SQLITE, *, unique: bool = False) -> list[str]:
    """Index terms serving filters and sorts on ``keys`` (each field's rank and value, with its direction)."""
    terms = []
    for field, direction in keys:
        suffix = " DESC" if direction == -1 else ""
        terms.extend(e + suffix for e in dialect.index_keys(sort_expressions(field, dialect), unique))
    return terms
