"""The vector search conformance suite on every backend set (and the embedded engine on PostgreSQL too)."""

from __future__ import annotations

import pytest

from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server, require_pgvector  # noqa: F401
from mlwarehouse.testing.vector_conformance import VectorTests

PROJECT = "vectors"


class TestSQLiteAndFiles(VectorTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)


class TestPostgresAndS3(VectorTests):
    """The default engine on PostgreSQL: pgvector."""

    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        if self.engine is None:
            require_pgvector(postgres_server)
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestPostgresEmbedded(TestPostgresAndS3):
    """The embedded engine over a PostgreSQL warehouse (each process keeps its own graph)."""

    engine = "embedded"


class TestMongoAndGridFS(VectorTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)
