"""The worker running real task processes: results, output, isolation, bad input, timeouts, cancel."""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import alive, wait_for

from mlwarehouse.errors import BackendError, TaskError
from mlwarehouse.tasks.worker import Worker


@pytest.fixture
def p(wh):
    return wh.project("w")


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def work(p, task_name, **options) -> int:
    options.setdefault("lease_seconds", 10)
    return Worker(p, task_name, once=True, verbose=False, **options).run()


def test_a_script_runs_with_globals_results_output_and_a_run(p, tmp_path):
    path = script(tmp_path, "train.py", """
        import sys
        import mlwarehouse
        me = mlwarehouse.current_task()
        accuracy = lr * 2
        info = {"id": me.id, "attempt": me.attempt, "hp": me.hyper_parameters, "run": me.run,
                "run_is_current": mlwarehouse.current_run().id == me.run, "main": __name__}
        print("training with", lr)
        print("a warning", file=sys.stderr)
    """)
    task = p.tasks.create("train", path, hyper_parameters={"lr": 0.25}, saved_result_keys=["accuracy", "info"])
    assert work(p, "train") == 1
    done = task.refresh()
    assert done.status == "finished" and done.attempts == 1 and done.error is None
    assert done.result == {"accuracy": 0.5, "info": {"id": task.id, "attempt": 1, "hp": {"lr": 0.25},
                                                     "run": done.run, "run_is_current": True, "main": "__main__"}}
    assert done.output == "training with 0.25\na warning\n" == p.tasks.output(task.id)
    run = p.runs.get(done.run)
    assert run.status == "complete" and run.task == task.id and run.hyper_parameters == {"lr": 0.25}


def test_globals_never_leak_into_the_next_task(p, tmp_path):
    path = script(tmp_path, "leak.py", """
        seen = sorted(name for name in ("a", "b", "leaked") if name in globals())
        leaked = 1
    """)
    first = p.tasks.create("leak", path, hyper_parameters={"a": 1}, saved_result_keys=["seen"])
    second = p.tasks.create("leak", path, hyper_parameters={"b": 2}, saved_result_keys=["seen"])
    assert work(p, "leak") == 2
    assert first.refresh().result == {"seen": ["a"]} and second.refresh().result == {"seen": ["b"]}


def test_callable_targets(p, tmp_path, monkeypatch):
    script(tmp_path, "helpers_mlw.py", """
        def train(lr, n=1):
            return {"accuracy": lr * n, "extra": "dropped"}

        def plus_one(x):
            return x + 1
    """)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    a = p.tasks.create("f", "helpers_mlw:train", hyper_parameters={"lr": 0.5, "n": 2}, saved_result_keys=["accuracy"])
    b = p.tasks.create("f", "helpers_mlw:plus_one", hyper_parameters={"x": 1}, saved_result_keys=["y"])
    c = p.tasks.create("f", "builtins:dict", hyper_parameters={"k": "v"})
    assert work(p, "f", concurrency=2) == 3
    assert a.refresh().result == {"accuracy": 1.0}
    assert b.refresh().result == {"y": 2}
    assert c.refresh().result == {"k": "v"}


def test_poison_task_fails_after_max_attempts_and_others_are_unaffected(p, tmp_path):
    bad = script(tmp_path, "poison.py", """
        def step():
            raise ValueError("poisoned input")
        step()
    """)
    good = script(tmp_path, "good.py", "ok = True\n")
    poison = p.tasks.create("mix", bad, max_attempts=2, priority=1)
    fine = p.tasks.create("mix", good, saved_result_keys=["ok"])
    assert work(p, "mix") == 3
    done = poison.refresh()
    assert done.status == "failed" and done.attempts == 2
    assert 'File "poison.py", line 3, in step' in done.error and "ValueError: poisoned input" in done.error
    assert "tasks/runtime.py" not in done.error  # the traceback starts in the user's code
    assert p.runs.get(done.run).status == "failed"
    assert fine.refresh().status == "finished" and fine.refresh().result == {"ok": True}


def test_bad_tasks_fail_clearly_and_the_worker_keeps_going(p, tmp_path):
    never = p.tasks.create("bad", script(tmp_path, "never.py", "x = 1\n"), saved_result_keys=["accuracy"])
    unstorable = p.tasks.create("bad", script(tmp_path, "obj.py", "accuracy = object()\n"),
                                saved_result_keys=["accuracy"])
    missing = p.tasks.create("bad", "no_such_module_mlw:train")
    crash = p.tasks.create("bad", script(tmp_path, "crash.py", "import os\nos._exit(3)\n"), max_attempts=1)
    exits = p.tasks.create("bad", script(tmp_path, "exits.py", "import sys\nsys.exit(2)\n"), max_attempts=1)
    good = p.tasks.create("bad", script(tmp_path, "fine.py", "import sys\nresult = 7\nsys.exit(0)\n"),
                          saved_result_keys=["result"])
    work(p, "bad")
    assert never.refresh().error == "result key 'accuracy' was never set by the script 'never.py'"
    assert "result 'accuracy': a object cannot be stored" in unstorable.refresh().error
    assert "module 'no_such_module_mlw' cannot be imported" in missing.refresh().error
    assert "exited with status 3 without reporting a result" in crash.refresh().error
    assert "sys.exit(2)" in exits.refresh().error
    for task in (never, unstorable, missing, crash, exits):
        assert task.refresh().status == "failed" and task.refresh().attempts == 1  # no pointless retries
    assert good.refresh().result == {"result": 7}


