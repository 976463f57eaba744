"""Queue semantics of ``project.tasks``, without running any task code."""

from __future__ import annotations

import time

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.errors import InvalidDocument, NotFound, TaskError, TaskFailed
from mlwarehouse.tasks.queue import OUTPUT_TAIL, current_task
from mlwarehouse.tasks.sweeps import config_hash, expand


@pytest.fixture
def p(wh):
    return wh.project("q")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("accuracy = lr * 2\nprint('trained')\n")
    return path


def test_create_stores_the_script_source_and_its_hash(p, script):
    task = p.tasks.create("train", script, hyper_parameters={"lr": np.float32(0.5)}, saved_result_keys="accuracy",
                          priority=2, tags="mnist", note="first")
    assert task.status == "pending" and task.attempts == 0 and task.max_attempts == 3
    assert task.hyper_parameters == {"lr": 0.5} and task.saved_result_keys == ["accuracy"]
    assert task.script["kind"] == "file" and task.script["filename"] == "train.py"
    assert bytes(p.unpack(task.script["source"])) == script.read_bytes()
    assert task.tags == ["mnist"] and task.note == "first" and task.priority == 2
    assert p.tasks.get(task.id) == task
    assert task.config_hash == config_hash({"lr": 0.5})


def test_create_names_a_callable_target(p):
    task = p.tasks.create("noop", "builtins:dict", hyper_parameters={"a": 1})
    assert task.script == {"kind": "callable", "target": "builtins:dict"}
    assert p.tasks.create("noop", np.mean).script == {"kind": "callable", "target": "numpy:mean"}


