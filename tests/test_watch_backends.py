"""Watching a query on every backend set: order, exact matches, acknowledged resumes, late commits and wake-ups
(NOTIFY on PostgreSQL wakes a watch at once; elsewhere it polls)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse import schema
from mlwarehouse.ids import new_id
from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

PROJECT = "watch"


def names(events) -> list:
    return [e.document["name"] for e in events]


class WatchTests:
    def test_order_and_exact_matches(self, wh):
        c = wh.collection("things")
        c.insert_one({"name": "before", "n": 1})
        w = wh.watch("things", where={"n": {"$lt": 10}}, timeout=0)
        assert list(w) == []  # starts now
        c.insert_many([{"name": f"a{i}", "n": i, "v": np.arange(i + 1)} for i in range(5)])
        c.insert_one({"name": "big", "n": 100})
        events = list(w)
        assert names(events) == [f"a{i}" for i in range(5)]
        assert [e.change for e in events] == sorted(e.change for e in events)
        assert isinstance(events[2].document["v"], np.ndarray) and events[2].document["v"].tolist() == [0, 1, 2]
        assert "_rev" not in events[0].document and events[0].collection == "things"
        c.update_one({"name": "big"}, {"$set": {"n": 3}})  # starts matching: an event
        c.update_one({"name": "a1"}, {"$set": {"n": 50}})  # stops matching: none
        c.delete_one({"name": "a2"})                        # deleted: none
        assert names(w) == ["big"]
        everything = wh.watch("things", start="beginning", timeout=0)
        assert sorted(names(everything)) == sorted(["before", "a0", "a1", "a3", "a4", "big"])

    def test_consumer_resumes_with_unacknowledged(self, wh):
        c = wh.collection("jobs")
        c.insert_many([{"name": f"j{i}"} for i in range(6)])
        first = wh.watch("jobs", consumer="worker", start="beginning", timeout=0)
        events = list(first)
        assert names(events) == [f"j{i}" for i in range(6)]
        events[0].ack()
        first.ack(events[1], events[3])  # j2 not acknowledged: it comes again, and so do j4, j5
        del first                        # a crash: nothing else stored
        again = wh.watch("jobs", consumer="worker", timeout=0)
        redelivered = list(again)
        assert names(redelivered) == ["j2", "j4", "j5"]
        again.ack(*redelivered)
        c.insert_one({"name": "j6"})
        third = wh.watch("jobs", consumer="worker", timeout=0)
        got = list(third)
        assert names(got) == ["j6"]
        other = wh.watch("jobs", consumer="other", timeout=0)  # another name: its own place (starts now)
        assert list(other) == []

    def test_late_commit_is_delivered(self, wh):
        wh.datasets.save([1, 2, 3], "first")
        early = new_id()  # a slow writer made this id, then committed after newer ones
        w = wh.watch(schema.DATASETS, timeout=0, consumer="late")
        wh.datasets.save([4], "second")
        assert [e.document["name"] for e in w] == ["second"]
        wh.insert(schema.DATASETS.name, {"_id": early, "name": "late", "version": 1})
        assert [e.document["name"] for e in w] == ["late"]
        assert list(w) == []
        c = wh.collection("docs")
        w = wh.watch(c, timeout=0)
        old_rev = new_id()
        c.insert_one({"name": "new"})
        assert names(w) == ["new"]
        c.table.insert_many([{"_id": "slow", "_rev": old_rev, "name": "slow", "_fold": "train"}])
        assert names(w) == ["slow"]

    def test_updates_in_place_are_changes(self, wh):
        before = {"_id": new_id(), "project": wh.project().name, "name": "old", "status": "complete"}
        wh.index.insert_one(schema.RUNS.name, before)  # written before revisions existed: no _rev
        run = wh.runs.start("r1")
        w = wh.watch("runs", where={"status": "complete"}, consumer="ends", start="beginning", timeout=0)
        assert [e.document["name"] for e in w] == ["old"]  # given its _id as _rev when the watch opened
        assert wh.index.find_one(schema.RUNS.name, {"_id": before["_id"]})["_rev"] == before["_id"]
        run.finish()
        (ended,) = list(w)
        assert ended.document["name"] == "r1" and ended.change > ended.id and ended.change == ended.document["_rev"]
        tasks = [wh.tasks.create("job", hyper_parameters={"i": i}) for i in range(3)]
        cancelled = wh.watch("tasks", where={"status": "cancelled"}, timeout=0)
        assert wh.tasks.cancel({"task_name": "job"}) == 3  # one update, three changes with revisions of their own
        events = list(cancelled)
        assert sorted(e.id for e in events) == sorted(t.id for t in tasks) and len({e.change for e in events}) == 3
        assert list(cancelled) == []

    def test_wake_latency(self, wh):
        poll = 5.0 if wh.wakes_on_writes else 0.1
        w = wh.watch("pings", poll=poll, timeout=8)
        wh.collection("pings").table.listen(0.01)  # listening before the writer's first write (as the watch does)
        writer = mlwarehouse.connect()  # another connection, as another process writes
        sent: list[float] = []

        def write():
            time.sleep(0.5)
            sent.append(time.monotonic())
            writer.collection("pings").insert_one({"name": "ping"})

        thread = threading.Thread(target=write)
        started = time.monotonic()
        thread.start()
        try:
            event = next(iter(w))
            latency = time.monotonic() - sent[0]
        finally:
            thread.join()
            writer.close()
        assert event.document["name"] == "ping"
        assert latency < 1.5, (latency, poll)
        assert time.monotonic() - started < poll + 1.5


class TestSQLiteAndFiles(WatchTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)


class TestPostgresAndS3(WatchTests):
    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestMongoAndGridFS(WatchTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)
