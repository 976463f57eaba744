"""The documented, stable SQL views that ``wh.sql()`` (and ``mlw sql``) read, on SQLite and PostgreSQL alike.

Documents stay JSON in their collections; these views give them columns. Their names and columns are a public
interface: new columns may be added, none is renamed or removed. Every view spans all projects; filter on
``project``. The same SELECT returns the same rows on both databases: columns are typed (``integer``: 64-bit
integers, NULL when the field holds anything else; ``real``: any number, as a float; ``text``: strings as they
are, other values as their JSON text; ``json``: JSON text; a JSON null or a missing field is NULL in every
type), and text sorts by code point (PostgreSQL's ``"C"`` collation, SQLite's default). Placeholders are the
database's own: ``?`` on SQLite, ``%s`` on PostgreSQL (write ``%%`` for a literal ``%`` when passing parameters),
and each keeps its SQL: NULLs sort first on SQLite and last on PostgreSQL unless told (``NULLS FIRST`` works on both).

=========  ==================================================================================================
view       columns
=========  ==================================================================================================
runs       run_id, project, name, status, started, ended, hyper_parameters (json), tags (json), task_id,
           datasets (json list of ids), summary (json: kind -> metric -> stats, see
           :mod:`mlwarehouse.runs.summary`), error
metrics    run_id, project, kind, step, epoch, time, metric, value (real): one row per numeric metric of each
           logged point (nulls, strings and booleans are left out)
models     model_id, project, name, run_id, dataset_id, epoch, step, time, fields (json: the document without
           its bookkeeping and stored values)
datasets   dataset_id, project, name, version (integer; NULL for a string version), time, description,
           tags (json), version_label (the version as text, string versions included)
tasks      task_id, project, task_name, status, priority (real), attempts, max_attempts, worker, run_id,
           created, started, ended, time, hyper_parameters (json), result (json), error, tags (json)
=========  ==================================================================================================

Views named after MLDB's tables, for :mod:`mlwarehouse.compat.mldb` (its cursor reads them as ``STATUS``, ``LOSS``
and ``METRICS``): ``mldb_status(EXP_ID, STATUS, project)`` (the run's name and its MLDB status string, else its
status in capitals), ``mldb_loss(EXP_ID, KIND, EPOCH, VALUE, project)`` (``loss`` of every log kind but
``metrics``), ``mldb_metrics(EXP_ID, NAME, EPOCH, VALUE, project)`` (the numeric fields of logs of kind
``metrics``). PostgreSQL folds unquoted names to lower case, so there these columns read ``exp_id``, ``status``...

Every definition is built here from :mod:`mlwarehouse.schema` (collections and their fields) through a small
:class:`Spelling` per database: SQLite's JSON1 functions over ``doc`` text, PostgreSQL's operators over its ``json``
column. A backend without SQL (MongoDB) has no views: :func:`ensure_views` raises ConfigError naming it.
"""

from __future__ import annotations

import hashlib
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from mlwarehouse import schema
from mlwarehouse.errors import ConfigError

__all__ = ["ensure_views", "definitions", "table_name", "Spelling", "SQLITE", "POSTGRES", "SPELLINGS", "VIEW_NAMES",
           "VIEW_COLLECTIONS", "TEXT", "INTEGER", "REAL", "JSON"]

TEXT, INTEGER, REAL, JSON = "text", "integer", "real", "json"

#: (column, document field, type) of the views with one row per document; ``_id`` reads the table's id column
_RUNS = (("run_id", "_id", TEXT), ("project", "project", TEXT), ("name", "name", TEXT), ("status", "status", TEXT),
         ("started", "started", TEXT), ("ended", "ended", TEXT), ("hyper_parameters", "hyper_parameters", JSON),
         ("tags", "tags", JSON), ("task_id", "task", TEXT), ("datasets", "datasets", JSON),
         ("summary", schema.SUMMARY_FIELD, JSON), ("error", "error", TEXT))
_MODELS = (("model_id", "_id", TEXT), ("project", "project", TEXT), ("name", "name", TEXT), ("run_id", "run", TEXT),
           ("dataset_id", "dataset", TEXT), ("epoch", "epoch", INTEGER), ("step", "step", INTEGER),
           ("time", "time", TEXT))
_DATASETS = (("dataset_id", "_id", TEXT), ("project", "project", TEXT), ("name", "name", TEXT),
             ("version", "version", INTEGER), ("time", "time", TEXT), ("description", "description", TEXT),
             ("tags", "tags", JSON), ("version_label", "version", TEXT))
