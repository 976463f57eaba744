"""The collections conformance suite on every backend set: SQLite + files, PostgreSQL + S3, MongoDB + GridFS."""

from __future__ import annotations

import secrets
from urllib.parse import quote

import psycopg
import pytest

import mlwarehouse
from mlwarehouse.testing.collection_conformance import CollectionTests
from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)


def _open(monkeypatch, uri: str, blobs: str):
    """A warehouse reached through the environment, as a worker process would reach it."""
    monkeypatch.setenv("MLW_URI", uri)
    monkeypatch.setenv("MLW_BLOBS", blobs)
    monkeypatch.setenv("MLW_PROJECT", "collections")
    return mlwarehouse.connect()


class TestSQLiteAndFiles(CollectionTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        warehouse = _open(monkeypatch, str(tmp_path / "wh"), str(tmp_path / "wh" / "blobs"))
        yield warehouse
        warehouse.close()


class TestPostgresAndS3(CollectionTests):
    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        schema = "c_" + secrets.token_hex(6)
        with psycopg.connect(postgres_server, autocommit=True) as con:
            con.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in postgres_server else "?"
        uri = f"{postgres_server}{sep}options={quote(f'-csearch_path={schema}')}"
        blobs = s3_server["uri"].replace("?", f"/c-{secrets.token_hex(6)}?", 1)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
        warehouse = _open(monkeypatch, uri, blobs)
        yield warehouse
        warehouse.close()
        with psycopg.connect(postgres_server, autocommit=True) as con:
            con.execute(f"DROP SCHEMA {schema} CASCADE")


class TestMongoAndGridFS(CollectionTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        uri = fresh_uri(mongo_server)
        warehouse = _open(monkeypatch, uri, uri)
        yield warehouse
        warehouse.close()