def test_bad_input_is_refused_when_creating(p, tmp_path):
    with pytest.raises(TaskError, match="nope.py"):
        p.tasks.create("t", str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\ny = (\n")
    with pytest.raises(TaskError, match=r"bad.py.*syntax error at line \d"):
        p.tasks.create("t", bad)
    with pytest.raises(InvalidDocument, match="hyper_parameters.w"):
        p.tasks.create("t", "builtins:dict", hyper_parameters={"w": np.zeros(3)})
    with pytest.raises(InvalidDocument, match="hyper_parameters.f"):
        p.tasks.create("t", "builtins:dict", hyper_parameters={"f": object()})
    with pytest.raises(InvalidDocument, match="status"):
        p.tasks.create("t", "builtins:dict", status="finished")
    with pytest.raises(TaskError, match="max_attempts"):
        p.tasks.create("t", "builtins:dict", max_attempts=0)
    with pytest.raises(TaskError, match="identifier"):
        p.tasks.create("t", "builtins:dict", saved_result_keys=["not valid"])
    with pytest.raises(TaskError, match="top level"):
        p.tasks.create("t", lambda: 1)
    assert p.tasks.find() == []


def test_sweep_skips_configs_that_exist(p, script):
    first = p.tasks.sweep("train", script, grid={"lr": [0.1, 0.2], "n": [1, 2]}, saved_result_keys=["accuracy"])
    assert [t.hyper_parameters for t in first] == [{"lr": 0.1, "n": 1}, {"lr": 0.1, "n": 2},
                                                   {"lr": 0.2, "n": 1}, {"lr": 0.2, "n": 2}]
    again = p.tasks.sweep("train", script, configs=[{"n": 1, "lr": 0.1}, {"lr": 0.3, "n": 1}, {"lr": 0.3, "n": 1}])
    assert [t.hyper_parameters for t in again] == [{"lr": 0.3, "n": 1}]
    assert len({t.script["source"]["_blob"] for t in p.tasks.find()}) == 1  # one blob for the shared script
    assert len(p.tasks.sweep("other", script, configs=[{"lr": 0.1, "n": 1}])) == 1  # per task name
    with pytest.raises(TaskError, match="exactly one"):
        expand()
    with pytest.raises(TaskError, match="list of values"):
        expand(grid={"lr": 0.1})


def test_claim_takes_priority_then_age_and_only_its_task_name(p):
    low = p.tasks.create("a", "builtins:dict")
    high = p.tasks.create("a", "builtins:dict", priority=5)
    other = p.tasks.create("b", "builtins:dict", priority=9)
    first = p.tasks.claim("a", "w1", 10)
    assert first.id == high.id and first.status == "running" and first.worker == "w1" and first.attempts == 1
    assert first.lease_until > time.time() + 9
    assert p.tasks.claim("a", "w2", 10).id == low.id
    assert p.tasks.claim("a", "w3", 10) is None
    assert p.tasks.get(other.id).status == "pending"
    assert not p.tasks.has_pending("a") and p.tasks.has_pending("b")


def test_only_the_owner_heartbeats_and_finishes_once(p):
    task = p.tasks.create("a", "builtins:dict")
    p.tasks.claim("a", "w1", 10)
    assert p.tasks.heartbeat(task.id, "w1", 10) and not p.tasks.heartbeat(task.id, "w2", 10)
    assert not p.tasks.finish(task.id, "w2", {"x": 1})
    assert p.tasks.finish(task.id, "w1", {"x": 2}, output=b"hello\n")
    assert not p.tasks.finish(task.id, "w1", {"x": 3})
    done = p.tasks.get(task.id)
    assert (done.status, done.result, done.output) == ("finished", {"x": 2}, "hello\n")
    assert done.ended >= done.started >= done.created


def test_fail_retries_until_max_attempts_and_keeps_the_traceback(p):
    task = p.tasks.create("a", "builtins:dict", max_attempts=2)
    p.tasks.claim("a", "w", 10)
    assert p.tasks.fail(task.id, "w", "Traceback 1") == "pending"
    p.tasks.claim("a", "w", 10)
    assert p.tasks.fail(task.id, "w", "Traceback 2") == "failed"
    done = p.tasks.get(task.id)
    assert (done.status, done.attempts, done.error) == ("failed", 2, "Traceback 2")
    other = p.tasks.create("a", "builtins:dict")
    p.tasks.claim("a", "w", 10)
    assert p.tasks.fail(other.id, "w", "bad script", retry=False) == "failed"
    assert p.tasks.fail(other.id, "w", "again") is None  # no longer ours


def test_release_does_not_count_the_attempt(p):
    task = p.tasks.create("a", "builtins:dict")
    p.tasks.claim("a", "w", 10)
    assert p.tasks.release(task.id, "w")
    again = p.tasks.get(task.id)
    assert (again.status, again.attempts, again.worker) == ("pending", 0, None)


def test_expired_leases_requeue_then_fail(p):
    task = p.tasks.create("a", "builtins:dict", max_attempts=2)
    p.tasks.claim("a", "w1", -1)  # a lease that has already expired: the worker died
    assert p.tasks.requeue_expired("b") == 0
    assert p.tasks.requeue_expired("a") == 1
    assert p.tasks.get(task.id).status == "pending"
    p.tasks.claim("a", "w2", 10)
    assert p.tasks.requeue_expired() == 0  # w2's lease is alive
    p.update("tasks", {"_id": task.id}, {"$set": {"lease_until": time.time() - 1, "error": "Traceback: boom"}})
    assert p.tasks.requeue_expired() == 1
    done = p.tasks.get(task.id)
    assert done.status == "failed" and done.attempts == 2
    assert done.error.startswith("lease expired after 2 attempts (worker w2 stopped heartbeating)")
    assert "Traceback: boom" in done.error


def test_cancel_retry_delete(p, script):
    tasks = [p.tasks.create("a", script, hyper_parameters={"lr": i}) for i in range(3)]
    p.tasks.claim("a", "w", 10)
    assert p.tasks.cancel([tasks[0], tasks[1].id]) == 2
    assert p.tasks.get(tasks[0].id).status == "cancelled"
    assert not p.tasks.heartbeat(tasks[0].id, "w", 10)  # its worker learns it was cancelled
    assert p.tasks.retry({"task_name": "a"}) == 2
    assert {t.status for t in p.tasks.find(task_name="a")} == {"pending"}
    assert [t.attempts for t in p.tasks.find(status=["pending"])] == [0, 0, 0]
    assert p.tasks.delete(where={"_id": tasks[2].id}) == 1 and p.tasks.delete() == 2
    with pytest.raises(NotFound):
        p.tasks.get(tasks[0].id)


def test_find_filters(p):
    for i in range(4):
        p.tasks.create("a" if i % 2 else "b", "builtins:dict", hyper_parameters={"i": i}, owner="ann" if i else "bo")
    assert len(p.tasks.find(task_name="a")) == 2
    assert [t.hyper_parameters["i"] for t in p.tasks.find(where={"owner": "ann"}, sort=[("hyper_parameters.i", -1)])] \
        == [3, 2, 1]
    assert len(p.tasks.find("b", where={"hyper_parameters.i": {"$gte": 1}}, status="pending")) == 1
    assert p.tasks.has_unfinished("a") and p.tasks.has_unfinished(where={"owner": "bo"})
    assert not p.tasks.has_unfinished("zzz")


def test_long_output_is_stored_whole_as_a_blob(p):
    task = p.tasks.create("a", "builtins:dict")
    p.tasks.claim("a", "w", 10)
    text = "".join(f"line {i}\n" for i in range(20000))
    p.tasks.finish(task.id, "w", {}, output=text.encode())
    stored = p.tasks.get(task.id)
    assert len(stored.output.encode()) == OUTPUT_TAIL and text.endswith(stored.output)
    assert stored.output_size == len(text) and p.tasks.output(task.id) == text
    assert stored.output_blob["_blob"] in stored._blobs  # referenced, so gc keeps it


def test_wait_returns_records_and_times_out(p):
    a = p.tasks.create("a", "builtins:dict")
    b = p.tasks.create("a", "builtins:dict")
    with pytest.raises(TaskError, match="2 of 2 tasks still unfinished"):
        p.tasks.wait([a, b.id], timeout=0.2, poll=0.05)
    for t in (a, b):
        p.tasks.claim("a", "w", 10)
    p.tasks.finish(a.id, "w", {"x": 1})
    p.tasks.fail(b.id, "w", "Traceback: boom", retry=False)
    done = p.tasks.wait([b, a], progress=False)
    assert [t.status for t in done] == ["failed", "finished"]
    assert [t.status for t in p.tasks.wait({"task_name": "a"})] == ["finished", "failed"]
    with pytest.raises(TaskFailed, match="boom") as info:
        p.tasks.wait([a, b], raise_on_failure=True)
    assert info.value.task["_id"] == b.id
    with pytest.raises(NotFound):
        p.tasks.wait(["nope"], timeout=1)


def test_current_task_is_none_outside_a_task():
    assert current_task() is None and mlwarehouse.current_task() is None


def test_wait_reads_only_unended_tasks_and_waits_again_for_one_retried_meanwhile(p, monkeypatch):
    a = p.tasks.create("a", "builtins:dict", max_attempts=1)
    b = p.tasks.create("a", "builtins:dict")
    p.tasks.claim("a", "w", 10)
    p.tasks.fail(a.id, "w", "boom")  # ended; b is still pending
    reads, real = [], p.tasks._by_ids

    def by_ids(ids, projection=None):
        reads.append(list(ids))
        docs = real(ids, projection=projection)
        if len(reads) == 1:  # after the first poll saw a ended: a is retried, b runs and ends
            p.tasks.retry(a.id)
            p.tasks.claim("a", "w", 10, sort=[("_id", -1)])
            p.tasks.finish(b.id, "w", {"b": 1})
        elif len(reads) == 3:  # the whole read found a pending again: it runs and ends
            p.tasks.claim("a", "w", 10)
            p.tasks.finish(a.id, "w", {"a": 1})
        return docs
    monkeypatch.setattr(p.tasks, "_by_ids", by_ids)
    done = p.tasks.wait([a, b], timeout=10, poll=0.01, progress=False)
    assert [(t.id, t.status, t.result) for t in done] == [(a.id, "finished", {"a": 1}), (b.id, "finished", {"b": 1})]
    assert reads[0] == [a.id, b.id] and reads[1] == [b.id]  # a poll leaves out the tasks seen ended
    assert reads[2] == [a.id, b.id] and reads[3] == [a.id]  # the whole read, then a alone again
