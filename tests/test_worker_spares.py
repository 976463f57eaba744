"""The fork server's spares and early recording keep the guarantees of a process forked for each request.

A spare is a task process forked before its request (it leads its session already, and after a moment opens
the warehouse): each request gets a spare of its own, a spare that died is replaced by a fork made for the
request, and a warehouse opened ahead is used only where and while it fits. A task is recorded as soon as it
wrote its result and closed its output; its session is killed then, output written later goes nowhere, and a
grandchild holding the output makes the worker wait for the exit as before. A spec too long for one message
goes through a file, and no file of a task attempt is left behind.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import pytest
from conftest import alive, wait_for
from test_worker_warm import LIGHT

from mlwarehouse.tasks import forkserver
from mlwarehouse.tasks.runtime import Ahead
from mlwarehouse.tasks.worker import Worker

pytestmark = pytest.mark.skipif(not forkserver.available(), reason="warm task processes need Linux")

IDENTITY = "import os\npid = os.getpid()\nsid = os.getsid(0)\n"


@pytest.fixture
def p(wh):
    return wh.project("s")


@pytest.fixture
def worker(p):
    made = []

    def make(task_name: str, **options) -> Worker:
        options.setdefault("lease_seconds", 10)
        made.append(Worker(p, task_name, verbose=False, warm=True, preload=LIGHT, **options))
        assert made[-1].warm_up()
        return made[-1]
    yield make
    for w in made:
        w.close()


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_each_request_gets_a_spare_of_its_own_that_opened_the_warehouse_ahead(p, tmp_path, worker):
    path = script(tmp_path, "who.py", IDENTITY)
    w = worker("who")
    server = w.fork_server_pid
    spares = []
    for i in range(2):
        wait_for(lambda: len(children_of(server)) == 1)
        spares.append(children_of(server)[0])
        time.sleep(forkserver.AHEAD_DELAY + 0.5)  # the spare opens the warehouse before the task comes
        task = p.tasks.create("who", path, hyper_parameters={"i": i}, saved_result_keys=["pid", "sid"])
        done = w.run_one()
        assert done.id == task.id and done.status == "finished"
        assert done.result == {"pid": spares[-1], "sid": spares[-1]}  # the spare, leading its own session
        assert p.runs.get(done.run).status == "complete" and p.runs.get(done.run).task == task.id
    assert spares[0] != spares[1] and w.forked == 2 and w.cold == 0
    wait_for(lambda: not any(alive(pid) for pid in spares))


def test_a_spare_that_died_is_replaced_by_a_fork_for_the_request(p, tmp_path, worker):
    path = script(tmp_path, "who.py", IDENTITY)
    w = worker("who")
    server = w.fork_server_pid
    wait_for(lambda: len(children_of(server)) == 1)
    spare = children_of(server)[0]
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: not alive(spare))
    task = p.tasks.create("who", path, saved_result_keys=["pid", "sid"])
    done = w.run_one()
    assert done.id == task.id and done.status == "finished" and done.attempts == 1
    assert done.result["pid"] != spare and done.result["pid"] == done.result["sid"]
    assert (w.forked, w.cold) == (1, 0) and w.fork_server_pid == server


def test_a_task_is_recorded_once_its_output_is_closed_and_its_session_is_killed(p, tmp_path, worker):
    path = script(tmp_path, "late.py", """
        import os, subprocess, sys, threading, time
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # does not hold the output pipe
        open(os.path.join(folder, "pids"), "w").write(f"{os.getpid()} {sleeper.pid}")

        def chatter():
            time.sleep(0.5)  # past the result: nothing of this may reach the task's output
            while True:
                print("late", flush=True)
                time.sleep(0.01)
        threading.Thread(target=chatter, daemon=True).start()
        print("done")
        value = 1
    """)
    task = p.tasks.create("late", path, hyper_parameters={"folder": str(tmp_path)}, saved_result_keys=["value"])
    done = worker("late").run_one()
    assert done.id == task.id and done.status == "finished" and done.result == {"value": 1}
    assert done.output == "done\n" == p.tasks.output(task.id)
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5)  # the task and its subprocess


def test_a_grandchild_holding_the_output_is_waited_for_then_killed(p, tmp_path, worker):
    path = script(tmp_path, "holder.py", """
        import os, subprocess, sys
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # inherits the output
        open(os.path.join(folder, "pids"), "w").write(f"{os.getpid()} {holder.pid}")
        print("spawned")
        value = 2
    """)
    task = p.tasks.create("holder", path, hyper_parameters={"folder": str(tmp_path)}, saved_result_keys=["value"])
    started = time.monotonic()
    done = worker("holder").run_one()
    assert time.monotonic() - started < 15
    assert done.id == task.id and done.status == "finished" and done.result == {"value": 2}
    assert done.output == "spawned\n"
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5)


def test_a_long_spec_goes_through_a_file_and_no_attempt_file_is_left(p, tmp_path, worker):
    path = script(tmp_path, "size.py", "n = len(blob)\n")
    long = p.tasks.create("size", path, hyper_parameters={"blob": "x" * (forkserver.MAX_MESSAGE + 1000)},
                          saved_result_keys=["n"])
    short = p.tasks.create("size", path, hyper_parameters={"blob": "xyz"}, saved_result_keys=["n"])
    w = worker("size")
    assert w.run_one(sort=[("_id", 1)]).result == {"n": forkserver.MAX_MESSAGE + 1000}
    assert w.run_one().result == {"n": 3}
    assert (w.forked, w.cold) == (2, 0) and {long.refresh().status, short.refresh().status} == {"finished"}
    folder = w._folder
    assert folder.is_dir() and list(folder.iterdir()) == []  # each attempt's spec, result and run id removed
    w.close()
    assert not folder.exists()


def test_a_warehouse_opened_ahead_is_used_only_in_its_directory_and_while_fresh(p, tmp_path, monkeypatch):
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    monkeypatch.setenv("MLW_PROJECT", "s")
    here = os.getcwd()
    fits = Ahead()
    assert fits.take(here) is fits.warehouse and fits.warehouse.project().name == "s"
    fits.warehouse.close()
    elsewhere, stale = Ahead(), Ahead()
    assert elsewhere.take(str(tmp_path)) is None  # a relative URI would mean another place there
    stale.opened -= Ahead.MAX_AGE
    assert stale.take(here) is None  # an idle connection a server may have dropped
    monkeypatch.setenv("MLW_URI", "nosuchscheme://nowhere")
    assert Ahead.open() is None  # the task connects itself, and reports the error then
