"""The README's main command: the end-to-end demo, run for real, its output checked."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse import schema


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "mlwarehouse.cli", "demo", "--home", str(tmp_path / "demo"),
                           "--epochs", "8"], env=subprocess_env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "saved dataset digits v1" in out
    assert re.search(r"dispatched a sweep of 6 tasks", out)
    assert re.search(r"6 finished, 0 failed", out)
    assert "leaderboard" in out
    match = re.search(r"test accuracy (\d\.\d+) \(stored (\d\.\d+)\)", out)
    assert match, out[-2000:]
    reloaded, stored = map(float, match.groups())
    assert reloaded == pytest.approx(stored, abs=1e-6) and reloaded > 0.85
    assert "mlw models -p digits-demo" in out


def _tiny_demo(home, env, cwd) -> str:
    """The demo with one task of one epoch and one worker: what a re-run clears, in seconds."""
    code = ("from mlwarehouse.examples.demo import run_demo; "
            f"run_demo(home={str(home)!r}, workers=1, epochs=1, n_hidden=(8,), lr=(0.01,))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 finished, 0 failed" in proc.stdout, proc.stdout[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_rerun_clears_only_what_the_demo_made_and_task_output_is_clean(tmp_path, subprocess_env):
    home = tmp_path / "demo"
    first = _tiny_demo(home, subprocess_env, tmp_path)
    assert "not writable" not in first
    with mlwarehouse.connect(home=home) as wh:
        p = wh.project("digits-demo")
        old_runs = {doc["_id"] for doc in p.find(schema.RUNS.name)}
        old_models = {doc["_id"] for doc in p.find(schema.MODELS.name)}
        assert len(old_runs) == 1 and old_models and p.count(schema.LOGS.name) > 0
        p.items.from_arrays(name="imported", columns={"x": np.zeros((3, 2), np.float32), "label": [0, 1, 2]})
        p.datasets.save({"a": 1}, name="mine")
        p.insert("notes", {"text": "keep me"})
        mine = p.runs.start(name="my-run")
        mine.log("train", step=0, loss=1.0)
        mine.finish()
    second = _tiny_demo(home, subprocess_env, tmp_path)
    assert "cleared" in second and "not writable" not in second
    with mlwarehouse.connect(home=home) as wh:
        p = wh.project("digits-demo")
        assert p.items.load(name="imported").count() == 3  # the user's item dataset, its items and shards
        assert [d["name"] for d in p.find(schema.DATASETS.name, {"name": {"$ne": "digits"}}, sort=[("name", 1)])] \
            == ["imported", "mine"]
        assert [d["text"] for d in p.find("notes")] == ["keep me"]
        runs = {doc["_id"]: doc for doc in p.find(schema.RUNS.name)}
        assert mine.id in runs and not old_runs & set(runs) and len(runs) == 2
        assert p.count(schema.LOGS.name, {"run": mine.id}) == 1
        assert p.count(schema.LOGS.name, {"run": {"$in": sorted(old_runs)}}) == 0
        models = {doc["_id"] for doc in p.find(schema.MODELS.name)}
        assert models and not models & old_models
        assert p.count(schema.DATASETS.name, {"name": "digits"}) == 1
        tasks = p.find(schema.TASKS.name)
        assert len(tasks) == 1 and tasks[0]["status"] == "finished"
        assert "test accuracy" in tasks[0]["output"] and "not writable" not in tasks[0]["output"]


@pytest.mark.slow
def test_continuous_demo_shows_the_champion_improving_and_the_server_following(tmp_path, subprocess_env):
    home = tmp_path / "continuous"
    proc = subprocess.run([sys.executable, "-m", "mlwarehouse.cli", "demo", "--continuous", "--home", str(home),
                           "--seconds", "12"], env=subprocess_env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "project continuous-1" in out and "started the trainer and the evaluator" in out
    match = re.search(r"the champion changed (\d+) times: ([\d. >-]+)", out)
    assert match, out[-3000:]
    accuracies = [float(v) for v in match.group(2).split("->")]
    assert int(match.group(1)) >= 3 and accuracies == sorted(accuracies) and accuracies[-1] > 0.85
    served = re.search(r"the server answered (\d+) times, from (\d+) different champions", out)
    assert served and int(served.group(1)) >= 3 and int(served.group(2)) >= 1, out[-3000:]
    with mlwarehouse.connect(home=home, project="continuous-1") as wh:  # every loop stopped by SIGTERM, cleanly
        assert all(r.doc["status"] == "complete" for r in wh.runs.find())
        holder = wh.models.aliases.resolve("digits-mlp", "champion")
        assert wh.models.evaluations.find(holder, metric="accuracy")[0].value == pytest.approx(accuracies[-1], abs=5e-4)
