"""The background log writer: no I/O on the caller's thread, batching, errors surfaced, bounded memory, exit."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from conftest import PYTHON

import mlwarehouse
from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.errors import InvalidDocument
from mlwarehouse.index.sqlite import SQLiteIndex
from mlwarehouse.runs import blocks
from mlwarehouse.runs.logwriter import LogWriter, _BatchIds
from mlwarehouse.warehouse import Warehouse


class SlowIndex(SQLiteIndex):
    """The real SQLite index, with each insert_many slowed down and counted."""

    delay = 0.3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inserts: list[int] = []

    def insert_many(self, collection, docs, *, chunk_size=None):
        time.sleep(self.delay)
        docs = list(docs)
        self.inserts.append(len(docs))
        return super().insert_many(collection, docs, chunk_size=chunk_size)


def _project(index, tmp_path):
    """Project "p" of a warehouse over ``index`` (the writer goes through the Project)."""
    return Warehouse(index, FileBlobStore(tmp_path / "blobs")).project("p")


@pytest.fixture
def slow(tmp_path):
    index = SlowIndex(tmp_path / "index.sqlite")
    index.ensure_collection("runs")
    yield index
    index.close()


def test_put_returns_at_once_and_flush_makes_durable(slow, tmp_path):
    project = _project(slow, tmp_path)
    writer = LogWriter(project, interval=0.05)
    start = time.perf_counter()
    for step in range(2000):
        writer.put({"run": None, "kind": "train", "step": step, "loss": 1.0, "time": time.time()})
    assert time.perf_counter() - start < 0.25  # a single write takes 0.3 s: nothing waited for one
    writer.flush()
    assert writer.pending == 0 and blocks.count_points(project) == 2000
    assert len(slow.inserts) <= 3  # batched, not one write per point
    assert slow.count("logs") <= 3  # a block per write: 2000 points are not 2000 rows
    points = blocks.read_points(project)
    assert [p["step"] for p in points] == list(range(2000))
    assert points[0]["project"] == "p" and len(points[0]["_id"].split(".")[0]) == 26
    assert points[0]["time"].endswith("Z")
    stored = list(slow.find("logs", sort=[("_id", 1)]))
    assert [d["step"] for d in stored] == sorted(d["step"] for d in stored)  # ids follow logging order
    writer.close()


def test_writer_error_is_raised_on_the_next_call_then_logging_goes_on(tmp_path):
    index = SQLiteIndex(tmp_path / "index.sqlite")
    project = _project(index, tmp_path)
    writer = LogWriter(project, interval=0.01)
    writer.put({"run": None, "kind": "train", "x": object()})  # not JSON (run.log refuses it): fails in the thread
    time.sleep(0.2)
    with pytest.raises(InvalidDocument, match="1 log points were not written"):
        writer.put({"run": None, "kind": "train", "x": 1.0})
    writer.put({"run": None, "kind": "train", "x": 2.0})
    writer.flush()
    assert sorted(d["x"] for d in blocks.read_points(project)) == [2.0]
    writer.put({"run": None, "kind": "train", "x": "\ud800"})  # a lone surrogate: no UTF-8 for it
    with pytest.raises(InvalidDocument):
        writer.flush()
    writer.close()
    index.close()


def test_memory_is_bounded_by_waiting_for_the_writer(slow, tmp_path):
    slow.delay = 0.05
    project = _project(slow, tmp_path)
    writer = LogWriter(project, interval=0.01, max_pending=100)
    seen = []
    watcher = threading.Thread(target=lambda: [seen.append(len(writer._pending)) or time.sleep(0.002)
                                               for _ in range(300)])
    watcher.start()
    for step in range(1000):
        writer.put({"run": None, "kind": "train", "step": step})
    watcher.join()
    writer.close()
    assert max(seen) <= 100 and blocks.count_points(project) == 1000


def test_summaries_kept_in_memory_and_written_per_batch(wh):
    run = wh.runs.start("r")
    writer = wh.runs.writer
    for step in range(12000):  # more than one batch
        run.log(step=step, loss=float(12000 - step), acc=step % 7)
    run.log("valid", acc=None)
    run.flush()
    summary = wh.runs.get(run.id).summary
    assert summary["train"]["loss"] == {"last": 1.0, "last_step": 11999, "min": 1.0, "min_step": 11999,
                                        "max": 12000.0, "max_step": 0, "count": 12000, "nulls": 0}
    assert summary["train"]["acc"]["max"] == 6 and summary["train"]["acc"]["max_step"] == 6
    assert summary["valid"]["acc"] == {"count": 0, "nulls": 1}
    assert run.id in writer._summaries
    run.finish()
    run.log("late", x=1.0)  # a finished run may still log: its summaries are reloaded from the index
    run.flush()
    assert wh.runs.get(run.id).summary["train"]["loss"]["count"] == 12000
    assert wh.runs.get(run.id).summary["late"]["x"]["count"] == 1


def test_points_keep_their_own_time_and_summaries_stay_in_their_project(wh):
    run = wh.runs.start("r")
    other = wh.project("other").runs.start("o")
    writer = wh.runs.writer
    writer.put({"run": run.id, "kind": "train", "step": 0, "loss": 1.0, "time": 1.25})
    writer.put({"run": other.id, "kind": "train", "step": 0, "loss": 2.0, "time": 1.25})  # another project's run
    writer.flush()
    assert [d["time"] for d in wh.runs.find_logs(run=run)] == ["1970-01-01T00:00:01.250000Z"]  # not the write's
    assert wh.runs.get(run.id).summary["train"]["loss"]["count"] == 1
    assert wh.project("other").runs.get(other.id).summary == {}  # the writer goes through its own Project


def test_close_is_final(tmp_path):
    index = SQLiteIndex(tmp_path / "index.sqlite")
    writer = LogWriter(_project(index, tmp_path))
    writer.put({"run": None, "kind": "t", "x": 1})
    writer.close()
    writer.close()
    assert index.count("logs") == 1 and not writer._thread.is_alive()
    with pytest.raises(mlwarehouse.BackendError, match="closed"):
        writer.put({"run": None, "kind": "t", "x": 2})
    index.close()


def test_pending_points_are_flushed_at_interpreter_exit(tmp_path, subprocess_env):
    script = (
        "import mlwarehouse\n"
        "wh = mlwarehouse.connect()\n"
        "run = wh.runs.start('exit')\n"
        "for i in range(3000):\n"
        "    run.log(step=i, loss=1.0)\n"
        "print(run.id)\n"  # no finish, no close: atexit must write the points
    )
    proc = subprocess.run([PYTHON, "-c", script], env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        run = wh.runs.get(proc.stdout.strip())
        assert wh.runs.count_logs(run=run) == 3000
        assert run.summary["train"]["loss"]["count"] == 3000


def test_forked_child_logs_on_its_own(tmp_path, subprocess_env):
    script = (
        "import os, mlwarehouse\n"
        "wh = mlwarehouse.connect()\n"
        "run = wh.runs.start('fork')\n"
        "run.log(step=0, loss=1.0)\n"
        "run.flush()\n"
        "run.log(step=1, loss=1.0)\n"  # queued in the parent when it forks: written once, by the parent
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    run.log('child', step=0, x=2.0)\n"
        "    run.flush()\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "run.finish()\n"
        "print(run.id)\n"
    )
    proc = subprocess.run([PYTHON, "-c", script], env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        logs = wh.runs.find_logs(run=proc.stdout.strip(), sort=[("kind", 1), ("step", 1)])
        assert [(d["kind"], d["step"]) for d in logs] == [("child", 0), ("train", 0), ("train", 1)]


def test_batch_ids_are_unique_sorted_ulids():
    make = _BatchIds()
    ids = make(5000) + make(3) + make(1)
    assert len(set(ids)) == len(ids) and ids == sorted(ids) and {len(i) for i in ids} == {26}
    assert all(c in "0123456789ABCDEFGHJKMNPQRSTVWXYZ" for c in "".join(ids[:50]))


def _log_in_child(home, run_id):
    import mlwarehouse
    wh = mlwarehouse.connect(home=home)
    run = wh.runs.get(run_id)
    for step in range(300):
        run.log("train", step=1000 + step, loss=1.0)
    # no flush: the child ends with os._exit, the writer's finalizer flushes


def test_a_bad_point_drops_alone_and_multiprocessing_children_flush(tmp_path):
    import multiprocessing

    import mlwarehouse
    from mlwarehouse.errors import InvalidDocument
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        run = wh.runs.start("r")
        with pytest.raises(InvalidDocument, match="NUL"):
            run.log("train", step=0, note="a\0b")  # refused at the call
        writer = wh.project().runs.writer
        for step in range(5):
            writer.put({"run": run.id, "kind": "train", "step": step, "loss": 1.0, "time": 0.0,
                        "note": "bad\0" if step == 2 else "ok"})  # one bad point slips past log() checks
        with pytest.raises(InvalidDocument, match="1 log point"):
            run.flush()
        assert [p["step"] for p in run.history("train")] == [0, 1, 3, 4]
        assert run.refresh().summary["train"]["loss"]["count"] == 4
        ctx = multiprocessing.get_context("fork")
        proc = ctx.Process(target=_log_in_child, args=(str(tmp_path / "wh"), run.id))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        assert len(run.history("train")) == 304
