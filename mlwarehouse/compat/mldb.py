"""MLDB's API on top of the warehouse: ``Database()`` with experiment statuses, loss and metric values, and SQL.

    from mlwarehouse.compat.mldb import Database
    with Database() as db:                                   # the embedded warehouse, project "mldb"
        db.set_exp_status("exp1", "TRAINING")
        db.add_loss_value("exp1", "train", 0, 0.9)
        db.cursor.execute('SELECT EXP_ID FROM STATUS WHERE STATUS.STATUS="TRAINING";')
        print(db.cursor.fetchall())                          # [('exp1',)]

An experiment is a run named after its ``exp_id``. Its MLDB status string is kept as given (``mldb_status``) and
mapped to the run's status: TRAINING/RUNNING/... -> running, COMPLETE/DONE/... -> complete, FAILED/ERROR/... ->
failed, CANCELLED/KILLED/... -> cancelled. Loss values are logs of their kind (``train``, ``valid``...) with a
``loss`` field; metric values are logs of kind ``metrics``, one field per metric. Hyper-parameters go to the run's
``hyper_parameters``.

SQL (``db.sql()``, ``db.cursor``) is read-only. MLDB's cursor wrote to its SQLite file; here its tables are views
of the warehouse's runs and logs, so a statement that writes (``INSERT INTO STATUS ...``, ``UPDATE``, ``DELETE``,
``CREATE``...) raises :class:`~mlwarehouse.errors.QueryError` naming the wrapper function that does the same write
(``set_exp_status``, ``add_loss_value``, ``add_metric_value``, ``add_hyperparam``): MLDB's writes are supported
through its wrapper functions only. The SQL sees, besides the views of :mod:`mlwarehouse.index.views`, MLDB's
tables of this project: ``STATUS(EXP_ID, STATUS)``, ``LOSS(EXP_ID, KIND, EPOCH, VALUE)`` and
``METRICS(EXP_ID, NAME, EPOCH, VALUE)``. Inside this facade ``METRICS`` is MLDB's table; the warehouse's own
``metrics`` view stays readable as ``main.metrics`` (on PostgreSQL, as ``<schema>.metrics``, e.g. ``public.metrics``).
The SQL is the database's: on SQLite (MLDB's own) every query MLDB accepted works; on PostgreSQL strings take single
quotes, placeholders are ``%s``, and column names come back in lower case (``exp_id``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mlwarehouse import schema
from mlwarehouse.errors import QueryError
from mlwarehouse.query.fields import normalize_value
from mlwarehouse.runs.registry import Run
from mlwarehouse.warehouse import connect

__all__ = ["Database", "Cursor", "STATUS_MAP", "WRITERS"]

#: MLDB status strings (upper case) -> run statuses; anything else counts as running
STATUS_MAP = {
    "COMPLETE": "complete", "COMPLETED": "complete", "FINISHED": "complete", "DONE": "complete",
    "SUCCESS": "complete", "FAILED": "failed", "FAILURE": "failed", "ERROR": "failed", "CRASHED": "failed",
    "CANCELLED": "cancelled", "CANCELED": "cancelled", "KILLED": "cancelled", "STOPPED": "cancelled",
    "ABORTED": "cancelled",
}

_WITH_RE = re.compile(r"^\s*with\s+(recursive\s+)?", re.I)
#: string literals, quoted names and comments: blanked before looking for a statement's verb
_NOISE_RE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|--[^\n]*|/\*.*?(?:\*/|$)", re.S)
_VERB_RE = re.compile(r"[\s(;]*([a-z]+)", re.I)
_WRITE_VERBS = frozenset({"insert", "update", "delete", "replace", "upsert", "merge", "create", "drop", "alter",
                          "truncate", "copy", "grant", "revoke", "attach", "detach", "vacuum", "reindex", "pragma"})
#: a write after ``WITH ...`` (SQLite and PostgreSQL accept ``WITH x AS (...) INSERT INTO ...``)
_CTE_WRITE_RE = re.compile(r"\b(insert|replace)\s+into\b|\bdelete\s+from\b|\bupdate\s+\S+\s+set\b|\bmerge\s+into\b",
                           re.I)
#: MLDB's tables -> the wrapper function that writes them (hyper-parameters: ``add_hyperparam``)
WRITERS = {
    "STATUS": "db.set_exp_status(exp_id, status)",
    "LOSS": "db.add_loss_value(exp_id, kind, epoch, value)",
    "METRICS": "db.add_metric_value(exp_id, metric, epoch, value)",
}


def _check_read_only(query: str) -> None:
    """Refuse a statement that writes before it reaches the database, whose own answer would be the misleading
    ``no such table: STATUS`` (MLDB's tables are read-only views here), and name the wrapper that writes instead."""
    text = _NOISE_RE.sub(" ", query)
    match = _VERB_RE.match(text)
    verb = match.group(1).lower() if match else ""
    cte_write = _CTE_WRITE_RE.search(text) if verb == "with" else None
    if verb not in _WRITE_VERBS and not cte_write:
        return
    verb = cte_write.group(0).split()[0] if cte_write else verb
    tables = [name for name in WRITERS if re.search(rf"\b{name}\b", text, re.I)]
    wanted = [WRITERS[name] for name in tables] or [*WRITERS.values(), "db.add_hyperparam(exp_id, name, value)"]
    raise QueryError(f"MLDB's SQL is read-only here ({verb.upper()} refused): STATUS, LOSS and METRICS are views of "
                     f"the warehouse's runs and logs; write through the wrapper functions instead: "
                     f"{', '.join(wanted)}")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Cursor:
    """A DB-API-like cursor over the read-only SQL of a :class:`Database`: ``execute`` then ``fetchall``."""

    def __init__(self, database: "Database"):
        self._db = database
        self._rows: list[tuple] = []
        self.description: tuple | None = None
        self.rowcount = -1

    def execute(self, query: str, params: Sequence[Any] | dict = ()) -> "Cursor":
        rows = self._db.sql(query, params)
        names = list(rows[0]) if rows else []
        self.description = tuple((n, None, None, None, None, None, None) for n in names) or None
        self._rows = [tuple(r.values()) for r in rows]
        self.rowcount = len(self._rows)
        return self

    def fetchone(self) -> tuple | None:
        return self._rows.pop(0) if self._rows else None

    def fetchmany(self, size: int = 1) -> list[tuple]:
        out, self._rows = self._rows[:size], self._rows[size:]
        return out

    def fetchall(self) -> list[tuple]:
        out, self._rows = self._rows, []
        return out

    def __iter__(self):
        while self._rows:
            yield self._rows.pop(0)

    def close(self) -> None:
        self._rows = []


class Database:
    """MLDB's ``Database``: a context manager over :func:`mlwarehouse.connect` scoped to one project."""

    def __init__(self, uri: str | None = None, project: str = "mldb", *, blobs: str | None = None,
                 home: str | None = None):
        self.warehouse = connect(uri, blobs=blobs, home=home)
        self.project = self.warehouse.project(project)
        self._runs: dict[str, Run] = {}
        self.cursor = Cursor(self)

    # -- experiments ---------------------------------------------------------------------------------------
    def run(self, exp_id: str) -> Run:
        """The run of an experiment (its newest run of that name), created if there is none."""
        if not isinstance(exp_id, str) or not exp_id:
            raise QueryError(f"exp_id must be a non-empty string, not {exp_id!r}")
        run = self._runs.get(exp_id)
        if run is None:
            runs = self.project.runs
            found = runs.find(where={"name": exp_id}, sort=[("started", -1)], limit=1)
            run = found[0] if found else runs._start(exp_id, None, (), (), None, {}, current=False)
            self._runs[exp_id] = run
        return run

    def set_exp_status(self, exp_id: str, status: str) -> None:
        """Set an experiment's status (created if new): the MLDB string is kept, the run's status follows it."""
        if not isinstance(status, str) or not status:
            raise QueryError(f"status must be a non-empty string, not {status!r}")
        run = self.run(exp_id)
        ours = STATUS_MAP.get(status.upper(), "running")
        if ours == "running":
            self.project.update(schema.RUNS.name, {"_id": run.id},
                                {"$set": {"status": "running", "ended": None, "mldb_status": status}})
            run.refresh()
        else:
            run.finish(ours, mldb_status=status)

    def add_loss_value(self, exp_id: str, kind: str, epoch: int, value: float) -> None:
        """Log ``loss=value`` at ``epoch`` under ``kind`` (train, valid, test...)."""
        self.run(exp_id).log(kind, epoch=epoch, loss=value)

    def add_metric_value(self, exp_id: str, metric: str, epoch: int, value: float) -> None:
        """Log one metric value at ``epoch`` (a log of kind ``metrics``)."""
        self.run(exp_id).log("metrics", epoch=epoch, **{metric: value})

    def add_hyperparam(self, exp_id: str, name: str, value: Any) -> None:
        """Record one hyper-parameter of an experiment."""
        run = self.run(exp_id)
        params = dict(run.doc.get("hyper_parameters") or {})
        params[name] = normalize_value(value, f"hyper_parameters.{name}")
        self.project.update(schema.RUNS.name, {"_id": run.id}, {"$set": {"hyper_parameters": params}})
        run.refresh()

    # -- SQL -----------------------------------------------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | dict = ()) -> list[dict]:
        """Read-only SQL with MLDB's STATUS, LOSS and METRICS tables of this project; rows as dicts."""
        if not isinstance(query, str):
            raise QueryError(f"sql() takes a string, not {type(query).__name__}")
        _check_read_only(query)
        return self.warehouse.sql(self._with_tables(query), params)  # flushes the logs, creates the views

    def _with_tables(self, query: str) -> str:
        project = _literal(self.project.name)
        tables = (f"STATUS AS (SELECT EXP_ID, STATUS FROM mldb_status WHERE project = {project}), "
                  f"LOSS AS (SELECT EXP_ID, KIND, EPOCH, VALUE FROM mldb_loss WHERE project = {project}), "
                  f"METRICS AS (SELECT EXP_ID, NAME, EPOCH, VALUE FROM mldb_metrics WHERE project = {project})")
        text = query.strip().rstrip(";").rstrip()
        match = _WITH_RE.match(text)
        if match:
            return f"WITH {match.group(1) or ''}{tables}, {text[match.end():]}"
        return f"WITH {tables} {text}"

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush every logged value and close the warehouse."""
        self.warehouse.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mldb.Database {self.warehouse!r} project={self.project.name!r}>"
