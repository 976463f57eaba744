"""The SQL views conformance suite: every SQL backend offers the same views, and the same SELECT returns the same rows.

A test module subclasses :class:`ViewsTests` and supplies a ``wh`` fixture: a fresh, empty warehouse on one SQL
backend. :data:`DOCUMENTS` are fixed documents (ids and times included, odd values on purpose) that
:func:`load` writes straight into the index, so every backend holds the same documents; :func:`rows_of_every_view`
runs :data:`SELECTS` over them. Comparing those rows between two backends (``tests/test_views_backends.py``) is the
conformance check; the tests here pin what every backend must answer on its own. :func:`postgres_schema` and
:func:`postgres_warehouse` give a fresh PostgreSQL schema (and a warehouse in it) to test modules that need one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest

import mlwarehouse
from mlwarehouse import schema
from mlwarehouse.errors import QueryError
from mlwarehouse.index import views
from mlwarehouse.index.views import VIEW_NAMES, definitions, ensure_views

__all__ = ["ViewsTests", "DOCUMENTS", "SELECTS", "load", "rows_of_every_view", "postgres_schema", "postgres_warehouse"]

_T = "2024-01-02T03:04:05.000006Z"
_T_MICROS = 1704164645_500000  # a block row's time (microseconds): read as "2024-01-02T03:04:05.500000Z"
RUN_A, RUN_B = "01HV0000000000000000000RNA", "01HV0000000000000000000RNB"
_SUMMARY = {"train": {"loss": {"last": 0.25, "last_step": 2, "min": 0.25, "min_step": 2, "max": 1.0, "max_step": 0,
                               "count": 3, "nulls": 1}}}


def _log(i: int, run: str | None, kind: str, step, **fields) -> dict:
    return {"_id": f"01HV00000000000000000LOG{i:02d}", "project": "p", "time": _T, "run": run, "kind": kind,
            "step": step, **fields}


#: collection name -> documents, as a backend stores them
DOCUMENTS: dict[str, list[dict]] = {
    schema.RUNS.name: [
        {"_id": RUN_A, "project": "p", "time": _T, "name": "mlp", "status": "complete", "started": _T, "ended": _T,
         "hyper_parameters": {"lr": 1e-05, "sum": 0.1 + 0.2, "text": "é \"q\" \\ \n\t", "big": 2 ** 62},
         "datasets": ["01HV0000000000000000000DS1"], "tags": ["a", "é"], "task": "01HV0000000000000000000TK1",
         "summary": _SUMMARY, "error": None, "mldb_status": "DONE"},
        {"_id": RUN_B, "project": "q", "time": _T, "name": "Zeta", "status": "failed", "started": _T, "ended": None,
         "hyper_parameters": {}, "datasets": [], "tags": [], "task": None, "summary": {}, "error": "boom"},
    ],
    schema.LOGS.name: [
        _log(1, RUN_A, "train", 0, epoch=0, loss=1.0, n=3, note="x", flag=True, missing=None),
        _log(2, RUN_A, "train", 1, epoch=0, loss=0.5, n=-7, big=2 ** 62),
        _log(3, RUN_A, "train", 2, epoch=1.5, loss=0.25, tiny=5e-324, neg=-1.5e300),
        _log(4, RUN_A, "valid", 2, loss=0.75, accuracy=1),
        _log(5, RUN_A, "metrics", None, epoch=3, f1=0.6, recall=0),
        _log(6, RUN_B, "train", "3", epoch="1", loss="nan"),
        _log(7, None, "train", 0, loss=2.0),
        # blocks (the layout the log writer writes: mlwarehouse.runs.blocks), with odd values in their rows
        {"_id": "01HV00000000000000000BLK01", "project": "p", "time": _T, "run": RUN_A, "kind": "test", "step": 3,
         "last": 4, "n": 4, "metrics": ["loss", "note", "acc"],
         "rows": json.dumps([[3, _T_MICROS, 1, 0.5, "x", None], [4, _T, None, 2 ** 62, True, 1.5],
                             ["5", None, 1.5, 1e-300, 2, -0.0], [6, _T]])},
        {"_id": "01HV00000000000000000BLK02", "project": "p", "time": _T, "run": RUN_A, "kind": "metrics",
         "step": None, "last": None, "n": 1, "metrics": ["f1"],
         "rows": json.dumps([[None, 1704164645_000000, 4, 0.7]])},
    ],
    schema.MODELS.name: [
        {"_id": "01HV0000000000000000000MD1", "project": "p", "time": _T, "name": "m", "kind": "arrays",
         "run": RUN_A, "dataset": "01HV0000000000000000000DS1", "epoch": 2, "step": None, "tags": [],
         "test_accuracy": 0.9, "nested": {"a": [1, 2.5, "é"], "b": None}, "value": {"_blob": "x"},
         "_blobs": ["x"], "weights": [], "architecture": None},
        {"_id": "01HV0000000000000000000MD2", "project": "p", "time": _T, "name": "n", "kind": "checkpoint",
         "run": None, "dataset": None, "epoch": 2.0, "step": 10},
    ],
    schema.DATASETS.name: [
        {"_id": "01HV0000000000000000000DS1", "project": "p", "time": _T, "name": "digits", "version": 1,
         "description": "four \"numbers\"\né", "tags": ["small"], "value": {"_blob": "y"}, "_blobs": ["y"]},
        {"_id": "01HV0000000000000000000DS2", "project": "p", "time": _T, "name": "digits", "version": "v2",
         "description": 0.30000000000000004, "tags": "single"},
        {"_id": "01HV0000000000000000000DS3", "project": "p", "time": _T, "name": "Digits", "version": 3,
         "description": True},
    ],
    schema.TASKS.name: [
        {"_id": "01HV0000000000000000000TK1", "project": "p", "time": _T, "task_name": "train", "status": "finished",
         "priority": 2, "attempts": 1, "max_attempts": 3, "worker": "host-1", "run": RUN_A, "created": _T,
         "started": _T, "ended": _T, "hyper_parameters": {"lr": 0.1}, "result": {"acc": 0.9}, "error": None,
         "tags": []},
        {"_id": "01HV0000000000000000000TK2", "project": "p", "time": _T, "task_name": "train", "status": "pending",
         "priority": -0.5, "attempts": 0, "max_attempts": 3, "worker": None, "run": None, "created": _T,
         "started": None, "ended": None, "hyper_parameters": {}, "result": None, "error": None},
    ],
}

#: view name -> a SELECT of all its rows in a total order. NULLs sort first on SQLite and last on PostgreSQL unless
#: told (``NULLS FIRST`` works on both); PostgreSQL folds the MLDB column names to lower case.
SELECTS: dict[str, str] = {
    "runs": "SELECT * FROM runs ORDER BY project, name, run_id",
    "metrics": "SELECT * FROM metrics ORDER BY run_id NULLS FIRST, kind, step NULLS FIRST, metric, value",
    "models": "SELECT * FROM models ORDER BY name, model_id",
    "datasets": "SELECT * FROM datasets ORDER BY name, version_label, dataset_id",
    "tasks": "SELECT * FROM tasks ORDER BY priority DESC, task_id",
    "mldb_status": "SELECT * FROM mldb_status ORDER BY project, EXP_ID",
    "mldb_loss": "SELECT * FROM mldb_loss ORDER BY EXP_ID, KIND, EPOCH NULLS FIRST, VALUE",
    "mldb_metrics": "SELECT * FROM mldb_metrics ORDER BY EXP_ID, NAME, EPOCH NULLS FIRST",
}


def load(wh) -> None:
    """Write :data:`DOCUMENTS` into the warehouse's index as they are (no stamping: the same bytes everywhere)."""
    for name, docs in DOCUMENTS.items():
        wh.ensure(schema.COLLECTIONS[name])
        wh.index.insert_many(name, [json.loads(json.dumps(d)) for d in docs])