_TASKS = (("task_id", "_id", TEXT), ("project", "project", TEXT), ("task_name", "task_name", TEXT),
          ("status", "status", TEXT), ("priority", "priority", REAL), ("attempts", "attempts", INTEGER),
          ("max_attempts", "max_attempts", INTEGER), ("worker", "worker", TEXT), ("run_id", "run", TEXT),
          ("created", "created", TEXT), ("started", "started", TEXT), ("ended", "ended", TEXT),
          ("time", "time", TEXT), ("hyper_parameters", "hyper_parameters", JSON), ("result", "result", JSON),
          ("error", "error", TEXT), ("tags", "tags", JSON))
#: fields of a model document left out of its ``fields`` column: bookkeeping and stored values (blob trees)
_MODEL_HIDDEN = (*schema.BOOKKEEPING_FIELDS, "value", "weights", "architecture")
#: the log kind that MLDB's METRICS table reads (every other kind is LOSS)
_MLDB_METRICS_KIND = "metrics"

#: the collections the views read (created empty if missing, so that every view can be queried at once)
VIEW_COLLECTIONS = (schema.RUNS, schema.LOGS, schema.MODELS, schema.DATASETS, schema.TASKS)
VIEW_NAMES = ("runs", "metrics", "models", "datasets", "tasks", "mldb_status", "mldb_loss", "mldb_metrics")

_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")  # inlined in SQL: only plain names, checked once here


@dataclass(frozen=True)
class Spelling:
    """How one database spells JSON access over a table whose ``doc`` column holds each document.

    Each column template takes ``{doc}`` (the document's expression) and ``{f}`` (a plain field name) and gives an
    expression of that type (see the module docstring), guarded so that a field of another JSON type gives NULL
    (or its JSON text, for ``text``) instead of an error.
    """

    name: str
    #: a statement listing the views that exist (column ``name``)
    catalog: str
    #: a string field as it is; a field of another type as its JSON text
    text: str
    #: an integer field as a 64-bit integer; NULL for anything else (3.0 and "3" included)
    integer: str
    #: a number field (integer or not) as a double
    real: str
    #: any field's JSON text (a string quoted)
    json: str
    #: the document's JSON text without some fields (``{paths}``: '$.a', ...; ``{names}``: ('a', ...)), in order
    without: str
    #: whether the member ``{m}`` of ``json_each(doc) AS {m}`` holds a number, and its value as a double
    is_number: str
    number: str
    #: whether the document ``{doc}`` has no field ``{f}`` (or a JSON null there)
    absent: str
    #: ``FROM`` items: the members of the JSON array held as JSON text in the string field ``{doc}.{f}``, as
    #: ``{a}`` (nothing when it is no array; an error when the text is no JSON), and the members of the JSON array
    #: ``{doc}.{f}`` of strings with their positions (``position``: from 0)
    packed: str
    strings: str
    position: str
    #: the member at position ``{i}`` (an SQL integer expression) of the JSON array ``{a}``: as 64-bit integer, as
    #: text (see ``text``), whether it is a number, and as a double
    at_integer: str
    at_text: str
    at_is_number: str
    at_number: str
    #: the member at ``{i}`` of ``{a}``: an integer of microseconds since 1970 as UTC text
    #: (``2024-05-01T10:00:00.123456Z``), anything else as ``at_text``
    at_time: str

    def column(self, doc: str, field: str, kind: str) -> str:
        """The expression of ``field`` as a column of type ``kind`` (TEXT, INTEGER, REAL or JSON)."""
        return getattr(self, kind).format(doc=doc, f=field)

    def remove(self, doc: str, fields: Sequence[str]) -> str:
        return self.without.format(doc=doc, paths=", ".join(f"'$.{f}'" for f in fields), names=_in(fields))


