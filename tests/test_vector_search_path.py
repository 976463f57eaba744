"""The unfiltered search path of an embedded index: batches answer as single queries do, results carry ids and
scores (hits made when read), query vectors are checked and never changed, and a quiet index's refreshes read
nothing while a write committed late still arrives with the whole-window read."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mlwarehouse.errors import VectorIndexError
from mlwarehouse.ids import new_id
from mlwarehouse.vectors import tracking
from mlwarehouse.vectors.search import Hit


def _points(wh, n=300, dims=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dims)).astype(np.float32)
    c = wh.collection("pts")
    c.insert_many({"_id": f"d{i:04d}", "v": x[i], "g": i % 3} for i in range(n))
    return c, x


def test_a_batch_answers_as_its_queries_one_by_one_with_exact_cosine_scores(wh):
    c, x = _points(wh)
    index = c.create_vector_index("v", field="v", metric="cosine")
    queries = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    batch = index.search(queries, 5, ef=300)  # ef past the size: the graph's answer is the exact one
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for q, res in zip(queries, batch):
        (single,) = index.search(q, 5, ef=300)
        assert res.ids == single.ids and res.plan == single.plan == "graph" and res.matched is None
        want = np.argsort(-(unit @ (q / np.linalg.norm(q))))[:5]
        assert res.ids == [f"d{i:04d}" for i in want]
        assert np.allclose(res.scores, (unit[want] @ (q / np.linalg.norm(q))), atol=1e-5)
        assert [h.id for h in res.hits] == res.ids and [h.score for h in res.hits] == res.scores
        assert len(res) == 5 and list(res) == res.hits


def test_results_hits_can_be_replaced_and_ids_follow(wh):
    c, x = _points(wh, n=50)
    index = c.create_vector_index("v", field="v")
    (res,) = index.search(x[3], 4)
    ids = res.ids
    ids.append("not-a-result")  # a copy: the results are not changed through it
    assert res.ids[0] == "d0003" and len(res.ids) == 4
    res.hits = [Hit("d0003", 1.0)]
    assert res.ids == ["d0003"] and res.scores == [1.0] and len(res) == 1


def test_query_vectors_are_checked_and_never_changed(wh):
    c, x = _points(wh, n=50)
    index = c.create_vector_index("v", field="v", metric="cosine")
    q = x[7] * 5
    kept = q.copy()
    (res,) = index.search(q, 1)
    assert res.ids == ["d0007"] and np.array_equal(q, kept)  # normalised as a copy
    bad = x[7].copy()
    bad[3] = np.nan
    with pytest.raises(VectorIndexError, match="finite"):
        index.search(bad, 1)
    with pytest.raises(VectorIndexError, match="shape"):
        index.search(x[7][:5], 1)
    (zero,) = index.search(np.zeros(16, np.float32), 3)  # no direction: any three, no error
    assert len(zero) == 3


def test_a_quiet_index_rereads_nothing_and_a_late_commit_still_arrives(wh, monkeypatch):
    monkeypatch.setattr(tracking, "RECENT_MS", 50)
    monkeypatch.setattr(tracking, "WINDOW_SECONDS", 1.0)
    c, x = _points(wh, n=200)
    index = c.create_vector_index("v", field="v")
    mirror = index.backend
    stale = new_id()  # the id of a write made now that commits only after the next reads
    time.sleep(0.2)
    mirror.refresh(force=True)  # the whole window once (writes of the build)
    read = []
    values = mirror.table.values

    def counted(*args, **kwargs):
        rows = values(*args, **kwargs)
        read.append(len(rows))
        return rows

    monkeypatch.setattr(mirror.table, "values", counted)
    for _ in range(3):
        mirror.refresh(force=True)
    assert read == [0, 0, 0]  # the load ended before the last read began: before, each re-read its newest rows

    c.table.insert_many([{"_id": "late", "_rev": stale, "v": (x[5] * 2).tolist(), "g": 0}])
    deadline = time.monotonic() + 5
    while "late" not in mirror.label_of and time.monotonic() < deadline:
        time.sleep(0.1)
        mirror.refresh(force=True)
    assert "late" in mirror.label_of  # its id was made before the reads began: the whole-window read took it
    assert index.search(x[5], 2)[0].ids[0] in ("late", "d0005")
    assert sorted(index.search(x[5], 2)[0].ids) == ["d0005", "late"]


def test_pgvector_text_gives_every_float32_back():
    from mlwarehouse.index.pgvectors import _literal
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(500).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 500),
                             np.array([0.0, -0.0, 1 / 3, 3.4e38, -1.1754944e-38, 16777217.0], np.float32)])
    values = values[np.isfinite(values)].astype(np.float32)
    text = _literal(values)
    assert text[0] == "[" and text[-1] == "]"
    back = np.array(text[1:-1].split(","), dtype=np.float32)
    assert np.array_equal(back, values) and np.array_equal(np.signbit(back), np.signbit(values))


def test_an_hnsw_build_asks_postgresql_for_the_memory_its_graph_needs(monkeypatch):
    from mlwarehouse.errors import ConfigError
    from mlwarehouse.index.pgvectors import BUILD_MEMORY_MB, build_memory_mb
    monkeypatch.delenv("MLW_PG_BUILD_MEMORY_MB", raising=False)
    assert build_memory_mb(0, 128, 16) == 64 and build_memory_mb(20_000, 128, 16) == 64  # small: the floor
    assert 1000 < build_memory_mb(1_000_000, 128, 16) < BUILD_MEMORY_MB  # more than the 512 MB that spilled
    assert build_memory_mb(10_000_000, 768, 16) == BUILD_MEMORY_MB  # bounded
    monkeypatch.setenv("MLW_PG_BUILD_MEMORY_MB", "256")
    assert build_memory_mb(1_000_000, 128, 16) == 256
    monkeypatch.setenv("MLW_PG_BUILD_MEMORY_MB", "lots")
    with pytest.raises(ConfigError, match="MLW_PG_BUILD_MEMORY_MB"):
        build_memory_mb(1_000_000, 128, 16)
