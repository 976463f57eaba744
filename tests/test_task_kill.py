"""Workers killed for real: SIGKILL mid-task (the lease brings the task back), SIGTERM (the task is released)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import alive, wait_for

pytestmark = pytest.mark.slow

WORKER = ("import sys; from mlwarehouse import connect; from mlwarehouse.tasks.worker import Worker; "
          "Worker(connect().project('k'), 'k', lease_seconds=float(sys.argv[1]), verbose=False, kill_grace=2).run()")

SCRIPT = textwrap.dedent("""
    import os, time
    import mlwarehouse
    attempt = mlwarehouse.current_task().attempt
    open(os.path.join(folder, f"attempt{attempt}"), "w").write(str(os.getpid()))
    if attempt == 1:
        time.sleep(60)
    value = attempt
""")


def start_worker(env, lease: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(lease)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.fixture
def task(wh, tmp_path):
    path = tmp_path / "sleepy.py"
    path.write_text(SCRIPT)
    return wh.project("k").tasks.create("k", path, hyper_parameters={"folder": str(tmp_path)},
                                        saved_result_keys=["value"])


def test_sigkilled_worker_task_runs_again_after_its_lease_and_is_recorded_once(wh, tmp_path, subprocess_env, task):
    p = wh.project("k")
    first = start_worker(subprocess_env, 1.5)
    try:
        wait_for(lambda: (tmp_path / "attempt1").exists() and (tmp_path / "attempt1").read_text(), timeout=15)
        child = int((tmp_path / "attempt1").read_text())
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        wait_for(lambda: not alive(child), timeout=5)  # the orphaned task process takes itself down
        assert p.tasks.get(task.id).status == "running"  # until its lease expires
    finally:
        first.kill()
    second = start_worker(subprocess_env, 1.5)
    try:
        done = p.tasks.wait([task.id], timeout=20, progress=False)[0]
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0, second.stderr.read().decode()
    assert done.status == "finished" and done.result == {"value": 2} and done.attempts == 2
    runs = p.runs.find(where={"task": task.id}, sort=[("started", 1)])
    assert [r.status for r in runs] == ["failed", "complete"] and runs[1].id == done.run
    assert "lease expired" in runs[0].error


def test_sigterm_releases_the_task_without_counting_the_attempt(wh, tmp_path, subprocess_env, task):
    p = wh.project("k")
    worker = start_worker(subprocess_env, 5)
    try:
        wait_for(lambda: (tmp_path / "attempt1").exists() and (tmp_path / "attempt1").read_text(), timeout=15)
        child = int((tmp_path / "attempt1").read_text())
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, worker.stderr.read().decode()
        assert time.monotonic() - started < 5
    finally:
        worker.kill()
    assert not alive(child)
    back = p.tasks.get(task.id)
    assert (back.status, back.attempts, back.worker) == ("pending", 0, None)
    assert p.runs.get(back.run).status == "failed"
    assert os.path.exists(tmp_path / "attempt1") and not os.path.exists(tmp_path / "attempt2")
