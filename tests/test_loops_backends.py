"""The continuous loops on every backend set: a trainer picks up documents another connection inserts, the
evaluator evaluates each save once and promotes the better ones, and a followed alias swaps to each new champion."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import wait_for

import mlwarehouse
from mlwarehouse.loops.evaluator import evaluate_forever
from mlwarehouse.loops.trainer import train_forever
from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

PROJECT = "loops"
W = np.random.default_rng(0).normal(size=(4, 2))


def _points(n: int, seed: int) -> list[dict]:
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    y = (x @ W).argmax(axis=1)
    return [{"x": x[i], "y": int(y[i])} for i in range(n)]


class LoopTests:
    def test_train_evaluate_promote_follow(self, wh):
        wh.collection("pts").insert_many(_points(64, 1))
        test = _points(300, 2)
        data = wh.datasets.save((np.stack([d["x"] for d in test]), np.array([d["y"] for d in test])), "test-set")
        torch.manual_seed(0)
        start = wh.models.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), "init").id
        stop = threading.Event()
        trained: dict = {}
        trainer = threading.Thread(target=lambda: trained.update(train_forever(
            wh, start, "collection:pts", inputs="x", target="y", name="mlp", batch_size=16, save_every=100,
            min_new=32, lr=0.05, poll=0.05, stop=stop)))
        trainer.start()
        try:
            wait_for(lambda: len(wh.models.find("mlp")) == 1, 60)
            other = mlwarehouse.connect()  # another connection writes, as another process would
            try:
                other.collection("pts").insert_many(_points(40, 3))
            finally:
                other.close()
            wait_for(lambda: len(wh.models.find("mlp")) == 2, 60)
        finally:
            stop.set()
            trainer.join(30)
        assert not trainer.is_alive() and trained["rounds"] == 2
        saves = sorted(wh.models.find("mlp"), key=lambda m: m.doc["step"])
        assert [m.doc["trainer"]["documents"] for m in saves] == [64, 104]

        counts = evaluate_forever(wh, data="test-set", metrics=["accuracy"], max_models=2, poll=0.05)
        assert counts["evaluated"] == 2 and counts["failed"] == 0
        values = [wh.models.evaluations.get(m, data, "accuracy").value for m in saves]
        best = saves[int(np.argmax(values))]
        assert wh.models.aliases.resolve("mlp", "champion") == best.id
        assert len(wh.models.evaluations.find(data=data)) == 2

        with wh.models.follow("mlp@champion", poll=0.05) as served:
            assert served.model_id == best.id
            newer = wh.models.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), "mlp")
            wh.models.aliases.set("mlp", "champion", newer)
            wait_for(lambda: served.model_id == newer.id, 20)
            assert served(torch.zeros(1, 4)).shape == (1, 2)


class TestSQLiteAndFiles(LoopTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)


class TestPostgresAndS3(LoopTests):
    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestMongoAndGridFS(LoopTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)
