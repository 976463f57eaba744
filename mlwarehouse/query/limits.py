"""Bounds on queries, checked at validation so that no backend ever sees a query it cannot run in bounded time.

Every limit raises QueryError naming it. They keep real use working (an ``$in`` of 10,000 ids, a few levels of
``$and``/``$or``) and keep every compiled query inside what the backends accept: SQLite's expression depth (1000)
and parser stack, PostgreSQL's 65,535 bound parameters and stack depth, Python's recursion limit.

Regular expressions run in Python on SQLite and MongoDB (the reference matcher), so the rule below must make
catastrophic backtracking impossible there: a pattern is refused if a quantified part (``*``, ``+``, ``{m,n}``
with n > 1) contains another quantifier or an alternation, or if it uses a backreference. That refuses every
classic ReDoS shape (``(a+)+``, ``(\\w+)*``, ``(a|a)*``, ``(.*a){20}``, ``(a)\\1``); write ``\\w+`` instead of
``(\\w+)+``, or a character class instead of ``(a|b)*``.
"""

from __future__ import annotations

import re
from typing import Any

try:
    from re import _parser as _sre  # Python 3.11+
except ImportError:  # pragma: no cover - older Python
    import sre_parse as _sre

from mlwarehouse.errors import QueryError

__all__ = ["MAX_DEPTH", "MAX_TERMS", "MAX_EXPRESSION", "MAX_PREDICATES", "MAX_STRING", "MAX_PATTERN", "MAX_SORT_KEYS",
           "MAX_PATHS", "check_regex_safe", "check_depth", "check_terms"]

#: nesting of $and/$or/$nor/$not/$elemMatch levels and of operand values (arrays and objects)
MAX_DEPTH = 32
#: operators plus listed values ($in, $nin, $all) in one filter: each is a bound parameter (two on an array field)
MAX_TERMS = 15_000
#: operator tests in one filter (a list of values in $in counts once): PostgreSQL plans a filter of 100 tests
#: over JSON expressions in tens of seconds, 40 in well under a second
MAX_PREDICATES = 40
#: estimated depth of the compiled SQL expression (chains of AND/OR terms, nested); SQLite stops at 1000
MAX_EXPRESSION = 400
#: characters of one string operand, and of one regular expression
MAX_STRING = 100_000
MAX_PATTERN = 1_000
#: keys of a sort, paths of a projection or an update
MAX_SORT_KEYS = 32
MAX_PATHS = 1_000

_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, *filter(None, [getattr(_sre, "POSSESSIVE_REPEAT", None)])}
_BACKREFS = {_sre.GROUPREF, _sre.GROUPREF_EXISTS, *filter(None, [getattr(_sre, "GROUPREF_IGNORE", None)])}


def check_depth(depth: int, where: str) -> None:
    if depth > MAX_DEPTH:
        raise QueryError(f"{where}: nested deeper than the limit of {MAX_DEPTH} levels (MAX_DEPTH)")


def check_terms(count: int, where: str) -> None:
    if count > MAX_TERMS:
        raise QueryError(f"{where}: {count} terms exceed the limit of {MAX_TERMS} operators and listed values "
                         "in one query (MAX_TERMS); split it into several queries")


def _items(av: Any) -> list:
    """The sub-patterns of one parsed node's argument."""
    if isinstance(av, _sre.SubPattern):
        return [av]
    if isinstance(av, (list, tuple)):
        out = []
        for x in av:
            out.extend(_items(x))
        return out
    return []


def _walk(sub, pattern: str, in_repeat: bool) -> None:
    for op, av in sub:
        if op in _BACKREFS:
            raise QueryError(f"$regex {pattern!r}: backreferences are not allowed (they can take exponential time)")
        if op in _REPEATS:
            lo, hi, body = av
            if in_repeat:
                raise QueryError(f"$regex {pattern!r}: a quantifier inside a quantified group (a nested "
                                 "quantifier) can take exponential time; quantify only once")
            _walk(body, pattern, in_repeat or hi > 1)
            continue
        if op is _sre.BRANCH and in_repeat:
            raise QueryError(f"$regex {pattern!r}: an alternation (|) inside a quantified group can take "
                             "exponential time; use a character class or separate patterns")
        for child in _items(av):
            _walk(child, pattern, in_repeat)


def check_regex_safe(pattern: str, flags: int) -> None:
    """QueryError if ``pattern`` is too long or can backtrack catastrophically (see the module rule)."""
    if len(pattern) > MAX_PATTERN:
        raise QueryError(f"$regex of {len(pattern)} characters exceeds the limit of {MAX_PATTERN} (MAX_PATTERN)")
    try:
        parsed = _sre.parse(pattern, flags)
    except (re.error, RecursionError, OverflowError) as exc:
        raise QueryError(f"invalid regular expression {pattern!r}: {exc}") from None
    _walk(parsed, pattern, False)
