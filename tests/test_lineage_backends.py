"""Lineage on every backend set: the same edges, traversals, refusals and tombstones everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from mlwarehouse.errors import DependencyError
from mlwarehouse.lineage import Ref
from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

PROJECT = "lineage"


class LineageTests:
    def test_hooks_traversals_refusal_and_tombstones(self, wh):
        data = wh.datasets.save(np.arange(5), "v")
        with wh.runs.start("train", datasets=[data]) as run:
            wh.models.checkpoint({"w": np.zeros(2)}, epoch=0)
            model = wh.models.save({"w": np.ones(2)}, "m", dataset=data)
        assert {(n.id, n.distance) for n in wh.lineage.upstream(model)} == {(data.id, 1), (run.id, 1)}
        down = wh.lineage.downstream(data)
        assert {n.kind for n in down} == {"run", "model", "checkpoint"} and len(down) == 3
        with pytest.raises(DependencyError):
            wh.datasets.delete("v")
        with pytest.raises(DependencyError):
            wh.runs.delete("train")
        assert wh.models.delete("m") == 1 and wh.runs.delete("train") == 1  # checkpoints hold nothing back
        assert wh.datasets.delete("v", force=True) == 1
        assert {n.id: n.deleted for n in wh.lineage.upstream(model)} == {data.id: True, run.id: True}
        assert len(wh.lineage.tombstones()) == 3

    def test_deep_chains_and_idempotent_batches(self, wh):
        chain = [Ref(f"01CHAIN{i:019d}", "dataset" if i % 2 == 0 else "run", f"n{i}") for i in range(15)]
        edges = [(a, b, "input") for a, b in zip(chain, chain[1:])]
        assert wh.lineage.record_many(edges) == 14
        assert wh.lineage.record_many(edges[:5]) == 0
        down = wh.lineage.downstream(chain[0])
        assert [n.id for n in down] == [r.id for r in chain[1:11]] and [n.distance for n in down] == list(range(1, 11))
        up = wh.lineage.upstream(chain[-1], depth=20)
        assert [n.id for n in up] == [r.id for r in reversed(chain[:-1])]
        assert wh.lineage.upstream(chain[-1], depth=3)[-1].distance == 3


class TestSQLiteAndFiles(LineageTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)


class TestPostgresAndS3(LineageTests):
    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestMongoAndGridFS(LineageTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)
