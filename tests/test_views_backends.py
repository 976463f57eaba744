"""The SQL views on every backend: the conformance suite on SQLite and PostgreSQL, the same rows on both, and
MongoDB saying clearly that it has no SQL."""

from __future__ import annotations

import pytest

import mlwarehouse
from mlwarehouse.errors import ConfigError
from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.views_conformance import ViewsTests, load, postgres_warehouse, rows_of_every_view


@pytest.fixture
def sqlite_wh(tmp_path):
    with mlwarehouse.connect(home=tmp_path / "sqlite") as wh:
        yield wh


@pytest.fixture
def postgres_wh(postgres_server, tmp_path):  # noqa: F811
    with postgres_warehouse(postgres_server, str(tmp_path / "pg-blobs")) as wh:
        yield wh


class TestSQLite(ViewsTests):
    @pytest.fixture
    def wh(self, sqlite_wh):
        return sqlite_wh


class TestPostgres(ViewsTests):
    @pytest.fixture
    def wh(self, postgres_wh):
        return postgres_wh


def test_the_same_documents_give_the_same_rows_on_sqlite_and_postgresql(sqlite_wh, postgres_wh):
    load(sqlite_wh)
    load(postgres_wh)
    on_sqlite, on_postgres = rows_of_every_view(sqlite_wh), rows_of_every_view(postgres_wh)
    for view, rows in on_sqlite.items():
        assert rows, view  # the documents give every view rows to compare
        assert rows == on_postgres[view], view
        assert [{k: type(v) for k, v in r.items()} for r in rows] == \
            [{k: type(v) for k, v in r.items()} for r in on_postgres[view]], view


def _log_the_same_runs(wh) -> None:
    for lr in (0.1, 0.01):
        with wh.runs.start(f"lr={lr}", hyper_parameters={"lr": lr}, tags=["sweep"]) as run:
            for step in range(30):
                run.log("train", step=step, epoch=step // 10, loss=lr / (step + 1), correct=step * 3, note="x")
            run.log("valid", step=30, accuracy=1 - lr, loss=None)
    wh.project("other").runs.start("idle").finish()


def test_logged_runs_give_the_same_metrics_on_sqlite_and_postgresql(sqlite_wh, postgres_wh):
    _log_the_same_runs(sqlite_wh)
    _log_the_same_runs(postgres_wh)
    count = "select count(*) as n from metrics"
    assert sqlite_wh.sql(count) == postgres_wh.sql(count) == [{"n": 2 * (30 * 2 + 1)}]
    select = ("select r.name, r.hyper_parameters, m.kind, m.step, m.epoch, m.metric, m.value "
              "from metrics m join runs r on r.run_id = m.run_id order by r.name, m.kind, m.step, m.metric")
    assert sqlite_wh.sql(select) == postgres_wh.sql(select)
    assert sqlite_wh.sql("select name, status, tags from runs order by name") == \
        postgres_wh.sql("select name, status, tags from runs order by name")


def test_mongodb_has_no_sql(mongo_server):  # noqa: F811
    uri = fresh_uri(mongo_server)
    with mlwarehouse.connect(uri, blobs=uri) as wh:
        wh.runs.start("r").finish()
        with pytest.raises(ConfigError, match="mongodb"):
            wh.sql("select count(*) from runs")
