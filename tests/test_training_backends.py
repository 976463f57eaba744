"""Folds and fits on every backend set: the same query and fold spec give the same two id sets everywhere, old
documents keep their fold when new ones arrive, and a fit reads and trains the same way on each."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)
from mlwarehouse.training import Folds

PROJECT = "folds"
N = 10_000


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


class FoldTests:
    def test_folds_are_reproducible_stable_and_disjoint(self, wh):
        c = wh.collection("docs")
        c.insert_many({"_id": f"doc-{i:05d}", "x": float(i % 97), "y": i % 3, "group": i % 2} for i in range(N))
        folds = Folds(valid=0.2, seed=7)
        train, valid = wh.training.split(c, folds=folds, keys=["x", "y"])
        assert (train, valid) == wh.training.split("collection:docs", folds=folds, keys=["x", "y"])
        assert not set(train) & set(valid) and len(train) + len(valid) == N
        assert abs(len(valid) / N - 0.2) < 0.01
        assert _digest(valid) == expected_digest()
        # 10% new documents: every old one keeps its fold
        c.insert_many({"_id": f"new-{i:05d}", "x": 1.0, "y": 0, "group": 0} for i in range(N // 10))
        train2, valid2 = wh.training.split(c, folds=folds, keys=["x", "y"])
        assert set(valid) <= set(valid2) and set(train) <= set(train2)
        assert len(train2) + len(valid2) == N + N // 10
        # a filter selects a subset, split the same way
        t3, v3 = wh.training.split(c, folds=folds, filter={"group": 1})
        assert set(v3) == {i for i in valid2 if i.startswith("doc-") and int(i[4:]) % 2 == 1}
        assert set(t3) | set(v3) == {f"doc-{i:05d}" for i in range(1, N, 2)}
        # another seed, another split of the same documents
        assert wh.training.split(c, folds=Folds(valid=0.2, seed=8), keys=["x"])[1] != valid2

    def test_a_small_fit_trains_the_same_way(self, wh):
        torch = pytest.importorskip("torch")
        rng = np.random.default_rng(0)
        X = rng.normal(size=(400, 8)).astype(np.float32)
        y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
        c = wh.collection("points")
        c.insert_many({"_id": f"p{i:04d}", "x": X[i], "y": int(y[i])} for i in range(len(y)))
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        fit = wh.training.fit(net, c, inputs="x", target="y", metrics=["accuracy"], epochs=8, lr=0.01,
                              batch_size=32, folds=Folds(valid=0.25, seed=1))
        assert fit.status == "complete" and fit.model.valid["accuracy"] > 0.85
        assert (fit.train_ids(), fit.valid_ids()) == wh.training.split(c, folds=Folds(valid=0.25, seed=1))
        assert wh.training.of_model(fit.model).id == fit.id


def expected_digest() -> str:
    ids = [f"doc-{i:05d}" for i in range(N)]
    return _digest(sorted(Folds(valid=0.2, seed=7).split(ids)[1]))


class TestSQLiteAndFiles(FoldTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)


class TestPostgresAndS3(FoldTests):
    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestMongoAndGridFS(FoldTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)
