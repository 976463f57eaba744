"""Warehouses on each backend set, reached through the environment as a worker's child processes reach them.

Each function is a generator for a pytest fixture (``yield from sqlite_and_files(...)``): SQLite + a blob folder,
PostgreSQL (a fresh schema, dropped afterwards) + S3 (a fresh prefix), and MongoDB (a fresh database) + GridFS.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import mlwarehouse
from mlwarehouse.testing.mongo_server import fresh_uri
from mlwarehouse.testing.views_conformance import postgres_schema

__all__ = ["env_warehouse", "sqlite_and_files", "postgres_and_s3", "mongo_and_gridfs"]


def env_warehouse(monkeypatch, uri: str, blobs: str, project: str) -> mlwarehouse.Warehouse:
    """A warehouse that this process and the workers' child processes reach through the environment."""
    monkeypatch.setenv("MLW_URI", uri)
    monkeypatch.setenv("MLW_BLOBS", blobs)
    monkeypatch.setenv("MLW_PROJECT", project)
    return mlwarehouse.connect()


def sqlite_and_files(tmp_path, monkeypatch, project: str) -> Iterator[mlwarehouse.Warehouse]:
    warehouse = env_warehouse(monkeypatch, str(tmp_path / "wh"), str(tmp_path / "wh" / "blobs"), project)
    yield warehouse
    warehouse.close()


def postgres_and_s3(postgres_server: str, s3_server: dict, monkeypatch, project: str
                    ) -> Iterator[mlwarehouse.Warehouse]:
    with postgres_schema(postgres_server) as uri:
        blobs = s3_server["uri"].replace("?", f"/w-{secrets.token_hex(6)}?", 1)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
        warehouse = env_warehouse(monkeypatch, uri, blobs, project)
        yield warehouse
        warehouse.close()


def mongo_and_gridfs(mongo_server: str, monkeypatch, project: str) -> Iterator[mlwarehouse.Warehouse]:
    uri = fresh_uri(mongo_server)
    warehouse = env_warehouse(monkeypatch, uri, uri, project)
    yield warehouse
    warehouse.close()
