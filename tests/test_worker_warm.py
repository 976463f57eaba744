"""Warm task processes, forked from the worker's fork server, keep every guarantee of a fresh interpreter.

Every test of test_worker.py runs here again with warm workers, and fails if any task process started cold; then
what only the forked runtime has: fresh process state in each fork (session, random state, ids, module state,
stdin, working directory), torch used after the fork, a timeout killing the task's own subprocesses, a fork
server killed mid-task (replaced, the task retried), one that cannot start (the worker goes cold), and the modes.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import alive, wait_for
from test_worker import *  # noqa: F403  (the worker's tests, collected again here with warm workers)
from test_worker import script

from mlwarehouse.errors import TaskError
from mlwarehouse.tasks import forkserver
from mlwarehouse.tasks.worker import Worker

#: what the fork servers of these tests import: enough for a task, without torch's seconds (one test adds it)
LIGHT = ("numpy", "mlwarehouse", "mlwarehouse.config", "mlwarehouse.warehouse", "mlwarehouse.index.sqlite",
         "mlwarehouse.blobs.files", "mlwarehouse.runs.registry", "mlwarehouse.tasks.runtime")

pytestmark = pytest.mark.skipif(not forkserver.available(), reason="warm task processes need Linux")


@pytest.fixture(autouse=True)
def warm_workers(monkeypatch):
    """Every worker of a test is warm by default, and no task process of a warm worker may start cold."""
    monkeypatch.setenv("MLW_WORKER_MODE", "warm")
    monkeypatch.setattr(forkserver, "PRELOAD", LIGHT)
    made: list[Worker] = []
    init = Worker.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(Worker, "__init__", recording)
    yield made
    for worker in made:
        worker.close()
        if worker.mode == "warm" and not worker._server_gave_up:
            assert worker.cold == 0, f"{worker.cold} task processes started cold in a warm worker"


@pytest.fixture
def p(wh):
    return wh.project("w")


FRESH = """
import os, random, sys
import numpy as np
import mlwarehouse
from mlwarehouse.ids import new_id
with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
    forked = b"mlwarehouse.tasks.forkserver" in f.read()
info = {"pid": os.getpid(), "ppid": os.getppid(), "forked": forked,
        "leader": os.getsid(0) == os.getpgrp() == os.getpid(), "stdin": sys.stdin.read(), "cwd": os.getcwd(),
        "np": float(np.random.rand()), "py": random.random(), "id": new_id(),
        "leaks": [getattr(np, "mlw_leak", None), os.environ.get("MLW_LEAK"), "mlw-leak" in sys.path,
                  getattr(mlwarehouse, "mlw_leak", None), sorted(n for n in ("a", "b") if n in globals())],
        "task": mlwarehouse.current_task().id, "run": mlwarehouse.current_run().id}
