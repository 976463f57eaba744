"""The `mlw` command: listings, --where/--sort/--json, gc, sql, and errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def mlw(env, *args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "mlwarehouse.cli", *args], env=env, capture_output=True,
                          text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def filled(tmp_path, subprocess_env):
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh", project="cli") as wh:
        wh.datasets.save(np.zeros(3), "zeros", description="three zeros")
        for acc in (0.5, 0.9, 0.7):
            wh.models.save({"w": np.full(2, acc)}, name="m", test_accuracy=acc)
        with wh.runs.start("r1", hyper_parameters={"lr": 0.1}) as run:
            run.log("train", step=0, loss=1.0)
            run.log("train", step=1, loss=0.5)
    return subprocess_env


def test_listings_and_json(filled):
    out = mlw(filled, "models", "-p", "cli", "--sort", "test_accuracy:-1", "--json").stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["test_accuracy"] for r in rows] == [0.9, 0.7, 0.5]
    out = mlw(filled, "models", "-p", "cli", "--where", '{"test_accuracy": {"$lt": 0.6}}', "--json").stdout
    assert [json.loads(line)["test_accuracy"] for line in out.splitlines()] == [0.5]
    assert "zeros" in mlw(filled, "datasets", "-p", "cli").stdout
    assert "r1" in mlw(filled, "runs", "-p", "cli").stdout
    best = json.loads(mlw(filled, "best", "test_accuracy", "-p", "cli", "--json").stdout)
    assert best["test_accuracy"] == 0.9
    assert json.loads(mlw(filled, "projects", "--json").stdout.splitlines()[0]) == {"project": "cli"}
    rows = [json.loads(x) for x in mlw(filled, "sql", "select metric, count(*) as n from metrics",
                                       "--json").stdout.splitlines()]
    assert rows == [{"metric": "loss", "n": 2}]


def test_gc_dry_run_and_real(filled):
    report = json.loads(mlw(filled, "gc", "--grace", "0", "--dry-run", "--json").stdout)
    assert report["removed"] == 0 and report["referenced"] >= 4


def test_errors_are_one_line(filled):
    proc = mlw(filled, "models", "-p", "cli", "--where", '{"a": {"$nope": 1}}', ok=False)
    assert proc.returncode == 1 and "QueryError" in proc.stderr and "$nope" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = mlw(filled, "models", "--where", "{not json", ok=False)
    assert proc.returncode == 1 and "not valid JSON" in proc.stderr
    proc = mlw(filled, "models", "--sort", "acc:2", ok=False)
    assert proc.returncode == 1 and "--sort" in proc.stderr
