"""The `mlw` command: listings, --where/--sort/--json, gc, sql, and errors as one line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import mlw


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


def rows(env, *args):
    """A listing's ``--json`` output: one JSON document (a list), so ``json.loads`` reads it whole."""
    found = json.loads(mlw(env, *args, "--json").stdout)
    assert isinstance(found, list)
    return found


def test_listings_and_json(filled):
    found = rows(filled, "models", "-p", "cli", "--sort", "test_accuracy:-1")
    assert [r["test_accuracy"] for r in found] == [0.9, 0.7, 0.5]  # the leaderboard, by the chosen metric
    found = rows(filled, "models", "-p", "cli", "--where", '{"test_accuracy": {"$lt": 0.6}}')
    assert [r["test_accuracy"] for r in found] == [0.5]
    assert "zeros" in mlw(filled, "datasets", "-p", "cli").stdout
    assert "r1" in mlw(filled, "runs", "-p", "cli").stdout
    best = json.loads(mlw(filled, "best", "test_accuracy", "-p", "cli", "--json").stdout)
    assert best["test_accuracy"] == 0.9
    assert rows(filled, "projects") == [{"project": "cli"}]
    assert rows(filled, "sql", "select metric, count(*) as n from metrics") == [{"metric": "loss", "n": 2}]
    assert rows(filled, "tasks", "-p", "cli") == []
    assert "one JSON document (a list" in " ".join(mlw(filled, "models", "--help").stdout.split())


def test_the_leaderboard_shows_final_models_unless_asked_for_checkpoints(filled):
    import mlwarehouse
    with mlwarehouse.connect(home=filled["MLW_HOME"], project="cli") as wh:
        for epoch in (1, 2):
            wh.models.checkpoint({"w": np.ones(2)}, epoch=epoch, name="m-ckpt", metrics={"test_accuracy": 0.99})
    board = rows(filled, "models", "-p", "cli", "--sort", "test_accuracy:-1")
    assert [r["test_accuracy"] for r in board] == [0.9, 0.7, 0.5]
    board = rows(filled, "models", "-p", "cli", "--sort", "test_accuracy:-1", "--checkpoints")
    assert [r["test_accuracy"] for r in board] == [0.99, 0.99, 0.9, 0.7, 0.5]
    assert json.loads(mlw(filled, "best", "test_accuracy", "-p", "cli", "--json").stdout)["test_accuracy"] == 0.9
    best = json.loads(mlw(filled, "best", "test_accuracy", "-p", "cli", "--checkpoints", "--json").stdout)
    assert best["test_accuracy"] == 0.99 and best["checkpoint"] is True
    assert "checkpoint" in mlw({**filled, "COLUMNS": "200"}, "models", "-p", "cli", "--checkpoints").stdout


def test_a_missing_project_is_an_error_naming_the_ones_there_are(filled, tmp_path):
    for args in (("models",), ("datasets",), ("runs",), ("tasks",), ("best", "test_accuracy"),
                 ("show", "01", "--project"), ("export",)):
        args = (*args, "cli-typo") if args[-1] in ("--project", "export") else (*args, "-p", "cli-typo")
        if args[0] == "export":
            args = (*args, str(tmp_path / "x.tar"))
        proc = mlw(filled, *args, ok=False)
        assert proc.returncode == 1, (args, proc.stdout)
        assert proc.stderr.strip() == "error: NotFound: no project 'cli-typo'; projects: cli", args


