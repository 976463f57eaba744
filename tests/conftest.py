"""Shared fixtures: a fresh embedded warehouse per test, with no environment leaking in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mlwarehouse.testing.servers import s3_server  # noqa: F401  (session-scoped SeaweedFS)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("MLW_URI", "MLW_BLOBS", "MLW_HOME", "MLW_PROJECT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def wh(tmp_path):
    import mlwarehouse
    warehouse = mlwarehouse.connect(home=tmp_path / "wh")
    yield warehouse
    warehouse.close()


@pytest.fixture
def subprocess_env(tmp_path):
    """Environment for child processes: the package importable, the warehouse of the test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MLW_HOME"] = str(tmp_path / "wh")
    env.pop("MLW_URI", None)
    env.pop("MLW_BLOBS", None)
    return env


PYTHON = sys.executable
