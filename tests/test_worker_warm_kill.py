"""Warm workers killed for real, and run side by side: the forked runtime keeps the cold one's guarantees.

SIGKILL mid-task: the fork server and the task's whole session (a grandchild included) go down with the worker,
and the lease brings the task back to be recorded once. SIGTERM: the task is released without counting the
attempt. Two warm workers running two tasks each: every task runs once, in a process of its worker's server.
``mlw worker`` runs tasks warm or cold as MLW_WORKER_MODE says.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import alive, mlw, wait_for
from test_worker_warm import LIGHT

from mlwarehouse.tasks import forkserver

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not forkserver.available(), reason="warm needs Linux")]

WORKER = ("import json, sys; from mlwarehouse import connect; from mlwarehouse.tasks.worker import Worker; "
          "w = Worker(connect().project('k'), 'k', lease_seconds=float(sys.argv[1]), concurrency=int(sys.argv[2]), "
          "verbose=False, kill_grace=2, warm=True, preload=json.loads(sys.argv[3])); "
          "assert w.warm_up(); print(w.id, w.fork_server_pid, flush=True); w.run()")

SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, time
    import mlwarehouse
    attempt = mlwarehouse.current_task().attempt
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) if attempt == 1 else None
    with open(os.path.join(folder, f"attempt{attempt}"), "w") as f:
        f.write(f"{os.getpid()} {os.getppid()} {sleeper.pid if sleeper else 0}")
    if attempt == 1:
        time.sleep(60)
    value = attempt
""")


def start_worker(env, lease: float, concurrency: int = 1) -> tuple[subprocess.Popen, str, int]:
    """A warm worker process, once its fork server is ready: (process, worker id, server pid)."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(lease), str(concurrency), json.dumps(LIGHT)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert len(line) == 2, proc.stderr.read() if proc.poll() is not None else line
    return proc, line[0], int(line[1])


def attempt(tmp_path, n: int) -> tuple[int, int, int] | None:
    path = tmp_path / f"attempt{n}"
    text = path.read_text() if path.exists() else ""
    return tuple(int(x) for x in text.split()) if len(text.split()) == 3 else None


@pytest.fixture
def task(wh, tmp_path):
    path = tmp_path / "sleepy.py"
    path.write_text(SCRIPT)
    return wh.project("k").tasks.create("k", path, hyper_parameters={"folder": str(tmp_path)},
                                        saved_result_keys=["value"])


def test_sigkilled_warm_worker_takes_server_and_task_session_down_and_the_task_runs_again(
        wh, tmp_path, subprocess_env, task):
    p = wh.project("k")
    first, _, server = start_worker(subprocess_env, 1.5)
    try:
        wait_for(lambda: attempt(tmp_path, 1), timeout=15)
        child, parent, sleeper = attempt(tmp_path, 1)
        assert parent == server  # forked from the worker's server, not started by the worker
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        wait_for(lambda: not any(alive(pid) for pid in (server, child, sleeper)), timeout=5)
        assert p.tasks.get(task.id).status == "running"  # until its lease expires
    finally:
        first.kill()
    second, _, second_server = start_worker(subprocess_env, 1.5)
    try:
        done = p.tasks.wait([task.id], timeout=20, progress=False)[0]
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0, second.stderr.read()
    assert done.status == "finished" and done.result == {"value": 2} and done.attempts == 2
    assert attempt(tmp_path, 2)[1] == second_server and not alive(second_server)
    runs = p.runs.find(where={"task": task.id}, sort=[("started", 1)])
    assert [r.status for r in runs] == ["failed", "complete"] and runs[1].id == done.run
    assert "lease expired" in runs[0].error


def test_sigterm_releases_the_warm_task_without_counting_the_attempt(wh, tmp_path, subprocess_env, task):
    p = wh.project("k")
    worker, _, server = start_worker(subprocess_env, 5)
    try:
        wait_for(lambda: attempt(tmp_path, 1), timeout=15)
        child, parent, sleeper = attempt(tmp_path, 1)
        assert parent == server
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, worker.stderr.read()
        assert time.monotonic() - started < 5
    finally:
        worker.kill()
    wait_for(lambda: not any(alive(pid) for pid in (server, child, sleeper)), timeout=5)
    back = p.tasks.get(task.id)
    assert (back.status, back.attempts, back.worker) == ("pending", 0, None)
    assert p.runs.get(back.run).status == "failed"
    assert attempt(tmp_path, 2) is None


def test_two_warm_workers_run_each_task_once_in_their_own_servers(wh, tmp_path, subprocess_env):
    p = wh.project("k")
    path = tmp_path / "who.py"
    path.write_text("import os, time\ntime.sleep(0.02)\nserver = os.getppid()\npid = os.getpid()\n")
    tasks = p.tasks.sweep("k", path, configs=[{"i": i} for i in range(40)], saved_result_keys=["server", "pid"])
    workers = [start_worker(subprocess_env, 10, concurrency=2) for _ in range(2)]
    servers = {worker_id: server for _, worker_id, server in workers}
    try:
        done = p.tasks.wait(tasks, timeout=60, progress=False)
    finally:
        for proc, _, _ in workers:
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in workers:
            assert proc.wait(10) == 0, proc.stderr.read()
    assert {t.status for t in done} == {"finished"} and {t.attempts for t in done} == {1}
    assert all(t.result["server"] == servers[t.worker] for t in done)  # in its own worker's server
    assert len({t.result["pid"] for t in done}) == 40
    runs = p.runs.find(where={"task": {"$in": [t.id for t in done]}})
    assert len(runs) == 40 and {r.status for r in runs} == {"complete"}
    assert not any(alive(server) for server in servers.values())


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_mlw_worker_runs_tasks_as_mlw_worker_mode_says(wh, tmp_path, subprocess_env, mode):
    p = wh.project()
    path = tmp_path / "parent.py"
    path.write_text("import os\nwith open(f'/proc/{os.getppid()}/cmdline', 'rb') as f:\n"
                    "    parent = f.read().split(b'\\0')[:3]\nparent = [a.decode() for a in parent]\n")
    tasks = p.tasks.sweep("cli", path, configs=[{"i": i} for i in range(2)], saved_result_keys=["parent"])
    mlw({**subprocess_env, "MLW_WORKER_MODE": mode}, "worker", "--once", "--no-listeners", "-t", "cli")
    parents = [t.refresh().result["parent"] for t in tasks]
    expected = "mlwarehouse.tasks.forkserver_process" if mode == "warm" else "mlwarehouse.cli"
    assert all(expected in parent for parent in parents), parents
    assert all(t.refresh().status == "finished" for t in tasks)
