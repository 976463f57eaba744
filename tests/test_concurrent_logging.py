"""Eight processes log into one embedded warehouse at once: nothing lost, nothing duplicated, no lock error."""

from __future__ import annotations

import subprocess

import pytest
from conftest import PYTHON

import mlwarehouse

PROCESSES = 8
STEPS = 5000

SCRIPT = """
import sys, mlwarehouse
worker = int(sys.argv[1])
wh = mlwarehouse.connect(project="concurrent")
try:
    with wh.runs.start(f"worker-{worker}", worker=worker) as run:
        for step in range(%(steps)d):
            run.log("train", step=step, loss=1.0 / (step + 1), acc=step / %(steps)d, worker=worker)
            if step %% 1000 == 999:
                run.log("valid", accuracy=worker + step / 10000)
    print(run.id)
finally:
    wh.close()
""" % {"steps": STEPS}


@pytest.mark.slow
def test_eight_processes_log_at_once(tmp_path, subprocess_env):
    procs = [subprocess.Popen([PYTHON, "-c", SCRIPT, str(i)], env=subprocess_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "locked" not in err.lower() and "error" not in err.lower(), err
    run_ids = [out.strip() for out, _ in outputs]
    with mlwarehouse.connect(home=tmp_path / "wh", project="concurrent") as wh:
        p = wh.project()
        assert wh.runs.count_logs() == PROCESSES * (STEPS + STEPS // 1000)
        assert p.count("logs") < PROCESSES * 100  # blocks, not a row per point
        for worker, run_id in enumerate(run_ids):
            run = wh.runs.get(run_id)
            assert run.status == "complete" and run.worker == worker
            steps = [d["step"] for d in wh.runs.find_logs("train", run=run_id)]
            assert sorted(steps) == list(range(STEPS))  # every step exactly once
            assert wh.runs.count_logs("train", where={"worker": {"$ne": worker}}, run=run_id) == 0
            loss = run.summary["train"]["loss"]
            assert (loss["count"], loss["min"], loss["min_step"], loss["max"], loss["max_step"]) == (
                STEPS, 1.0 / STEPS, STEPS - 1, 1.0, 0)
            assert run.summary["valid"]["accuracy"]["max"] == worker + (STEPS - 1) / 10000
        best = wh.runs.best("valid.accuracy")
        assert best.worker == PROCESSES - 1
