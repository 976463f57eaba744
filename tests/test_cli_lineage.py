"""``mlw lineage ID``: upstream and downstream trees, --depth, --json, id prefixes, deleted nodes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, mlw

WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import mlwarehouse
    home = tmp_path_factory.mktemp("clil") / "wh"
    with mlwarehouse.connect(home=home, project="lab") as wh:
        data = wh.datasets.save(np.arange(4), "digits")
        with wh.runs.start("mlp", datasets=[data]) as run:
            model = wh.models.save({"w": np.ones(2)}, "mlp", dataset=data)
        gone = wh.datasets.save(np.arange(2), "old")
        with wh.runs.start("early", datasets=[gone]) as early:
            pass
        wh.datasets.delete("old", force=True)
    environ = {k: v for k, v in os.environ.items() if k not in ("MLW_URI", "MLW_BLOBS", "MLW_PROJECT")}
    env = {**environ, "PYTHONPATH": str(ROOT) + os.pathsep + environ.get("PYTHONPATH", ""), "MLW_HOME": str(home)}
    return env, {"data": data.id, "run": run.id, "model": model.id, "gone": gone.id, "early": early.id}


def test_json_lists_both_directions(env):
    env, ids = env
    out = json.loads(mlw(env, "lineage", ids["model"], "--json").stdout)
    assert out["node"] == {"id": ids["model"], "kind": "model", "name": "mlp", "project": "lab", "deleted": False}
    assert {(n["id"], n["kind"], n["relation"]) for n in out["upstream"]} == {
        (ids["data"], "dataset", "trained_on"), (ids["run"], "run", "produced")}
    assert out["downstream"] == []
    down = json.loads(mlw(env, "lineage", ids["data"], "--json", "-p", "lab").stdout)["downstream"]
    assert {n["id"] for n in down} == {ids["run"], ids["model"]}
    shallow = json.loads(mlw(env, "lineage", ids["run"], "--json", "--depth", "0").stdout)
    assert shallow["upstream"] == [] and shallow["downstream"] == []


def test_trees_through_the_installed_entry_point(env):
    env, ids = env
    script = Path(sys.executable).parent / "mlw"
    if not script.exists():
        pytest.skip("the mlw entry point is not installed beside this interpreter")
    proc = subprocess.run([str(script), "lineage", ids["run"]], env={**env, **WIDE},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.splitlines()[0] == f"run mlp {ids['run']}"
    assert "upstream (came from)" in text and f"input: dataset digits v1 {ids['data']}" in text
    assert f"produced: model mlp {ids['model']}" in text


def test_a_prefix_and_a_deleted_node(env):
    env, ids = env
    out = json.loads(mlw(env, "lineage", ids["gone"].lower(), "--json").stdout)  # its tombstone is found
    assert out["node"]["deleted"] is True and out["node"]["kind"] == "dataset"
    assert [n["id"] for n in out["downstream"]] == [ids["early"]]
    up = json.loads(mlw(env, "lineage", ids["early"], "--json").stdout)["upstream"]
    assert [(n["id"], n["deleted"]) for n in up] == [(ids["gone"], True)]
    tree = mlw({**env, **WIDE}, "lineage", ids["early"]).stdout
    assert "(deleted)" in tree
    others = [v for k, v in ids.items() if k != "model"]
    prefix = next(ids["model"][:n] for n in range(8, 27) if not any(o.startswith(ids["model"][:n]) for o in others))
    assert json.loads(mlw(env, "lineage", prefix, "--json").stdout)["node"]["id"] == ids["model"]


def test_errors_are_one_line(env):
    env, ids = env
    missing = mlw(env, "lineage", "01ZZZZZZZZZZZZZZZZZZZZZZZZ", ok=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: NotFound: ")
    bad = mlw(env, "lineage", ids["run"], "--depth", "-1", ok=False)
    assert bad.returncode == 2

