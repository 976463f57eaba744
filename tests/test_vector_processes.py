"""Vector indexes across processes: reopened in a fresh process, and searched while other processes write."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.testing.backend_sets import postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.postgres_server import postgres_server, require_pgvector  # noqa: F401

DIMS = 12
PROJECT = "vecproc"


@pytest.fixture(params=["sqlite", "postgres-pgvector", "postgres-embedded"])
def setup(request, tmp_path, monkeypatch):
    """A warehouse reached through the environment (so child processes reach it too) and the engine to use."""
    if request.param == "sqlite":
        yield from ((wh, None) for wh in sqlite_and_files(tmp_path, monkeypatch, PROJECT))
    else:
        pg, s3 = request.getfixturevalue("postgres_server"), request.getfixturevalue("s3_server")
        engine = "pgvector" if request.param.endswith("pgvector") else "embedded"
        if engine == "pgvector":
            require_pgvector(pg)
        yield from ((wh, engine) for wh in postgres_and_s3(pg, s3, monkeypatch, PROJECT))


def _child(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_process_answers_as_before_plus_what_was_inserted_since(setup):
    wh, engine = setup
    c = wh.collection("pts")
    x = np.random.default_rng(0).standard_normal((700, DIMS)).astype(np.float32)
    c.insert_many({"_id": f"d{i}", "v": x[i], "g": i % 5} for i in range(700))
    c.create_vector_index("v", field="v", engine=engine)
    queries = x[:8] + 0.05
    before = {str(i): [d["_id"] for d in c.find({"g": {"$lt": 3}}, vector=q, n=5)] for i, q in enumerate(queries)}
    c.insert_many({"_id": f"late{i}", "v": queries[i], "g": 0} for i in range(4))  # nearest to queries 0..3
    code = f"""
import json, numpy as np, mlwarehouse
c = mlwarehouse.connect().collection("pts")
q = np.array({queries.tolist()!r}, dtype=np.float32)
out = {{str(i): [d["_id"] for d in c.find({{"g": {{"$lt": 3}}}}, vector=v, n=5)] for i, v in enumerate(q)}}
out["stats"] = c.vector_index("v").stats()
print(json.dumps(out, default=str))
"""
    after = _child(code)
    for i in range(8):
        assert after[str(i)] == [d["_id"] for d in c.find({"g": {"$lt": 3}}, vector=queries[i], n=5)]
        assert [d for d in after[str(i)] if not d.startswith("late")] == [
            d for d in before[str(i)] if d in after[str(i)]]  # what was found before stays, in order
        if i < 4:
            assert after[str(i)][0] == f"late{i}"
    if engine != "pgvector":
        assert after["stats"]["loaded_from"] == "snapshot"


def _writer(seed: int, stop_at: float, ids: list[str]) -> None:
    rng = np.random.default_rng(seed)
    c = mlwarehouse.connect().collection("pts")
    n = 0
    while time.time() < stop_at:
        doc_id = ids[int(rng.integers(len(ids)))]
        action = rng.random()
        if action < 0.5:
            c.update_one({"_id": doc_id}, {"$set": {"v": rng.standard_normal(DIMS).astype(np.float32)}})
        elif action < 0.75:
            c.update_one({"_id": doc_id}, {"$set": {"g": int(rng.integers(5))}})
        elif action < 0.9:
            c.delete_one({"_id": doc_id})
        else:
            c.insert_one({"_id": f"w{seed}-{n}", "v": rng.standard_normal(DIMS).astype(np.float32),
                          "g": int(rng.integers(5))})
        n += 1


def _searcher(seed: int, stop_at: float, out) -> None:
    """Search under filters while others write: each result must match its filter and score as its vector."""
    rng = np.random.default_rng(seed)
    c = mlwarehouse.connect().collection("pts")
    searches = bad = 0
    while time.time() < stop_at:
        q = rng.standard_normal(DIMS).astype(np.float32)
        g = int(rng.integers(5))
        found = c.find({"g": {"$ne": g}}, vector=q, n=8)
        for d in found:
            v = np.asarray(d["v"], dtype=np.float32)
            score = float(v @ q / (np.linalg.norm(v) * np.linalg.norm(q)))
            if d["g"] == g or abs(score - d["_score"]) > 1e-4:
                bad += 1
        if len({d["_id"] for d in found}) != len(found):
            bad += 1
        searches += 1
    out.put((searches, bad))


@pytest.mark.slow
def test_searchers_never_see_an_old_vector_while_writers_change_them(setup):
    wh, engine = setup
    c = wh.collection("pts")
    x = np.random.default_rng(1).standard_normal((400, DIMS)).astype(np.float32)
    ids = [f"d{i}" for i in range(400)]
    c.insert_many({"_id": ids[i], "v": x[i], "g": i % 5} for i in range(400))
    c.create_vector_index("v", field="v", engine=engine)
    ctx = mp.get_context("spawn")
    stop_at = time.time() + 6
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(s, stop_at, ids)) for s in (1, 2)]
    procs += [ctx.Process(target=_searcher, args=(s, stop_at, out)) for s in (3, 4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"
    results = [out.get(timeout=10) for _ in range(2)]
    assert sum(s for s, _ in results) > 20
    assert sum(b for _, b in results) == 0, results
    # and once the writers stopped, a refreshed index agrees with brute force over what is stored now
    index = c.vector_index("v")
    index.refresh()
    docs = list(c.find({}))
    m = np.stack([np.asarray(d["v"], dtype=np.float32) for d in docs])
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    for q in x[:5]:
        want = [docs[i]["_id"] for i in np.argsort(-(m @ (q / np.linalg.norm(q))))[:5]]
        got = [d["_id"] for d in c.find(vector=q, n=5)]
        assert len(set(got) & set(want)) >= 4
