"""TensorHub compatibility: the original method names and behaviour, with its bugs fixed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mlwarehouse import TensorHub, Unavailable


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    hub = TensorHub(project_name="tutorial")
    yield hub
    hub.close()


def test_dataset_methods(db):
    X, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    assert db.save_dataset((X, y), "mnist", description="this is a tutorial") is True
    assert db.save_dataset((X * 2, y), "mnist", version="2.0", description="doubled") is True
    X2, _ = db.find_top_dataset("mnist")
    assert np.array_equal(X2, X * 2)  # sort=None: newest first, not natural order
    X1, _ = db.find_top_dataset("mnist", sort=[("time", 1)])
    assert np.array_equal(X1, X)
    assert np.array_equal(db.find_dataset("mnist", version="2.0")[0], X * 2)
    assert len(db.find_datasets("mnist")) == 2 and len(db.find_all_datasets("mnist", version="2.0")) == 1
    assert db.find_top_dataset("nothing") is False
    blobs_before = len(list(db.warehouse.blobs.list()))
    assert db.delete_datasets(version="2.0") == 1
    assert len(list(db.warehouse.blobs.list())) < blobs_before  # the original leaked GridFS files here
    assert len(db.find_datasets("mnist")) == 1


def test_model_methods(db):
    for acc in (0.7, 0.9, 0.8):
        db.save_model({"W": np.full((2, 2), acc)}, model_name="mlp", test_accuracy=acc, loss=1 - acc)
    net = db.find_top_model(sort=[("test_accuracy", -1)], model_name="mlp")
    assert net._test_accuracy == 0.9 and net["W"][0, 0] == 0.9
    newest = db.find_top_model(model_name="mlp")
    assert newest._test_accuracy == 0.8
    assert db.find_top_model(model_name="mlp", test_accuracy={"$gt": 0.95}) is False
    assert db.find_model(model_name="mlp", loss={"$lt": 0.15})._test_accuracy == 0.9
    assert db.delete_model(test_accuracy=0.7) == 1
    assert db.delete_model() == 2
    assert db.find_top_model(model_name="mlp") is False
    assert list(db.warehouse.blobs.list()) == []


def test_log_methods_and_the_readers_the_original_lacked(db):
    db.save_training_log(accuracy=0.33)
    db.save_training_log(accuracy=0.44, step=2)
    db.save_validation_log(accuracy=0.5)
    db.save_testing_log(accuracy=0.6)
    assert [d["accuracy"] for d in db.find_training_logs()] == [0.33, 0.44]
    assert [d["accuracy"] for d in db.find_training_logs(accuracy={"$gt": 0.4})] == [0.44]
    assert db.delete_training_log(accuracy=0.33) == 1
    assert [d["accuracy"] for d in db.find_training_logs()] == [0.44]
    assert db.delete_training_log() == 1 and db.find_training_logs() == []
    assert len(db.find_validation_logs()) == 1 and len(db.find_testing_logs()) == 1
    assert db.delete_validation_log() == 1 and db.delete_testing_log() == 1


def test_projects_scope_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    a, b = TensorHub(project_name="a"), TensorHub(project_name="b")
    a.save_dataset(np.zeros(1), "d")
    assert b.find_top_dataset("d") is False
    assert b.delete_datasets() == 0 and a.find_top_dataset("d") is not False
    a.close(), b.close()


def test_server_arguments_connect_to_mongodb_and_fail_clearly_when_unreachable():
    started = time.monotonic()
    with pytest.raises(Unavailable, match="127.0.0.1:1"):
        TensorHub(ip="127.0.0.1", port=1, dbname="x", username="u", password="p", project_name="t")
    assert time.monotonic() - started < 10
