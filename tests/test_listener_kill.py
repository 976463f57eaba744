"""Listener workers SIGKILLed mid-batch while four processes write: every live document ends with exactly one output,
computed from its current input, and nothing is left running or pending.

Two :class:`~mlwarehouse.collections.worker.ListenerWorker` processes compute a ``compute="workers"`` listener (an
importable callable that sleeps per document, so a batch takes a while) while four writer processes insert,
update the listener's key and other fields, replace and delete documents. One worker is SIGKILLed after it claimed
a batch and replaced; the replacement is killed the same way and not replaced. The survivor requeues the expired
leases and sweeps up whatever no task covers; then every stored tree is checked against its input digest and the
model applied to its current input. Every process is a fresh interpreter (no fork of the test's state).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from urllib.parse import quote

import pytest
from conftest import wait_for

import mlwarehouse
from mlwarehouse.collections.documents import MISSING, digest, get_path
from mlwarehouse.schema import LISTENER_TASK
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

PROJECT, COLLECTION, LISTENER = "lk", "docs", "lin"
SEEDED = 480  # documents there before the listener is attached (its backfill is what the kills land in: 30 batches)
BATCH = 16
LEASE = 2.0

MODEL = textwrap.dedent("""
    import time

    W = [[((7 * i + 3 * j) % 11 - 5) / 5.0 for j in range(4)] for i in range(16)]
    B = [0.5, -0.25, 0.125, 0.0]


    def linear(xs):
        time.sleep(0.01 * len(xs))  # a batch of 16 takes 160 ms: long enough to be killed inside
        return [[round(sum(x[i] * W[i][j] for i in range(16)) + B[j], 9) for j in range(4)] for x in xs]
""")

WORKER = textwrap.dedent("""
    import sys
    import mlwarehouse
    from mlwarehouse.collections.worker import ListenerWorker
    ListenerWorker(mlwarehouse.connect().project(sys.argv[1]), lease_seconds=float(sys.argv[2]), poll_interval=0.05,
                   sweep_seconds=1.0).run()
""")

# Each writer owns the documents it inserts and shares the seeded ones with the others; it prints what it deleted.
WRITER = textwrap.dedent("""
    import json, random, sys, time
    import mlwarehouse
    k, ops, seeded = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(1000 + k)
    c = mlwarehouse.connect().project(sys.argv[4]).collection(sys.argv[5])
    vec = lambda: [round(rng.uniform(-1, 1), 4) for _ in range(16)]
    pool = [f"s{i:04d}" for i in range(seeded)]
    deleted, made = [], 0
    for op in range(ops):
        r = rng.random()
        if r < 0.25:
            docs = []
            for _ in range(rng.randint(1, 4)):
                doc = {"_id": f"w{k}-{made:04d}", "tag": "new", "n": 0}
                if rng.random() < 0.9:
                    doc["x"] = vec()
                docs.append(doc)
                made += 1
            c.insert_many(docs)
            pool += [d["_id"] for d in docs]
            continue
        target = rng.choice(pool)
        if r < 0.55:
            c.update_one({"_id": target}, {"$set": {"x": vec()}})
        elif r < 0.75:
            c.update_one({"_id": target}, {"$set": {"tag": rng.choice("abc")}, "$inc": {"n": 1}})
        elif r < 0.82:
            c.replace_one({"_id": target}, {"x": vec(), "tag": "replaced", "n": -1})
        elif r < 0.85:
            c.update_one({"_id": target}, {"$unset": {"x": ""}})
        elif r < 0.88:
            c.update_many({"tag": rng.choice("abc"), "n": {"$gt": 3}}, {"$set": {"x": vec()}})
        else:
            if c.delete_one({"_id": target}).deleted_count:
                deleted.append(target)
            pool.remove(target)
        time.sleep(rng.uniform(0, 0.01))
    print(json.dumps({"deleted": deleted}))
""")


def reference(x: list) -> list:
    """The model's output for one input, computed here (without its sleep)."""
    import lkmodel
    return [round(sum(x[i] * lkmodel.W[i][j] for i in range(16)) + lkmodel.B[j], 9) for j in range(4)]


@pytest.fixture(params=["sqlite", "postgres"])
def setting(request, tmp_path, monkeypatch):
    """(environment of the child processes, the warehouse of the test), on each backend."""
    (tmp_path / "lkmodel.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(mlwarehouse.__file__)),
                                         env.get("PYTHONPATH", "")])
    env["MLW_TRUSTED_MODULES"] = "lkmodel"
    for name in ("MLW_URI", "MLW_BLOBS", "MLW_PROJECT"):
        env.pop(name, None)
    if request.param == "sqlite":
        env["MLW_HOME"] = str(tmp_path / "wh")
        with mlwarehouse.connect(home=tmp_path / "wh") as wh:
            yield env, wh
        return
    server = request.getfixturevalue("postgres_server")
    import psycopg
    schema = "lk_" + os.urandom(5).hex()
    with psycopg.connect(server, autocommit=True) as con:
        con.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in server else "?"
    env["MLW_URI"] = f"{server}{sep}options={quote(f'-csearch_path={schema}')}"
    env["MLW_BLOBS"] = str(tmp_path / "blobs")
    try:
        with mlwarehouse.connect(env["MLW_URI"], blobs=env["MLW_BLOBS"]) as wh:
            yield env, wh
    finally:
        with psycopg.connect(server, autocommit=True) as con:
            con.execute(f"DROP SCHEMA {schema} CASCADE")


