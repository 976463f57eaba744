"""The whole-warehouse conformance suite: datasets, models, runs, logs, tasks and gc on any backend pair.

A test module subclasses :class:`WarehouseTests` and supplies a ``wh`` fixture: a fresh, empty warehouse (its own
SQLite folder, PostgreSQL schema, MongoDB database, S3 prefix...) whose settings child processes can reach through
``MLW_URI`` / ``MLW_BLOBS`` and the standard AWS variables. Every backend set must pass every test here: a
backend that cannot is a bug, not a skip.
"""

from __future__ import annotations

import textwrap
import threading
import time

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse import DuplicateKey, IntegrityError, NotFound, QueryError, TensorHub
from mlwarehouse.tasks.worker import Worker

__all__ = ["WarehouseTests"]


class WarehouseTests:
    """Behaviour every (index, blob store) pair must show, through the public API only."""

    @pytest.fixture
    def wh(self):  # pragma: no cover - supplied by subclasses
        raise NotImplementedError

    # -- datasets ------------------------------------------------------------------------------------------
    def test_datasets_round_trip_versions_and_delete(self, wh):
        X = np.arange(600, dtype=np.float32).reshape(100, 6)
        wh.datasets.save((X, X[:, 0].astype(np.int64)), "toy", description="d", tags=["a"], rows=100)
        wh.datasets.save({"X": X * 2}, "toy", rows=100)
        assert [r.version for r in wh.datasets.find("toy")] == [2, 1]
        assert np.array_equal(wh.datasets.load("toy")["X"], X * 2)
        X1, y1 = wh.datasets.load("toy", version=1)
        assert np.array_equal(X1, X) and y1.dtype == np.int64
        assert wh.datasets.get("toy", where={"tags": "a"}).version == 1
        with pytest.raises(DuplicateKey):
            wh.datasets.save(np.zeros(1), "toy", version=1)
        with pytest.raises(NotFound):
            wh.datasets.load("nope")
        assert wh.datasets.delete("toy") == 2
        assert list(wh.blobs.list()) == []

    # -- models --------------------------------------------------------------------------------------------
    def test_models_best_find_and_delete(self, wh):
        for i, acc in enumerate([0.5, 0.9, 0.7, 0.8]):
            wh.models.save({"w": np.full(3, acc)}, name="m" if i % 2 == 0 else "n", test_accuracy=acc,
                           tags=["x"] if acc > 0.6 else [])
        assert wh.models.best("test_accuracy").test_accuracy == 0.9
        assert wh.models.best("test_accuracy", mode="min").test_accuracy == 0.5
        assert wh.models.best("test_accuracy", name="m").test_accuracy == 0.7
        found = wh.models.find(where={"tags": "x", "test_accuracy": {"$lt": 0.85}}, sort=[("test_accuracy", 1)])
        assert [m.test_accuracy for m in found] == [0.7, 0.8]
        assert wh.models.find(where={"name": {"$regex": "^n"}, "test_accuracy": {"$in": [0.9, 0.8]}},
                              sort=[("test_accuracy", -1)])[0].load()["w"][0] == 0.9
        with pytest.raises(QueryError):
            wh.models.find(where={"test_accuracy": {"$bad": 1}})
        assert wh.models.delete(name="m") == 2 and wh.models.delete() == 2
        assert list(wh.blobs.list()) == []

    def test_torch_model_and_checkpoints_share_unchanged_tensors(self, wh):
        torch = pytest.importorskip("torch")
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        net[0].requires_grad_(False)
        with wh.runs.start("train") as run:
            for epoch in range(3):
                with torch.no_grad():
                    net[2].weight.add_(0.1)
                wh.models.checkpoint(net, run=run.id, epoch=epoch, metrics={"acc": epoch / 10}, keep_last=2)
        kept = wh.models.find(where={"checkpoint": True}, sort=[("epoch", 1)])
        assert [m.epoch for m in kept] == [1, 2]
        first_layer = [dict(m.doc["weights"])["0.weight"]["_blob"] for m in kept]
        assert first_layer[0] == first_layer[1]  # the frozen layer is stored once
        loaded = kept[-1].load()
        x = torch.randn(5, 4)
        assert torch.allclose(loaded(x), net(x))

    # -- runs and logs -------------------------------------------------------------------------------------
    def test_runs_log_summaries_history_and_best(self, wh):
        for lr in (0.1, 0.01):
            with wh.runs.start(f"lr={lr}", hyper_parameters={"lr": lr}) as run:
                for step in range(300):
                    run.log("train", step=step, loss=1.0 / (step + 1) + lr)
                run.log("valid", step=300, accuracy=1 - lr)
        best = wh.runs.best("valid.accuracy")
        assert best.hyper_parameters == {"lr": 0.01} and best.status == "complete"
        summary = best.summary["train"]["loss"]
        assert summary["count"] == 300 and summary["min_step"] == 299
        assert summary["last"] == pytest.approx(0.01 + 1 / 300)
        steps, values = best.metric("train", "loss")
        assert list(steps) == list(range(300)) and values[0] == pytest.approx(1.01)
        assert len(wh.runs.find(where={"hyper_parameters.lr": {"$gt": 0.05}})) == 1
        assert wh.runs.delete() == 2 and wh.runs.find_logs() == []

    def test_standalone_logs_through_tensorhub(self, wh):
        hub = TensorHub(project_name=wh.default_project, uri=wh.settings.index_uri, blobs=wh.settings.blobs_uri)
        try:
            hub.save_training_log(accuracy=0.3)
            hub.save_training_log(accuracy=0.4)
            hub.save_validation_log(accuracy=0.5)
            assert [d["accuracy"] for d in hub.find_training_logs()] == [0.3, 0.4]
            assert hub.delete_training_log(accuracy=0.3) == 1
            assert [d["accuracy"] for d in hub.find_training_logs()] == [0.4]
            assert hub.save_dataset(np.arange(3), "d") and hub.find_top_dataset("d")[2] == 2
        finally:
            hub.close()

    # -- tasks ---------------------------------------------------------------------------------------------
    def test_tasks_run_by_a_worker_with_lineage(self, wh, tmp_path):
        script = tmp_path / "task.py"
        script.write_text(textwrap.dedent("""
            import numpy as np
            import mlwarehouse
            wh = mlwarehouse.connect()
            run = mlwarehouse.current_run()
            run.log("train", step=0, loss=1.0 / n)
            wh.models.save({"w": np.full(2, float(n))}, name="tiny", score=n * 10)
            score = n * 10
            print("done", n)
        """))
        created = wh.tasks.sweep("t", str(script), grid={"n": [1, 2, 3]}, saved_result_keys=["score"])
        assert len(created) == 3 and wh.tasks.sweep("t", str(script), grid={"n": [1, 2, 3]}) == []
        wh.tasks.create("other", str(script), hyper_parameters={"n": 9}, saved_result_keys=["score"])
        Worker(wh.project(), "t", once=True, verbose=False, lease_seconds=10).run()
        tasks = wh.tasks.find(task_name="t", sort=[("hyper_parameters.n", 1)])
        assert [t.status for t in tasks] == ["finished"] * 3
        assert [t.result["score"] for t in tasks] == [10, 20, 30]
        assert "done 2" in wh.tasks.output(tasks[1].id)
        model = wh.models.best("score")
        assert model.run == tasks[2].run and wh.runs.get(model.run).task == tasks[2].id
        assert wh.tasks.has_unfinished("other") and not wh.tasks.has_unfinished("t")

    def test_claims_are_exclusive(self, wh):
        for i in range(30):
            wh.tasks.create("c", "builtins:dict", hyper_parameters={"i": i})
        claimed = []
        while (task := wh.tasks.claim("c", f"w{len(claimed) % 3}", 30)) is not None:
            claimed.append(task.hyper_parameters["i"])
        assert sorted(claimed) == list(range(30))

    # -- the web UI reads every backend ---------------------------------------------------------------------
    def test_web_pages_and_chart(self, wh):
        pytest.importorskip("fastapi")
        from fastapi.testclient import TestClient

        from mlwarehouse.web import create_app
        wh.datasets.save((np.zeros((4, 64), np.float32), np.arange(4)), "digits")
        wh.models.save({"w": np.ones(2)}, name="m", test_accuracy=0.5)
        with wh.runs.start("r") as run:
            for step in range(50):
                run.log("train", step=step, loss=1 / (step + 1))
        wh.tasks.create("t", "builtins:dict")
        project = wh.default_project
        client = TestClient(create_app(wh), base_url="http://localhost")
        for page in ("runs", "models", "tasks", "datasets"):
            response = client.get(f"/p/{project}/{page}")
            assert response.status_code == 200, (page, response.text[:300])
        chart = client.get(f"/api/p/{project}/runs/metric", params={"ids": run.id, "kind": "train", "metric": "loss"})
        assert chart.status_code == 200 and "loss" in chart.text
        bad = client.get(f"/p/{project}/models", params={"q": '{"a": {"$nope": 1}}'})
        assert bad.status_code == 400 and "$nope" in bad.text
        assert client.get(f"/p/{project}/runs/{'0' * 26}").status_code == 404

    # -- integrity and gc ----------------------------------------------------------------------------------
    def test_gc_and_verified_reads(self, wh):
        wh.datasets.save(np.arange(50), "kept")
        orphan = wh.blobs.put(b"left behind by a crashed writer")
        assert wh.gc(grace_seconds=3600).removed == []
        time.sleep(1.1)  # object stores stamp whole seconds
        report = wh.gc(grace_seconds=0)
        assert report.removed == [orphan] and not wh.blobs.exists(orphan)
        assert wh.datasets.load("kept")[49] == 49
        with pytest.raises(NotFound):
            wh.blobs.get("f" * 64)
        with pytest.raises((NotFound, IntegrityError)):
            wh.blobs.get("../../etc/passwd")

    def test_delete_beside_a_save_in_flight_sharing_a_blob(self, wh):
        """A save whose large put is still running when another writer saves and deletes a document sharing its
        first blob commits a document that loads completely (the multi-process version: tests/test_blob_race.py)."""
        writer = mlwarehouse.connect()  # another connection, as another machine would have
        inner, started, deleted, errors = writer.blobs.put, threading.Event(), threading.Event(), []

        def slow_put(data):
            key = inner(data)
            if len(data) > 100_000:  # the large leaf: its put lasts until the delete is over
                started.set()
                deleted.wait(30)
            return key

        def save(r):
            try:
                writer.models.save({"a_shared": np.full(500, r / 7), "b_big": np.random.default_rng(r).random(20_000)},
                                   name="a", round=r)
            except mlwarehouse.WarehouseError as exc:  # pragma: no cover - reported below
                errors.append(exc)

        writer.blobs.put = slow_put
        try:
            for r in range(3):
                started.clear()
                deleted.clear()
                thread = threading.Thread(target=save, args=(r,))
                thread.start()
                assert started.wait(30)
                wh.models.save({"a_shared": np.full(500, r / 7)}, name="b")
                wh.models.delete("b")
                deleted.set()
                thread.join(30)
                assert not errors
                for rec in wh.models.find("a"):
                    assert rec.load()["a_shared"][0] == rec.doc["round"] / 7
        finally:
            writer.close()
        assert len(wh.models.find("a")) == 3 and wh.models.delete() == 3
        assert list(wh.blobs.list()) == []  # no writer in flight any more: the delete removed every blob
