"""The MLDB facade: experiment statuses, loss and metric values, MLDB's tables through SQL and a cursor."""

from __future__ import annotations

import pytest

import mlwarehouse
from mlwarehouse.compat.mldb import Database
from mlwarehouse.errors import InvalidDocument, QueryError
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.views_conformance import postgres_schema


@pytest.fixture
def db(tmp_path):
    with Database(home=tmp_path / "wh") as database:
        yield database


def test_the_mldb_readme_example(db):
    db.set_exp_status("exp1", "TRAINING")
    db.add_loss_value("exp1", "train", 0, 0.9)
    db.set_exp_status("exp2", "COMPLETE")
    db.cursor.execute('SELECT EXP_ID FROM STATUS WHERE STATUS.STATUS="COMPLETE";')
    assert db.cursor.fetchall() == [("exp2",)]
    db.cursor.execute('SELECT EXP_ID FROM STATUS WHERE STATUS.STATUS="TRAINING"')
    assert db.cursor.fetchone() == ("exp1",) and db.cursor.fetchone() is None


def test_statuses_map_to_runs_and_keep_the_original(db):
    db.set_exp_status("e", "TRAINING")
    run = db.run("e")
    assert run.status == "running" and run.mldb_status == "TRAINING"
    db.set_exp_status("e", "FAILED")
    assert db.project.runs.get(run.id).status == "failed"
    db.set_exp_status("e", "queued")  # unknown strings count as running, kept as given
    again = db.project.runs.get(run.id)
    assert (again.status, again.mldb_status, again.ended) == ("running", "queued", None)
    db.set_exp_status("e", "Complete")
    assert db.sql("select STATUS from STATUS") == [{"STATUS": "Complete"}]
    assert db.project.runs.get(run.id).status == "complete"
    assert len(db.project.runs.find("e")) == 1
    db.project.runs.start("plain").finish()
    assert db.sql("select STATUS from STATUS where EXP_ID = 'plain'") == [{"STATUS": "COMPLETE"}]
    with pytest.raises(QueryError):
        db.set_exp_status("", "COMPLETE")


def test_loss_and_metric_tables(db):
    for epoch, (train, valid) in enumerate([(0.9, 1.0), (0.5, 0.7)]):
        db.add_loss_value("exp", "train", epoch, train)
        db.add_loss_value("exp", "valid", epoch, valid)
        db.add_metric_value("exp", "f1", epoch, 0.5 + epoch / 10)
    db.add_hyperparam("exp", "lr", 0.01)
    cur = db.cursor.execute("SELECT * FROM LOSS ORDER BY KIND, EPOCH")
    assert [d[0] for d in cur.description] == ["EXP_ID", "KIND", "EPOCH", "VALUE"]
    assert cur.fetchall() == [("exp", "train", 0, 0.9), ("exp", "train", 1, 0.5),
                              ("exp", "valid", 0, 1.0), ("exp", "valid", 1, 0.7)]
    cur = db.cursor.execute("SELECT * FROM METRICS WHERE NAME = ?", ["f1"])
    assert [d[0] for d in cur.description] == ["EXP_ID", "NAME", "EPOCH", "VALUE"]
    assert cur.fetchmany(1) == [("exp", "f1", 0, 0.5)] and cur.fetchall() == [("exp", "f1", 1, 0.6)]
    run = db.run("exp")
    stored = db.project.runs.get(run.id)
    assert stored.summary["valid"]["loss"]["min"] == 0.7 and stored.hyper_parameters == {"lr": 0.01}
    with pytest.raises(InvalidDocument):
        db.add_metric_value("exp", "not a name", 0, 1.0)