def test_timeout_kills_the_task_and_counts_attempts(p, tmp_path):
    path = script(tmp_path, "slow.py", """
        import os, time
        open(os.path.join(folder, f"{os.getpid()}.pid"), "w").close()
        time.sleep(60)
    """)
    # 3 s, not less: under load a fresh interpreter may need over a second to reach the script's first line
    task = p.tasks.create("slow", path, hyper_parameters={"folder": str(tmp_path)}, timeout=3, max_attempts=2)
    started = time.monotonic()
    work(p, "slow", kill_grace=1.0)
    assert time.monotonic() - started < 15
    done = task.refresh()
    assert done.status == "failed" and done.attempts == 2 and done.error.startswith("timed out after 3 s")
    pids = [int(f.stem) for f in tmp_path.glob("*.pid")]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)
    assert p.runs.get(done.run).status == "failed"


def test_a_worker_only_takes_its_task_name(p):
    mine = p.tasks.create("X", "builtins:dict", hyper_parameters={"v": 1})
    other = p.tasks.create("Y", "builtins:dict", hyper_parameters={"v": 2})
    assert work(p, "X") == 1
    assert mine.refresh().status == "finished" and other.refresh().status == "pending"


def test_cancel_while_running_kills_the_task(p, tmp_path):
    path = script(tmp_path, "long.py", """
        import os, time
        open(os.path.join(folder, "pid"), "w").write(str(os.getpid()))
        time.sleep(60)
        done = True
    """)
    task = p.tasks.create("long", path, hyper_parameters={"folder": str(tmp_path)}, saved_result_keys=["done"])
    worker = Worker(p, "long", lease_seconds=1.2, verbose=False, kill_grace=1.0)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text())
        pid = int((tmp_path / "pid").read_text())
        assert p.tasks.cancel({"task_name": "long"}) == 1
        wait_for(lambda: not alive(pid), timeout=5)
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
    done = task.refresh()
    assert done.status == "cancelled" and done.result is None
    assert p.runs.get(done.run).status == "failed"


def test_run_one_runs_the_top_matching_task(p):
    p.tasks.create("one", "builtins:dict", hyper_parameters={"v": 1})
    top = p.tasks.create("one", "builtins:dict", hyper_parameters={"v": 2}, priority=3)
    worker = Worker(p, "one", verbose=False)
    ran = worker.run_one()
    assert ran.id == top.id and ran.status == "finished" and ran.result == {"v": 2}
    assert worker.run_one(where={"hyper_parameters.v": 5}) is None
    assert worker.run_one(sort=[("_id", -1)]).result == {"v": 1}
    assert worker.run_one() is None


def test_a_claim_draws_a_lease_that_a_later_claim_by_the_same_worker_replaces(p):
    p.tasks.create("lease", "builtins:dict")
    first = p.tasks.claim("lease", "w1")
    assert first.get("lease") and p.tasks.heartbeat(first.id, "w1", lease=first.get("lease"))
    p.tasks.cancel(first.id)
    p.tasks.retry(first.id)
    second = p.tasks.claim("lease", "w1")  # the same worker claims the retried task again
    assert second.id == first.id and second.get("lease") != first.get("lease")
    assert not p.tasks.heartbeat(first.id, "w1", lease=first.get("lease"))  # the old attempt is not the owner
    assert not p.tasks.finish(first.id, "w1", {}, lease=first.get("lease"))
    assert p.tasks.finish(second.id, "w1", {}, lease=second.get("lease"))


def test_exits_threads_bad_callables_and_a_briefly_unavailable_warehouse(p, tmp_path, monkeypatch):
    script(tmp_path, "exits_mlw.py", """
        import sys

        def done():
            sys.exit(0)
    """)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    quits = p.tasks.create("edge", "exits_mlw:done")
    lingering = p.tasks.create("edge", script(tmp_path, "linger.py", """
        import threading, time
        threading.Thread(target=time.sleep, args=(3600,)).start()  # not a daemon: would hold the exit
        acc = 0.9
    """), saved_result_keys=["acc"], timeout=30)
    real, calls = p.tasks.finish, []

    def flaky(*args, **kwargs):  # the first result to record meets a warehouse that is briefly unavailable
        calls.append(1)
        if len(calls) == 1:
            raise BackendError("database is locked (simulated)")
        return real(*args, **kwargs)
    started = time.monotonic()
    worker = Worker(p, "edge", once=True, verbose=False, lease_seconds=10)
    worker.tasks.finish = flaky
    assert worker.run() == 2 and time.monotonic() - started < 25
    assert quits.refresh().status == "finished" and p.find("runs", {"task": quits.id})[0]["status"] == "complete"
    done = lingering.refresh()
    assert done.status == "finished" and done.result == {"acc": 0.9} and done.attempts == 1
    assert len(calls) == 3 and len(p.find("runs", {"task": lingering.id})) == 1
    import collections
    import functools
    for bad in (functools.partial(dict, a=1), collections.Counter().update):
        with pytest.raises(TaskError, match="bound method or a partial"):
            p.tasks.create("edge", bad)
