"""The documented, stable SQL views that ``wh.sql()`` (and ``mlw sql``) read.

Documents stay JSON in their collections; these views give them columns. Their names and columns are a public
interface: new columns may be added, none is renamed or removed. JSON columns hold JSON text (read them with
``json_extract``). Every view spans all projects; filter on ``project``.

========  ===================================================================================================
view      columns
========  ===================================================================================================
runs      run_id, project, name, status, started, ended, hyper_parameters (JSON), tags (JSON), task_id,
          datasets (JSON list of ids), summary (JSON: kind -> metric -> last/min/max/...), error
metrics   run_id, project, kind, step, epoch, time, metric, value: one row per numeric field of each log
          document (nulls, strings and booleans are left out)
models    model_id, project, name, run_id, dataset_id, epoch, step, time, fields (JSON: the document without
          its bookkeeping and stored values)
datasets  dataset_id, project, name, version, time, description, tags (JSON)
========  ===================================================================================================

Views named after MLDB's tables, for :mod:`mlwarehouse.compat.mldb` (its cursor reads them as ``STATUS``, ``LOSS``
and ``METRICS``): ``mldb_status(EXP_ID, STATUS, project)`` (the run's name and its MLDB status string, else its
status in capitals), ``mldb_loss(EXP_ID, KIND, EPOCH, VALUE, project)`` (``loss`` of every log kind but
``metrics``), ``mldb_metrics(EXP_ID, NAME, EPOCH, VALUE, project)`` (the numeric fields of logs of kind
``metrics``).

Only backends that can create views (SQLite) get them; elsewhere :func:`ensure_views` does nothing.
"""

from __future__ import annotations

import threading
import weakref

__all__ = ["ensure_views", "VIEWS", "VIEW_COLLECTIONS"]


def _j(field: str, table: str = "") -> str:
    return f"json_extract({table + '.' if table else ''}doc, '$.{field}')"


_LOG_FIELDS = "('_id', 'project', 'time', 'run', 'kind', 'step', 'epoch', '_blobs')"

#: view name -> SELECT over the SQLite tables ``c_<collection>(id, doc)``
VIEWS: dict[str, str] = {
    "runs": (
        f"SELECT id AS run_id, {_j('project')} AS project, {_j('name')} AS name, {_j('status')} AS status, "
        f"{_j('started')} AS started, {_j('ended')} AS ended, {_j('hyper_parameters')} AS hyper_parameters, "
        f"{_j('tags')} AS tags, {_j('task')} AS task_id, {_j('datasets')} AS datasets, "
        f"{_j('summary')} AS summary, {_j('error')} AS error FROM c_runs"),
    "metrics": (
        f"SELECT {_j('run', 'l')} AS run_id, {_j('project', 'l')} AS project, {_j('kind', 'l')} AS kind, "
        f"{_j('step', 'l')} AS step, {_j('epoch', 'l')} AS epoch, {_j('time', 'l')} AS time, "
        f"m.key AS metric, m.value AS value FROM c_logs AS l, json_each(l.doc) AS m "
        f"WHERE m.type IN ('integer', 'real') AND m.key NOT IN {_LOG_FIELDS}"),
    "models": (
        f"SELECT id AS model_id, {_j('project')} AS project, {_j('name')} AS name, {_j('run')} AS run_id, "
        f"{_j('dataset')} AS dataset_id, {_j('epoch')} AS epoch, {_j('step')} AS step, {_j('time')} AS time, "
        "json_remove(doc, '$._id', '$._blobs', '$.project', '$.time', '$.value', '$.weights', "
        "'$.architecture') AS fields FROM c_models"),
    "datasets": (
        f"SELECT id AS dataset_id, {_j('project')} AS project, {_j('name')} AS name, {_j('version')} AS version, "
        f"{_j('time')} AS time, {_j('description')} AS description, {_j('tags')} AS tags FROM c_datasets"),
    # MLDB's tables, over the base tables (not the views above) so that the MLDB cursor's STATUS/LOSS/METRICS
    # names can never capture them
    "mldb_status": (
        f"SELECT {_j('name')} AS EXP_ID, "
        f"coalesce({_j('mldb_status')}, upper({_j('status')})) AS STATUS, {_j('project')} AS project FROM c_runs"),
    "mldb_loss": (
        f"SELECT {_j('name', 'r')} AS EXP_ID, {_j('kind', 'l')} AS KIND, "
        f"{_j('epoch', 'l')} AS EPOCH, {_j('loss', 'l')} AS VALUE, {_j('project', 'l')} AS project "
        f"FROM c_logs AS l JOIN c_runs AS r ON r.id = {_j('run', 'l')} "
        f"WHERE json_type(l.doc, '$.loss') IN ('integer', 'real') AND {_j('kind', 'l')} <> 'metrics'"),
    "mldb_metrics": (
        f"SELECT {_j('name', 'r')} AS EXP_ID, m.key AS NAME, "
        f"{_j('epoch', 'l')} AS EPOCH, m.value AS VALUE, {_j('project', 'l')} AS project "
        f"FROM c_logs AS l JOIN c_runs AS r ON r.id = {_j('run', 'l')}, json_each(l.doc) AS m "
        f"WHERE {_j('kind', 'l')} = 'metrics' AND m.type IN ('integer', 'real') AND m.key NOT IN {_LOG_FIELDS}"),
}

#: the collections the views read (created empty if missing, so that every view can be queried at once)
VIEW_COLLECTIONS = ("runs", "logs", "models", "datasets")

_done: "weakref.WeakSet" = weakref.WeakSet()
_lock = threading.Lock()


def ensure_views(index) -> None:
    """Create or update the views on ``index`` (once per index object; a no-op without ``create_view``)."""
    create = getattr(index, "create_view", None)
    if create is None or getattr(index, "name", None) != "sqlite":
        return
    with _lock:
        if index in _done:
            return
        for collection in VIEW_COLLECTIONS:
            index.ensure_collection(collection)
        existing = {row["name"]: row["sql"] for row in
                    index.sql("SELECT name, sql FROM sqlite_master WHERE type = 'view'")}
        for name, select in VIEWS.items():
            current = existing.get(name)
            if current is None or not current.endswith(" AS " + select):
                create(name, select, replace=current is not None)
        _done.add(index)
