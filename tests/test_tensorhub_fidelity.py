"""TensorHub, method by method, against the original's documented behaviour (TensorLayer's ``tensorlayer/db.py``
docstrings and its database tutorial): keyword fields are document fields under their own names, whatever names
the warehouse uses itself; ``model_name`` / ``dataset_name`` filter; a failed task is False; logs belong to runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mlwarehouse import TensorHub
from mlwarehouse.compat.tensorhub_fields import DATASET, LOG, MODEL, PREFIX, TASK


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    monkeypatch.delenv("MLW_URI", raising=False)
    monkeypatch.delenv("MLW_BLOBS", raising=False)
    hub = TensorHub(project_name="tutorial")
    yield hub
    hub.close()


def _script(tmp_path, source: str) -> str:
    path = tmp_path / "task_script.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


# -- TensorHub(project_name=...): every save/find/delete is scoped to the project -------------------------------
def test_project_name_scopes_every_method_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    monkeypatch.delenv("MLW_URI", raising=False)
    monkeypatch.delenv("MLW_BLOBS", raising=False)
    a, b = TensorHub(project_name="a"), TensorHub(project_name="b")
    try:
        a.save_model({"w": np.zeros(1)}, model_name="m", acc=1.0)
        a.save_training_log(loss=1.0)
        assert b.find_top_model(model_name="m") is False and b.find_training_logs() == []
        assert b.delete_model() == 0 and b.delete_training_log() == 0
        assert a.find_top_model(model_name="m", project_name="b")._project_name == "a"  # the original overwrote it
        assert a.find_training_logs()[0]["project_name"] == "a"
    finally:
        a.close(), b.close()


# -- save_dataset / find_top_dataset / find_datasets / delete_datasets ------------------------------------------
def test_save_dataset_stores_every_keyword_field_even_ours(db):
    X = np.arange(6.0).reshape(3, 2)
    assert db.save_dataset([X, X], "mnist", description="this is a tutorial", name="mine", kind="images",
                           tags="raw", value=7, count={"rows": 3}) is True
    doc = db.project.datasets.find(where={"name": "mnist"})[0].doc
    assert (doc["name"], doc["description"], doc["tags"]) == ("mnist", "this is a tutorial", ["raw"])  # ours
    assert (doc[PREFIX + "name"], doc[PREFIX + "kind"], doc[PREFIX + "value"], doc[PREFIX + "count"]) == \
        ("mine", "images", 7, {"rows": 3})
    got = db.find_top_dataset("mnist", name="mine", kind="images", value=7, tags="raw", **{"count.rows": 3})
    assert np.array_equal(got[0], X)  # the user's kind is not ours: still a whole dataset
    assert db.find_top_dataset("mnist", name="other") is False
    db.save_dataset(X, "odd", tags=5)  # not tags of ours: a field of the user's
    assert db.project.datasets.find(where={"name": "odd"})[0].doc[PREFIX + "tags"] == 5
    assert db.find_top_dataset("odd", tags=5) is not False and db.find_top_dataset("odd", tags="raw") is False
    assert DATASET.to_hub(doc)["name"] == "mine" and DATASET.to_hub(doc)["dataset_name"] == "mnist"


def test_find_top_dataset_version_and_sort(db):
    db.save_dataset(np.zeros(2), "mnist", version="1.0")
    db.save_dataset(np.ones(2), "mnist", version="2.0")
    db.save_dataset(np.full(2, 3.0), "mnist", version=3.5)  # not a version of ours: a field of the user's
    assert db.find_top_dataset("mnist", version="1.0")[0] == 0
    assert db.find_top_dataset("mnist", version=3.5)[0] == 3
    assert db.find_top_dataset("mnist", sort=[("time", 1)])[0] == 0
    assert db.find_top_dataset("mnist", sort=[("time", -1)])[0] == 3
    assert len(db.find_datasets("mnist")) == 3 and len(db.find_datasets("mnist", version={"$in": ["2.0"]})) == 1


def test_dataset_name_filters_find_and_delete(db):
    db.save_dataset(np.zeros(1), "a", split="train")
    db.save_dataset(np.zeros(1), "b", split="train")
    assert len(db.find_datasets(dataset_name="a")) == 1 and len(db.find_datasets(split="train")) == 2
    assert db.delete_datasets(dataset_name="a", split="train") == 1  # was 0: it filtered a field never stored
    assert db.find_top_dataset("a") is False and db.find_top_dataset("b") is not False
    assert db.delete_datasets() == 1


# -- save_model / find_top_model / delete_model -----------------------------------------------------------------
def test_save_model_with_a_name_field_as_the_tutorial_does(db):
    """``save_model(net, model_name='mlp', name='64-64', ...)`` raised TypeError (multiple values for 'name')."""
    for n, acc in ((64, 0.8), (128, 0.9), (32, 0.7)):
        assert db.save_model({"W": np.full((2, 2), acc)}, model_name="mlp", name=f"{n}-{n}", test_accuracy=acc,
                             n_hidden=n, kind="cnn", run="r1", epoch="last", description=f"width {n}",
                             tags="mlp") is True
    net = db.find_top_model(sort=[("test_accuracy", -1)], model_name="mlp")
    assert (net._name, net._model_name, net._test_accuracy, net._kind, net._run, net._epoch) == \
        ("128-128", "mlp", 0.9, "cnn", "r1", "last")
    assert net._description == "width 128" and net._tags == ["mlp"] and net["W"][0, 0] == 0.9
    assert db.find_top_model(model_name="mlp", tags="mlp", n_hidden=64)._name == "64-64"
    assert db.find_top_model(model_name="mlp", name="32-32")._test_accuracy == 0.7
    assert db.find_top_model(model_name="mlp", sort=[("name", 1)])._name == "128-128"  # sorts the user's name
    assert db.find_top_model(sess=object(), model_name="mlp", kind="cnn", run="r1")._name == "32-32"  # newest
    assert db.find_top_model(model_name="other") is False
    stored = db.project.models.find(where={"name": "mlp"}, sort=[("time", 1)])[0].doc
    assert stored["kind"] == "arrays" and stored[PREFIX + "kind"] == "cnn" and stored[PREFIX + "name"] == "64-64"


def test_find_top_model_default_model_name_and_fields(db):
    db.save_model({"w": np.zeros(1)}, accuracy=0.8, loss=2.3, name="second_model")  # the docstring's example
    net = db.find_top_model(accuracy=0.8, loss=2.3)
    assert net._accuracy == 0.8 and net._name == "second_model" and net._model_name == "model"
    assert db.find_top_model(sort=[("time", -1)])._loss == 2.3
    assert db.find_model(name="second_model")._accuracy == 0.8
    assert db.find_top_model(model_name=None, loss={"$lt": 3})._loss == 2.3


def test_delete_model_filters_on_model_name_and_fields(db):
    for name in ("mlp", "cnn"):
        for n in (8, 16):
            db.save_model({"w": np.full(1, n)}, model_name=name, n_hidden=n, name=f"{name}-{n}")
    assert db.delete_model(model_name="mlp", n_hidden=8) == 1  # deleted nothing before
    assert db.delete_model(name="cnn-16") == 1  # the user's name, not the model's
    assert sorted(m._name for m in [db.find_top_model(model_name="mlp"), db.find_top_model(model_name="cnn")]) \
        == ["cnn-8", "mlp-16"]
    assert db.delete_model(**{"$or": [{"model_name": "mlp"}, {"name": "cnn-8"}]}) == 2
    assert db.delete_model() == 0 and list(db.warehouse.blobs.list()) == []


# -- save_*_log / delete_*_log / find_*_logs -------------------------------------------------------------------
def test_logs_outside_a_task_belong_to_one_run_per_process(db):
    db.save_training_log(accuracy=0.33, run="mine", kind="batch", time=0)
    db.save_training_log(accuracy=0.44)
    db.save_validation_log(accuracy=0.5, step=3)
    db.save_testing_log(accuracy=0.6)
    runs = db.project.runs.find(where={"tags": "tensorhub"})
    assert len(runs) == 1 and runs[0].status == "running"  # shown by `mlw runs` and the UI
    logs = db.project.runs.find_logs()
    assert {d["run"] for d in logs} == {runs[0].id}
    assert runs[0].refresh().summary["train"]["accuracy"]["max"] == 0.44
    train = db.find_training_logs()
    assert [d["accuracy"] for d in train] == [0.33, 0.44]
    assert (train[0]["run"], train[0]["kind"]) == ("mine", "batch") and train[1]["run"] == runs[0].id
    assert isinstance(train[0]["time"], str)  # the stamp, as the original replaced a given time
    assert [d["accuracy"] for d in db.find_training_logs(run="mine")] == [0.33]
    assert db.find_validation_logs()[0]["step"] == 3 and len(db.find_testing_logs(accuracy=0.6)) == 1
    assert [d["accuracy"] for d in db.find_training_logs(sort=[("accuracy", -1)])] == [0.44, 0.33]
    assert db.delete_training_log(accuracy=0.33) == 1 and len(db.find_training_logs()) == 1
    assert db.delete_training_log() == 1 and db.delete_validation_log() == 1 and db.delete_testing_log() == 1
    other = TensorHub(project_name="tutorial")  # a second hub of this process logs to the same run
    other.save_testing_log(accuracy=0.7)
    assert [d["run"] for d in other.find_testing_logs()] == [runs[0].id]
    other.close()
    assert db.project.runs.get(runs[0].id).status == "running"  # db still holds it
    db.close()
    hub = TensorHub(project_name="tutorial")
    try:
        assert hub.project.runs.get(runs[0].id).status == "complete"  # completed with its last hub
    finally:
        hub.close()


@pytest.mark.slow
def test_a_script_that_never_closes_its_hub_completes_its_run_at_exit(db, tmp_path):
    script = _script(tmp_path, """
        import mlwarehouse
        db = mlwarehouse.TensorHub(project_name="tutorial")
        db.save_training_log(loss=0.1)
    """)
    subprocess.run([sys.executable, script], check=True, timeout=120)
    (run,) = db.project.runs.find(where={"tags": "tensorhub"})
    assert run.status == "complete" and run.name == "tensorhub-task_script"
    assert [d["loss"] for d in db.find_training_logs()] == [0.1]


def test_logs_inside_a_users_run_belong_to_it(db):
    with db.project.runs.start("mine") as run:
        db.save_training_log(loss=0.5)
    assert [d["run"] for d in db.find_training_logs()] == [run.id]
    assert db.project.runs.find(where={"tags": "tensorhub"}) == []


@pytest.mark.slow
def test_logs_inside_a_task_belong_to_the_tasks_run(db, tmp_path):
    script = _script(tmp_path, """
        import mlwarehouse
        db = mlwarehouse.TensorHub(project_name="tutorial")
        db.save_training_log(loss=1.0 / n, step=0)
        assert mlwarehouse.current_task() is not None and mlwarehouse.current_run() is not None
    """)
    assert db.create_task(task_name="t", script=script, hyper_parameters={"n": 4}) is True
    assert db.run_top_task(task_name="t") is True
    task = db.project.tasks.find(task_name="t")[0]
    logs = db.find_training_logs()
    assert [d["loss"] for d in logs] == [0.25] and logs[0]["run"] == task.run
    assert db.project.runs.get(task.run).summary["train"]["loss"]["last"] == 0.25


# -- create_task / run_top_task / check_unfinished_task / delete_tasks ------------------------------------------
@pytest.mark.slow
def test_create_task_stores_fields_named_like_the_queues(db, tmp_path):
    script = _script(tmp_path, "acc = n / 10\n")
    assert db.create_task(task_name="t", script=script, hyper_parameters={"n": 5}, saved_result_keys=["acc"],
                          description="five", priority="high", run="r7", tags="x", timeout="none",
                          status="ignored") is True
    doc = db.project.tasks.find(task_name="t")[0].doc
    assert doc["status"] == "pending" and doc["description"] == "five" and doc["timeout"] is None
    assert (doc[PREFIX + "priority"], doc[PREFIX + "run"], doc["tags"]) == ("high", "r7", ["x"])
    assert TASK.to_hub(doc)["run"] == "r7"
    assert db.check_unfinished_task(task_name="t", priority="high", description="five")
    assert not db.check_unfinished_task(task_name="t", priority="low")
    assert db.run_top_task(task_name="t", run="other") is False  # nothing matches
    assert db.run_top_task(task_name="t", sort=[("time", -1)], priority="high", sess=None) is True
    assert not db.check_unfinished_task(task_name="t")
    finished = db.project.tasks.find(task_name="t", where={"status": "finished"})
    assert [t.result for t in finished] == [{"acc": 0.5}]
    assert db.delete_tasks(run="r7") == 1 and db.delete_tasks() == 0


@pytest.mark.slow
def test_run_top_task_returns_false_and_prints_output_and_traceback_when_the_script_fails(db, tmp_path, capsys):
    script = _script(tmp_path, """
        print("loading the data", n)
        def train():
            raise ValueError("the script crashed")
        train()
    """)
    db.create_task(task_name="t", script=script, hyper_parameters={"n": 1})
    assert db.run_top_task(task_name="t") is False  # was True
    out, err = capsys.readouterr()
    assert "loading the data 1" in out
    assert "Traceback" in err and "ValueError: the script crashed" in err and "train()" in err
    assert db.check_unfinished_task(task_name="t")  # back to pending: attempts are left
    db.create_task(task_name="ok", script=_script(tmp_path, 'print("hello from the task")\n'))
    assert db.run_top_task(task_name="ok") is True
    assert "hello from the task" in capsys.readouterr().out
    assert db.run_top_task(task_name="nothing") is False


# -- the mapping itself ----------------------------------------------------------------------------------------
def test_the_mapping_is_symmetric_and_names_only_fields_that_collide():
    assert MODEL.to_filter({"model_name": "m", "name": "x", "acc": {"$gt": 1}, "th_x": 1, "project_name": "p"}) \
        == {"name": "m", "th_name": "x", "acc": {"$gt": 1}, "th_th_x": 1}
    assert MODEL.to_hub({"_id": "1", "name": "m", "th_name": "x", "th_th_x": 1, "project": "p", "kind": "arrays"}) \
        == {"_id": "1", "model_name": "m", "name": "x", "th_x": 1, "project_name": "p", "kind": "arrays"}
    assert MODEL.to_sort([("name", 1), ("time", -1), ("model_name", 1)]) == \
        [("th_name", 1), ("time", -1), ("name", 1)]
    assert MODEL.to_filter({"$and": [{"name": "x"}, {"config.lr": 1}]}) == \
        {"$and": [{"th_name": "x"}, {"th_config.lr": 1}]}
    assert LOG.to_store({"run": 1, "kind": 2, "step": 3, "time": 4, "loss": 5}) == \
        {"th_run": 1, "th_kind": 2, "step": 3, "loss": 5}
    assert TASK.to_filter({"task_name": "t", "status": "pending", "worker": "w", "result.acc": 1}) == \
        {"task_name": "t", "status": "pending", "th_worker": "w", "result.acc": 1}
    assert DATASET.to_store({"version": 1.5, "description": "d", "name": "n", "tags": ["a"]}) == \
        {"th_version": 1.5, "description": "d", "th_name": "n", "tags": ["a"]}
    assert TASK.to_store({"tags": {"a": 1}, "priority": 1}) == {"th_tags": {"a": 1}, "th_priority": 1}
