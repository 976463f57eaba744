"""The shared index: a PostgreSQL database, one table per collection, documents as ``json`` text.

The tables, the compiled queries and the updates are those of :class:`mlwarehouse.index.sqlbase.SQLIndex`; here
is what PostgreSQL does its own way. Tables are ``c_<collection>(id TEXT COLLATE "C" PRIMARY KEY, doc JSON NOT
NULL)``; ``mlw_meta`` also records whether writes notify listeners. ``json`` (not ``jsonb``) keeps each document's
exact text, which the reference semantics need (see :class:`mlwarehouse.index.sql.postgres_dialect.PostgresDialect`).
Read-modify-writes lock their rows with ``SELECT ... FOR UPDATE`` in one transaction, so ``find_one_and_update`` is
atomic across machines (``SKIP LOCKED`` first, so claimers do not queue behind each other). Bulk inserts use
``COPY``, one transaction per chunk; schema changes take an advisory lock, as concurrent ``CREATE TABLE IF NOT
EXISTS`` race; writes to a collection someone listens to send a ``NOTIFY``.

Connections come from a pool (psycopg_pool), one per process (a forked child opens its own). Driver errors are
mapped in :meth:`PostgresIndex._errors`: unreachable server -> Unavailable naming host:port, refused credentials
-> Unavailable naming the user, missing database -> ConfigError naming it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from mlwarehouse.errors import BackendError, ConfigError, DuplicateKey, InvalidDocument, QueryError, Unavailable
from mlwarehouse.index.sql.postgres_dialect import POSTGRES
from mlwarehouse.index.sqlbase import SQLIndex

try:
    import psycopg
    from psycopg import errors as pgerrors
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as _exc:  # pragma: no cover - depends on the installation
    raise ConfigError("the PostgreSQL index needs psycopg 3 and psycopg_pool: pip install 'mlwarehouse[postgres]'") \
        from _exc

__all__ = ["PostgresIndex"]

_NOTIFY_TTL = 5.0  # seconds a writer trusts its cached "does anyone listen" flags
_DEADLOCK_TRIES = 5
#: inserts through one index object that trigger an ANALYZE of their table (see PostgresIndex.insert_many)
ANALYZE_AFTER_ROWS = 1000
_DDL_LOCK = "SELECT pg_advisory_xact_lock(hashtext('mlw_ddl'))"


class PostgresIndex(SQLIndex):
    """An :class:`~mlwarehouse.index.base.Index` in a PostgreSQL database (``postgresql://user:pw@host/db``)."""

    name = "postgresql"
    supports_listen = True
    dialect = POSTGRES
    name_limit = 48  # c_ / ix_ prefixes must fit PostgreSQL's 63-byte names
    _table_columns = '(id TEXT COLLATE "C" PRIMARY KEY, doc JSON NOT NULL)'
    _meta_columns = ("(collection TEXT PRIMARY KEY, scalar_fields TEXT NOT NULL, indexes TEXT NOT NULL, "
                    "notify BOOLEAN NOT NULL DEFAULT false)")
    _doc_out, _doc_in = "doc::text", "%s::json"  # text: psycopg would parse the JSON and lose its exact spelling
    _claim_locks = (" FOR UPDATE SKIP LOCKED", " FOR UPDATE")  # skip rows other claimers hold, else wait for them
    _update_lock = " FOR UPDATE"

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, max_connections: int = 8,
                 chunk_size: int = 1000):
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._loaded: dict[str, list[int]] = {}  # collection -> [rows at the last ANALYZE here, rows since]
        self.max_connections = max_connections
        try:
            info = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"invalid PostgreSQL URI: {exc}") from exc
        self._host = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"
        self._user = info.get("user") or os.environ.get("PGUSER") or "(default user)"
        self._db = info.get("dbname") or os.environ.get("PGDATABASE") or self._user
        self._kwargs = {"autocommit": True, "connect_timeout": max(1, round(connect_timeout))}
        self._lock = threading.RLock()
        self._pool_pid: int | None = None
        self._pool_obj: ConnectionPool | None = None
        self._listener: tuple[int, Any] | None = None
        self._listening: set[str] = set()
        self._notify: dict[str, bool] = {}
        self._notify_read = 0.0
        self._closed = False
        with self._errors():  # fail fast with a clear message, before any pool thread retries in the background
            psycopg.connect(dsn, **self._kwargs).close()
        super().__init__(chunk_size=chunk_size)

    # -- connections and errors ----------------------------------------------------------------------------
    def _pool(self) -> ConnectionPool:
        if self._closed:
            raise BackendError(f"the PostgreSQL index {self._where()} is closed")
        if self._pool_pid != os.getpid():  # new process: never share a parent's sockets
            with self._lock:
                if self._pool_pid != os.getpid():
                    self._pool_obj = ConnectionPool(self.dsn, kwargs=self._kwargs, min_size=1,
                                                    max_size=self.max_connections, timeout=self.connect_timeout * 2,
                                                    name="mlwarehouse", open=True)
                    self._pool_pid = os.getpid()
        return self._pool_obj

    def _where(self) -> str:
        return f"{self._host}/{self._db}"

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        with self._errors():
            with self._pool().connection() as con:
                yield con

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._connection() as con:
            with con.transaction():
                yield con

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place where driver errors become :mod:`mlwarehouse.errors`."""
        try:
            yield
        except pgerrors.UniqueViolation as exc:
            raise DuplicateKey(f"duplicate key: {exc.diag.message_detail or exc}") from exc
        except pgerrors.InvalidRegularExpression as exc:
            raise QueryError(f"PostgreSQL refused the regular expression: {exc}") from exc
        except (pgerrors.UntranslatableCharacter, pgerrors.CharacterNotInRepertoire) as exc:
            raise InvalidDocument(f"PostgreSQL cannot handle a string here ({exc}); NUL characters (\\u0000) "
                                  "in strings are not supported by the PostgreSQL index") from exc
        except UnicodeEncodeError as exc:
            raise InvalidDocument(f"a string is not valid UTF-8 ({exc.reason})") from exc
        except pgerrors.DeadlockDetected as exc:  # an OperationalError, but the server is reachable
            raise BackendError(f"PostgreSQL at {self._where()} broke a deadlock by rolling back this transaction: "
                               f"{exc}") from exc
        except PoolTimeout as exc:
            raise Unavailable(f"no connection to PostgreSQL at {self._host} within {self.connect_timeout * 2:g} s: "
                              "is the server up and reachable?") from exc
        except psycopg.OperationalError as exc:
            raise self._connect_error(exc) from exc
        except psycopg.Error as exc:
            raise BackendError(f"PostgreSQL error at {self._where()}: {exc}") from exc

    def _connect_error(self, exc: Exception) -> Exception:
        msg = str(exc)
        if "password authentication failed" in msg or "no password supplied" in msg or \
                ("role" in msg and "does not exist" in msg) or "pg_hba.conf" in msg:
            return Unavailable(f"PostgreSQL at {self._host} refused user {self._user!r}: check the credentials "
                               f"(user and password in the URI) ({msg.strip()})")
        if "database" in msg and "does not exist" in msg:
            return ConfigError(f"the database {self._db!r} does not exist on the PostgreSQL server at {self._host}: "
                               f"create it (createdb {self._db}) or fix the URI")
        return Unavailable(f"cannot reach PostgreSQL at {self._host} (database {self._db!r}): {msg.strip()}")

    # -- schema changes and bulk writes --------------------------------------------------------------------
    def _lock_ddl(self, con) -> None:
        con.execute(_DDL_LOCK)  # concurrent CREATE TABLE / INDEX IF NOT EXISTS race

    def _bulk_insert(self, con, collection: str, rows: list[tuple[str, str]]) -> None:
        with con.cursor().copy(f'COPY {self._table(collection)} (id, doc) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(row)

    def insert_many(self, collection: str, docs: Iterable[dict], *, chunk_size: int | None = None) -> int:
        """As for every backend; and once a table has at least doubled (by 1,000 rows or more) through this
        object's inserts, ANALYZE it: until autovacuum gets to a freshly loaded table, the planner's statistics
        say it is empty and it scans it whole instead of using the indexes (lineage walks went from 2.5 ms to
        260 ms on 100,000 edges just loaded)."""
        total = super().insert_many(collection, docs, chunk_size=chunk_size)
        seen = self._loaded.setdefault(collection, [0, 0])
        seen[1] += total
        if seen[1] >= max(ANALYZE_AFTER_ROWS, seen[0]):
            with self._connection() as con:
                con.execute(f'ANALYZE {self._table(collection)}')
            seen[0], seen[1] = seen[0] + seen[1], 0
        return total

    def _index_made(self, collection: str) -> None:
        """ANALYZE, so that the planner knows the new index pays (only for a new one: at 1M documents an ANALYZE
        takes a second, and every process opening a vector index asks for its ``_rev`` index)."""
        with self._connection() as con:
            con.execute(f'ANALYZE {self._table(collection)}')

    def _rewrite(self, *args: Any, **kwargs: Any) -> list[dict]:
        """A read-modify-write, tried again when PostgreSQL rolled it back to break a deadlock (its advice for
        such transactions: nothing of it was applied). Claimers racing for the same rows under load meet this."""
        attempt = 0
        while True:
            try:
                return super()._rewrite(*args, **kwargs)
            except BackendError as exc:
                attempt += 1
                if not isinstance(exc.__cause__, pgerrors.DeadlockDetected) or attempt >= _DEADLOCK_TRIES:
                    raise
                time.sleep(0.01 * attempt)

    # -- notifications -------------------------------------------------------------------------------------
    def _after_write(self, con, collection: str) -> None:
        """NOTIFY listeners of ``collection``, if any (who listens is re-read every few seconds, on ``con``: a
        second connection from the pool could wait for this one)."""
        now = time.monotonic()
        if now - self._notify_read > _NOTIFY_TTL:
            self._notify = {c: n for c, n in con.execute("SELECT collection, notify FROM mlw_meta")}
            self._notify_read = now
        if self._notify.get(collection, False):
            con.execute(f"NOTIFY mlw_{collection}")

    def listen(self, collection: str, timeout: float) -> bool:
        """Block until a write to ``collection`` commits (True) or ``timeout`` seconds pass (False).

        The first call makes writers of ``collection`` send notifications (they notice within a few seconds);
        a wake-up may be spurious, so callers re-check what they wait for.
        """
        self._check_name("collection", collection)
        with self._lock, self._errors():
            if self._listener is None or self._listener[0] != os.getpid():
                self._listener = (os.getpid(), psycopg.connect(self.dsn, **self._kwargs))
                self._listening = set()
            con = self._listener[1]
            if collection not in self._listening:
                self.ensure_collection(collection)
                with self._connection() as writer:
                    writer.execute("UPDATE mlw_meta SET notify = true WHERE collection = %s AND NOT notify",
                                   (collection,))
                self._notify = {**self._notify, collection: True}  # this object's own writes notify at once
                con.execute(f"LISTEN mlw_{collection}")
                self._listening.add(collection)
            deadline = time.monotonic() + timeout
            channel, woke = f"mlw_{collection}", False
            while not woke and (left := deadline - time.monotonic()) > 0:
                # the generator is read to its end: leaving it early drops the other notifications of the packet
                for note in con.notifies(timeout=left, stop_after=1):
                    woke |= note.channel == channel
            return woke

    # -- vectors -------------------------------------------------------------------------------------------
    def vector_store(self):
        """Vector tables (:class:`~mlwarehouse.index.pgvectors.PgVectors`) when the database has pgvector >= 0.8,
        else None (asked once per index object)."""
        if not hasattr(self, "_vectors"):
            from mlwarehouse.index.pgvectors import PgVectors
            self._vectors = PgVectors.probe(self)
        return self._vectors

    # -- raw SQL and views ---------------------------------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | dict = ()) -> list[dict]:
        """Run one statement in a READ ONLY transaction (``%s`` placeholders); rows as dicts."""
        with self._connection() as con:
            for last in (False, True):
                try:
                    with con.transaction():
                        con.execute("SET TRANSACTION READ ONLY")
                        # prepared: one statement only, so "COMMIT; DROP ..." cannot leave the read-only transaction
                        cur = con.execute(query, params or None, prepare=True)
                        names = [d[0] for d in cur.description or ()]
                        return [dict(zip(names, row)) for row in cur.fetchall()]
                except pgerrors.FeatureNotSupported as exc:
                    # a view this connection had prepared a statement on was replaced since (by another
                    # connection): the driver forgot the failed statement, so the second try prepares it afresh
                    if last or "cached plan" not in str(exc):
                        raise
                except (pgerrors.ReadOnlySqlTransaction, pgerrors.SyntaxError, pgerrors.InsufficientPrivilege,
                        pgerrors.ActiveSqlTransaction, psycopg.ProgrammingError) as exc:
                    raise QueryError(f"sql(): {exc} (only read-only SELECT statements are allowed)") from exc

    def _view_exists(self, con, name: str) -> bool:
        return con.execute("SELECT 1 FROM pg_views WHERE viewname = %s AND schemaname = current_schema()",
                           (name,)).fetchone() is not None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._pool_obj is not None and self._pool_pid == os.getpid():
                self._pool_obj.close()
            if self._listener is not None and self._listener[0] == os.getpid():
                self._listener[1].close()
            self._pool_obj = self._listener = None

    def __repr__(self) -> str:
        return f"PostgresIndex({self._where()!r}, user={self._user!r})"
