"""Aliases and evaluations in the fronts: ``mlw show mlp@champion`` (the installed entry point) and the web UI's
model page, reachable by alias and listing the model's aliases, their history and its evaluations."""

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
def filled(tmp_path_factory):
    import mlwarehouse
    home = tmp_path_factory.mktemp("alf") / "wh"
    wh = mlwarehouse.connect(home=home, project="lab")
    test = wh.datasets.save(np.arange(4), "march-test")
    a = wh.models.save({"w": np.ones(2)}, "mlp")
    b = wh.models.save({"w": np.zeros(2)}, "mlp")
    wh.models.evaluations.record(a, test, "accuracy", 0.81)
    wh.models.evaluations.record(b, test, "accuracy", 0.93)
    wh.models.aliases.set("mlp", "champion", a, by="ci", reason="first <b>")
    wh.models.aliases.promote("mlp", "champion", b, evaluation=(test, "accuracy"), margin=0.1)
    wh.models.aliases.set("mlp", "staging", a)
    environ = {k: v for k, v in os.environ.items() if k not in ("MLW_URI", "MLW_BLOBS", "MLW_PROJECT")}
    env = {**environ, "PYTHONPATH": str(ROOT) + os.pathsep + environ.get("PYTHONPATH", ""), "MLW_HOME": str(home)}
    yield wh, env, {"test": test.id, "a": a.id, "b": b.id}
    wh.close()


def test_show_by_alias_through_the_entry_point(filled):
    _, env, ids = filled
    script = Path(sys.executable).parent / "mlw"
    if not script.exists():
        pytest.skip("the mlw entry point is not installed beside this interpreter")
    proc = subprocess.run([str(script), "show", "mlp@champion"], env={**env, **WIDE}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"model {ids['b']}" in proc.stdout and "aliases: mlp@champion" in proc.stdout
    assert "evaluations" in proc.stdout and "0.93" in proc.stdout and "alias changes" in proc.stdout


def test_show_json_and_errors(filled):
    _, env, ids = filled
    out = json.loads(mlw(env, "show", "mlp@staging", "--json", "-p", "lab").stdout)
    assert out["doc"]["_id"] == ids["a"] and out["aliases"] == ["mlp@staging"]
    assert [e["value"] for e in out["evaluations"]] == [0.81]
    assert {(c["alias"], c["version"]) for c in out["alias_changes"]} == {("champion", 1), ("champion", 2),
                                                                         ("staging", 1)}
    by_id = json.loads(mlw(env, "show", ids["b"], "--json").stdout)
    assert by_id["aliases"] == ["mlp@champion"]
    missing = mlw(env, "show", "mlp@nobody", ok=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr and "mlp@nobody" in missing.stderr


@pytest.fixture(scope="module")
def client(filled):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mlwarehouse.web import create_app
    return TestClient(create_app(filled[0]), base_url="http://127.0.0.1")


def test_model_page_by_alias_lists_aliases_history_and_evaluations(client, filled):
    _, _, ids = filled
    page = client.get("/p/lab/models/mlp@champion")
    assert page.status_code == 200
    html = page.text
    assert ids["b"] in html and '<code class="alias">mlp@champion</code>' in html
    assert "<h3>Alias history" in html and "first &lt;b&gt;" in html and "first <b>" not in html
    assert "<h2>Evaluations" in html and "accuracy" in html and ids["test"] in html
    staging = client.get(f"/p/lab/models/{ids['a']}").text
    assert '<code class="alias">mlp@staging</code>' in staging and "0.81" in staging
    assert client.get("/p/lab/models/mlp@nobody").status_code == 404
