"""Shared fixtures (a fresh embedded warehouse per test, with no environment leaking in) and process helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlwarehouse.testing.servers import s3_server  # noqa: F401  (session-scoped SeaweedFS)

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return stat.read_text().split()[2] != "Z"  # a zombie is dead
    except (FileNotFoundError, ProcessLookupError):  # gone since the kill, or no /proc on this system
        return not Path("/proc/self/stat").exists()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("MLW_URI", "MLW_BLOBS", "MLW_HOME", "MLW_PROJECT", "MLW_WORKER_MODE"):
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


def mlw(env, *args, ok=True):
    """Run ``python -m mlwarehouse.cli ARGS`` in ``env``; with ``ok``, assert it exits 0."""
    proc = subprocess.run([sys.executable, "-m", "mlwarehouse.cli", *args], env=env, capture_output=True,
                          text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc
