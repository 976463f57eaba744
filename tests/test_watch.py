"""Watching a query on the embedded warehouse: bad input, acknowledgement bookkeeping, paging, naming, and a
consumer process SIGKILLed mid-stream while two writer processes write (every event delivered at least once,
acknowledged ones never again). The conformance over every backend set is in test_watch_backends.py."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import wait_for

from mlwarehouse import schema
from mlwarehouse.collections import watch as watching
from mlwarehouse.errors import QueryError


def names(events) -> list:
    return [e.document["name"] for e in events]


@pytest.mark.parametrize("kwargs", [
    {"where": {"price": {"$bogus": 1}}},
    {"where": {"$where": "1"}},
    {"where": {"a..b": 1}},
    {"where": ["not", "a", "dict"]},
    {"where": {"n": 1}, "start": "yesterday"},
    {"consumer": ""},
    {"consumer": 7},
    {"poll": -1},
    {"timeout": "soon"},
    {"batch": 0},
])
def test_bad_watch_raises_and_stores_nothing(wh, kwargs):
    wh.collection("stock").insert_one({"name": "x", "price": 1})
    before = sorted(wh.index.collections())
    with pytest.raises(QueryError):
        wh.watch("stock", consumer=kwargs.pop("consumer", "c"), **kwargs)
    assert sorted(wh.index.collections()) == before
    assert schema.WATCHES.name not in before


@pytest.mark.parametrize("collection", [schema.META, "meta", schema.WATCHES.name, 42, ""])
def test_unwatchable_collections(wh, collection):
    with pytest.raises(QueryError):
        wh.watch(collection)


def test_consumer_keeps_its_filter(wh):
    wh.watch("stock", where={"n": 1}, consumer="c")
    wh.watch("stock", where={"n": 1}, consumer="c")
    with pytest.raises(QueryError, match="another consumer"):
        wh.watch("stock", where={"n": 2}, consumer="c")
    wh.watch("stock", where={"n": 2}, consumer="d")


def test_out_of_order_acks_survive_a_restart(wh):
    c = wh.collection("q")
    c.insert_many([{"name": f"d{i}"} for i in range(8)])
    w = wh.watch("q", consumer="c", start="beginning", timeout=0)
    events = list(w)
    w.ack(events[5], events[6])  # later ones acknowledged, the first five not
    state = wh.find_one(schema.WATCHES.name, {"consumer": "c"})
    assert state["resume"] == events[0].change and len(state["acked"]) == 2
    assert names(wh.watch("q", consumer="c", timeout=0)) == ["d0", "d1", "d2", "d3", "d4", "d7"]


def test_pages_through_the_beginning_in_batches(wh):
    c = wh.collection("many")
    c.insert_many([{"name": f"{i:04d}"} for i in range(1234)])
    w = wh.watch("many", start="beginning", batch=100, timeout=0)
    got = names(w)
    assert got == [f"{i:04d}" for i in range(1234)]


def test_timeout_ends_an_idle_watch(wh):
    w = wh.watch("idle", poll=0.05, timeout=0.3)
    started = time.monotonic()
    assert list(w) == []
    assert 0.25 < time.monotonic() - started < 2.0


def test_names_of_warehouse_collections_and_users_objects(wh):
    users_models = wh.collection("models")  # a users' collection named like the warehouse's
    by_object = wh.watch(users_models, timeout=0)
    by_name = wh.watch("models", timeout=0)
    users_models.insert_one({"name": "mine"})
    wh.insert(schema.MODELS.name, {"name": "registered", "kind": "model"})
    assert names(by_object) == ["mine"]
    assert names(by_name) == ["registered"]
    other = wh.warehouse.project("elsewhere")
    with pytest.raises(QueryError, match="belongs to project"):
        other.watch(users_models)


def test_unnamed_watch_acks_are_no_ops_and_events_belong_to_their_watch(wh):
    c = wh.collection("plain")
    w1, w2 = wh.watch("plain", timeout=0), wh.watch("plain", consumer="c2", timeout=0)
    c.insert_one({"name": "a"})
    (event,) = list(w1)
    event.ack()
    (other,) = list(w2)
    with pytest.raises(QueryError, match="delivered it"):
        w2.ack(event)
    other.ack()
    w2.forget()
    assert wh.find_one(schema.WATCHES.name, {"consumer": "c2"}) is None


def test_window_holds_what_a_slow_writer_commits(wh, monkeypatch):
    """A change older than the look-back window is assumed seen (the stated limit of exactness)."""
    monkeypatch.setattr(watching, "LOOKBACK_MS", 50)
    c = wh.collection("slow")
    from mlwarehouse.ids import new_id
    stale = new_id()
    time.sleep(0.2)
    w = wh.watch("slow", timeout=0)
    c.insert_one({"name": "fresh"})
    assert names(w) == ["fresh"]
    c.table.insert_many([{"_id": "old", "_rev": stale, "name": "old", "_fold": "train"}])
    assert list(w) == []


WRITER = textwrap.dedent("""
    import sys, time, mlwarehouse
    who, count = int(sys.argv[1]), int(sys.argv[2])
    c = mlwarehouse.connect().collection("stream")
    for i in range(count):
        c.insert_one({"w": who, "i": i, "keep": i % 3 != 0})
        time.sleep(0.015)
""")

CONSUMER = textwrap.dedent("""
    import sys, time, mlwarehouse
    log = open(sys.argv[1], "a", buffering=1)
    w = mlwarehouse.connect().watch("stream", where={"keep": True}, consumer="copier", start="beginning",
                                    timeout=2.5)
    for event in w:
        doc = event.document
        log.write(f"got {event.change} {doc['w']}:{doc['i']} {int(doc['keep'])}\\n")
        time.sleep(0.005)  # the work an event asks for: a kill often lands here, before the ack
        event.ack()
        log.write(f"ack {event.change}\\n")
""")


@pytest.mark.slow
def test_consumer_sigkilled_mid_stream_loses_nothing(tmp_path, subprocess_env):
    per_writer = 250
    (tmp_path / "writer.py").write_text(WRITER)
    (tmp_path / "consumer.py").write_text(CONSUMER)
    rng = random.Random(16)

    def spawn(script, *args):
        return subprocess.Popen([sys.executable, str(tmp_path / script), *map(str, args)], env=subprocess_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    subprocess.run([sys.executable, "-c", "import mlwarehouse; mlwarehouse.connect().collection('stream')"
                    ".insert_one({'w': -1, 'i': 0, 'keep': False})"], env=subprocess_env, check=True, timeout=60)
    writers = [spawn("writer.py", k, per_writer) for k in range(2)]
    logs = []
    for run in range(3):
        logs.append(tmp_path / f"run{run}.log")
        consumer = spawn("consumer.py", logs[-1])
        if run < 2:  # mid-stream: once it has delivered something, at a random moment
            wait_for(lambda: "got " in logs[-1].read_text() if logs[-1].exists() else False, timeout=30)
            time.sleep(rng.uniform(0.1, 0.8))
            consumer.send_signal(signal.SIGKILL)
            consumer.wait(timeout=30)
    for writer in writers:
        assert writer.wait(timeout=60) == 0, writer.stderr.read().decode()
    assert consumer.wait(timeout=60) == 0, consumer.stderr.read().decode()

    got: list[list[tuple[str, str]]] = []
    acked: list[set[str]] = []
    for path in logs:
        lines = path.read_text().splitlines()
        got.append([(line.split()[1], line.split()[2]) for line in lines if line.startswith("got ")
                    and line.count(" ") == 3])
        acked.append({line.split()[1] for line in lines if line.startswith("ack ") and line.count(" ") == 1})
        assert all(line.split()[3] == "1" for line in lines if line.startswith("got ") and line.count(" ") == 3)
    expected = {f"{k}:{i}" for k in range(2) for i in range(per_writer) if i % 3 != 0}
    delivered = {doc for run in got for _, doc in run}
    assert delivered == expected  # none lost, none that does not match
    assert got[0] and got[1], json.dumps([len(r) for r in got])  # the kills landed mid-stream
    for run in range(1, 3):
        earlier = set().union(*acked[:run])
        assert not {change for change, _ in got[run]} & earlier  # acknowledged: never again
    for run in got:
        changes = [change for change, _ in run]
        assert len(changes) == len(set(changes))  # within one process, once


def test_whole_window_is_reread_for_later_commits(wh, monkeypatch):
    """A change committed later than RECENT_MS after its id was made comes at the next whole-window read."""
    monkeypatch.setattr(watching, "RECENT_MS", 50)
    monkeypatch.setattr(watching, "WINDOW_SECONDS", 0.3)
    c = wh.collection("later")
    from mlwarehouse.ids import new_id
    stale = new_id()
    time.sleep(0.2)
    w = wh.watch("later", poll=0.05, timeout=0)
    c.insert_one({"name": "fresh"})
    assert names(w) == ["fresh"]
    c.table.insert_many([{"_id": "late", "_rev": stale, "name": "late", "_fold": "train"}])
    w.timeout = 1.0  # a few whole-window reads
    assert names(w) == ["late"]