#: SQLite's JSON1 functions over the ``doc`` text (``json_type`` tells integers from reals)
SQLITE = Spelling(
    name="sqlite",
    catalog="SELECT name FROM sqlite_master WHERE type = 'view'",
    text="CASE json_type({doc}, '$.{f}') WHEN 'text' THEN json_extract({doc}, '$.{f}') WHEN 'null' THEN NULL "
         "ELSE {doc} -> '$.{f}' END",
    integer="CASE json_type({doc}, '$.{f}') WHEN 'integer' THEN json_extract({doc}, '$.{f}') END",
    real="CASE WHEN json_type({doc}, '$.{f}') IN ('integer', 'real') THEN CAST(json_extract({doc}, '$.{f}') AS REAL) "
         "END",
    json="CASE json_type({doc}, '$.{f}') WHEN 'null' THEN NULL ELSE {doc} -> '$.{f}' END",
    without="json_remove({doc}, {paths})",
    is_number="{m}.type IN ('integer', 'real')",
    number="CAST({m}.value AS REAL)",
    absent="coalesce(json_type({doc}, '$.{f}'), 'null') = 'null'",
    packed="json_each(CASE WHEN json_type({doc}, '$.{f}') = 'text' AND json_type(json_extract({doc}, '$.{f}')) = "
           "'array' THEN json_extract({doc}, '$.{f}') END) AS {a}",
    strings="json_each(CASE json_type({doc}, '$.{f}') WHEN 'array' THEN {doc} -> '$.{f}' END) AS {a}",
    position="{a}.key",
    at_integer="CASE json_type({a}, '$[' || ({i}) || ']') WHEN 'integer' THEN json_extract({a}, '$[' || ({i}) || ']') "
               "END",
    at_text="CASE json_type({a}, '$[' || ({i}) || ']') WHEN 'text' THEN json_extract({a}, '$[' || ({i}) || ']') "
            "WHEN 'null' THEN NULL ELSE {a} -> ('$[' || ({i}) || ']') END",
    at_is_number="json_type({a}, '$[' || ({i}) || ']') IN ('integer', 'real')",
    at_number="CAST(json_extract({a}, '$[' || ({i}) || ']') AS REAL)",
    at_time="CASE WHEN json_type({a}, '$[' || ({i}) || ']') = 'integer' THEN "
            "strftime('%Y-%m-%dT%H:%M:%S', json_extract({a}, '$[' || ({i}) || ']') / 1000000, 'unixepoch') "
            "|| '.' || printf('%06d', json_extract({a}, '$[' || ({i}) || ']') % 1000000) || 'Z' "
            "WHEN json_type({a}, '$[' || ({i}) || ']') = 'text' THEN json_extract({a}, '$[' || ({i}) || ']') "
            "WHEN json_type({a}, '$[' || ({i}) || ']') = 'null' THEN NULL "
            "ELSE {a} -> ('$[' || ({i}) || ']') END")

#: PostgreSQL's operators over the ``json`` column ``doc`` (``->>`` text, ``->`` JSON, ``json_typeof``); text in the
#: "C" collation, so that it sorts like SQLite's. ``without`` rebuilds the object member by member: the json type has
#: no "minus", and jsonb would reorder the keys and add spaces.
POSTGRES = Spelling(
    name="postgresql",
    catalog="SELECT viewname AS name FROM pg_views WHERE schemaname = current_schema()",
    text="({doc} ->> '{f}') COLLATE \"C\"",
    integer="CASE WHEN json_typeof({doc} -> '{f}') = 'number' AND {doc} ->> '{f}' ~ '^-?[0-9]+$' "
            "THEN ({doc} ->> '{f}')::bigint END",
    real="CASE WHEN json_typeof({doc} -> '{f}') = 'number' THEN ({doc} ->> '{f}')::float8 END",
    json="CASE WHEN json_typeof({doc} -> '{f}') <> 'null' THEN ({doc} -> '{f}')::text COLLATE \"C\" END",
    without="coalesce((SELECT '{{' || string_agg(to_json(e.key)::text || ':' || e.value::text, ',' ORDER BY e.n) "
            "|| '}}' FROM json_each({doc}) WITH ORDINALITY AS e(key, value, n) WHERE e.key NOT IN {names}), '{{}}') "
            "COLLATE \"C\"",
    is_number="json_typeof({m}.value) = 'number'",
    number="({m}.value::text)::float8",
    absent="coalesce(json_typeof({doc} -> '{f}'), 'null') = 'null'",
    packed="json_array_elements(CASE WHEN json_typeof({doc} -> '{f}') = 'string' AND "
           "json_typeof(({doc} ->> '{f}')::json) = 'array' THEN ({doc} ->> '{f}')::json END) AS {a}(value)",
    strings="json_array_elements_text(CASE WHEN json_typeof({doc} -> '{f}') = 'array' THEN {doc} -> '{f}' END) "
            "WITH ORDINALITY AS {a}(value, n)",
    position="({a}.n - 1)",
    at_integer="CASE WHEN json_typeof({a} -> ({i})::int) = 'number' AND {a} ->> ({i})::int ~ '^-?[0-9]+$' "
               "THEN ({a} ->> ({i})::int)::bigint END",
    at_text="({a} ->> ({i})::int) COLLATE \"C\"",
    at_is_number="json_typeof({a} -> ({i})::int) = 'number'",
    at_number="(({a} -> ({i})::int)::text)::float8",
    at_time="CASE WHEN json_typeof({a} -> ({i})::int) = 'number' AND {a} ->> ({i})::int ~ '^-?[0-9]+$' THEN "
            "to_char(to_timestamp(({a} ->> ({i})::int)::bigint / 1000000) AT TIME ZONE 'UTC', "
            "'YYYY-MM-DD\"T\"HH24:MI:SS') || '.' || lpad((({a} ->> ({i})::int)::bigint % 1000000)::text, 6, '0') "
            "|| 'Z' ELSE ({a} ->> ({i})::int) END COLLATE \"C\"")

