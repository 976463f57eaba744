"""Aliases' compare-and-set and evaluations' uniqueness on every backend set (the unique indexes do the work)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mlwarehouse.errors import AliasConflict
from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

PROJECT = "aliases"


class AliasTests:
    def test_compare_and_set_and_history(self, wh):
        a = wh.models.save({"w": np.ones(2)}, "mlp")
        b = wh.models.save({"w": np.zeros(2)}, "mlp")
        aliases = wh.models.aliases
        first = aliases.set("mlp", "champion", a, expected=None)
        with pytest.raises(AliasConflict):
            aliases.set("mlp", "champion", b, expected=None)
        second = aliases.set("mlp", "champion", b, expected=a.id)
        assert [c.version for c in aliases.history("mlp@champion")] == [1, 2]
        assert aliases.resolve("mlp@champion", at=first.changed) == a.id
        assert aliases.resolve("mlp@champion", at=second.changed) == b.id
        assert wh.models.get("mlp@champion").id == b.id

    def test_racing_threads_lose_no_update(self, wh):
        ids = [wh.models.save({"w": np.full(1, float(i))}, "mlp").id for i in range(3)]
        aliases = wh.models.aliases
        aliases.set("mlp", "champion", ids[0])
        won: list[int] = []
        lost: list[int] = []

        def racer(seed: int) -> None:
            for step in range(25):
                head = aliases.head("mlp", "champion")
                try:
                    won.append(aliases.set("mlp", "champion", ids[(seed + step) % 3], expected=head.model).version)
                except AliasConflict:
                    lost.append(1)

        threads = [threading.Thread(target=racer, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        history = aliases.history("mlp", "champion")
        assert sorted(won) == list(range(2, len(history) + 1)) and len(won) + len(lost) == 75
        for before, after in zip(history, history[1:]):
            assert after.previous == before.model and after.changed >= before.changed

    def test_evaluations_are_unique(self, wh):
        data = wh.datasets.save(np.arange(3), "test")
        a = wh.models.save({"w": np.ones(2)}, "mlp")
        ev = wh.models.evaluations
        results = []
        threads = [threading.Thread(target=lambda v=v: results.append(ev.record(a, data, "acc", v).id))
                   for v in (0.1, 0.2, 0.3, 0.4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(results)) == 1 and len(ev.find(a)) == 1
        assert ev.record(a, data, "acc", 0.9, replace=True).value == 0.9
        assert ev.best("acc", data=data).id == a.id


class TestSQLiteAndFiles(AliasTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)


class TestPostgresAndS3(AliasTests):
    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestMongoAndGridFS(AliasTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)