def rows_of_every_view(wh) -> dict[str, list[dict]]:
    """view name -> its rows (column names in lower case), in the order of :data:`SELECTS`."""
    return {view: [{k.lower(): v for k, v in row.items()} for row in wh.sql(select)]
            for view, select in SELECTS.items()}


@contextmanager
def postgres_schema(server: str) -> Iterator[str]:
    """The URI of a fresh schema of the PostgreSQL server ``server`` (dropped afterwards)."""
    import psycopg
    name = "v_" + secrets.token_hex(6)
    with psycopg.connect(server, autocommit=True) as con:
        con.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in server else "?"
    try:
        yield f"{server}{sep}options={quote(f'-csearch_path={name}')}"
    finally:
        with psycopg.connect(server, autocommit=True) as con:
            con.execute(f"DROP SCHEMA {name} CASCADE")


@contextmanager
def postgres_warehouse(server: str, blobs: str) -> Iterator[mlwarehouse.Warehouse]:
    """A warehouse in a fresh schema of the PostgreSQL server ``server``, its blobs in the folder ``blobs``."""
    with postgres_schema(server) as uri, mlwarehouse.connect(uri, blobs=blobs) as wh:
        yield wh


class ViewsTests:
    """What every SQL backend's views answer, through ``wh.sql`` only."""

    @pytest.fixture
    def wh(self):  # pragma: no cover - supplied by subclasses
        raise NotImplementedError

    def test_every_view_exists_and_answers_on_an_empty_warehouse(self, wh):
        for view in VIEW_NAMES:
            assert wh.sql(f"SELECT * FROM {view}") == []
        with pytest.raises(QueryError):
            wh.sql("DELETE FROM c_runs")

    def test_columns_are_typed_the_same_everywhere(self, wh):
        load(wh)
        rows = rows_of_every_view(wh)
        run = rows["runs"][0]
        assert (run["name"], run["task_id"], run["error"]) == ("mlp", "01HV0000000000000000000TK1", None)
        assert json.loads(run["hyper_parameters"]) == DOCUMENTS["runs"][0]["hyper_parameters"]
        assert json.loads(run["summary"]) == _SUMMARY
        metrics = [(r["kind"], r["step"], r["epoch"], r["metric"], r["value"]) for r in rows["metrics"]
                   if r["run_id"] == RUN_A]
        assert ("train", 2, None, "loss", 0.25) in metrics  # epoch 1.5 is not an integer: NULL
        assert ("metrics", None, 3, "recall", 0.0) in metrics
        assert all(type(v) is float for *_, v in metrics) and not any(m == "flag" for *_, m, _ in metrics)
        assert [(r["kind"], r["step"], r["epoch"]) for r in rows["metrics"] if r["run_id"] == RUN_B] == []
        # a block's rows: one row per numeric metric of each point; a short (damaged) row gives none
        assert sorted((m for m in metrics if m[0] == "test"), key=repr) == sorted([
            ("test", 3, 1, "loss", 0.5), ("test", 4, None, "loss", 2.0 ** 62), ("test", 4, None, "acc", 1.5),
            ("test", None, None, "loss", 1e-300), ("test", None, None, "note", 2.0), ("test", None, None, "acc", 0.0)],
            key=repr)
        assert {(r["step"], r["time"]) for r in rows["metrics"] if r["kind"] == "test"} == {
            (3, "2024-01-02T03:04:05.500000Z"), (4, _T), (None, None)}
        datasets = [(d["name"], d["version"], d["version_label"], d["description"]) for d in rows["datasets"]]
        assert datasets == [("Digits", 3, "3", "true"), ("digits", 1, "1", 'four "numbers"\né'),
                            ("digits", None, "v2", "0.30000000000000004")]
        assert [d["tags"] for d in rows["datasets"]] == [None, '["small"]', '"single"']
        model = rows["models"][0]
        assert json.loads(model["fields"]) == {"name": "m", "kind": "arrays", "run": RUN_A,
                                               "dataset": "01HV0000000000000000000DS1", "epoch": 2, "step": None,
                                               "tags": [], "test_accuracy": 0.9, "nested": {"a": [1, 2.5, "é"],
                                                                                             "b": None}}
        assert (rows["models"][1]["epoch"], rows["models"][1]["step"]) == (None, 10)
        tasks = [(t["status"], t["priority"], t["attempts"], t["result"]) for t in rows["tasks"]]
        assert tasks == [("finished", 2.0, 1, '{"acc":0.9}'), ("pending", -0.5, 0, None)]
        assert [(r["exp_id"], r["status"]) for r in rows["mldb_status"]] == [("mlp", "DONE"), ("Zeta", "FAILED")]
        assert [(r["kind"], r["epoch"], r["value"]) for r in rows["mldb_loss"]] == [
            ("test", None, 1e-300), ("test", None, 2.0 ** 62), ("test", 1, 0.5),
            ("train", None, 0.25), ("train", 0, 0.5), ("train", 0, 1.0), ("valid", None, 0.75)]
        assert [(r["name"], r["epoch"], r["value"]) for r in rows["mldb_metrics"]] == [
            ("f1", 3, 0.6), ("f1", 4, 0.7), ("recall", 3, 0.0)]

    def test_logged_runs_count_the_same_metrics(self, wh):
        with wh.runs.start("a", hyper_parameters={"lr": 0.1}) as run:
            for step in range(50):
                run.log("train", step=step, loss=1 / (step + 1), acc=step, note="text", nan=float("nan"))
            run.log("valid", step=50, acc=0.5)
        wh.project("other").runs.start("b").finish()
        assert wh.sql("SELECT count(*) AS n FROM metrics")[0]["n"] == 101
        assert wh.sql("SELECT count(*) AS n FROM runs")[0]["n"] == 2
        best = wh.sql("SELECT r.name, max(m.value) AS best FROM metrics m JOIN runs r ON r.run_id = m.run_id "
                      "WHERE m.metric = 'acc' AND m.kind = 'train' GROUP BY r.name")
        assert best == [{"name": "a", "best": 49.0}]

    def test_a_changed_definition_is_replaced(self, wh):
        wh.index.ensure_collection(schema.RUNS.name)
        wh.index.create_view("runs", "SELECT 1 AS old_column")  # as an older version might have left it
        wh.runs.start("r").finish()
        assert [r["name"] for r in wh.sql("SELECT name FROM runs")] == ["r"]
        # a view whose recorded digest no longer matches (an upgrade changed it) is replaced by the next process
        wh.index.create_view("metrics", "SELECT 1 AS old_column", replace=True)
        stamps = wh.index.find_one(schema.META.name, {"_id": views.STAMPS_ID})
        stamps["views"]["metrics"] = "older"
        wh.index.replace_one(schema.META.name, stamps)
        ensure_views(wh.index)  # cached per index object: nothing to do a second time
        assert wh.sql("SELECT * FROM metrics") == [{"old_column": 1}]
        views._done.discard(wh.index)  # as a fresh process would see it
        assert wh.sql("SELECT count(*) AS n FROM metrics") == [{"n": 0}]
        assert set(definitions(wh.index)) == set(VIEW_NAMES)
