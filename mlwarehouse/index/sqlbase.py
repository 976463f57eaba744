"""What the SQL index backends (SQLite, PostgreSQL) share: one table per collection, documents as JSON text.

Tables are ``c_<collection>(id, doc)``; ``mlw_meta`` records each collection's scalar fields and indexes.
Filters and sorts compile to SQL with bound parameters (:mod:`mlwarehouse.index.sql.compiler`, in the backend's
dialect); updates are applied in Python (:func:`mlwarehouse.query.apply_update`) to rows selected inside one
write transaction, so every write, ``find_one_and_update`` included, is atomic across processes.

A condition (equality, ``$in``, a range) on a field that may hold an array is what no index serves, with or without
a sort: it means "the value passes, or an element of the array does". When an index holds that field, ``find`` and
``count`` run the query as the union of both halves (:func:`mlwarehouse.index.sql.plans.split_field`), each an
index range in sort order. Which fields indexes hold is read from ``mlw_meta`` and trusted for a few seconds
(another process's new index is used within that time); it only decides the plan, never the result. The SQL of
plain filters (equalities) is compiled once per shape and kept per index object, with fresh parameters each time;
that compiling is :mod:`mlwarehouse.index.sql.statements`.

A backend supplies only what differs (see :class:`SQLIndex`): its connections and write transactions, its
dialect, how its tables and ``mlw_meta`` are declared, how a document is read and bound, how a chunk is
bulk-written, the row-lock clauses of read-modify-writes, the lock taken around DDL, the notification sent
after a write, and whether a view exists.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from itertools import islice
from typing import Any

from mlwarehouse.errors import DuplicateKey, InvalidDocument
from mlwarehouse.index.base import Filter, IndexBackend, Projection, Sort, Update
from mlwarehouse.index.sql.compiler import Compiler, Dialect, index_expressions
from mlwarehouse.index.sql.statements import Statements
from mlwarehouse.query import (
    apply_update,
    get_path,
    json_text,
    json_value,
    parse_filter,
    split_path,
    validate_sort,
    validate_update,
    values_equal,
)
from mlwarehouse.query.documents import plausible_document, projector, validate_document

__all__ = ["SQLIndex"]

_SWAP_CHUNK = 500  # ids per SELECT of swap_many (bound parameters stay well under every driver's limit)


class SQLIndex(Statements, IndexBackend):
    """An :class:`~mlwarehouse.index.base.Index` over SQL tables; subclasses supply the hooks below (its statements
    are compiled by :class:`~mlwarehouse.index.sql.statements.Statements`)."""

    #: the compiler's dialect; its ``placeholder`` is also the one of every statement written here
    dialect: Dialect
    #: the column declarations of a collection's table, and of ``mlw_meta``
    _table_columns = "(id TEXT PRIMARY KEY, doc TEXT NOT NULL)"
    _meta_columns = "(collection TEXT PRIMARY KEY, scalar_fields TEXT NOT NULL, indexes TEXT NOT NULL)"
    #: the ``doc`` column as selected (JSON text), and the bound parameter written to it
    _doc_out, _doc_in = "doc", "?"
    #: row-lock clauses: ``find_one_and_update`` tries each in turn until one selects a row; the other
    #: read-modify-writes (``update_many``, index bookkeeping) use ``_update_lock``
    _claim_locks: tuple[str, ...] = ("",)
    _update_lock = ""

    def __init__(self, *, chunk_size: int) -> None:
        """Called last by a backend's ``__init__``: creates ``mlw_meta`` through the backend's hooks."""
        super().__init__()
        self.chunk_size = chunk_size
        with self._transaction() as con:
            self._lock_ddl(con)
            con.execute(f"CREATE TABLE IF NOT EXISTS mlw_meta {self._meta_columns}")

    def table_name(self, collection: str) -> str:
        """The (unquoted) table that holds ``collection``: what the SQL views and hand-written SQL read."""
        return "c_" + collection

    def _table(self, collection: str) -> str:
        """The table of ``collection`` quoted, as the statements here name it."""
        return f'"{self.table_name(collection)}"'

    # -- hooks ---------------------------------------------------------------------------------------------
    @abstractmethod
    def _connection(self) -> AbstractContextManager[Any]:
        """A connection for reads, with driver errors mapped (a context manager)."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Any]:
        """A connection inside a write transaction: committed on success, rolled back on any error."""

    def _lock_ddl(self, con) -> None:
        """Serialise schema changes with other processes (where the write transaction does not already)."""

    def _bulk_insert(self, con, collection: str, rows: list[tuple[str, str]]) -> None:
        """Insert ``(id, json_text)`` rows in the open transaction."""
        p = self.dialect.placeholder
        con.cursor().executemany(f'INSERT INTO {self._table(collection)} (id, doc) VALUES ({p}, {self._doc_in})', rows)

    def _after_write(self, con, collection: str) -> None:
        """Called in the transaction of every write that changed ``collection`` (notifications)."""

    @abstractmethod
    def _view_exists(self, con, name: str) -> bool:
        """Whether the view ``name`` exists (seen in the open transaction)."""

    # -- collections and indexes ---------------------------------------------------------------------------
    def _meta(self, con, collection: str, column: str, lock: str = "") -> Any:
        """A JSON column of the collection's ``mlw_meta`` row, or None if there is no row."""
        row = con.execute(f"SELECT {column} FROM mlw_meta WHERE collection = {self.dialect.placeholder}{lock}",
                          (collection,)).fetchone()
        return None if row is None else json_value(row[0])

    def _read_scalar_fields(self, collection: str) -> list[str] | None:
        with self._connection() as con:
            return self._meta(con, collection, "scalar_fields")

    def ensure_collection(self, collection: str, *, scalar_fields: Sequence[str] = ()) -> None:
        wanted = self._wanted(collection, scalar_fields)
        if wanted is None:
            return
        stored = self._read_scalar_fields(collection)  # a read first: every process opening a warehouse asks
        if stored is not None and wanted <= set(stored):  # the row is written with the table, in one transaction
            self._remember(collection, stored)
            return
        d, p, table = self.dialect, self.dialect.placeholder, self._table(collection)
        with self._transaction() as con:
            self._lock_ddl(con)
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} {self._table_columns}")
            old = set(self._meta(con, collection, "scalar_fields") or ())
            for field in sorted(wanted - old):
                kind = d.type_of("doc", d.path("doc", split_path(field)))
                bad = con.execute(f"SELECT id FROM {table} WHERE {kind} IN ('array', 'object') LIMIT 1").fetchone()
                if bad:
                    raise InvalidDocument(f"collection {collection!r}: cannot declare {field!r} scalar, "
                                          f"document {bad[0]!r} holds an array or object there")
            fields = sorted(old | wanted)
            con.execute(f"INSERT INTO mlw_meta (collection, scalar_fields, indexes) VALUES ({p}, {p}, '[]') "
                        "ON CONFLICT (collection) DO UPDATE SET scalar_fields = excluded.scalar_fields",
                        (collection, json.dumps(fields)))
        self._remember(collection, fields)

    def create_index(self, collection: str, keys: Sequence[tuple[str, int]], *, unique: bool = False) -> None:
        spec, name = self._index_spec(collection, keys, unique)
        self.ensure_collection(collection)
        with self._connection() as con:  # a read first: an index recorded in mlw_meta was made in that transaction
            known = self._meta(con, collection, "indexes") or []
        if any(old.get("name") == name for old in known):
            return
        terms = index_expressions(spec, self.dialect, unique=unique)
        if not unique and all(f != "_id" for f, _ in spec):
            terms.append("id")  # matches the _id tie-breaker of every sort
        p = self.dialect.placeholder
        with self._transaction() as con:
            self._lock_ddl(con)
            con.execute(f'CREATE {"UNIQUE " if unique else ""}INDEX IF NOT EXISTS "{name}" '
                        f'ON {self._table(collection)} ({", ".join(terms)})')
            indexes = self._meta(con, collection, "indexes", self._update_lock)
            if all(old["name"] != name for old in indexes):
                indexes.append({"name": name, "keys": spec, "unique": unique})
                con.execute(f"UPDATE mlw_meta SET indexes = {p} WHERE collection = {p}",
                            (json.dumps(indexes), collection))
        self._fields_cache().pop(collection, None)  # seen by this process's next query at once
        self._index_made(collection)

    def _index_made(self, collection: str) -> None:
        """After :meth:`create_index` made an index (not when it was there already): a backend's hook."""

    def indexes(self, collection: str) -> list[dict]:
        """The indexes created on a collection: ``{"name", "keys", "unique"}``."""
        with self._connection() as con:
            return self._meta(con, collection, "indexes") or []

    def collections(self) -> list[str]:
        with self._connection() as con:
            return sorted(r[0] for r in con.execute("SELECT collection FROM mlw_meta"))

    # -- writes --------------------------------------------------------------------------------------------
    def _encode(self, doc: Any, scalars: frozenset[str], collection: str) -> str:
        """Validated compact JSON text of a document (fast path for plain documents)."""
        text = None
        if plausible_document(doc):
            try:
                text = json_text(doc)
            except ValueError:  # NaN or infinity: let the full validation name the field
                pass
        if text is None or "\\u0000" in text:  # NUL: the full validation names the string
            validate_document(doc)
            text = json_text(doc)
            self._check_scalars(doc, scalars, collection)
            return text
        for field in scalars:  # as _check_scalars, cheaper: a plausible document holds no subclass of dict or list
            value = doc.get(field) if "." not in field else get_path(doc, field)
            if type(value) is dict or type(value) is list:
                raise self._not_scalar(doc, field, collection)
        return text

    def insert_many(self, collection: str, docs: Iterable[dict], *, chunk_size: int | None = None) -> int:
        scalars = self._known(collection)
        size = chunk_size or self.chunk_size
        encode = self._encode
        it = iter(docs)
        total = 0
        while chunk := list(islice(it, size)):
            texts = [encode(doc, scalars, collection) for doc in chunk]  # every document checked before writing
            rows = [(doc["_id"], text) for doc, text in zip(chunk, texts)]
            try:
                with self._transaction() as con:
                    self._bulk_insert(con, collection, rows)
                    self._after_write(con, collection)
            except DuplicateKey as exc:
                raise DuplicateKey(self._duplicate_message(collection, [r[0] for r in rows], exc)) from exc
            except InvalidDocument:  # a string the driver cannot encode: name the field
                for doc in chunk:
                    validate_document(doc)
                raise
            total += len(rows)
        return total

    def _duplicate_message(self, collection: str, ids: list[str], exc: Exception) -> str:
        seen: set[str] = set()
        for _id in ids:
            if _id in seen:
                return f"collection {collection!r}: _id {_id!r} appears twice in one insert"
            seen.add(_id)
        p = self.dialect.placeholder
        with self._connection() as con:
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                row = con.execute(f'SELECT id FROM {self._table(collection)} '
                                  f'WHERE id IN ({", ".join([p] * len(part))}) LIMIT 1', part).fetchone()
                if row:
                    return f"collection {collection!r}: a document with _id {row[0]!r} already exists"
        return f"collection {collection!r}: {exc}"

    def _rewrite(self, collection: str, filter: Filter | None, update: Update, *, first: bool,
                 sort: Sort | None = None) -> list[dict]:
        node = parse_filter(filter)
        ops = validate_update(update)
        validate_sort(sort)
        scalars = self._scalar_fields(collection)
        if scalars is None:
            return []
        sql, params = self._select(collection, scalars, node, sort if first else None, 1 if first else None)
        updated: list[dict] = []
        with self._transaction() as con:
            for lock in (self._claim_locks if first else (self._update_lock,)):
                rows = con.execute(sql + lock, params).fetchall()
                if rows:
                    break
            out = []
            for _id, text in rows:
                new = apply_update(json_value(text), ops)
                out.append((self._encode(new, scalars, collection), _id))
                updated.append(new)
            if out:
                con.cursor().executemany(f'UPDATE {self._table(collection)} SET doc = {self._doc_in} '
                                         f"WHERE id = {self.dialect.placeholder}", out)
                self._after_write(con, collection)
        return updated

    def update_many(self, collection: str, filter: Filter, update: Update) -> int:
        return len(self._rewrite(collection, filter, update, first=False))

    def find_one_and_update(self, collection: str, filter: Filter, update: Update, *,
                            sort: Sort | None = None) -> dict | None:
        docs = self._rewrite(collection, filter, update, first=True, sort=sort or [])
        return docs[0] if docs else None

    def replace_one(self, collection: str, doc: dict, *, upsert: bool = False) -> bool:
        scalars = self._known(collection) if upsert else self._scalar_fields(collection)
        if scalars is None:
            validate_document(doc)
            return False
        text = self._encode(doc, scalars, collection)
        p, table = self.dialect.placeholder, self._table(collection)
        with self._transaction() as con:
            if upsert:
                con.execute(f"INSERT INTO {table} (id, doc) VALUES ({p}, {self._doc_in}) "
                            "ON CONFLICT (id) DO UPDATE SET doc = excluded.doc", (doc["_id"], text))
            elif not con.execute(f"UPDATE {table} SET doc = {self._doc_in} WHERE id = {p}",
                                 (text, doc["_id"])).rowcount:
                return False
            self._after_write(con, collection)
        return True

    def swap_many(self, collection: str, docs: Sequence[dict], expected: Sequence[Any], *,
                  field: str = "_rev") -> list[str]:
        """One write transaction for the whole batch: the rows are read under the update lock, compared here with
        the reference rules, and the matching ones rewritten (a document named twice is compared the second time
        with what the first replacement wrote)."""
        checked = self._swaps(docs, expected, field)
        scalars = self._scalar_fields(collection)
        if scalars is None or not checked:
            for doc, _ in checked:
                validate_document(doc)
            return []
        texts = [self._encode(doc, scalars, collection) for doc, _ in checked]  # all checked before writing
        p, table = self.dialect.placeholder, self._table(collection)
        done: list[str] = []
        with self._transaction() as con:
            current: dict[str, Any] = {}
            for start in range(0, len(checked), _SWAP_CHUNK):
                ids = sorted({doc["_id"] for doc, _ in checked[start:start + _SWAP_CHUNK]} - current.keys())
                if ids:
                    rows = con.execute(f"SELECT id, {self._doc_out} FROM {table} WHERE id IN "
                                       f"({', '.join([p] * len(ids))}){self._update_lock}", ids).fetchall()
                    current.update((_id, json_value(text).get(field)) for _id, text in rows)
            out = []
            for (doc, want), text in zip(checked, texts):
                _id = doc["_id"]
                if _id in current and values_equal(current[_id], want):
                    current[_id] = doc.get(field)
                    out.append((text, _id))
                    done.append(_id)
            if out:
                con.cursor().executemany(f"UPDATE {table} SET doc = {self._doc_in} WHERE id = {p}", out)
                self._after_write(con, collection)
        return done

    def delete_many(self, collection: str, filter: Filter) -> list[dict]:
        node = parse_filter(filter)
        scalars = self._scalar_fields(collection)
        if scalars is None:
            return []
        c = Compiler(self.dialect, scalar_fields=scalars)
        with self._transaction() as con:
            rows = con.execute(f'DELETE FROM {self._table(collection)} WHERE {c.where(node)} RETURNING {self._doc_out}',
                               c.params).fetchall()
            if rows:
                self._after_write(con, collection)
        return [json_value(r[0]) for r in rows]

    # -- reads ---------------------------------------------------------------------------------------------
    def find(self, collection: str, filter: Filter | None = None, *, sort: Sort | None = None,
             limit: int | None = None, skip: int = 0, projection: Projection | None = None) -> Iterator[dict]:
        """Matching documents; the rows are fetched at once (no transaction stays open while you iterate)."""
        node = parse_filter(filter)
        validate_sort(sort)
        shape = projector(projection)
        self._check_limits(limit, skip)
        scalars = self._scalar_fields(collection)
        if scalars is None:
            return iter(())
        sql, params = self._statement("find", collection, node, scalars, sort, limit, skip)
        with self._connection() as con:
            rows = con.execute(sql, params).fetchall()
        if projection:
            return (shape(json_value(r[0])) for r in rows)
        return (json_value(r[0]) for r in rows)

    def count(self, collection: str, filter: Filter | None = None) -> int:
        node = parse_filter(filter)
        scalars = self._scalar_fields(collection)
        if scalars is None:
            return 0
        sql, params = self._statement("count", collection, node, scalars, None, None, 0)
        with self._connection() as con:
            return con.execute(sql, params).fetchone()[0]

    # -- views ---------------------------------------------------------------------------------------------
    def create_view(self, name: str, select_sql: str, *, replace: bool = False) -> None:
        """Create (idempotently, or replacing it) a view that :meth:`sql` can read."""
        self._check_name("view", name)
        with self._transaction() as con:
            self._lock_ddl(con)
            if replace:
                con.execute(f'DROP VIEW IF EXISTS "{name}"')
            if not self._view_exists(con, name):
                con.execute(f'CREATE VIEW "{name}" AS {select_sql}')
