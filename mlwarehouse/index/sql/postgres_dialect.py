"""The PostgreSQL dialect of the query compiler (:mod:`mlwarehouse.index.sql.compiler`): documents in a ``json``
column."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

from mlwarehouse.errors import QueryError
from mlwarehouse.index.sql.compiler import Dialect
from mlwarehouse.query import ARRAY, BOOL, NULL, NUMBER, OBJECT, STRING, is_index, type_rank

__all__ = ["PostgresDialect", "POSTGRES", "pg_regex"]


_PG_RANKS = ("CASE json_typeof({x}) WHEN 'number' THEN 1 WHEN 'string' THEN 2 WHEN 'object' THEN 3 "
             "WHEN 'array' THEN 4 WHEN 'boolean' THEN 5 ELSE 0 END")
_PG_TYPES = {NULL: ("null",), NUMBER: ("number",), STRING: ("string",), OBJECT: ("object",), ARRAY: ("array",),
             BOOL: ("boolean",)}
_INT_LIKE = re.compile(r"^-?[0-9]+$")
_TWO_53, _TWO_63 = 2.0 ** 53, 2.0 ** 63


class PostgresDialect(Dialect):
    """PostgreSQL over a ``json`` column holding each document's compact JSON text.

    Why ``json`` and not ``jsonb``: the reference semantics compare objects and arrays by their compact JSON
    text (key order matters, ``[1] != [1.0]``) and return documents exactly as written; ``jsonb`` reorders
    keys and respells numbers (``1e+20`` comes back as an integer). ``json`` keeps the text, so the sub-value
    at a path (``doc #> '{a,b}'``) is the exact compact text, and expression indexes serve filters and sorts.

    Each value is seen through three keys: its type rank, ``num`` (numbers exactly as ``numeric``, booleans as
    0/1, else 0) and ``txt`` (strings, and the JSON text of objects and arrays, in code point order:
    ``COLLATE "C"``; else ''). The key a class does not use is constant, so equality on it is an index condition.
    Numbers compare exactly across int and float: a float is its shortest decimal, except integral floats in
    [2**53, 2**63), taken as their exact integer value so that they compare right against 64-bit integers.
    Regular expressions are translated to PostgreSQL's (see :func:`pg_regex`).
    """

    true, false = "true", "false"
    placeholder = "%s"
    no_limit = None

    def bind(self, rank: int | None = None) -> str:
        if rank in (NUMBER, BOOL):
            return "%s::numeric"
        return "%s::text"

    def not_(self, part: str) -> str:
        return f"NOT coalesce({part}, false)"

    def is_type(self, type_expr: str, kind: str) -> str:
        return f"{type_expr} IS NOT DISTINCT FROM '{kind}'"

    def path(self, doc: str, comps: tuple[str, ...]) -> str:
        """The JSON sub-value itself (the opaque ``path`` of this dialect); SQL NULL when missing."""
        expr, run = doc, []
        for comp in comps:
            if _INT_LIKE.match(comp) and not is_index(comp):  # PostgreSQL would index arrays with "-1" or "01"
                if run:
                    expr = f"({expr} #> '{_pg_path(run)}')"
                    run = []
                expr = f"(CASE WHEN json_typeof({expr}) = 'array' THEN NULL ELSE {expr} -> '{comp}' END)"
            else:
                run.append(comp)
        return f"({expr} #> '{_pg_path(run)}')" if run else expr

    def type_of(self, doc: str, path: str) -> str:
        return f"json_typeof({path})"

    def extract(self, doc: str, path: str) -> str:
        return path

    def rank(self, doc: str, path: str) -> str:
        return _PG_RANKS.format(x=path)

    def in_class(self, doc: str, path: str, rank: int) -> str:
        # the other key is a constant within a class: saying so lets a (rank, num, txt) index serve sorts
        other = f"{_pg_num(path)} = 0" if rank in (STRING, OBJECT, ARRAY) else f"{_pg_txt(path)} = ''"
        return f"{self.rank(doc, path)} = {rank}" if rank == NULL else f"{self.rank(doc, path)} = {rank} AND {other}"

    def value(self, doc: str, path: str, rank: int) -> str:
        return _pg_num(path) if rank in (NUMBER, BOOL) else _pg_txt(path)

    def sort_keys(self, doc: str, path: str) -> list[str]:
        return [self.rank(doc, path), _pg_num(path), _pg_txt(path)]

    def index_keys(self, keys: list[str], unique: bool) -> list[str]:
        if unique and len(keys) == 3:  # NULL only for null/missing (distinct, as in SQLite), never a value
            rank, num, txt = keys
            keys = [rank, f"CASE WHEN {rank} = 0 THEN NULL ELSE {num} END",
                    f"CASE WHEN {rank} = 0 THEN NULL ELSE {txt} END"]
        return [f"({e})" for e in keys]  # PostgreSQL indexes an expression only in parentheses

    def each(self, json_expr: str, path: str | None) -> str:
        return f"json_array_elements({path or json_expr})"

    def elem_in_class(self, alias: str, rank: int) -> str:
        return f"{self.rank('', alias + '.value')} = {rank}"

    def elem_value(self, alias: str, rank: int | None = None) -> str:
        x = f"{alias}.value"
        return x if rank is None else self.value("", x, rank)

    def elem_is(self, alias: str, kind: str) -> str:
        return f"json_typeof({alias}.value) = '{kind}'"

    def array_length(self, json_expr: str, path: str | None) -> str:
        return f"json_array_length({path or json_expr})"

    def regex(self, value: str) -> str:
        return f"(({value}) COLLATE pg_catalog.\"default\" ~ %s::text)"

    def regex_params(self, pattern: str, flags: int) -> list:
        return [pg_regex(pattern, flags)]

    def param(self, value: Any) -> Any:
        """Numbers as exact ``Decimal`` (see the class docstring), booleans as 0/1, containers as JSON text."""
        rank = type_rank(value)
        if rank == NUMBER:
            if isinstance(value, int):
                return Decimal(value)
            if value.is_integer() and _TWO_53 <= abs(value) < _TWO_63:
                return Decimal(int(value))
            return Decimal(repr(value)) if math.isfinite(value) else Decimal(value)
        return super().param(value)


def _pg_path(comps: list[str]) -> str:
    return "{" + ",".join(f'"{c}"' for c in comps) + "}"  # quoted: '{null}' would be a NULL element


def _pg_num(x: str) -> str:
    t = f"({x} #>> '{{}}')"
    return (f"(CASE json_typeof({x}) WHEN 'number' THEN CASE WHEN {t} ~ '[.eE]' "
            f"AND abs({t}::float8) >= {_TWO_53!r}::float8 AND abs({t}::float8) < {_TWO_63!r}::float8 "
            f"THEN {t}::float8::int8::numeric ELSE {t}::numeric END "
            f"WHEN 'boolean' THEN CASE WHEN {x}::text = 'true' THEN 1 ELSE 0 END ELSE 0 END)")


def _pg_txt(x: str) -> str:
    return (f"((CASE json_typeof({x}) WHEN 'string' THEN {x} #>> '{{}}' WHEN 'object' THEN {x}::text "
            f"WHEN 'array' THEN {x}::text ELSE '' END) COLLATE \"C\")")


_UNSUPPORTED = ("(?P", "(?#", "(?>", "(?(", "(?a", "(?i", "(?L", "(?m", "(?s", "(?u", "(?x", "(?-")


def pg_regex(pattern: str, flags: int) -> str:
    """A PostgreSQL ARE that matches like Python's ``re.search(pattern, flags)``.

    Translated: ``.`` (no newline unless ``re.S``), ``^`` and ``$`` (``$`` also before a final newline;
    line anchors with ``re.M``), ``\\b``/``\\B`` (``\\y``/``\\Y``); flags ``i`` and ``x`` become embedded options.
    Differences that remain: ``\\d \\w \\s`` and case-insensitive matching of non-ASCII letters follow the
    database's LC_CTYPE rather than Unicode; ``\\x`` and ``\\u`` escapes take any number of hex digits.
    Named groups, comments, atomic groups, conditionals and inline flags raise QueryError.
    """
    for construct in _UNSUPPORTED:
        if construct in pattern:
            raise QueryError(f"$regex {pattern!r}: {construct!r} is not supported by the PostgreSQL index")
    out, i, n, in_class = [], 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1:i + 2]
            out.append({"b": "\\y", "B": "\\Y"}.get(nxt, c + nxt) if not in_class else c + nxt)
            i += 2
            continue
        if in_class:
            out.append(c)
            in_class = c != "]"
            i += 1
            continue
        if c == "[":
            j = i + 1
            if pattern[j:j + 1] == "^":
                j += 1
            if pattern[j:j + 1] == "]":  # a leading ']' is a literal member
                j += 1
            out.append(pattern[i:j])
            in_class, i = True, j
            continue
        if c == "." and not flags & re.S:
            out.append("[^\\n]")
        elif c == "^" and flags & re.M:
            out.append("(?:^|(?<=\\n))")
        elif c == "$":
            out.append("(?=\\n|$)" if flags & re.M else "(?=\\n?$)")
        else:
            out.append(c)
        i += 1
    options = "s" + ("i" if flags & re.I else "") + ("x" if flags & re.X else "")
    return f"(?{options})" + "".join(out)


POSTGRES = PostgresDialect()
