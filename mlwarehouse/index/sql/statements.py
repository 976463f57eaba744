"""How the SQL backends' finds and counts become statements: compiled once per shape of a plain filter, and split
on a field that may hold arrays where an index holds it (see the notes of :mod:`mlwarehouse.index.sqlbase`).

:class:`Statements` is a part of :class:`~mlwarehouse.index.sqlbase.SQLIndex`, apart because it has one job: the
text and parameters of a statement. It reads the host's ``dialect``, ``_table``, ``_doc_out``, ``indexes`` and
``_scalar_fields``, and runs nothing but the read of the indexes a plan may use.
"""

from __future__ import annotations

import time

from mlwarehouse.index.base import Filter, Sort
from mlwarehouse.index.sql.compiler import Compiler
from mlwarehouse.index.sql.plans import plain_shape, split_field
from mlwarehouse.query import parse_filter

__all__ = ["Statements", "INDEX_FIELDS_TTL"]

#: seconds a process trusts what it read of a collection's indexes (for the split plans)
INDEX_FIELDS_TTL = 5.0
_MAX_LIMIT = (1 << 63) - 1
_STATEMENTS = 512  # compiled statements kept per index object (all dropped when full)


class Statements:
    """The statements of an :class:`~mlwarehouse.index.sqlbase.SQLIndex` (a part of it: see the module notes)."""

    def _fields_cache(self) -> dict[str, tuple[float, tuple[tuple[str, ...], ...]]]:
        """collection -> (when read, each index's field paths); made on first use (a read-only SQLite index
        skips this class's ``__init__``)."""
        cache = self.__dict__.get("_index_fields")
        if cache is None:
            cache = self.__dict__["_index_fields"] = {}
        return cache

    def _indexed_fields(self, collection: str) -> tuple[tuple[str, ...], ...]:
        """The field paths of each index of ``collection``, as last read (at most :data:`INDEX_FIELDS_TTL` s ago)."""
        cache = self._fields_cache()
        now = time.monotonic()
        entry = cache.get(collection)
        if entry is None or now - entry[0] > INDEX_FIELDS_TTL:
            fields = tuple(tuple(f for f, _ in ix["keys"]) for ix in self.indexes(collection))
            entry = cache[collection] = (now, fields)
        return entry[1]

    def _ids_statement(self, collection: str, filter: Filter | None, *, source: str | None = None,
                       columns: str = "id") -> tuple[str, list] | None:
        """``SELECT id`` of the documents matching ``filter`` as this backend would select them (split on a field
        where that lets an index serve it: a ``UNION ALL`` of disjoint halves), and its parameters; None when the
        collection does not exist. For a larger statement that selects by a filter, such as a vector search's
        exact plan: inlined, a filter on a field that may hold arrays reads every row. ``source`` and ``columns``:
        another table with a ``doc`` column of the collection's documents (or of their filtered fields) and the
        columns to select from it, planned on the collection's indexes (which that table repeats)."""
        node = parse_filter(filter)
        scalars = self._scalar_fields(collection)
        if scalars is None:
            return None
        table, field = source or self._table(collection), self._split(collection, node, scalars)
        branches = [None] if field is None else [(field, "whole"), (field, "elements")]
        parts, params = [], []
        for branch in branches:
            c = Compiler(self.dialect, scalar_fields=scalars, branch=branch)
            parts.append(f"SELECT {columns} FROM {table} WHERE {c.where(node)}")
            params += c.params
        return " UNION ALL ".join(parts), params

    def _split(self, collection: str, node, scalars: frozenset[str]):
        """The conjunct to split ``node`` on (see :mod:`mlwarehouse.index.sqlbase`), or None."""
        if not node.children:
            return None
        indexed = self._indexed_fields(collection)
        return split_field(node, scalars, indexed) if indexed else None

    def _select(self, collection: str, scalars: frozenset[str], node, sort: Sort | None,
                limit: int | None) -> tuple[str, list]:
        """The compiled ``SELECT id, doc`` of the matching rows, and its parameters."""
        c = Compiler(self.dialect, scalar_fields=scalars)
        sql = f'SELECT id, {self._doc_out} FROM {self._table(collection)} WHERE {c.where(node)}'
        if sort is not None:
            sql += f" ORDER BY {c.order_by(sort)}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql, c.params

    def _statement(self, kind: str, collection: str, node, scalars: frozenset[str], sort: Sort | None,
                   limit: int | None, skip: int) -> tuple[str, list]:
        """The SQL of a ``find`` or ``count`` and its parameters, split on a field where that serves (see
        :mod:`mlwarehouse.index.sqlbase`). The text of a plain filter (:func:`~mlwarehouse.index.sql.plans.plain_shape`)
        is compiled once per shape and kept: compiling took most of the time of a query that an index answers in
        microseconds."""
        field = self._split(collection, node, scalars)
        plain = plain_shape(node, field)
        want = None if limit is None else min(limit + skip, _MAX_LIMIT)
        extras = {-1: want, -2: self.dialect.no_limit if limit is None else limit, -3: skip}
        if plain is not None:
            shape, operands, at = plain
            key = (kind, collection, scalars, shape, at, None if sort is None else tuple(map(tuple, sort)),
                   limit is None, skip == 0)
            cache = self.__dict__.get("_statements")
            if cache is None:
                cache = self.__dict__["_statements"] = {}
            hit = cache.get(key)
            if hit is None:
                if len(cache) >= _STATEMENTS:
                    cache.clear()
                hit = cache[key] = self._compile(kind, collection, node, scalars, field, sort, limit, skip)[:2]
            sql, slots = hit
            param = self.dialect.param
            return sql, [param(operands[s]) if s >= 0 else extras[s] for s in slots]
        sql, slots, params = self._compile(kind, collection, node, scalars, field, sort, limit, skip)
        return sql, [v if s >= 0 else extras[s] for s, v in zip(slots, params)]

    def _compile(self, kind: str, collection: str, node, scalars: frozenset[str], field, sort: Sort | None,
                 limit: int | None, skip: int) -> tuple[str, list[int], list]:
        """``(sql, slots, params)`` of a statement: a parameter's slot is the number of the field whose operand it
        binds (the parameter is in ``params``), or -1 (``skip + limit``), -2 (the limit), -3 (the skip).

        Split on ``field``, a find is the ``UNION ALL`` of the two halves (disjoint), each sorted and cut to ``skip
        + limit`` rows in its own subquery, then merged in the same order: the same rows as the one query; a count
        adds the halves' counts."""
        p, table = self.dialect.placeholder, self._table(collection)
        slots: list[int] = []
        params: list = []

        def where(c: Compiler) -> str:
            text = c.where(node)
            assert len(c.sources) == len(c.params), "a parameter outside any field"
            slots.extend(c.sources)
            params.extend(c.params)
            return text

        def extra(slot: int) -> str:
            slots.append(slot)
            params.append(None)
            return p

        order = Compiler(self.dialect).order_by(sort)  # no parameters
        if field is None:
            c = Compiler(self.dialect, scalar_fields=scalars)
            if kind == "count":
                sql = f"SELECT count(*) FROM {table} WHERE {where(c)}"
            else:
                sql = f"SELECT {self._doc_out} FROM {table} WHERE {where(c)} ORDER BY {order}"
                if limit is not None or skip:
                    sql += f" LIMIT {extra(-2)} OFFSET {extra(-3)}"
        else:
            halves = [Compiler(self.dialect, scalar_fields=scalars, branch=(field, h)) for h in ("whole", "elements")]
            if kind == "count":
                sql = "SELECT " + " + ".join(f"(SELECT count(*) FROM {table} WHERE {where(c)})" for c in halves)
            else:
                parts = []
                for i, c in enumerate(halves):
                    inner = f"SELECT id, doc FROM {table} WHERE {where(c)}"
                    if limit is not None:
                        inner += f" ORDER BY {order} LIMIT {extra(-1)}"
                    parts.append(f"SELECT id, doc FROM ({inner}) AS h{i}")
                sql = f"SELECT {self._doc_out} FROM ({' UNION ALL '.join(parts)}) AS u ORDER BY {order}"
                if limit is not None or skip:
                    sql += f" LIMIT {extra(-2)} OFFSET {extra(-3)}"
        return sql, slots, params
