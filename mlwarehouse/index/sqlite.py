"""The embedded index: one SQLite file, one table per collection, documents as compact JSON text.

The tables, the compiled queries and the updates are those of :class:`mlwarehouse.index.sqlbase.SQLIndex`; here
is what SQLite does its own way. Write transactions are ``BEGIN IMMEDIATE``, so every write, including
``find_one_and_update``, is atomic across threads and processes. The database runs in WAL mode with a long busy
timeout, so concurrent writers wait for each other instead of failing.

Writers also take an advisory file lock (``<file>.lock``, ``flock``) around each write transaction. SQLite alone
makes a blocked writer sleep in its busy handler with growing back-off, so under contention from many processes
the lock sat idle between sleeps; a blocking ``flock`` hands it over at once and in arrival order (task claims went
from about 750 to over 1,000 per second with 8 processes). The lock is held only for the short transaction our
code runs (no user code), and the kernel releases it if the process dies.

Errors: a full disk (SQLite's ``SQLITE_FULL``, also a database at its ``max_page_count``) is a BackendError that
says so, with SQLite's error chained; SQLite has already rolled the transaction back then, so no second ROLLBACK
hides it. A file or folder that cannot be written (a read-only mount, a chmod'ed folder, or ``read_only=True``)
is opened read-only (``mode=ro``, or ``immutable=1`` where SQLite cannot create its shared-memory file there):
reads work, schema creation is skipped, and every write raises a BackendError that says the index is read-only.

Connections: one per thread (and per process: a forked child opens its own), created on first use. An
in-memory database (``":memory:"``) has a single connection shared by all threads under a lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from urllib.parse import quote

try:
    import fcntl
except ImportError:  # Windows: SQLite's busy handler alone
    fcntl = None
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlwarehouse.errors import BackendError, DuplicateKey, InvalidDocument, QueryError
from mlwarehouse.index.base import Filter, Sort
from mlwarehouse.index.sql.compiler import REGEX_FUNCTION, SQLITE, Compiler
from mlwarehouse.index.sqlbase import SQLIndex
from mlwarehouse.query import compile_regex, parse_filter, split_path, validate_sort

__all__ = ["SQLiteIndex"]

_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                 getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def _regex(pattern: str, flags: int, value: Any) -> int:
    return int(isinstance(value, str) and compile_regex(pattern, flags).search(value) is not None)


def _regexp(pattern: str, value: Any) -> int:  # the REGEXP operator, for hand-written SQL
    return _regex(pattern, 0, value)


def _read_only(action: int, *args) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


_CONVERTED = frozenset({"true", "false", "array", "object"})


def _typed(value: Any, json_type: str | None) -> Any:
    """A json_extract result as the Python value (SQLite returns booleans as 1/0 and containers as text)."""
    if json_type == "true" or json_type == "false":
        return json_type == "true"
    if json_type == "array" or json_type == "object":
        return json.loads(value)
    return value


def _writable(path: str) -> bool:
    """Whether SQLite can write ``path``: the file (if there is one) and its folder (for the -wal and -shm files)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        return os.access(path, os.W_OK) and os.access(folder, os.W_OK)
    existing = folder
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return os.access(existing, os.W_OK)


