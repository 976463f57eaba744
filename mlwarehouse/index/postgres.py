"""The shared index: a PostgreSQL database, one table per collection, documents as ``json`` text.

Tables are ``c_<collection>(id TEXT COLLATE "C" PRIMARY KEY, doc JSON NOT NULL)``; ``mlw_meta`` records each
collection's scalar fields, indexes and whether writes notify listeners. ``json`` (not ``jsonb``) keeps each
document's exact text, which the reference semantics need (see :class:`mlwarehouse.index.sql.compiler.PostgresDialect`).
Filters and sorts compile to SQL with bound parameters; updates are applied in Python
(:func:`mlwarehouse.query.apply_update`) to rows locked with ``SELECT ... FOR UPDATE`` in one transaction, so
``find_one_and_update`` is atomic across machines (``SKIP LOCKED`` first, so claimers do not queue behind each
other). Bulk inserts use ``COPY``, one transaction per chunk.

Connections come from a pool (psycopg_pool), one per process (a forked child opens its own). Driver errors are
mapped in :meth:`PostgresIndex._errors`: unreachable server -> Unavailable naming host:port, refused credentials
-> Unavailable naming the user, missing database -> ConfigError naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any

from mlwarehouse.errors import BackendError, ConfigError, DuplicateKey, InvalidDocument, QueryError, Unavailable
from mlwarehouse.index.base import Filter, Index, Projection, Sort, Update
from mlwarehouse.index.sql.compiler import Compiler, sort_expressions
from mlwarehouse.index.sql.postgres_dialect import POSTGRES
from mlwarehouse.query import (
    apply_update,
    get_path,
    json_text,
    parse_filter,
    project,
    split_path,
    validate_projection,
    validate_sort,
    validate_update,
)
from mlwarehouse.query.documents import plausible_document, validate_document

try:
    import psycopg
    from psycopg import errors as pgerrors
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as _exc:  # pragma: no cover - depends on the installation
    raise ConfigError("the PostgreSQL index needs psycopg 3 and psycopg_pool: pip install 'mlwarehouse[postgres]'") \
        from _exc

__all__ = ["PostgresIndex"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}\Z")  # c_ / ix_ prefixes must fit PostgreSQL's 63-byte names
_NOTIFY_TTL = 5.0  # seconds a writer trusts its cached "does anyone listen" flags


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise QueryError(f"invalid {kind} name {name!r}: use at most 48 lowercase letters, digits and '_', "
                         "starting with a letter")
    return name


class PostgresIndex(Index):
    """An :class:`~mlwarehouse.index.base.Index` in a PostgreSQL database (``postgresql://user:pw@host/db``)."""

    name = "postgresql"
    supports_sql = True
    supports_listen = True

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, max_connections: int = 8,
                 chunk_size: int = 1000):
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.chunk_size = chunk_size
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
        self._scalars: dict[str, frozenset[str]] = {}
        self._notify: dict[str, bool] = {}
        self._notify_read = 0.0
        self._closed = False
        with self._errors():  # fail fast with a clear message, before any pool thread retries in the background
            psycopg.connect(dsn, **self._kwargs).close()
        with self._transaction() as con:
            con.execute("SELECT pg_advisory_xact_lock(hashtext('mlw_ddl'))")
            con.execute("CREATE TABLE IF NOT EXISTS mlw_meta (collection TEXT PRIMARY KEY, scalar_fields TEXT "
                        "NOT NULL, indexes TEXT NOT NULL, notify BOOLEAN NOT NULL DEFAULT false)")

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

    # -- collections and indexes ---------------------------------------------------------------------------
    def _scalar_fields(self, collection: str) -> frozenset[str] | None:
        known = self._scalars.get(collection)
        if known is not None:
            return known
        _check_name("collection", collection)
        with self._connection() as con:
            row = con.execute("SELECT scalar_fields FROM mlw_meta WHERE collection = %s", (collection,)).fetchone()
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
        with self._transaction() as con:
            con.execute("SELECT pg_advisory_xact_lock(hashtext('mlw_ddl'))")  # concurrent CREATE TABLE races
            con.execute(f'CREATE TABLE IF NOT EXISTS {table} (id TEXT COLLATE "C" PRIMARY KEY, doc JSON NOT NULL)')
            row = con.execute("SELECT scalar_fields FROM mlw_meta WHERE collection = %s", (collection,)).fetchone()
            old = set(json.loads(row[0])) if row else set()
            for field in sorted(wanted - old):
                path = POSTGRES.path("doc", split_path(field))
                bad = con.execute(f"SELECT id FROM {table} WHERE json_typeof({path}) IN ('array', 'object') "
                                  "LIMIT 1").fetchone()
                if bad:
                    raise InvalidDocument(f"collection {collection!r}: cannot declare {field!r} scalar, "
                                          f"document {bad[0]!r} holds an array or object there")
            fields = sorted(old | wanted)
            con.execute("INSERT INTO mlw_meta (collection, scalar_fields, indexes) VALUES (%s, %s, '[]') "
                        "ON CONFLICT (collection) DO UPDATE SET scalar_fields = EXCLUDED.scalar_fields",
                        (collection, json.dumps(fields)))
        self._scalars[collection] = frozenset(fields)

    def create_index(self, collection: str, keys: Sequence[tuple[str, int]], *, unique: bool = False) -> None:
        keys = list(keys)
        if not keys:
            raise QueryError("create_index needs at least one (field, 1 or -1) key")
        spec = validate_sort(keys)[:len(keys)]
        self.ensure_collection(collection)
        terms = []
        for field, direction in spec:
            keys = sort_expressions(field, POSTGRES)
            if unique and len(keys) == 3:  # NULL only for null/missing (distinct, as in SQLite), never a value
                rank, num, txt = keys
                keys = [rank, f"CASE WHEN {rank} = 0 THEN NULL ELSE {num} END",
                        f"CASE WHEN {rank} = 0 THEN NULL ELSE {txt} END"]
            terms += [f"({e}){' DESC' if direction == -1 else ''}" for e in keys]
        if not unique and all(f != "_id" for f, _ in spec):
            terms.append("id")
        digest = hashlib.sha1(json.dumps([spec, unique]).encode()).hexdigest()[:12]
        name = f"ix_{collection}_{digest}"
        with self._transaction() as con:
            con.execute("SELECT pg_advisory_xact_lock(hashtext('mlw_ddl'))")
            con.execute(f'CREATE {"UNIQUE " if unique else ""}INDEX IF NOT EXISTS "{name}" '
                        f'ON "c_{collection}" ({", ".join(terms)})')
            row = con.execute("SELECT indexes FROM mlw_meta WHERE collection = %s FOR UPDATE",
                              (collection,)).fetchone()
            indexes = json.loads(row[0])
            if all(old["name"] != name for old in indexes):
                indexes.append({"name": name, "keys": spec, "unique": unique})
                con.execute("UPDATE mlw_meta SET indexes = %s WHERE collection = %s", (json.dumps(indexes), collection))
        with self._connection() as con:
            con.execute(f'ANALYZE "c_{collection}"')

    def indexes(self, collection: str) -> list[dict]:
        """The indexes created on a collection: ``{"name", "keys", "unique"}``."""
        with self._connection() as con:
            row = con.execute("SELECT indexes FROM mlw_meta WHERE collection = %s", (collection,)).fetchone()
        return json.loads(row[0]) if row else []

    def collections(self) -> list[str]:
        with self._connection() as con:
            return [r[0] for r in con.execute('SELECT collection FROM mlw_meta ORDER BY collection COLLATE "C"')]

    # -- notifications -------------------------------------------------------------------------------------
    def _notifies(self, collection: str) -> bool:
        now = time.monotonic()
        if now - self._notify_read > _NOTIFY_TTL:
            with self._connection() as con:
                self._notify = {c: n for c, n in con.execute("SELECT collection, notify FROM mlw_meta")}
            self._notify_read = now
        return self._notify.get(collection, False)

    def _after_write(self, con, collection: str) -> None:
        if self._notifies(collection):
            con.execute(f"NOTIFY mlw_{collection}")

    def listen(self, collection: str, timeout: float) -> bool:
        """Block until a write to ``collection`` commits (True) or ``timeout`` seconds pass (False).

        The first call makes writers of ``collection`` send notifications (they notice within a few seconds);
        a wake-up may be spurious, so callers re-check what they wait for.
        """
        _check_name("collection", collection)
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
                con.execute(f"LISTEN mlw_{collection}")
                self._listening.add(collection)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                for note in con.notifies(timeout=left, stop_after=1):
                    if note.channel == f"mlw_{collection}":
                        return True
            return False

    # -- writes --------------------------------------------------------------------------------------------
    def _encode(self, doc: Any, scalars: frozenset[str], collection: str) -> str:
        text = None
        if plausible_document(doc):
            try:
                text = json_text(doc)
            except ValueError:
                pass
        if text is None or "\\u0000" in text:  # NUL: the full validation names the string
            validate_document(doc)
            text = json_text(doc)
        for field in scalars:
            if isinstance(get_path(doc, field), (dict, list)):
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
        it = iter(docs)
        total = 0
        while chunk := list(islice(it, size)):
            rows = [(self._encode(doc, scalars, collection), doc) for doc in chunk]
            rows = [(doc["_id"], text) for text, doc in rows]
            ids = [r[0] for r in rows]
            if len(set(ids)) != len(ids):
                dup = next(i for i in ids if ids.count(i) > 1)
                raise DuplicateKey(f"collection {collection!r}: _id {dup!r} appears twice in one insert")
            try:
                with self._transaction() as con:
                    with con.cursor().copy(f'COPY "c_{collection}" (id, doc) FROM STDIN') as copy:
                        for row in rows:
                            copy.write_row(row)
                    self._after_write(con, collection)
            except DuplicateKey as exc:
                raise DuplicateKey(self._duplicate_message(collection, ids, exc)) from exc
            except InvalidDocument:  # a string the driver cannot encode: name the field
                for doc in chunk:
                    validate_document(doc)
                raise
            total += len(rows)
        return total

    def _duplicate_message(self, collection: str, ids: list[str], exc: Exception) -> str:
        with self._connection() as con:
            row = con.execute(f'SELECT id FROM "c_{collection}" WHERE id = ANY(%s) LIMIT 1', (ids,)).fetchone()
        if row:
            return f"collection {collection!r}: a document with _id {row[0]!r} already exists"
        return f"collection {collection!r}: {exc}"

    def _select(self, collection: str, node, sort: Sort | None, limit: int | None, lock: str = "") -> tuple:
        c = Compiler(POSTGRES, scalar_fields=self._scalars.get(collection, ()))
        sql = f'SELECT id, doc::text FROM "c_{collection}" WHERE {c.where(node)}'
        if sort is not None:
            sql += f" ORDER BY {c.order_by(sort)}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql + lock, c.params

    def _rewrite(self, collection: str, filter: Filter | None, update: Update, *, first: bool,
                 sort: Sort | None = None) -> list[dict]:
        node = parse_filter(filter)
        ops = validate_update(update)
        validate_sort(sort)
        scalars = self._scalar_fields(collection)
        if scalars is None:
            return []
        updated: list[dict] = []
        with self._transaction() as con:
            if first:  # skip rows other claimers hold; if that finds nothing, wait for them and look again
                sql, params = self._select(collection, node, sort, 1, " FOR UPDATE SKIP LOCKED")
                rows = con.execute(sql, params).fetchall()
                if not rows:
                    sql, params = self._select(collection, node, sort, 1, " FOR UPDATE")
                    rows = con.execute(sql, params).fetchall()
            else:
                sql, params = self._select(collection, node, None, None, " FOR UPDATE")
                rows = con.execute(sql, params).fetchall()
            out = []
            for _id, text in rows:
                new = apply_update(json.loads(text), ops)
                out.append((self._encode(new, scalars, collection), _id))
                updated.append(new)
            if out:
                con.cursor().executemany(f'UPDATE "c_{collection}" SET doc = %s::json WHERE id = %s', out)
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
        with self._transaction() as con:
            if upsert:
                con.execute(f'INSERT INTO "c_{collection}" (id, doc) VALUES (%s, %s::json) '
                            "ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc", (doc["_id"], text))
            elif not con.execute(f'UPDATE "c_{collection}" SET doc = %s::json WHERE id = %s',
                                 (text, doc["_id"])).rowcount:
                return False
            self._after_write(con, collection)
        return True

    def delete_many(self, collection: str, filter: Filter) -> list[dict]:
        node = parse_filter(filter)
        if self._scalar_fields(collection) is None:
            return []
        c = Compiler(POSTGRES, scalar_fields=self._scalars.get(collection, ()))
        with self._transaction() as con:
            rows = con.execute(f'DELETE FROM "c_{collection}" WHERE {c.where(node)} RETURNING doc::text',
                               c.params).fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- reads ---------------------------------------------------------------------------------------------
    def find(self, collection: str, filter: Filter | None = None, *, sort: Sort | None = None,
             limit: int | None = None, skip: int = 0, projection: Projection | None = None) -> Iterator[dict]:
        """Matching documents; the rows are fetched at once (no transaction stays open while you iterate)."""
        node = parse_filter(filter)
        validate_sort(sort)
        validate_projection(projection)
        for name, n in (("limit", limit), ("skip", skip)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 1 << 63):
                raise QueryError(f"{name} must be an integer from 0 to 2**63 - 1, not {n!r}")
        if self._scalar_fields(collection) is None:
            return iter(())
        c = Compiler(POSTGRES, scalar_fields=self._scalars.get(collection, ()))
        sql = f'SELECT doc::text FROM "c_{collection}" WHERE {c.where(node)} ORDER BY {c.order_by(sort)}'
        params = c.params
        if limit is not None or skip:
            sql += " LIMIT %s OFFSET %s"
            params = [*params, limit, skip]
        with self._connection() as con:
            rows = con.execute(sql, params).fetchall()
        if projection:
            return (project(json.loads(r[0]), projection) for r in rows)
        return (json.loads(r[0]) for r in rows)

    def count(self, collection: str, filter: Filter | None = None) -> int:
        node = parse_filter(filter)
        if self._scalar_fields(collection) is None:
            return 0
        c = Compiler(POSTGRES, scalar_fields=self._scalars.get(collection, ()))
        with self._connection() as con:
            return con.execute(f'SELECT count(*) FROM "c_{collection}" WHERE {c.where(node)}', c.params).fetchone()[0]

    # -- raw SQL -------------------------------------------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | dict = ()) -> list[dict]:
        """Run one statement in a READ ONLY transaction (``%s`` placeholders); rows as dicts."""
        with self._connection() as con:
            try:
                with con.transaction():
                    con.execute("SET TRANSACTION READ ONLY")
                    # prepared: one statement only, so "COMMIT; DROP ..." cannot leave the read-only transaction
                    cur = con.execute(query, params or None, prepare=True)
                    names = [d[0] for d in cur.description or ()]
                    return [dict(zip(names, row)) for row in cur.fetchall()]
            except (pgerrors.ReadOnlySqlTransaction, pgerrors.SyntaxError, pgerrors.InsufficientPrivilege,
                    pgerrors.ActiveSqlTransaction, psycopg.ProgrammingError) as exc:
                raise QueryError(f"sql(): {exc} (only read-only SELECT statements are allowed)") from exc

    def create_view(self, name: str, select_sql: str, *, replace: bool = False) -> None:
        """Create (idempotently, or replacing it) a view that :meth:`sql` can read."""
        _check_name("view", name)
        with self._transaction() as con:
            con.execute("SELECT pg_advisory_xact_lock(hashtext('mlw_ddl'))")
            if replace:
                con.execute(f'DROP VIEW IF EXISTS "{name}"')
            exists = con.execute("SELECT 1 FROM pg_views WHERE viewname = %s AND schemaname = current_schema()",
                                 (name,)).fetchone()
            if not exists:
                con.execute(f'CREATE VIEW "{name}" AS {select_sql}')

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
