"""Vector tables in PostgreSQL with pgvector: vectors beside a collection's table, searched with its filters.

A vector table ``v_<name>(doc_id, rev, embedding vector(d), doc json)`` holds one vector per document of a
collection, with the document's ``_rev`` it was read at, and an HNSW index (``m``, ``ef_construction``) for the
metric. ``doc`` is a copy of the document's *filtered fields* at that revision (the top-level fields of the
collection's indexes, when the table was built), with the collection's indexes on them repeated
(:meth:`PgVectors.copy_indexes`), so that a filter on those fields is one table's statement, as pgvector's own
users write it: the HNSW scan with the filter on the same row, with pgvector's **iterative index scans** (0.8+, in
relaxed order, re-sorted here) so a filter that rejects most of the first candidates makes the scan go on instead
of returning too few rows; or, for few matches, an exact scan of the rows the filter's index selects. Any other
filter is evaluated on the collection's own rows (joined by id). When a graph scan still comes back short (a very
selective filter), an exact scan answers. Every statement joins its nearest rows to the collection's, so the
caller sees each document's current revision (and re-checks, through the filter, those that moved).

A filter searched often can have an HNSW index of its own (:meth:`PgVectors.filter_index`): a partial index over
the rows whose copy matches it, as pgvector's documentation advises for such filters. Its predicate
(:meth:`PgVectors.filter_predicate`) holds the filter's values written in, and a search with that filter adds it
to its own condition word for word (so does a filter that adds conditions to it), so PostgreSQL proves the index
applies under any plan; the walk then visits only matching rows (measured at 200,000
x 128: 416 to 1,373 q/s at 10% of the rows, 128 to 2,608 q/s at 1%, built in 5.5 s and 0.7 s).

This module knows nothing of what the vectors mean; :mod:`mlwarehouse.vectors.pgvector` keeps them current. A
compiled filter names its table's ``doc`` column unqualified, so every statement keeps one ``doc`` in its scope.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import weakref
from collections.abc import Iterable, Sequence

import numpy as np

from mlwarehouse.errors import ConfigError, QueryError
from mlwarehouse.index.sql.compiler import index_expressions
from mlwarehouse.query.filters import parse_filter
from mlwarehouse.query.jsonvalues import split_path

__all__ = ["PgVectors", "OPS", "MINIMUM_VERSION"]

#: the distance operator and operator class of each metric
OPS = {"cosine": ("<=>", "vector_cosine_ops"), "ip": ("<#>", "vector_ip_ops"), "l2": ("<->", "vector_l2_ops")}
#: iterative index scans came with pgvector 0.8.0
MINIMUM_VERSION = (0, 8)
_NAME = re.compile(r"^[a-z0-9_]{1,40}\Z")
_MAX_SCAN = 100_000
#: the most memory (MB) an HNSW build asks the server for, unless ``MLW_PG_BUILD_MEMORY_MB`` says otherwise
BUILD_MEMORY_MB = 2048


def build_memory_mb(rows: int, dims: int, m: int) -> int:
    """``maintenance_work_mem`` for building an HNSW graph of ``rows`` vectors in memory: pgvector keeps each
    vector (4 bytes a dimension) and its neighbour lists (2m at level 0, about 16 bytes each with their
    distances) in it, and a graph that outgrows it goes on building on disk, many times slower (at 1M x 128 the
    earlier fixed 512 MB spilled). A quarter more than that estimate, at least 64 MB, at most
    :data:`BUILD_MEMORY_MB` or ``$MLW_PG_BUILD_MEMORY_MB``."""
    try:
        limit = int(os.environ.get("MLW_PG_BUILD_MEMORY_MB") or BUILD_MEMORY_MB)
    except ValueError:
        raise ConfigError(f"MLW_PG_BUILD_MEMORY_MB must be a number of megabytes, not "
                          f"{os.environ['MLW_PG_BUILD_MEMORY_MB']!r}") from None
    need = rows * (4 * dims + 32 * m + 256) * 5 // 4 >> 20
    return max(64, min(need, max(64, limit)))


@functools.lru_cache(maxsize=8)
def _format(dims: int) -> str:
    return "[" + ",".join(["%.9g"] * dims) + "]"


class _Query:
    """A query vector as a statement's parameter, sent in pgvector's binary form (dimensions, then big-endian
    float32): a tenth of the bytes of its text, and nothing for the server to parse."""

    __slots__ = ("data",)

    def __init__(self, vector: np.ndarray):
        values = np.asarray(vector, dtype=np.float32).reshape(-1)
        self.data = struct.pack(">HH", len(values), 0) + values.astype(">f4").tobytes()


def _query_dumper(oid: int):
    """A psycopg dumper of :class:`_Query` for the ``vector`` type of one database (its oid)."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class QueryDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj: _Query) -> bytes:
            return obj.data

    QueryDumper.oid = oid
    return QueryDumper