def test_runs_show_the_hyper_parameters_that_vary(filled):
    import mlwarehouse
    with mlwarehouse.connect(home=filled["MLW_HOME"], project="cli") as wh:
        with wh.runs.start("r2", hyper_parameters={"lr": 0.01}) as run:
            run.log("train", step=0, loss=2.0)
        for name, lr in (("s1", 0.5), ("s2", 0.25)):
            wh.runs.start(name, hyper_parameters={"lr": lr, "batch": 32}).finish()
    header = mlw(filled, "runs", "-p", "cli", "--where", '{"name": {"$in": ["s1", "s2"]}}').stdout
    assert "lr" in header and "batch" not in header  # the same in both: not a column
    out = mlw({**filled, "COLUMNS": "200"}, "runs", "-p", "cli").stdout
    assert " lr " in out and "0.01" in out and "0.25" in out
    found = rows(filled, "runs", "-p", "cli", "--sort", "name:1")
    assert [r["hyper_parameters"] for r in found][:2] == [{"lr": 0.1}, {"lr": 0.01}]


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
    return rows(env, command, "-p", "cli")[0]["_id"]


def test_ids_by_unique_prefix_in_any_project_and_whole_in_tables(filled):
    import mlwarehouse
    model_id = _first_id(filled, "models")
    narrow = {**filled, "COLUMNS": "50"}
    assert model_id in mlw(narrow, "models", "-p", "cli").stdout  # not cut to "01M8…": it can be pasted back
    with mlwarehouse.connect(home=filled["MLW_HOME"], project="other") as wh:
        other = wh.models.save({"w": np.zeros(1)}, name="o").id
        task = wh.tasks.create("t", "json:dumps")
        ids = [d["_id"] for c in ("runs", "models", "datasets", "tasks") for d in wh.index.find(c)]
    shown = json.loads(mlw(filled, "show", model_id, "--json").stdout)  # no -p: ids are unique across projects
    assert shown["doc"]["_id"] == model_id and shown["doc"]["project"] == "cli"
    assert json.loads(mlw(filled, "show", other, "--json").stdout)["doc"]["project"] == "other"
    prefix = next(i[:n] for n in range(1, 27) for i in ids if sum(j.startswith(i[:n]) for j in ids) == 1)
    found = json.loads(mlw(filled, "show", prefix.lower(), "--json").stdout)["doc"]["_id"]
    assert found.startswith(prefix)
    shared = os.path.commonprefix(ids)  # ids made within seconds share their time digits
    assert len(shared) >= 4
    proc = mlw(filled, "show", shared, ok=False)
    assert proc.returncode == 1 and "ambiguous" in proc.stderr and ids[0] in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = mlw(filled, "show", model_id[:2], ok=False)
    assert proc.returncode == 1 and "too short" in proc.stderr
    proc = mlw(filled, "show", other, "-p", "cli", ok=False)  # -p narrows the search to one project
    assert proc.returncode == 1 and "NotFound" in proc.stderr
    assert mlw(filled, "output", task.id[:-3]).stdout == ""  # a pending task has no output yet


def test_usage_errors_are_one_line_and_a_hint(filled):
    for args, message, hint in ((("model",), "No such command 'model'", "Try 'mlw --help' for help."),
                                (("show",), "Missing argument 'ID'", "Try 'mlw show --help' for help."),
                                (("models", "--limt", "3"), "--limt", "Try 'mlw models --help' for help.")):
        proc = mlw(filled, *args, ok=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        first, second = proc.stderr.strip().splitlines()
        assert first.startswith("error: ") and message in first and second == hint
    import mlwarehouse
    assert mlw(filled, "--version").stdout == f"mlw {mlwarehouse.__version__}\n"


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
    assert sorted(r["test_accuracy"] for r in rows(other, "models", "-p", "cli")) == [0.5, 0.7, 0.9]
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
    out = mlw({**subprocess_env, "COLUMNS": "200"}, "runs", "-p", "odd").stdout
    assert "[/bold]" in out and "[red]" in out  # printed as they are, not read as rich markup
    for args, message in ((("export", "odd", str(tmp_path / "no-such-dir" / "x.tar")), "FileNotFoundError"),
                          (("runs", "-p", "odd", "--limit", "99999999999999999999"), "2**63"),
                          (("items", "show", "nope", "-p", "odd"), "no item dataset")):
        proc = mlw(subprocess_env, *args, ok=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