class SQLiteIndex(SQLIndex):
    """An :class:`~mlwarehouse.index.base.Index` in one SQLite file (or ``":memory:"``)."""

    name = "sqlite"
    dialect = SQLITE

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0, chunk_size: int = 1000,
                 read_only: bool | None = None):
        self.path = str(path)
        self.timeout = timeout
        self._memory = self.path == ":memory:"
        #: opened read-only: given, or found (the file or its folder cannot be written)
        self.read_only = bool(read_only) if read_only is not None else (not self._memory and not _writable(self.path))
        self._immutable = False  # read-only where SQLite cannot create its -shm file: opened with immutable=1
        if self.read_only and not os.path.isfile(self.path):
            raise BackendError(f"the SQLite index {self.path} does not exist and its folder is read-only")
        if not self._memory and not self.read_only:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._all: list[sqlite3.Connection] = []
        self._closed = False
        self._writer = threading.Lock()  # one writer per process; flock serialises processes
        self._lock_fd: int | None = None
        self._lock_pid: int | None = None
        if self.read_only:  # SQLIndex.__init__ would create mlw_meta: nothing is created in a read-only file
            super(SQLIndex, self).__init__()
            self.chunk_size = chunk_size
        else:
            super().__init__(chunk_size=chunk_size)

    # -- connections and errors ----------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self._closed:
            raise BackendError(f"the SQLite index {self.path} is closed")
        try:
            con = self._connect_read_only() if self.read_only else sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False,
                cached_statements=256)
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if not self._memory and not self.read_only:
                self._enable_wal(con)
                con.execute("PRAGMA synchronous = NORMAL")
            con.create_function(REGEX_FUNCTION, 3, _regex, deterministic=True)
            con.create_function("regexp", 2, _regexp, deterministic=True)
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open the SQLite index {self.path}: {exc}") from exc
        with self._lock:
            self._all.append(con)
        return con

    def _enable_wal(self, con: sqlite3.Connection) -> None:
        """Switch a new file to WAL, retrying while another process holds it.

        The switch needs an exclusive lock, and SQLite answers "database is locked" at once, without its busy
        handler, when processes open a fresh file together; once one of them has switched, the mode is persistent.
        """
        deadline = time.monotonic() + self.timeout
        pause = 0.005
        while True:
            try:
                con.execute("PRAGMA journal_mode = WAL").fetchone()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _connect_read_only(self) -> sqlite3.Connection:
        """``mode=ro``; ``immutable=1`` where a WAL file's shared memory cannot be created beside it."""
        for immutable in ((True,) if self._immutable else (False, True)):
            uri = f"file:{quote(os.path.abspath(self.path))}?" + ("immutable=1" if immutable else "mode=ro")
            con = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None,
                                  check_same_thread=False, cached_statements=256)
            try:
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                con.close()
                if immutable:
                    raise
                continue
            self._immutable = immutable
            return con
        raise AssertionError("unreachable")

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
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any error.

        SQLite ends the transaction itself on some errors (a full disk): then there is nothing to roll back, and
        a failing ROLLBACK never replaces the error that caused it.
        """
        if self.read_only:
            raise BackendError(f"the SQLite index {self.path} is read-only (its file or folder cannot be written, "
                               f"or it was opened with read_only=True): writes are refused")
        with self._connection() as con, self._write_lock():
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException as exc:
                if con.in_transaction:
                    try:
                        con.execute("ROLLBACK")
                    except sqlite3.Error as again:
                        exc.add_note(f"the rollback after it failed too: {again}")
                raise

    def ensure_collection(self, collection: str, *, scalar_fields: Sequence[str] = ()) -> None:
        if not self.read_only:  # read-only: nothing is created; a missing collection reads as empty
            super().ensure_collection(collection, scalar_fields=scalar_fields)

    def create_index(self, collection: str, keys: Sequence[tuple[str, int]], *, unique: bool = False) -> None:
        if not self.read_only:
            super().create_index(collection, keys, unique=unique)

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """The process-wide writer lock (see the module docstring); a no-op in memory or without fcntl."""
        if self._memory or fcntl is None:
            yield
            return
        with self._writer:
            if self._lock_pid != os.getpid():  # first use, or a forked child: never share the parent's lock
                try:
                    self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as exc:
                    raise BackendError(f"cannot open the write lock {self.path}.lock: {exc}") from exc
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
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code == sqlite3.SQLITE_FULL:
                raise BackendError(f"the disk holding the SQLite index {self.path} is full (or the database reached "
                                   f"its size limit); nothing of this write was stored: {msg}") from exc
            if code == sqlite3.SQLITE_READONLY:
                raise BackendError(f"the SQLite index {self.path} cannot be written (read-only): {msg}") from exc
            if "locked" in msg or "busy" in msg:
                raise BackendError(f"the SQLite index {self.path} stayed locked by another writer for more than "
                                   f"{self.timeout:g} s ({msg})") from exc
            raise BackendError(f"SQLite error in {self.path}: {msg}") from exc
        except sqlite3.Error as exc:
            raise BackendError(f"SQLite error in {self.path}: {exc}") from exc
        except UnicodeEncodeError as exc:
            raise InvalidDocument(f"a string is not valid UTF-8 ({exc.reason})") from exc

    # -- reads ---------------------------------------------------------------------------------------------
    def values(self, collection: str, filter: Filter | None, fields: Sequence[str], *, sort: Sort | None = None,
               limit: int | None = None) -> list[tuple]:
        """Extracted in SQL (``json_extract``): no document is parsed in Python unless a value is a container."""
        node = parse_filter(filter)
        validate_sort(sort)
        paths = [SQLITE.path("doc", tuple(split_path(f, "field"))) for f in fields]
        self._check_limits(limit)
        scalars = self._scalar_fields(collection)
        if scalars is None or not paths:
            return []
        c = Compiler(SQLITE, scalar_fields=scalars)
        columns = ", ".join(f"json_extract(doc, {p}), json_type(doc, {p})" for p in paths)
        sql = f'SELECT {columns} FROM {self._table(collection)} WHERE {c.where(node)} ORDER BY {c.order_by(sort)}'
        params = c.params
        if limit is not None:
            sql += " LIMIT ?"
            params = [*params, limit]
        with self._connection() as con:
            rows = con.execute(sql, params).fetchall()
        n = len(paths)
        if all(t not in _CONVERTED for row in rows for t in row[1::2]):
            return [row[0::2] for row in rows]
        return [tuple(_typed(row[2 * i], row[2 * i + 1]) for i in range(n)) for row in rows]

    # -- raw SQL and views ---------------------------------------------------------------------------------
    def _view_exists(self, con, name: str) -> bool:
        row = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'view' AND name = ?", (name,)).fetchone()
        return row is not None

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