#: index name (``Index.name``) -> its spelling
SPELLINGS: dict[str, Spelling] = {s.name: s for s in (SQLITE, POSTGRES)}


def table_name(index, collection: schema.Collection) -> str:
    """The quoted table of a collection, as the SQL index names it."""
    return f'"{index.table_name(collection.name)}"'


def _in(values: Sequence[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def _check(field: str) -> str:
    if not _FIELD_RE.match(field):
        raise ValueError(f"view field {field!r} is not a plain name")
    return field


def _documents(s: Spelling, table: str, columns, extra: str = "") -> str:
    """One row per document of ``table``, with the declared columns."""
    parts = [f"id AS {name}" if field == "_id" else f"{s.column('doc', _check(field), kind)} AS {name}"
             for name, field, kind in columns]
    return f"SELECT {', '.join(parts + ([extra] if extra else []))} FROM {table}"


def definitions(index) -> dict[str, str]:
    """View name -> its SELECT on ``index`` (ConfigError for a backend without SQL views)."""
    s = SPELLINGS.get(getattr(index, "name", None))
    if s is None or not hasattr(index, "create_view"):
        raise ConfigError(f"the {getattr(index, 'name', type(index).__name__)} index has no SQL and no SQL views "
                          "(they need SQLite or PostgreSQL)")
    runs, logs = table_name(index, schema.RUNS), table_name(index, schema.LOGS)
    log_fields = _in(schema.LOG_FIELDS)

    def t(doc: str, field: str) -> str:
        return s.column(doc, field, TEXT)

    def i(doc: str, field: str) -> str:
        return s.column(doc, field, INTEGER)

    def r(doc: str, field: str) -> str:
        return s.column(doc, field, REAL)

    is_number, number = s.is_number.format(m="m"), s.number.format(m="m")
    # logs hold blocks (mlwarehouse.runs.blocks): for each metric name m of a block, each row r is a point
    # [step, time, epoch, <metric values>]; documents of the older one-point layout are read as they are
    head = len(schema.LOG_ROW_HEAD)
    points = (f"CROSS JOIN {s.strings.format(doc='l.doc', f=schema.LOG_BLOCK_NAMES, a='m')} "
              f"CROSS JOIN {s.packed.format(doc='l.doc', f=schema.LOG_BLOCK_ROWS, a='r')}")
    value_at = f"{s.position.format(a='m')} + {head}"

    def at(kind: str, i) -> str:
        return getattr(s, f"at_{kind}").format(a="r.value", i=i)

    point_value = s.at_number.format(a="r.value", i=value_at)
    point_is_number = s.at_is_number.format(a="r.value", i=value_at)
    one_point = s.absent.format(doc="l.doc", f=schema.LOG_BLOCK_ROWS)
    return {
        "runs": _documents(s, runs, _RUNS),
        "metrics": (
            f"SELECT {t('l.doc', 'run')} AS run_id, {t('l.doc', 'project')} AS project, {t('l.doc', 'kind')} AS kind, "
            f"{at('integer', 0)} AS step, {at('integer', 2)} AS epoch, {at('time', 1)} AS time, "
            f"m.value AS metric, {point_value} AS value FROM {logs} AS l {points} WHERE {point_is_number} "
            "UNION ALL "
            f"SELECT {t('l.doc', 'run')} AS run_id, {t('l.doc', 'project')} AS project, {t('l.doc', 'kind')} AS kind, "
            f"{i('l.doc', 'step')} AS step, {i('l.doc', 'epoch')} AS epoch, {t('l.doc', 'time')} AS time, "
            f"m.key AS metric, {number} AS value FROM {logs} AS l CROSS JOIN json_each(l.doc) AS m "
            f"WHERE {one_point} AND {is_number} AND m.key NOT IN {log_fields}"),
        "models": _documents(s, table_name(index, schema.MODELS), _MODELS,
                             f"{s.remove('doc', _MODEL_HIDDEN)} AS fields"),
        "datasets": _documents(s, table_name(index, schema.DATASETS), _DATASETS),
        "tasks": _documents(s, table_name(index, schema.TASKS), _TASKS),
        # MLDB's tables, over the base tables (not the views above) so that the MLDB cursor's STATUS/LOSS/METRICS
        # names can never capture them
        "mldb_status": (
            f"SELECT {t('doc', 'name')} AS EXP_ID, coalesce({t('doc', 'mldb_status')}, upper({t('doc', 'status')})) "
            f"AS STATUS, {t('doc', 'project')} AS project FROM {runs}"),
        "mldb_loss": (
            f"SELECT {t('r_.doc', 'name')} AS EXP_ID, {t('l.doc', 'kind')} AS KIND, {at('integer', 2)} AS EPOCH, "
            f"{point_value} AS VALUE, {t('l.doc', 'project')} AS project "
            f"FROM {logs} AS l JOIN {runs} AS r_ ON r_.id = {t('l.doc', 'run')} {points} "
            f"WHERE m.value = 'loss' AND {point_is_number} AND {t('l.doc', 'kind')} <> '{_MLDB_METRICS_KIND}' "
            "UNION ALL "
            f"SELECT {t('r_.doc', 'name')} AS EXP_ID, {t('l.doc', 'kind')} AS KIND, {i('l.doc', 'epoch')} AS EPOCH, "
            f"{r('l.doc', 'loss')} AS VALUE, {t('l.doc', 'project')} AS project "
            f"FROM {logs} AS l JOIN {runs} AS r_ ON r_.id = {t('l.doc', 'run')} "
            f"WHERE {one_point} AND {r('l.doc', 'loss')} IS NOT NULL "
            f"AND {t('l.doc', 'kind')} <> '{_MLDB_METRICS_KIND}'"),
        "mldb_metrics": (
            f"SELECT {t('r_.doc', 'name')} AS EXP_ID, m.value AS NAME, {at('integer', 2)} AS EPOCH, "
            f"{point_value} AS VALUE, {t('l.doc', 'project')} AS project "
            f"FROM {logs} AS l JOIN {runs} AS r_ ON r_.id = {t('l.doc', 'run')} {points} "
            f"WHERE {t('l.doc', 'kind')} = '{_MLDB_METRICS_KIND}' AND {point_is_number} "
            "UNION ALL "
            f"SELECT {t('r_.doc', 'name')} AS EXP_ID, m.key AS NAME, {i('l.doc', 'epoch')} AS EPOCH, "
            f"{number} AS VALUE, {t('l.doc', 'project')} AS project "
            f"FROM {logs} AS l JOIN {runs} AS r_ ON r_.id = {t('l.doc', 'run')} CROSS JOIN json_each(l.doc) AS m "
            f"WHERE {one_point} AND {t('l.doc', 'kind')} = '{_MLDB_METRICS_KIND}' AND {is_number} "
            f"AND m.key NOT IN {log_fields}"),
    }


#: the META document recording a digest of each view's definition (PostgreSQL keeps no comparable SQL text)
STAMPS_ID = "sql_views"
_done: "weakref.WeakSet" = weakref.WeakSet()
_lock = threading.Lock()


def ensure_views(index) -> None:
    """Create the views on ``index``, or replace those whose definition changed (once per index object).

    ConfigError on a backend without SQL views. Each definition's digest is kept in the ``meta`` collection, so
    an upgrade that changes a view replaces it on the first ``sql()`` call, on every database.
    """
    with _lock:
        if index in _done:  # checked first: every sql() call comes here
            return
        wanted = definitions(index)
        for collection in VIEW_COLLECTIONS:
            index.ensure_collection(collection.name, scalar_fields=collection.scalar_fields)
        index.ensure_collection(schema.META.name)
        existing = {row["name"] for row in index.sql(SPELLINGS[index.name].catalog)}
        stored = index.find_one(schema.META.name, {"_id": STAMPS_ID}) or {}
        stamps = dict(stored.get("views") or {})
        for name, select in wanted.items():
            digest = hashlib.sha256(select.encode()).hexdigest()[:16]
            if name not in existing or stamps.get(name) != digest:
                index.create_view(name, select, replace=name in existing)
                stamps[name] = digest
        if stamps != stored.get("views"):
            index.replace_one(schema.META.name, {"_id": STAMPS_ID, "views": stamps}, upsert=True)
        _done.add(index)