def spawn(code: str, env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def claimed_by(tasks, proc: subprocess.Popen) -> list:
    """The listener tasks the worker process ``proc`` holds now (its worker id names its pid)."""
    return [t for t in tasks.find(LISTENER_TASK, status="running")
            if f":{proc.pid}:" in (t.doc.get("worker") or "")]


def kill_mid_batch(tasks, proc: subprocess.Popen, rng: random.Random) -> str | None:
    """SIGKILL ``proc`` inside a batch it claimed; returns that task's id, left running by the kill (None if the
    batch ended before the signal landed)."""
    held: list = []

    def holds() -> bool:
        assert proc.poll() is None, proc.stderr.read()
        held[:] = claimed_by(tasks, proc)
        return bool(held)
    wait_for(holds, timeout=20)
    time.sleep(rng.uniform(0.0, 0.1))  # inside the model's 160 ms, or among the batch's writes
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(5) == -signal.SIGKILL
    back = tasks.get(held[0].id)
    return back.id if (back.status, back.worker) == ("running", held[0].doc["worker"]) else None


def test_sigkilled_listener_workers_lose_nothing_under_concurrent_writes(setting):
    env, wh = setting
    rng = random.Random(7)
    p = wh.project(PROJECT)
    c = p.collection(COLLECTION)
    c.insert_many([{"_id": f"s{i:04d}", "x": [round(rng.uniform(-1, 1), 4) for _ in range(16)], "tag": "seed",
                    "n": 0} for i in range(SEEDED)])
    c.attach(LISTENER, "lkmodel:linear", key="x", compute="workers", batch_size=BATCH, batched=True)
    assert c.progress(LISTENER)["pending"] == SEEDED

    workers = [spawn(WORKER, env, PROJECT, LEASE) for _ in range(2)]
    writers = [spawn(WRITER, env, k, 120, SEEDED, PROJECT, COLLECTION) for k in range(4)]
    killed: list[str] = []
    try:
        for _ in range(8):  # the first worker killed inside a batch is replaced, its replacement is not
            task_id = kill_mid_batch(p.tasks, workers[0], rng)
            killed += [task_id] if task_id else []
            if len(killed) == 2:
                break
            workers[0] = spawn(WORKER, env, PROJECT, LEASE)
        assert len(killed) == 2, "no kill landed inside a batch"

        deleted = set()
        for proc in writers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            deleted |= set(json.loads(out)["deleted"])
        survivor = workers[1]

        def caught_up() -> bool:
            assert survivor.poll() is None, survivor.stderr.read()
            return c.progress(LISTENER)["pending"] == 0 \
                and not p.tasks.has_unfinished(LISTENER_TASK)
        wait_for(caught_up, timeout=40)
    finally:
        for proc in workers + writers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    progress = c.progress(LISTENER)
    assert progress["pending"] == 0 and progress["failed"] == 0, progress
    tasks = p.tasks.find(LISTENER_TASK)
    assert not [t.id for t in tasks if t.status in ("running", "pending")]
    for task_id in killed:  # the expired lease came back and the batch was computed by another worker
        back = p.tasks.get(task_id)
        assert back.status == "finished" and back.attempts >= 2, back.doc

    stored = list(c.table.find())
    ids = {d["_id"] for d in stored}
    assert deleted and not ids & deleted
    assert len(ids) > SEEDED  # the writers' inserts are there
    with_input = 0
    for doc in stored:
        state = (doc.get("_listeners") or {}).get(LISTENER) or {}
        packed = get_path(doc, "x")
        outputs = doc.get("_outputs") or {}
        if packed is MISSING:
            assert state.get("status") == "skipped" and outputs == {}, doc
            continue
        with_input += 1
        assert state.get("status") == "done", doc
        assert state["input"] == digest(packed), doc["_id"]  # computed from the input it has now
        assert list(outputs) == ["x"] and list(outputs["x"]) == [LISTENER], doc["_id"]  # exactly one output
        assert c.unpack(outputs["x"][LISTENER]) == pytest.approx(reference(c.unpack(packed))), doc["_id"]
    assert with_input > SEEDED // 2
    assert progress["done"] == with_input and progress["skipped"] == len(stored) - with_input