np.mlw_leak = mlwarehouse.mlw_leak = os.environ["MLW_LEAK"] = str(info["pid"])
sys.path.append("mlw-leak")
print("out", info["pid"])
print("err", file=sys.stderr)
"""


def test_each_forked_task_gets_fresh_process_state(p, tmp_path, monkeypatch):
    path = script(tmp_path, "fresh.py", FRESH)
    tasks = [p.tasks.create("fresh", path, hyper_parameters={k: 1}, saved_result_keys=["info"]) for k in "aba"]
    worker = Worker(p, "fresh", once=True, verbose=False, lease_seconds=10)
    assert worker.warm_up() and worker.fork_server_pid
    server = worker.fork_server_pid
    monkeypatch.chdir(tmp_path)  # after the server started: each fork still runs in the worker's directory
    assert worker.run() == 3 and worker.forked == 3 and worker.cold == 0
    infos = []
    for task, name in zip(tasks, "aba"):
        done = task.refresh()
        info = done.result["info"]
        assert done.status == "finished" and done.output == f"out {info['pid']}\nerr\n"
        assert info["ppid"] == server and info["forked"] and info["leader"]
        assert info["stdin"] == "" and info["cwd"] == str(tmp_path)
        assert info["leaks"] == [None, None, False, None, [name]]  # nothing from the task before
        assert (info["task"], info["run"]) == (task.id, done.run)
        infos.append(info)
    for key in ("pid", "np", "py", "id"):  # each fork draws its own random state and ids
        assert len({info[key] for info in infos}) == 3, key
    assert not alive(server)  # run() stopped the server


@pytest.mark.slow  # the fork server imports torch: seconds
def test_torch_runs_with_threads_in_forked_tasks(p, tmp_path):
    pytest.importorskip("torch")
    path = script(tmp_path, "torchy.py", """
        import sys
        preloaded = "torch" in sys.modules  # imported by the fork server, before this script
        import torch
        torch.set_num_threads(2)
        x = torch.arange(256 * 256, dtype=torch.float32).reshape(256, 256) / 65536
        total = round(float((x @ x.T).sum()), 2)
        threads = torch.get_num_threads()
    """)
    tasks = [p.tasks.create("torch", path, hyper_parameters={"i": i}, saved_result_keys=["preloaded", "total",
                                                                                        "threads"])
             for i in range(2)]
    worker = Worker(p, "torch", once=True, verbose=False, lease_seconds=20,
                    preload=("torch", *LIGHT))  # the default preload (forkserver.PRELOAD) has torch too
    assert worker.warm_up() and "torch" in worker._server.loaded
    assert worker.run() == 2 and worker.forked == 2
    x = __import__("torch").arange(256 * 256, dtype=__import__("torch").float32).reshape(256, 256) / 65536
    expected = round(float((x @ x.T).sum()), 2)
    for task in tasks:
        assert task.refresh().result == {"preloaded": True, "total": expected, "threads": 2}


def test_a_timeout_kills_the_forked_task_and_its_subprocesses(p, tmp_path):
    path = script(tmp_path, "spawns.py", """
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open(os.path.join(folder, "pids"), "w").write(f"{os.getpid()} {child.pid}")
        time.sleep(60)
    """)
    task = p.tasks.create("spawn", path, hyper_parameters={"folder": str(tmp_path)}, timeout=2, max_attempts=1)
    started = time.monotonic()
    Worker(p, "spawn", once=True, verbose=False, kill_grace=1.0, lease_seconds=10).run()
    assert time.monotonic() - started < 12
    done = task.refresh()
    assert done.status == "failed" and done.error.startswith("timed out after 2 s")
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5)  # the whole session, grandchild included


def test_a_killed_fork_server_is_replaced_and_its_task_retried(p, tmp_path):
    path = script(tmp_path, "victim.py", """
        import os, time
        import mlwarehouse
        attempt = mlwarehouse.current_task().attempt
        open(os.path.join(folder, f"attempt{attempt}"), "w").write(f"{os.getpid()} {os.getppid()}")
        if attempt == 1:
            time.sleep(60)
        value = attempt
    """)
    task = p.tasks.create("victim", path, hyper_parameters={"folder": str(tmp_path)}, saved_result_keys=["value"])
    worker = Worker(p, "victim", verbose=False, lease_seconds=10, kill_grace=1.0)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: (tmp_path / "attempt1").exists() and (tmp_path / "attempt1").read_text(), timeout=20)
        pid, server = (int(x) for x in (tmp_path / "attempt1").read_text().split())
        assert server == worker.fork_server_pid
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: not alive(pid), timeout=5)  # the orphaned task takes itself down (and the worker kills
        done = p.tasks.wait([task.id], timeout=30, progress=False)[0]  # its group); attempt 2: a new server
    finally:
        worker.stop()
        thread.join(15)
    assert not thread.is_alive()
    assert done.status == "finished" and done.result == {"value": 2} and done.attempts == 2
    second_server = int((tmp_path / "attempt2").read_text().split()[1])
    assert second_server != server and not alive(second_server)
    runs = p.runs.find(where={"task": task.id}, sort=[("started", 1)])
    assert [r.status for r in runs] == ["failed", "complete"]
    assert "without reporting a result" in runs[0].error and worker.forked == 2 and worker.cold == 0


def test_a_fork_server_that_cannot_start_leaves_the_worker_cold(p, tmp_path, monkeypatch, warm_workers):
    script(tmp_path, "dies_mlw.py", "import os\nos._exit(3)\n")  # takes the server down while it imports
    script(tmp_path, "broken_mlw.py", "raise ImportError('broken on purpose')\n")  # only skipped
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tasks = [p.tasks.create("c", "builtins:dict", hyper_parameters={"i": i}) for i in range(2)]
    skipping = Worker(p, "c", verbose=False, preload=("broken_mlw", *LIGHT))
    assert skipping.warm_up() and skipping._server.failed == {"broken_mlw": "ImportError: broken on purpose"}
    skipping.close()
    worker = Worker(p, "c", once=True, verbose=False, lease_seconds=10, preload=("dies_mlw", *LIGHT))
    assert worker.run() == 2 and (worker.forked, worker.cold) == (0, 2) and worker._server_gave_up
    assert all(t.refresh().status == "finished" for t in tasks)


def test_modes_cold_auto_and_bad_values(p, tmp_path, monkeypatch):
    path = script(tmp_path, "parent.py", "import os\nparent = os.getppid()\n")
    for i in range(4):
        p.tasks.create("m", path, hyper_parameters={"i": i}, saved_result_keys=["parent"], priority=-i)
    cold = Worker(p, "m", verbose=False, warm=False)
    assert cold.mode == "cold" and not cold.warm_up() and cold.fork_server_pid is None
    assert cold.run_one().result == {"parent": os.getpid()}  # a fresh interpreter, child of this process
    monkeypatch.setenv("MLW_WORKER_MODE", "auto")
    auto = Worker(p, "m", verbose=False)
    assert auto.mode == "auto" and auto.run_one().result == {"parent": os.getpid()}  # cold while the server imports
    server = auto.fork_server_pid
    assert server and auto.warm_up() and (auto.forked, auto.cold) == (0, 1)
    assert auto.run_one().result == {"parent": server} and auto.run_one().result == {"parent": server}
    auto.close()
    assert auto.fork_server_pid is None and not alive(server)
    monkeypatch.setenv("MLW_WORKER_MODE", "lukewarm")
    with pytest.raises(TaskError, match="MLW_WORKER_MODE must be auto, warm or cold"):
        Worker(p, "m")
    monkeypatch.setattr(forkserver, "available", lambda: False)  # as on a platform without fork
    monkeypatch.delenv("MLW_WORKER_MODE")
    assert Worker(p, "m").mode == "cold"
    with pytest.raises(TaskError, match="need os.fork"):
        Worker(p, "m", warm=True)


def test_a_tampered_script_fails_in_the_forked_process_without_running(p, tmp_path):
    path = script(tmp_path, "ran.py", "import os\nopen(os.path.join(folder, 'ran'), 'w').close()\nok = 1\n")
    task = p.tasks.create("t", path, hyper_parameters={"folder": str(tmp_path)}, saved_result_keys=["ok"])
    p.update("tasks", {"_id": task.id}, {"$set": {"script.sha256": "0" * 64}})
    worker = Worker(p, "t", once=True, verbose=False, lease_seconds=10)
    assert worker.run() == 1 and worker.forked == 1
    done = task.refresh()
    assert done.status == "failed" and done.attempts == 1 and "does not match its sha256" in done.error
    assert not (tmp_path / "ran").exists()
