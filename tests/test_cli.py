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


def _first_id(env, command):
    return json.loads(mlw(env, command, "-p", "cli", "--json").stdout.splitlines()[0])["_id"]


def test_show_one_entity(filled):
    model_id = _first_id(filled, "models")
    out = mlw(filled, "show", model_id, "-p", "cli").stdout
    assert model_id in out and "test_accuracy" in out and "float64" in out  # arrays by dtype, not loaded
    shown = json.loads(mlw(filled, "show", model_id, "-p", "cli", "--json").stdout)
    assert shown["collection"] == "models" and shown["arrays"][0]["shape"] == [2]
    run_id = _first_id(filled, "runs")
    out = mlw(filled, "show", run_id, "-p", "cli").stdout
    assert "summaries" in out and "loss" in out and "0.5 @1" in out
    shown = json.loads(mlw(filled, "show", _first_id(filled, "datasets"), "-p", "cli", "--json").stdout)
    assert shown["doc"]["name"] == "zeros" and shown["arrays"][0]["dtype"] == "float64"
    proc = mlw(filled, "show", "NO-SUCH-ID", "-p", "cli", ok=False)
    assert proc.returncode == 1 and "NotFound" in proc.stderr and "NO-SUCH-ID" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_show_a_failed_task_with_its_error(filled):
    import mlwarehouse
    with mlwarehouse.connect(home=filled["MLW_HOME"], project="cli") as wh:
        task = wh.tasks.create("t", "json:dumps", max_attempts=1)
        wh.tasks.claim("t", "w")
        wh.tasks.fail(task.id, "w", "Traceback...\nValueError: bad lr", retry=False)
    out = mlw(filled, "show", task.id, "-p", "cli").stdout
    assert "failed" in out and "ValueError: bad lr" in out and "error" in out


def test_export_and_import(filled, tmp_path):
    archive = str(tmp_path / "cli.tar")
    exported = json.loads(mlw(filled, "export", "cli", archive, "--json").stdout)
    assert exported["collections"]["models"] == 3 and exported["blobs"] >= 4
    other = {**filled, "MLW_HOME": str(tmp_path / "other")}
    imported = json.loads(mlw(other, "import", archive, "--json").stdout)
    assert imported["project"] == "cli" and imported["documents"] == exported["documents"]
    rows = [json.loads(x) for x in mlw(other, "models", "-p", "cli", "--json").stdout.splitlines()]
    assert sorted(r["test_accuracy"] for r in rows) == [0.5, 0.7, 0.9]
    proc = mlw(other, "import", archive, ok=False)
    assert proc.returncode == 1 and "DuplicateKey" in proc.stderr and "--project" in proc.stderr
    out = mlw(other, "import", archive, "--project", "copy").stdout
    assert "imported project copy (from cli, with new ids)" in out
    assert "copy" in mlw(other, "projects").stdout
    proc = mlw(other, "export", "nope", str(tmp_path / "x.tar"), ok=False)
    assert proc.returncode == 1 and "no project 'nope'" in proc.stderr


def test_brackets_missing_files_huge_limits_and_sub_command_errors_are_one_line(tmp_path, subprocess_env):
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh", project="odd") as wh:
        with wh.runs.start("[/bold] run [red]", hyper_parameters={"lr": 0.1}) as run:
            run.log("train", step=0, loss=1.0)
        wh.index.insert_one("runs", {"_id": "raw", "project": "odd", "name": "raw", "summary": {"train": 3}})
    out = mlw(subprocess_env, "runs", "-p", "odd").stdout
    assert "[/bold]" in out and "[red]" in out  # printed as they are, not read as rich markup
    for args, message in ((("export", "odd", str(tmp_path / "no-such-dir" / "x.tar")), "FileNotFoundError"),
                          (("runs", "-p", "odd", "--limit", "99999999999999999999"), "2**63"),
                          (("items", "show", "nope", "-p", "odd"), "no item dataset")):
        proc = mlw(subprocess_env, *args, ok=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
