"""How the SQL backends plan a query before compiling it: which conjunct to split into index-ordered halves, and
when a compiled filter's text can be cached by its shape (see :mod:`mlwarehouse.index.sqlbase`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from mlwarehouse.query import ARRAY, BOOL, NUMBER, OBJECT, STRING, Field, Logical, type_rank

__all__ = ["split_field", "plain_shape"]

_SPLIT_OPS = frozenset({"$eq", "$in", "$gt", "$gte", "$lt", "$lte"})
_SPLIT_RANKS = frozenset({NUMBER, STRING, BOOL})


def _conjuncts(node: Logical) -> list:
    """The fields ANDed at the top of a filter (through nested ``$and``), in order."""
    out, stack = [], [node]
    while stack:
        current = stack.pop(0)
        if current.op == "$and":
            for child in current.children:
                (stack if isinstance(child, Logical) else out).append(child)
    return out


def _splittable(field: Field) -> bool:
    for op, arg in field.ops:
        if op not in _SPLIT_OPS:
            return False
        values = arg if op == "$in" else [arg]
        if not values or any(type_rank(v) not in _SPLIT_RANKS for v in values):
            return False
    return bool(field.ops)


def split_field(node: Logical, scalar_fields: Collection[str], indexes: Collection[Sequence[str]]) -> Field | None:
    """The conjunct of ``node`` to split the query on, or None.

    A condition on a field that may hold an array (equality, ``$in`` or a range, with numbers, strings or
    booleans) compiles to "the value passes OR an element of the array does": no index serves that OR, nor a sort
    after it. Its two halves select disjoint documents (the value's rank is 1, 2 or 5, against 4 for an array),
    so the query can run as the ``UNION ALL`` of both (:class:`Compiler` ``branch``), each an index range in sort
    order, the second usually empty. Worth it only where an index (``indexes``: each one's field paths) holds the
    field after fields that the filter fixes by equality, so that both halves are index ranges; otherwise both
    would scan. Equalities are taken before ranges, then filter order.
    """
    fields = _conjuncts(node)
    fixed = {f.path for f in fields if len(f.ops) == 1 and f.ops[0][0] == "$eq"
             and type_rank(f.ops[0][1]) not in (OBJECT, ARRAY)}
    candidates = [f for f in fields if f.path not in scalar_fields and f.comps != ("_id",) and _splittable(f)]
    candidates.sort(key=lambda f: f.ops[0][0] != "$eq" or len(f.ops) > 1)
    for field in candidates:
        for keys in indexes:
            if field.path in keys and all(k in fixed for k in keys[:list(keys).index(field.path)]):
                return field
    return None


def plain_shape(node: Logical, split: Field | None = None) -> tuple[tuple, list, int] | None:
    """What a compiled filter's text depends on, if the filter is *plain* (each field tested for equality with one
    number, string, boolean or null), else None: ``(shape, operands, split position)``.

    The text of a plain filter depends only on its structure, its paths and the rank of each operand, and each of
    its parameters binds the operand of one field (:attr:`Compiler.sources`): so the SQL compiled once serves every
    filter of the same shape (backends cache it), with the operands bound anew. ``split`` is the field the query is
    split on; its position (in filter order) is part of what the text depends on.
    """
    operands: list = []
    where = [-1]

    def walk(n) -> tuple | None:
        if isinstance(n, Field):
            if len(n.ops) != 1 or n.ops[0][0] != "$eq":
                return None
            rank = type_rank(n.ops[0][1])
            if rank in (OBJECT, ARRAY):
                return None
            if n is split:
                where[0] = len(operands)
            operands.append(n.ops[0][1])
            return (n.path, rank)
        parts = []
        for child in n.children:
            part = walk(child)
            if part is None:
                return None
            parts.append(part)
        return (n.op, tuple(parts))

    shape = walk(node)
    return None if shape is None else (shape, operands, where[0])
