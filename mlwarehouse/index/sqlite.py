"""The embedded index: one SQLite file, one table per collection, documents as compact JSON text.

Tables are ``c_<collection>(id TEXT PRIMARY KEY, doc TEXT NOT NULL)``; ``mlw_meta`` records each collection's
scalar fields and indexes. Filters and sorts compile to SQL (:mod:`mlwarehouse.index.sql.compiler`); updates are applied in
Python (:func:`mlwarehouse.query.apply_update`) inside ``BEGIN IMMEDIATE`` transactions, so every write,
including ``find_one_and_update``, is atomic across threads and processes. The database runs in WAL mode with
a long busy timeout, so concurrent writers wait for each other instead of failing.

Writers also take an advisory file lock (``<file>.lock``, ``flock``) around each write transaction. SQLite alone
makes a blocked writer sleep in its busy handler with growing back-off, so under contention from many processes
the lock sat idle between sleeps; a blocking ``flock`` hands it over at once and in arrival order (task claims went
from about 750 to over 1,000 per second with 8 processes). The lock is held only for the short transaction our
code runs (no user code), and the kernel releases it if the process dies.

Connections: one per thread (and per process: a forked child opens its own), created on first use. An
in-memory database (``":memory:"``) has a single connection shared by all threads under a lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading

try:
    import fcntl
except ImportError:  # Windows: SQLite's busy handler alone
    fcntl = None
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

from mlwarehouse.errors import BackendError, DuplicateKey, InvalidDocument, QueryError
from mlwarehouse.index.base import Filter, Index, Projection, Sort, Update
from mlwarehouse.index.sql.compiler import REGEX_FUNCTION, SQLITE, Compiler, index_expressions
from mlwarehouse.query import (
    apply_update,
    compile_regex,
    get_path,
    json_text,
    parse_filter,
    split_path,
    validate_sort,
    validate_update,
)
from mlwarehouse.query.documents import plausible_document, projector, validate_document

__all__ = ["SQLiteIndex"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*\Z")
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                 getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def _regex(pattern: str, flags: int, value: Any) -> int:
    return int(isinstance(value, str) and compile_regex(pattern, flags).search(value) is not None)


def _regexp(pattern: str, value: Any) -> int:  # the REGEXP operator, for hand-written SQL
    return _regex(pattern, 0, value)


def _read_only(action: int, *args) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise QueryError(f"invalid {kind} name {name!r}: use lowercase letters, digits and '_', starting with a letter")
    return name


_CONVERTED = frozenset({"true", "false", "array", "object"})


def _typed(value: Any, json_type: str | None) -> Any:
    """A json_extract result as the Python value (SQLite returns booleans as 1/0 and containers as text)."""
    if json_type == "true" or json_type == "false":
        return json_type == "true"
    if json_type == "array" or json_type == "object":
        return json.loads(value)
    return value


class SQLiteIndex(Index):
    """An :class:`~mlwarehouse.index.base.Index` in one SQLite file (or ``":memory:"``)."""

    name = "sqlite"
    supports_sql = True

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0, chunk_size: int = 1000):
        self.path = str(path)
        self.timeout = timeout
        self.chunk_size = chunk_size
        self._memory = self.path == ":memory:"
        if not self._memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._all: list[sqlite3.Connection] = []
        self._scalars: dict[str, frozenset[str]] = {}
        self._closed = False
        self._writer = threading.Lock()  # one writer per process; flock serialises processes
        self._lock_fd: int | None = None
        self._lock_pid: int | None = None
        with self._write() as con:
            con.execute("CREATE TABLE IF NOT EXISTS mlw_meta (collection TEXT PRIMARY KEY, "
                        "scalar_fields TEXT NOT NULL, indexes TEXT NOT NULL)")

    # -- connections and errors ----------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self._closed:
            raise BackendError(f"the SQLite index {self.path} is closed")
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                  check_same_thread=False, cached_statements=256)
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if not self._memory:
                con.execute("PRAGMA journal_mode = WAL")
                con.execute("PRAGMA synchronous = NORMAL")
            con.create_function(REGEX_FUNCTION, 3, _regex, deterministic=True)
            con.create_function("regexp", 2, _regexp, deterministic=True)
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open the SQLite index {self.path}: {exc}") from exc
        with self._lock:
            self._all.append(con)
        return con

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if self._memory:
            with self._lock:
                con = self._all[0] if self._all else self._open()
                with self._errors():
                    yield con
            return
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # new thread, or a forked child: never share
            local.con, local.pid = self._open(), os.getpid()
        with self._errors():
            yield local.con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any error."""
        with self._connection() as con, self._write_lock():
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """The process-wide writer lock (see the module docstring); a no-op in memory or without fcntl."""
        if self._memory or fcntl is None:
            yield
            return
        with self._writer:
            if self._lock_pid != os.getpid():  # first use, or a forked child: never share the parent's lock
                self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                self._lock_pid = os.getpid()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                raise DuplicateKey(f"duplicate key: {exc}") from exc
            raise BackendError(f"SQLite integrity error in {self.path}: {exc}") from exc
        except sqlite3.OperationalError as exc:
            msg = str(exc)
            if "locked" in msg or "busy" in msg:
                raise BackendError(f"the SQLite index {self.path} stayed locked by another writer for more than "
                                   f"{self.timeout:g} s ({msg})") from exc
            raise BackendError(f"SQLite error in {self.path}: {msg}") from exc
        except sqlite3.Error as exc:
            raise BackendError(f"SQLite error in {self.path}: {exc}") from exc
        except UnicodeEncodeError as exc:
            raise InvalidDocument(f"a string is not valid UTF-8 ({exc.reason})") from exc

    # -- collections and indexes ---------------------------------------------------------------------------
    def _scalar_fields(self, collection: str) -> frozenset[str] | None:
        """Scalar fields of a collection, or None if it does not exist (cached once seen)."""
        known = self._scalars.get(collection)
        if known is not None:
            return known
        _check_name("collection", collection)
        with self._connection() as con:
            row = con.execute("SELECT scalar_fields FROM mlw_meta WHERE collection = ?", (collection,)).fetchone()
        if row is None:
            return None
        fields = self._scalars[collection] = frozenset(json.loads(row[0]))
        return fields

    def ensure_collection(self, collection: str, *, scalar_fields: Sequence[str] = ()) -> None:
        _check_name("collection", collection)
        if isinstance(scalar_fields, str):
            raise QueryError(f"scalar_fields must be a list of field paths, not the string {scalar_fields!r}")
        wanted = {f for f in scalar_fields if split_path(f, "scalar field")}
        known = self._scalars.get(collection)
        if known is not None and wanted <= known:
            return
        table = f'"c_{collection}"'
        with self._write() as con:
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, doc TEXT NOT NULL)")
            row = con.execute("SELECT scalar_fields, indexes FROM mlw_meta WHERE collection = ?",
                              (collection,)).fetchone()
            old = set(json.loads(row[0])) if row else set()
            indexes = row[1] if row else "[]"
            for field in sorted(wanted - old):
                path = "$" + "".join(f'."{c}"' for c in split_path(field))
                bad = con.execute(f"SELECT id FROM {table} WHERE json_type(doc, ?) IN ('array', 'object') "
                                  "LIMIT 1", (path,)).fetchone()
                if bad:
                    raise InvalidDocument(f"collection {collection!r}: cannot declare {field!r} scalar, "
                                          f"document {bad[0]!r} holds an array or object there")
            fields = sorted(old | wanted)
            con.execute("INSERT OR REPLACE INTO mlw_meta VALUES (?, ?, ?)",
                        (collection, json.dumps(fields), indexes))
        self._scalars[collection] = frozenset(fields)

    def create_index(self, collection: str, keys: Sequence[tuple[str, int]], *, unique: bool = False) -> None:
        keys = list(keys)
        if not keys:
            raise QueryError("create_index needs at least one (field, 1 or -1) key")
        spec = validate_sort(keys)[:len(keys)]  # without the appended tie-breaker
        self.ensure_collection(collection)
        terms = index_expressions(spec)
        if not unique and all(f != "_id" for f, _ in spec):
            terms.append("id")  # matches the _id tie-breaker of every sort
        digest = hashlib.sha1(json.dumps([spec, unique]).encode()).hexdigest()[:12]
        name = f"ix_{collection}_{digest}"
        with self._write() as con:
            con.execute(f'CREATE {"UNIQUE " if unique else ""}INDEX IF NOT EXISTS "{name}" '
                        f'ON "c_{collection}" ({", ".join(terms)})')
            row = con.execute("SELECT indexes FROM mlw_meta WHERE collection = ?", (collection,)).fetchone()
            indexes = json.loads(row[0])
            entry = {"name": name, "keys": spec, "unique": unique}
            if all(old["name"] != name for old in indexes):
                indexes.append(entry)
                con.execute("UPDATE mlw_meta SET indexes = ? WHERE collection = ?", (json.dumps(indexes), collection))

    def indexes(self, collection: str) -> list[dict]:
        """The indexes created on a collection: ``{"name", "keys", "unique"}``."""
        with self._connection() as con:
            row = con.execute("SELECT indexes FROM mlw_meta WHERE collection = ?", (collection,)).fetchone()
        return json.loads(row[0]) if row else []

    def collections(self) -> list[str]:
        with self._connection() as con:
            return [r[0] for r in con.execute("SELECT collection FROM mlw_meta ORDER BY collection")]

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
        for field in scalars:
            value = doc.get(field) if "." not in field else get_path(doc, field)  # the common case, cheaply
            if type(value) is dict or type(value) is list:
                raise InvalidDocument(f"collection {collection!r}: {field!r} is a scalar field and cannot hold "
                                      f"an array or object (document {doc['_id']!r})")
        return text

    def _known(self, collection: str) -> frozenset[str]:
        scalars = self._scalar_fields(collection)
        if scalars is None:
            self.ensure_collection(collection)
            scalars = self._scalars[collection]
        return scalars

    def insert_many(self, collection: str, docs: Iterable[dict], *, chunk_size: int | None = None) -> int:
        scalars = self._known(collection)
        size = chunk_size or self.chunk_size
        sql = f'INSERT INTO "c_{collection}" (id, doc) VALUES (?, ?)'
        encode = self._encode
        it = iter(docs)
        total = 0
        while chunk := list(islice(it, size)):
            rows = [(doc, encode(doc, scalars, collection)) for doc in chunk]
            rows = [(doc["_id"], text) for doc, text in rows]
            try:
                with self._write() as con:
                    con.executemany(sql, rows)
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
        with self._connection() as con:
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                row = con.execute(f'SELECT id FROM "c_{collection}" WHERE id IN ({",".join("?" * len(part))}) '
                                  "LIMIT 1", part).fetchone()
                if row:
                    return f"collection {collection!r}: a document with _id {row[0]!r} already exists"
        return f"collection {collection!r}: {exc}"

    def _select(self, collection: str, filter: Filter | None, sort: Sort | None, limit: int | None):
        """The compiled ``SELECT id, doc`` of the matching rows, and its parameters."""
        c = Compiler(scalar_fields=self._scalars.get(collection, ()))
        where = c.where(filter)
        sql = f'SELECT id, doc FROM "c_{collection}" WHERE {where}'
        if sort is not None:
            sql += f" ORDER BY {c.order_by(sort)}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql, c.params

    def _rewrite(self, collection: str, filter: Filter | None, update: Update, *, first: bool,
                 sort: Sort | None = None) -> list[dict]:
        node = parse_filter(filter)
        ops = validate_update(update)
        validate_sort(sort)
        scalars = self._scalar_fields(collection)
        if scalars is None:
            return []
        updated: list[dict] = []
        sql, params = self._select(collection, node, sort if first else None, 1 if first else None)
        with self._write() as con:
            rows = con.execute(sql, params).fetchall()
            out = []
            for _id, text in rows:
                new = apply_update(json.loads(text), ops)
                out.append((self._encode(new, scalars, collection), _id))
                updated.append(new)
            con.executemany(f'UPDATE "c_{collection}" SET doc = ? WHERE id = ?', out)
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
        with self._write() as con:
            cur = con.execute(f'UPDATE "c_{collection}" SET doc = ? WHERE id = ?', (text, doc["_id"]))
            if cur.rowcount:
                return True
            if not upsert:
                return False
            con.execute(f'INSERT INTO "c_{collection}" (id, doc) VALUES (?, ?)', (doc["_id"], text))
        return True

    def delete_many(self, collection: str, filter: Filter) -> list[dict]:
        node = parse_filter(filter)
        if self._scalar_fields(collection) is None:
            return []
        c = Compiler(scalar_fields=self._scalars.get(collection, ()))
        where = c.where(node)
        with self._write() as con:
            rows = con.execute(f'DELETE FROM "c_{collection}" WHERE {where} RETURNING doc', c.params).fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- reads ---------------------------------------------------------------------------------------------
    def find(self, collection: str, filter: Filter | None = None, *, sort: Sort | None = None,
             limit: int | None = None, skip: int = 0, projection: Projection | None = None) -> Iterator[dict]:
        """Matching documents; the rows are fetched at once (no transaction stays open while you iterate)."""
        node = parse_filter(filter)
        validate_sort(sort)
        shape = projector(projection)
        for name, n in (("limit", limit), ("skip", skip)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 1 << 63):
                raise QueryError(f"{name} must be an integer from 0 to 2**63 - 1, not {n!r}")
        if self._scalar_fields(collection) is None:
            return iter(())
        c = Compiler(scalar_fields=self._scalars.get(collection, ()))
        sql = f'SELECT doc FROM "c_{collection}" WHERE {c.where(node)} ORDER BY {c.order_by(sort)}'
        params = c.params
        if limit is not None or skip:
            sql += " LIMIT ? OFFSET ?"
            params = [*params, -1 if limit is None else limit, skip]
        with self._connection() as con:
            rows = con.execute(sql, params).fetchall()
        if projection:
            return (shape(json.loads(r[0])) for r in rows)
        return (json.loads(r[0]) for r in rows)

    def values(self, collection: str, filter: Filter | None, fields: Sequence[str], *, sort: Sort | None = None,
               limit: int | None = None) -> list[tuple]:
        """Extracted in SQL (``json_extract``): no document is parsed in Python unless a value is a container."""
        node = parse_filter(filter)
        validate_sort(sort)
        paths = [SQLITE.path("doc", tuple(split_path(f, "field"))) for f in fields]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit < 1 << 63):
            raise QueryError(f"limit must be an integer from 0 to 2**63 - 1, not {limit!r}")
        if self._scalar_fields(collection) is None or not paths:
            return []
        c = Compiler(scalar_fields=self._scalars.get(collection, ()))
        columns = ", ".join(f"json_extract(doc, {p}), json_type(doc, {p})" for p in paths)
        sql = f'SELECT {columns} FROM "c_{collection}" WHERE {c.where(node)} ORDER BY {c.order_by(sort)}'
        params = c.params
        if limit is not None:
            sql += " LIMIT ?"
            params = [*params, limit]
        with self._connection() as con:
            rows = con.execute(sql, params).fetchall()
        n = len(paths)
        if all(t not in _CONVERTED for row in rows for t in row[1::2]):
            return [row[0::2] for row in rows] if n > 1 else [(row[0],) for row in rows]
        return [tuple(_typed(row[2 * i], row[2 * i + 1]) for i in range(n)) for row in rows]

    def count(self, collection: str, filter: Filter | None = None) -> int:
        node = parse_filter(filter)
        if self._scalar_fields(collection) is None:
            return 0
        c = Compiler(scalar_fields=self._scalars.get(collection, ()))
        with self._connection() as con:
            return con.execute(f'SELECT count(*) FROM "c_{collection}" WHERE {c.where(node)}', c.params).fetchone()[0]

    # -- raw SQL -------------------------------------------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | dict = ()) -> list[dict]:
        """Run one read-only statement (anything but reading is refused); rows as dicts."""
        with self._connection() as con:
            con.set_authorizer(_read_only)
            try:
                cur = con.execute(query, params)
                names = [d[0] for d in cur.description or ()]
                return [dict(zip(names, row)) for row in cur.fetchall()]
            except sqlite3.DatabaseError as exc:
                if "not authorized" in str(exc) or "syntax error" in str(exc):
                    raise QueryError(f"sql(): {exc} (only read-only SELECT statements are allowed)") from exc
                raise
            finally:
                con.set_authorizer(None)

    def create_view(self, name: str, select_sql: str, *, replace: bool = False) -> None:
        """Create (idempotently, or replacing it) a view that :meth:`sql` can read."""
        _check_name("view", name)
        with self._write() as con:
            if replace:
                con.execute(f'DROP VIEW IF EXISTS "{name}"')
            con.execute(f'CREATE VIEW IF NOT EXISTS "{name}" AS {select_sql}')

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for con in self._all:
                try:
                    con.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
            if self._lock_fd is not None and self._lock_pid == os.getpid():
                os.close(self._lock_fd)
            self._lock_fd = None

    def __repr__(self) -> str:
        return f"SQLiteIndex({self.path!r})"

