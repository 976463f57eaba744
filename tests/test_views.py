"""The documented SQL views: their columns, their rows, read-only access, upgrades of their definitions, and
every backend either offering them or saying it has no SQL (the cross-backend suite is test_views_backends.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.errors import ConfigError, QueryError
from mlwarehouse.index.views import VIEW_NAMES, definitions, ensure_views
from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.views_conformance import postgres_warehouse


@pytest.fixture
def filled(wh):
    data = wh.datasets.save(np.arange(4), "digits", description="four numbers", tags=["small"])
    with wh.runs.start("mlp", hyper_parameters={"lr": 0.1}, tags=["t"], datasets=[data]) as run:
        for step in range(3):
            run.log("train", step=step, epoch=0, loss=1.0 / (step + 1), note="text", flag=True, bad=float("nan"))
        run.log("valid", step=3, accuracy=0.75)
    wh.models.save({"w": np.ones(2)}, name="m", run=run.id, dataset=data.id, epoch=2, test_accuracy=0.9)
    wh.project("other").runs.start("elsewhere").finish()
    return wh, run, data


def test_runs_view(filled):
    wh, run, data = filled
    rows = wh.sql("select * from runs where project = ? order by started", ["default"])
    assert len(rows) == 1
    row = rows[0]
    assert set(row) >= {"run_id", "project", "name", "status", "started", "ended", "hyper_parameters", "tags",
                        "task_id"}
    assert (row["run_id"], row["name"], row["status"], row["task_id"]) == (run.id, "mlp", "complete", None)
    assert json.loads(row["hyper_parameters"]) == {"lr": 0.1} and json.loads(row["tags"]) == ["t"]
    assert json.loads(row["datasets"]) == [data.id]
    assert json.loads(row["summary"])["valid"]["accuracy"]["max"] == 0.75
    assert wh.sql("select count(*) as n from runs")[0]["n"] == 2


def test_metrics_view_has_one_row_per_numeric_point(filled):
    wh, run, _ = filled
    rows = wh.sql("select * from metrics where run_id = ? order by kind, step, metric", [run.id])
    assert [(r["kind"], r["step"], r["metric"], r["value"]) for r in rows] == [
        ("train", 0, "loss", 1.0), ("train", 1, "loss", 0.5), ("train", 2, "loss", 1.0 / 3), ("valid", 3, "accuracy", 0.75)]
    assert list(rows[0]) == ["run_id", "project", "kind", "step", "epoch", "time", "metric", "value"]
    assert rows[0]["epoch"] == 0 and rows[-1]["epoch"] is None and rows[0]["project"] == "default"
    best = wh.sql("select r.name, max(m.value) as best from metrics m join runs r using (run_id) "
                  "where m.metric = 'accuracy' group by r.name")
    assert best == [{"name": "mlp", "best": 0.75}]


def test_models_and_datasets_views(filled):
    wh, run, data = filled
    model = wh.sql("select * from models")[0]
    assert (model["name"], model["run_id"], model["dataset_id"], model["epoch"]) == ("m", run.id, data.id, 2)
    fields = json.loads(model["fields"])
    assert fields["test_accuracy"] == 0.9 and "_id" not in fields and "_blobs" not in fields
    dataset = wh.sql("select * from datasets")[0]
    assert (dataset["dataset_id"], dataset["name"], dataset["description"]) == (data.id, "digits", "four numbers")
    assert dataset["version"] == data.version and json.loads(dataset["tags"]) == ["small"]


def test_views_exist_on_an_empty_warehouse_and_sql_is_read_only(wh):
    for name in VIEW_NAMES:
        assert wh.sql(f"select * from {name}") == []
    with pytest.raises(QueryError):
        wh.sql("delete from c_runs")
    with pytest.raises(QueryError):
        wh.sql("drop view runs")


def test_changed_definitions_are_replaced(tmp_path):
    with mlwarehouse.connect(home=tmp_path / "w") as wh:
        wh.index.create_view("runs", "SELECT 1 AS old_column")  # as an older version might have left it
        wh.index.create_view("metrics", definitions(wh.index)["metrics"])
    with mlwarehouse.connect(home=tmp_path / "w") as wh:
        wh.runs.start("r").finish()
        assert wh.sql("select name from runs") == [{"name": "r"}]
        ensure_views(wh.index)  # cached: nothing to do a second time


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mongodb"])
def test_every_backend_has_the_views_or_says_it_has_no_sql(backend, request, tmp_path):
    def check(wh):
        wh.runs.start("r").finish()
        if backend == "mongodb":
            with pytest.raises(ConfigError, match="the mongodb index has no SQL"):
                wh.sql("select count(*) as n from runs")
            with pytest.raises(ConfigError, match="mongodb"):
                ensure_views(wh.index)
            return
        for name in VIEW_NAMES:
            assert isinstance(wh.sql(f"select * from {name}"), list)
        assert wh.sql("select count(*) as n, min(name) as name from runs") == [{"n": 1, "name": "r"}]

    if backend == "sqlite":
        with mlwarehouse.connect(home=tmp_path / "w") as wh:
            check(wh)
    elif backend == "postgresql":
        with postgres_warehouse(request.getfixturevalue("postgres_server"), str(tmp_path / "blobs")) as wh:
            check(wh)
    else:
        uri = fresh_uri(request.getfixturevalue("mongo_server"))
        with mlwarehouse.connect(uri, blobs=uri) as wh:
            check(wh)
