"""``Warehouse.projects()`` on every backend set: the projects of every kind of document, read by index seeks,
the same names as reading every document's ``project``."""

from __future__ import annotations

import numpy as np
import pytest

from mlwarehouse import schema
from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

PROJECT = "projects"


def every_project(wh) -> list[str]:
    """The reference: every document's ``project`` in every collection of the warehouse's own (users' tables hold
    no project field: before, a users' document's own ``project`` was listed as a project)."""
    names = set()
    for collection in wh.index.collections():
        if collection != schema.META.name and not collection.startswith(schema.TABLE_PREFIX):
            names.update(v for v in wh.index.distinct(collection, "project") if isinstance(v, str))
    return sorted(names)


class ProjectTests:
    def test_projects_of_every_kind_of_document(self, wh, tmp_path):
        script = tmp_path / "job.py"
        script.write_text("print(1)\n")
        wh.project("p-runs").runs.start("r").finish()
        wh.project("p-data").datasets.save(np.zeros(3), "d")
        wh.project("p-users").collection("things").insert_one({"x": 1, "project": "not-a-project"})
        wh.project("p-tasks").tasks.create("t", str(script))
        for i in range(30):  # many documents of one project: still one seek for it
            wh.project("p-many").runs.start(f"r{i}").finish()
        wh.project("p-ünï \\ 'q'").models.save({"w": np.ones(2)}, "m")
        got = wh.projects()
        assert {"p-runs", "p-data", "p-users", "p-tasks", "p-many", "p-ünï \\ 'q'"} <= set(got)
        assert "not-a-project" not in got  # a users' document's own field named project is not a project
        assert got == every_project(wh) and got == sorted(got)


class TestSQLiteAndFiles(ProjectTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)


class TestPostgresAndS3(ProjectTests):
    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestMongoAndGridFS(ProjectTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)