def test_sql_keeps_the_warehouse_views_and_user_ctes(db):
    db.add_loss_value("exp", "train", 0, 0.9)
    rows = db.sql("WITH t AS (SELECT 2 AS k) SELECT count(*) AS n, max(t.k) AS k FROM main.metrics, t")
    assert rows == [{"n": 1, "k": 2}]
    assert db.sql("select name from runs") == [{"name": "exp"}]
    assert db.cursor.execute("select count(*) from LOSS").fetchall() == [(1,)]
    with pytest.raises(QueryError):
        db.sql("delete from c_runs")


def test_writes_are_refused_naming_the_wrapper_functions(db):
    """MLDB's cursor wrote to its SQLite file; here its tables are views: a write says so (not "no such table")."""
    db.set_exp_status("exp", "TRAINING")
    cases = {'INSERT INTO STATUS VALUES ("exp2", "TRAINING")': "db.set_exp_status(",
             "  -- fix a status\n UPDATE STATUS SET STATUS = 'COMPLETE'": "db.set_exp_status(",
             "insert into LOSS (EXP_ID, KIND, EPOCH, VALUE) values ('exp', 'train', 0, 0.5);": "db.add_loss_value(",
             "WITH v AS (SELECT 1) INSERT INTO METRICS SELECT * FROM v": "db.add_metric_value(",
             "DELETE FROM c_runs": "db.add_hyperparam(", "create table notes (a)": "db.set_exp_status("}
    for query, wrapper in cases.items():
        for attempt in (db.sql, db.cursor.execute):
            with pytest.raises(QueryError) as info:
                attempt(query)
            message = str(info.value)
            assert "read-only" in message and wrapper in message and "no such table" not in message, message
    assert db.sql("SELECT STATUS FROM STATUS") == [{"STATUS": "TRAINING"}]  # nothing was written
    assert db.sql("SELECT 'insert into STATUS' AS x -- update STATUS set x") == [{"x": "insert into STATUS"}]


def test_projects_are_separate(tmp_path):
    with Database(home=tmp_path / "wh") as one, Database(home=tmp_path / "wh", project="two") as two:
        one.set_exp_status("a", "TRAINING")
        two.set_exp_status("b", "TRAINING")
        assert one.sql("select EXP_ID from STATUS") == [{"EXP_ID": "a"}]
        assert two.sql("select EXP_ID from STATUS") == [{"EXP_ID": "b"}]
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        assert wh.sql("select EXP_ID, project from mldb_status order by project") == [
            {"EXP_ID": "a", "project": "mldb"}, {"EXP_ID": "b", "project": "two"}]


def test_the_tables_on_postgresql(postgres_server, tmp_path):  # noqa: F811
    with postgres_schema(postgres_server) as uri, Database(uri, blobs=str(tmp_path / "blobs")) as db:
        db.set_exp_status("exp", "TRAINING")
        for epoch, loss in enumerate([0.9, 0.5]):
            db.add_loss_value("exp", "train", epoch, loss)
        db.add_metric_value("exp", "f1", 1, 0.5)
        db.set_exp_status("done", "COMPLETE")
        cur = db.cursor.execute("SELECT EXP_ID FROM STATUS WHERE STATUS.STATUS = 'TRAINING'")
        assert cur.fetchall() == [("exp",)] and cur.description[0][0] == "exp_id"  # PostgreSQL folds names
        assert db.sql("SELECT EPOCH, VALUE FROM LOSS WHERE KIND = %s ORDER BY EPOCH", ["train"]) == [
            {"epoch": 0, "value": 0.9}, {"epoch": 1, "value": 0.5}]
        assert db.sql("SELECT NAME, VALUE FROM METRICS") == [{"name": "f1", "value": 0.5}]
        schema = db.sql("SELECT current_schema() AS s")[0]["s"]  # the warehouse's metrics view, behind METRICS
        assert db.sql(f"SELECT count(*) AS n FROM {schema}.metrics") == [{"n": 3}]
        with pytest.raises(QueryError, match=r"read-only.*db\.set_exp_status\("):
            db.cursor.execute("INSERT INTO STATUS VALUES ('x', 'TRAINING')")