def _literal(vector: np.ndarray) -> str:
    """A vector as pgvector's text: nine significant digits give every float32 back exactly (pgvector reads it as
    float4), in one formatting call (a tenth of the time of a repr per value, paid once per search and per row)."""
    values = np.asarray(vector, dtype=np.float32).reshape(-1).tolist()
    return _format(len(values)) % tuple(values)


class PgVectors:
    """Vector tables of one :class:`~mlwarehouse.index.postgres.PostgresIndex`."""

    def __init__(self, index, schema: str, version: tuple[int, ...]):
        self.index, self.schema, self.version = index, schema, version
        self._type = f'"{schema}".vector'
        self._session: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection -> scan settings
        self._dumper = None  # of query vectors, made when the first search learns the vector type's oid
        self._predicates: dict[tuple, str] = {}  # (collection, filter) -> its filter index's predicate

    @classmethod
    def probe(cls, index) -> "PgVectors | None":
        """The vector tables of ``index`` when pgvector (new enough) is installed in its database, else None."""
        with index._connection() as con:
            row = con.execute("SELECT n.nspname, e.extversion FROM pg_extension e JOIN pg_namespace n "
                              "ON n.oid = e.extnamespace WHERE e.extname = 'vector'").fetchone()
        if row is None:
            return None
        version = tuple(int(p) for p in re.findall(r"\d+", row[1])[:3])
        return cls(index, row[0], version) if version >= MINIMUM_VERSION else None

    def _table(self, name: str) -> str:
        if not _NAME.match(name):
            raise QueryError(f"invalid vector table name {name!r}")
        return f'"v_{name}"'

    def _op(self, metric: str) -> str:
        return f"OPERATOR(\"{self.schema}\".{OPS[metric][0]})"

    # -- tables -------------------------------------------------------------------------------------------
    def ensure(self, name: str, dims: int) -> None:
        table = self._table(name)
        with self.index._transaction() as con:
            self.index._lock_ddl(con)
            con.execute(f'CREATE TABLE IF NOT EXISTS {table} (doc_id TEXT COLLATE "C" PRIMARY KEY, '
                        f'rev TEXT NOT NULL, embedding {self._type}({int(dims)}) NOT NULL, doc json)')
            con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS doc json")  # a table made before copies

    def create_index(self, name: str, metric: str, *, dims: int, m: int, ef_construction: int) -> None:
        """The HNSW index (after a bulk fill: building it over the rows is faster than growing it row by row),
        built with the memory its graph needs (:func:`build_memory_mb`)."""
        table = self._table(name)
        with self.index._transaction() as con:
            self.index._lock_ddl(con)
            rows = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            con.execute(f"SET LOCAL maintenance_work_mem = '{build_memory_mb(rows, dims, m)}MB'")
            con.execute(f'CREATE INDEX IF NOT EXISTS "vx_{name}" ON {table} USING hnsw '
                        f'(embedding "{self.schema}".{OPS[metric][1]}) WITH (m = {int(m)}, '
                        f'ef_construction = {int(ef_construction)})')

    def copy_indexes(self, name: str, collection: str, fields: frozenset[str]) -> int:
        """Repeat on the table's ``doc`` the collection's indexes whose fields it copies (the same expressions,
        so the collection's plans serve it); returns how many it has."""
        table, held, made = self._table(name), 0, 0
        for ix in self.index.indexes(collection):
            keys = [tuple(k) for k in ix["keys"]]
            if not all(f.split(".")[0] in fields for f, _ in keys):
                continue
            held += 1
            index = f'vf_{name}_{ix["name"].rsplit("_", 1)[-1]}'
            with self.index._connection() as con:
                if con.execute("SELECT to_regclass(%s) IS NOT NULL", (index,)).fetchone()[0]:
                    continue
            terms = index_expressions(keys, self.index.dialect)
            with self.index._transaction() as con:
                self.index._lock_ddl(con)
                con.execute(f'CREATE INDEX IF NOT EXISTS "{index}" ON {table} ({", ".join(terms)})')
            made += 1
        if made:  # so that the planner weighs the new indexes against the graph
            with self.index._connection() as con:
                con.execute(f"ANALYZE {table}")
        return held

    def filter_index(self, name: str, collection: str, filter: dict, metric: str, *, dims: int, m: int,
                     ef_construction: int) -> str:
        """A partial HNSW index of the table over the rows whose copy matches ``filter`` (see the module notes);
        returns its name (``vp_<table>_<digest of its predicate>``), made unless there."""
        predicate = self.filter_predicate(collection, filter)
        index = self.filter_index_name(name, collection, filter)
        with self.index._transaction() as con:
            self.index._lock_ddl(con)
            if con.execute("SELECT to_regclass(%s) IS NOT NULL", (index,)).fetchone()[0]:
                return index
            rows = con.execute(f"SELECT count(*) FROM {self._table(name)} WHERE {predicate}").fetchone()[0]
            con.execute(f"SET LOCAL maintenance_work_mem = '{build_memory_mb(rows, dims, m)}MB'")
            con.execute(f'CREATE INDEX "{index}" ON {self._table(name)} USING hnsw (embedding '
                        f'"{self.schema}".{OPS[metric][1]}) WITH (m = {int(m)}, ef_construction = '
                        f'{int(ef_construction)}) WHERE {predicate}')
        return index

    def filter_index_name(self, name: str, collection: str, filter: dict) -> str:
        """The name of ``filter``'s partial index (of its predicate: a filter compiled otherwise gets another)."""
        return f"vp_{name}_{hashlib.sha256(self.filter_predicate(collection, filter).encode()).hexdigest()[:12]}"

    def filter_indexes(self, name: str) -> set[str]:
        """The names of the table's filter indexes."""
        with self.index._connection() as con:
            return {r[0] for r in con.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                                              "AND tablename = %s AND indexname LIKE %s",
                                              (f"v_{name}", f"vp\\_{name}\\_%")).fetchall()}

    def drop_index(self, index: str) -> None:
        if not re.match(r"^vp_[a-z0-9_]{1,60}\Z", index):
            raise QueryError(f"invalid filter index name {index!r}")
        with self.index._transaction() as con:
            self.index._lock_ddl(con)
            con.execute(f'DROP INDEX IF EXISTS "{index}"')

    def filter_predicate(self, collection: str, filter: dict) -> str:
        """The predicate of ``filter``'s partial index, on a table's copy, with its values written in (as psycopg
        would send them): per field, its condition on the value itself or the value is an array (whose elements
        the full filter then tests), so every row the filter keeps is in the index, and no subquery, which an
        index predicate cannot hold. A filter of fields with conditions (their conjunction) has one; another
        (``$or``, ``$elemMatch``...) is refused."""
        from psycopg import ClientCursor

        from mlwarehouse.index.sql.compiler import Compiler
        key = (collection, json.dumps(filter, sort_keys=True, default=str))
        text = self._predicates.get(key)
        if text is not None:
            return text
        d, parts = self.index.dialect, []
        for path, condition in filter.items():
            if path.startswith("$"):
                raise QueryError(f"a filter index takes conditions on fields (their conjunction), not {path!r}")
            c = Compiler(d, scalar_fields={path})
            whole = c.where({path: condition})
            if "SELECT" in whole.upper():
                raise QueryError(f"a filter index cannot hold the condition on {path!r} ({condition!r}): it tests "
                                 f"an array's elements")
            with self.index._connection() as con:
                whole = ClientCursor(con).mogrify(whole, list(c.params))
            target = d.path(d.doc_column, split_path(path))
            parts.append(f"(({whole}) OR {d.is_type(d.type_of(d.doc_column, target), 'array')})")
        if not parts:
            raise QueryError("a filter index needs a filter")
        text = self._predicates[key] = " AND ".join(parts)
        if len(self._predicates) > 256:
            self._predicates.pop(next(iter(self._predicates)))
        return text

    def drop(self, name: str) -> None:
        with self.index._transaction() as con:
            self.index._lock_ddl(con)
            con.execute(f"DROP TABLE IF EXISTS {self._table(name)}")

    def exists(self, name: str) -> bool:
        with self.index._connection() as con:
            return con.execute("SELECT to_regclass(%s) IS NOT NULL", (f'v_{name}',)).fetchone()[0]

    # -- rows ---------------------------------------------------------------------------------------------
    def revisions(self, name: str, ids: Sequence[str]) -> dict[str, str]:
        """The revision each of ``ids`` has a vector of (absent: none)."""
        out: dict[str, str] = {}
        with self.index._connection() as con:
            for start in range(0, len(ids), 5000):
                part = list(ids[start:start + 5000])
                out.update(con.execute(f"SELECT doc_id, rev FROM {self._table(name)} WHERE doc_id = ANY(%s)",
                                       (part,)).fetchall())
        return out

    def put(self, name: str, rows: Iterable[tuple[str, str, np.ndarray, str | None]]) -> int:
        """Insert or replace vectors ``(doc_id, rev, vector, copied fields as JSON text or None)``."""
        rows = [(i, r, _literal(v), d) for i, r, v, d in rows]
        if not rows:
            return 0
        table = self._table(name)
        with self.index._transaction() as con:
            con.execute("CREATE TEMP TABLE IF NOT EXISTS mlw_vec_rows (doc_id TEXT, rev TEXT, embedding TEXT, "
                        "doc TEXT) ON COMMIT DELETE ROWS")
            with con.cursor().copy("COPY mlw_vec_rows (doc_id, rev, embedding, doc) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            # in id order: two processes refreshing at once lock the rows they share in the same order (no deadlock)
            con.execute(f"INSERT INTO {table} (doc_id, rev, embedding, doc) SELECT doc_id, rev, "
                        f"embedding::{self._type}, doc::json FROM mlw_vec_rows ORDER BY doc_id ON CONFLICT (doc_id) "
                        f"DO UPDATE SET rev = EXCLUDED.rev, embedding = EXCLUDED.embedding, doc = EXCLUDED.doc")
        return len(rows)

    def delete(self, name: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        table = self._table(name)
        with self.index._transaction() as con:  # rows locked in id order, as put() locks them
            return con.execute(f"DELETE FROM {table} WHERE doc_id IN (SELECT doc_id FROM {table} WHERE doc_id = "
                               f"ANY(%s) ORDER BY doc_id FOR UPDATE)", (sorted(ids),)).rowcount

    def delete_orphans(self, name: str, collection: str) -> int:
        """Remove vectors whose document is gone."""
        with self.index._transaction() as con:
            return con.execute(f"DELETE FROM {self._table(name)} v WHERE NOT EXISTS (SELECT 1 FROM "
                               f"{self.index._table(collection)} d WHERE d.id = v.doc_id)").rowcount

    def truncate(self, name: str) -> None:
        with self.index._transaction() as con:
            con.execute(f"TRUNCATE {self._table(name)}")

    def stats(self, name: str) -> dict:
        table = self._table(name)
        with self.index._connection() as con:
            count = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            size = con.execute("SELECT pg_total_relation_size(%s)", (f"v_{name}",)).fetchone()[0]
        return {"vectors": int(count), "memory_bytes": int(size)}

    # -- search -------------------------------------------------------------------------------------------
    def filter_plan(self, collection: str, filter: dict) -> tuple[bool, float, float]:
        """How PostgreSQL would select the documents matching ``filter``: through an index (True) or not, how many
        rows it expects, and how many the collection holds (its planner's estimates, from the statistics ANALYZE
        keeps)."""
        selected = self.index._ids_statement(collection, filter)
        if selected is None:
            return False, 0.0, 0.0
        with self.index._connection() as con:
            plan = con.execute(f"EXPLAIN (FORMAT JSON) {selected[0]}", selected[1]).fetchone()[0]
            total = con.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)",
                                (self.index._table(collection),)).fetchone()
        plan = plan[0]["Plan"] if isinstance(plan, list) else json.loads(plan)[0]["Plan"]
        nodes, indexed = [plan], False
        while nodes:
            node = nodes.pop()
            indexed |= "Index" in node.get("Node Type", "")
            nodes += node.get("Plans", [])
        rows = float(plan.get("Plan Rows", 0))
        return indexed, rows, max(float(total[0]) if total else 0.0, rows)

    def search(self, name: str, collection: str, metric: str, query: np.ndarray, n: int, filter: dict | None, *,
               ef: int = 40, documents: bool = True, exact: bool = False, copied: bool = False,
               indexed: dict | None = None) -> tuple[list[tuple[str, str, float, str]], bool]:
        """The ``n`` nearest rows that match ``filter``: ``(doc_id, rev, distance, document JSON)`` (without
        ``documents``: the document's ``_rev`` in place of its JSON; without a filter either, the vector's own
        ``rev``: no document is read, as the embedded engine's fast path reads none), nearest first, and whether
        the HNSW scan answered (False: it came back short, or ``exact`` asked for it, so this was an exact scan: of
        the documents the filter selects, through the collection's own indexes where it has them). ``copied``: the
        filter reads only fields the table copies, so it is evaluated on the table's rows (see the module notes;
        a row whose document moved matched as of its ``rev``: the caller checks it again); ``indexed``: a filter
        with an index of its own (:meth:`filter_index`) that ``filter`` holds all of, whose index the scan walks."""
        scalars = self.index._scalar_fields(collection)
        if scalars is None:
            return [], True
        op, q = self._op(metric), _Query(query)
        out = "d.doc::text" if documents else "d.doc ->> '_rev'"
        if exact and filter:
            return self._exact(name, collection, filter, op, q, n, out, copied), False
        sql, params = self._graph_statement(name, collection, scalars, op, filter, out if filter or documents
                                            else None, n, copied, indexed)
        with self.index._connection() as con:
            self._prepare(con, (max(int(ef), int(n), 10), _MAX_SCAN))
            rows = con.execute(sql, [q, *params]).fetchall()
            rows.sort(key=lambda r: r[2])  # relaxed order: the scan may return a near one after a nearer one
        if len(rows) >= n or not filter:
            return rows, True
        # short: fewer matches than n, or the scan gave up first; an exact scan of the matches tells which
        return self._exact(name, collection, filter, op, q, n, out, copied), False

    def _graph_statement(self, name: str, collection: str, scalars, op: str, filter: dict | None, out: str | None,
                         n: int, copied: bool = False, indexed: dict | None = None) -> tuple[str, list]:
        """The HNSW scan joined to the documents, filtered on the table's copied fields (``copied``) or on the
        documents (``out`` None: the scan alone, its ``rev`` twice); its parameters are the query vector and the
        filter's values. Ordered by the distance's column, which the scan serves (the query vector is sent once).
        The table is read through a subquery that names one ``doc`` (PostgreSQL folds it into the plan). The limit
        is written in: a prepared statement with it as a parameter is planned again at every search (a generic
        plan cannot know it is small)."""
        from mlwarehouse.index.sql.compiler import Compiler
        table, docs = self._table(name), self.index._table(collection)
        if out is None:  # a join costs a third of an unfiltered search at 200k vectors
            return f"SELECT doc_id, rev, embedding {op} %s AS dist, rev FROM {table} ORDER BY dist LIMIT {int(n)}", []
        c = Compiler(self.index.dialect, scalar_fields=scalars)
        where, params = c.where(parse_filter(filter or {})), list(c.params)
        if copied and indexed:  # the filter index's predicate beside it, word for word: the planner takes the index
            where = f"({self.filter_predicate(collection, indexed).replace('%', '%%')}) AND ({where})"
        if copied:  # the filter on the table's row; only the rows it keeps are joined
            return (f"SELECT v.doc_id, v.rev, v.dist, {out} FROM (SELECT doc_id, rev, embedding {op} %s AS dist "
                    f"FROM {table} WHERE {where}) v JOIN {docs} d ON d.id = v.doc_id ORDER BY v.dist "
                    f"LIMIT {int(n)}"), params
        return (f"SELECT v.doc_id, v.rev, v.dist, {out} FROM (SELECT doc_id, rev, embedding {op} %s AS dist "
                f"FROM {table}) v JOIN {docs} d ON d.id = v.doc_id WHERE {where} ORDER BY v.dist "
                f"LIMIT {int(n)}"), params

    def _prepare(self, con, want: tuple[int, int] | None = None) -> None:
        """Ready a pooled connection for searches: the query vectors' dumper, and the scan's settings (in the
        connection's session, set again only when they change: no transaction round trips per search; nothing
        else reads them)."""
        held = self._session.get(con)
        if held is None:
            if self._dumper is None:
                oid = con.execute(f"SELECT '{self._type}'::regtype::oid").fetchone()[0]
                self._dumper = _query_dumper(oid)
            con.adapters.register_dumper(_Query, self._dumper)
            held = self._session[con] = ()
        if want is not None and held != want:
            con.execute(f"SET hnsw.ef_search = {want[0]}; SET hnsw.iterative_scan = relaxed_order; "
                        f"SET hnsw.max_scan_tuples = {want[1]}")
            self._session[con] = want

    def _exact(self, name: str, collection: str, filter: dict, op: str, q: _Query, n: int, out: str,
               copied: bool = False) -> list:
        """The ``n`` nearest of the documents ``filter`` selects, each one's distance computed, and only those
        ``n`` joined to their documents. ``copied``: the table's rows are selected by the filter on its copy,
        through the indexes it repeats (one index read and one row per match, as a table of pgvector's own
        users). Otherwise the documents are selected as a find selects them, and their vectors read by primary
        key (``= ANY`` of the ids as one array: a sorted index scan, 1.5-3x faster than ``IN``). The order is by
        the distance plus zero, which the HNSW index cannot serve, so no plan walks the graph."""
        table = self._table(name)
        if copied:
            rows_sql, params = self.index._ids_statement(collection, filter, source=table,
                                                          columns="doc_id, rev, embedding")
            nearest = (f"SELECT u.doc_id, u.rev, (u.embedding {op} %s) + 0 AS dist FROM ({rows_sql}) u "
                       f"ORDER BY dist LIMIT {int(n)}")
        else:
            ids_sql, params = self.index._ids_statement(collection, filter)
            nearest = (f"SELECT v.doc_id, v.rev, (v.embedding {op} %s) + 0 AS dist FROM {table} v "
                       f"WHERE v.doc_id = ANY(ARRAY({ids_sql})) ORDER BY dist LIMIT {int(n)}")
        with self.index._connection() as con:
            self._prepare(con)
            return con.execute(f"SELECT t.doc_id, t.rev, t.dist, {out} FROM ({nearest}) t "
                               f"JOIN {self.index._table(collection)} d ON d.id = t.doc_id ORDER BY t.dist",
                               [q, *params]).fetchall()
