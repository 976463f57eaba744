"""Vector engines and the embedded mirror: exactness, persistence, untrusted snapshots, compaction, memory bounds."""

from __future__ import annotations

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.errors import IntegrityError, NotFound, QueryError, VectorIndexError
from mlwarehouse.vectors import mirror as mirrors
from mlwarehouse.vectors import spec as specs
from mlwarehouse.vectors.engines import ExactEngine, exact_top
from mlwarehouse.vectors.faiss_graph import FaissGraph
from mlwarehouse.vectors.hnswlib_graph import HnswlibGraph

GRAPHS = [FaissGraph, HnswlibGraph]


def _brute(matrix, queries, k, metric):
    if metric == "l2":
        scores = -((queries[:, None, :] - matrix[None, :, :]) ** 2).sum(2)
    else:
        scores = queries @ matrix.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_exact_top_matches_brute_force_across_blocks(monkeypatch, metric, rows):
    from mlwarehouse.vectors import engines
    monkeypatch.setattr(engines, "BLOCK", 64)  # several blocks, and a last one shorter than k
    rng = np.random.default_rng(rows)
    m, q = rng.standard_normal((rows, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    k = 10
    scores, labels = exact_top(m, q, k, metric)
    want = _brute(m, q, min(k, rows), metric)
    assert np.array_equal(labels[:, :min(k, rows)], want)
    assert (labels[:, rows:] == -1).all() and np.isneginf(scores[:, rows:]).all()


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda g: g.kind)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_a_graph_round_trips_through_its_arrays_and_keeps_growing(graph, metric):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    engine = graph(24, metric, {"M": 16, "ef_construction": 80})
    engine.add(x[:1800])
    engine.add(x[1800:])  # a second batch: the graph grows (hnswlib past its first capacity)
    q = x[:20] + 0.01
    before = engine.search(q, 5)
    if metric == "l2":
        assert (before[1][:, 0] == np.arange(20)).all()  # each point's nearest is itself
    arrays = engine.to_arrays()
    assert np.array_equal(arrays["vectors"], x)  # by label, whatever order the graph keeps its nodes in
    again = graph.from_arrays(arrays, 24, metric, {"M": 16, "ef_construction": 80})
    after = again.search(q, 5)
    assert np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0])
    assert again.add(x[:3]) == 3000 and again.size == 3003
    assert np.array_equal(again.gather(np.array([3001, 7])), x[[1, 7]])
    mask = np.zeros(again.size, dtype=bool)
    mask[::3] = True
    _, labels = again.search(q, 5, allowed=mask)
    assert ((labels % 3 == 0) | (labels == -1)).all()
    none = np.zeros(again.size, dtype=bool)
    none[[4, 9]] = True
    scores, labels = again.search(q[:2], 5, allowed=none)  # fewer allowed than asked for
    assert set(labels[labels >= 0].tolist()) <= {4, 9} and np.isneginf(scores[labels < 0]).all()


def test_hnswlib_skips_removed_labels_without_a_filter_and_after_a_round_trip():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    engine = HnswlibGraph(16, "l2", {"M": 8, "ef_construction": 60})
    engine.add(x)
    engine.remove([0, 1, 2])
    assert engine.removes and not set(engine.search(x[:3], 10)[1].ravel().tolist()) & {0, 1, 2}
    again = HnswlibGraph.from_arrays(engine.to_arrays(), 16, "l2", {"M": 8, "ef_construction": 60})
    assert 0 in again.search(x[:1], 1)[1]  # marks are not stored: the mirror marks its dead labels again
    again.remove([0])
    assert 0 not in again.search(x[:1], 10)[1]


def _damaged_faiss(arrays, damage):
    if damage == "neighbour out of range":
        arrays["neighbors"][5] = 10 ** 9
    elif damage == "offsets":
        arrays["offsets"][-1] = np.uint64(2 ** 40)  # would make faiss walk far past the neighbour array
    elif damage == "levels":
        arrays["levels"][0] = 99
    elif damage == "entry":
        arrays["entry"][0] = 5000
    elif damage == "dtype":
        arrays["neighbors"] = arrays["neighbors"].astype(np.int64)
    else:
        del arrays["offsets"]


def _damaged_hnswlib(arrays, damage):
    upper = arrays["upper"].reshape(-1, 9)  # M=8: a count and 8 links per upper level
    if damage == "neighbour out of range":
        arrays["links0"][5, 1] = 10 ** 9
    elif damage == "count":
        arrays["links0"][5, 0] = 17  # more links than level 0 holds (2 M): hnswlib would read the next node's
    elif damage == "upper link to a lower node":
        low = int(np.flatnonzero(arrays["levels"] == 0)[0])
        upper[0, 0], upper[0, 1] = max(upper[0, 0], 1), low  # hnswlib would read that node's missing level
    elif damage == "levels":
        arrays["levels"][0] += 1  # the upper lists no longer add up
    elif damage == "labels":
        arrays["labels"][1] = arrays["labels"][0]  # a label twice
    elif damage == "entry":
        arrays["entry"][0] = 5000
    elif damage == "dtype":
        arrays["links0"] = arrays["links0"].astype(np.int64)
    else:
        del arrays["upper"]


_DAMAGES = [(FaissGraph, d) for d in ("neighbour out of range", "offsets", "levels", "entry", "dtype", "missing")] + \
    [(HnswlibGraph, d) for d in ("neighbour out of range", "count", "upper link to a lower node", "levels", "labels",
                                 "entry", "dtype", "missing")]


@pytest.mark.parametrize("graph,damage", _DAMAGES, ids=[f"{g.kind}-{d}" for g, d in _DAMAGES])
def test_crafted_graph_arrays_are_refused_before_the_library_reads_them(graph, damage):
    rng = np.random.default_rng(2)
    engine = graph(8, "ip", {"M": 8})
    engine.add(rng.standard_normal((400, 8)).astype(np.float32))
    arrays = {k: v.copy() for k, v in engine.to_arrays().items()}
    (_damaged_faiss if graph is FaissGraph else _damaged_hnswlib)(arrays, damage)
    with pytest.raises(IntegrityError):
        graph.from_arrays(arrays, 8, "ip", {"M": 8})


def _collection(tmp_path, n=400, dims=8, name="pts"):
    wh = mlwarehouse.connect(home=tmp_path / "wh")
    c = wh.collection(name)
    x = np.random.default_rng(3).standard_normal((n, dims)).astype(np.float32)
    c.insert_many({"_id": f"d{i}", "v": x[i], "g": i % 4} for i in range(n))
    return wh, c, x


def test_a_damaged_snapshot_is_rebuilt_from_the_documents(tmp_path):
    wh, c, x = _collection(tmp_path)
    c.create_vector_index("v", field="v")
    record = specs.find(c, "v")
    tree = record["snapshot"]["data"]
    tree["labels"] = c.project.pack(b'{"ids": ["d0"], "revs": [], "without": {}}')  # labels that do not fit
    c.project.update(specs.VECTOR_INDEXES, {"_id": record["_id"]}, {"$set": {"snapshot.data": tree}})
    other = mlwarehouse.connect(home=tmp_path / "wh").collection("pts")
    index = other.vector_index("v")
    assert other.find(vector=x[9], n=1)[0]["_id"] == "d9"
    assert index.stats()["loaded_from"] == "build" and index.stats()["vectors"] == 400


def test_reopening_loads_the_snapshot_and_replays_only_what_came_after(tmp_path):
    wh, c, x = _collection(tmp_path)
    c.create_vector_index("v", field="v")
    c.insert_one({"_id": "late", "v": x[0] * 3, "g": 1})
    c.delete_many({"_id": {"$in": ["d1", "d2"]}})
    other = mlwarehouse.connect(home=tmp_path / "wh").collection("pts")
    stats = other.vector_index("v").stats()
    assert stats["loaded_from"] == "snapshot" and stats["vectors"] == 399
    found = [d["_id"] for d in other.find({"g": 1}, vector=x[0], n=3)]
    assert found[0] == "late" and "d1" not in found


@pytest.mark.parametrize("kind,reopened_as", [("hnswlib", "hnswlib"), ("hnsw", "hnsw"), ("hnswlib", "hnsw"),
                                               ("hnsw", "hnswlib")])
def test_each_graph_skips_dead_labels_and_reopens_from_a_snapshot_of_either(tmp_path, monkeypatch, kind,
                                                                            reopened_as):
    """Dead labels never come back from the fast path (hnswlib marks them deleted, faiss filters them out), and a
    snapshot stored by one graph library is loaded by it, or rebuilt from its vectors where only the other is."""
    from mlwarehouse.vectors import faiss_graph, hnswlib_graph
    monkeypatch.setattr(mirrors, "best_kind", lambda: kind)
    wh, c, x = _collection(tmp_path, n=600)
    index = c.create_vector_index("v", field="v")
    c.delete_many({"_id": {"$in": ["d1", "d2"]}})
    c.update_one({"_id": "d3"}, {"$set": {"v": -x[3]}})
    ids = index.search(x[1:4], 5)
    assert index.stats()["kind"] == kind and index.stats()["dead"] == 3
    assert not {"d1", "d2"} & {i for r in ids for i in r.ids} and "d3" not in ids[2].ids
    assert index.backend.save()
    monkeypatch.setattr(mirrors, "best_kind", lambda: reopened_as)
    if reopened_as != kind:  # the library that stored it is not installed where it is opened
        monkeypatch.setattr(faiss_graph if kind == "hnsw" else hnswlib_graph, "available", lambda: False)
    other = mlwarehouse.connect(home=tmp_path / "wh").collection("pts").vector_index("v")
    assert other.stats()["loaded_from"] == "snapshot" and other.stats()["kind"] == reopened_as
    again = other.search(x[1:4], 5)
    assert not {"d1", "d2"} & {i for r in again for i in r.ids} and "d3" not in again[2].ids
    assert [r.ids[0] for r in again] == [r.ids[0] for r in ids]
    assert other.search(-x[3], 1)[0].ids == ["d3"]


def test_dead_labels_are_compacted_away(tmp_path, monkeypatch):
    wh, c, x = _collection(tmp_path, n=1600)
    index = c.create_vector_index("v", field="v")
    c.update_many({"g": {"$in": [0, 1]}}, {"$set": {"seen": True}})  # the vectors stay: the graph is kept
    index.refresh()
    assert index.stats()["dead"] == 0 and index.stats()["vectors"] == 1600
    for i in range(0, 600):
        c.update_one({"_id": f"d{i}"}, {"$set": {"v": x[i] * 2}})
    index.refresh()
    stats = index.stats()
    assert stats["vectors"] == 1600 and stats["dead"] == 0  # 600 of 2200 labels dead: compacted on refresh
    assert c.find(vector=x[5], n=1)[0]["_id"] == "d5"


def test_memory_is_bounded_and_reported(tmp_path, monkeypatch):
    wh, c, x = _collection(tmp_path, n=300)
    monkeypatch.setattr(mirrors, "MEMORY_LIMIT", 50_000)
    with pytest.raises(VectorIndexError, match="MLW_VECTOR_MEMORY_MB"):
        c.create_vector_index("v", field="v")
    monkeypatch.setattr(mirrors, "MEMORY_LIMIT", 10 ** 9)
    index = c.vector_index("v")
    assert index.stats()["memory_bytes"] > 300 * 8 * 4


def test_documents_without_a_vector_or_with_a_wrong_one_are_left_out(tmp_path):
    wh, c, x = _collection(tmp_path, n=50)
    c.insert_many([{"_id": "none"}, {"_id": "short", "v": [1.0, 2.0]}, {"_id": "text", "v": "not a vector"},
                   {"_id": "nan", "v": [float("nan")] * 8}])
    index = c.create_vector_index("v", field="v")
    stats = index.stats()
    assert stats["vectors"] == 50 and stats["without_vector"] == 4 and stats["invalid"] == 3
    assert len(c.find(vector=x[0], n=100)) == 50


def test_exact_engine_is_used_without_the_ann_library(tmp_path, monkeypatch):
    monkeypatch.setattr(mirrors, "best_kind", lambda: "exact")
    wh, c, x = _collection(tmp_path, n=200)
    index = c.create_vector_index("v", field="v")
    assert index.stats()["kind"] == "exact"
    assert [d["_id"] for d in c.find({"g": 2}, vector=x[2], n=1)] == ["d2"]
    assert isinstance(index.backend.engine, ExactEngine)


def test_a_cached_filter_follows_changes_of_the_filtered_field(tmp_path):
    wh, c, x = _collection(tmp_path)
    c.create_vector_index("v", field="v")
    assert "d1" not in [d["_id"] for d in c.find({"g": 0}, vector=x[1], n=5)]  # d1 has g == 1
    other = mlwarehouse.connect(home=tmp_path / "wh").collection("pts")
    other.update_one({"_id": "d1"}, {"$set": {"g": 0}})  # another process: the vector stays, the filter moves
    c.vector_index("v").refresh()
    assert c.find({"g": 0}, vector=x[1], n=1)[0]["_id"] == "d1"
    other.update_one({"_id": "d1"}, {"$set": {"g": 1}})
    c.vector_index("v").refresh()
    assert "d1" not in [d["_id"] for d in c.find({"g": 0}, vector=x[1], n=5)]


def test_an_archive_carries_index_definitions_and_the_index_is_rebuilt_where_it_lands(tmp_path):
    from mlwarehouse.archive.tarball import export_project, import_project
    wh, c, x = _collection(tmp_path, n=120)
    c.create_vector_index("v", field="v", metric="l2")
    c.delete_one({"_id": "d0"})  # a tombstone: the warehouse's own, not exported
    summary = export_project(wh, "default", tmp_path / "a.tar")
    assert "tombstones" not in summary["collections"] and summary["collections"]["vector_indexes"] == 1
    target = mlwarehouse.connect(home=tmp_path / "target")
    import_project(target, tmp_path / "a.tar", project="copy")
    copied = target.project("copy").collection("pts")
    assert copied.vector_indexes()[0]["metric"] == "l2"
    assert copied.find(vector=x[5], n=1)[0]["_id"] == "d5"
    assert copied.vector_index("v").stats()["loaded_from"] == "build"


def test_of_two_snapshots_saved_at_once_the_newer_stays(tmp_path):
    wh, c, x = _collection(tmp_path, n=100)
    index = c.create_vector_index("v", field="v")
    other = mlwarehouse.connect(home=tmp_path / "wh").collection("pts").vector_index("v")
    other.backend  # loaded from the snapshot at this position
    c.insert_one({"_id": "late", "v": x[0], "g": 0})
    index.refresh()
    assert index.save()  # newer: stored
    assert not other.save()  # older than the stored one: refused, its blobs released
    assert specs.find(c, "v")["snapshot"]["position"] == index.backend.position
    fresh = mlwarehouse.connect(home=tmp_path / "wh").collection("pts").vector_index("v")
    assert fresh.stats()["vectors"] == 101 and fresh.stats()["loaded_from"] == "snapshot"


def test_the_index_definition_is_looked_up_once_per_refresh_interval(tmp_path, monkeypatch):
    """Every search asks for its index: the definition is read again only once the refresh interval has passed
    (this process's drops and creations at once), so another process's new default shows as late as its writes."""
    from mlwarehouse.vectors import tracking
    wh, c, x = _collection(tmp_path, n=100)
    first = c.create_vector_index("first", field="v")
    calls = []
    real = specs.get
    monkeypatch.setattr(specs, "get", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    monkeypatch.setattr(tracking, "REFRESH_SECONDS", 60.0)
    for _ in range(5):
        assert c.find(vector=x[1], n=1)[0]["_id"] == "d1"
    assert c.vector_index() is first and len(calls) == 1
    other = mlwarehouse.connect(home=tmp_path / "wh").collection("pts")
    other.drop_vector_index("first")
    other.create_vector_index("second", field="v", metric="l2")
    assert c.vector_index() is first  # within the interval: the lookup made before
    monkeypatch.setattr(tracking, "REFRESH_SECONDS", 0.0)
    assert c.vector_index().name == "second" and c.find(vector=x[2], n=1)[0]["_id"] == "d2"
    c.drop_vector_index("second")
    with pytest.raises(mlwarehouse.errors.NotFound):
        c.vector_index()


def test_filter_indexes_are_recorded_bounded_and_forgotten_on_the_embedded_engine(tmp_path):
    """The embedded engine filters inside its graph walk and builds nothing for ``index_filter``, but records the
    filter as pgvector does (so both engines list the same), within the same bound, and refuses what is no filter."""
    c = mlwarehouse.connect(home=tmp_path).collection("items")
    x = np.random.default_rng(3).standard_normal((200, 8)).astype(np.float32)
    c.insert_many({"_id": f"d{i}", "v": x[i], "g": i % 10} for i in range(200))
    index = c.create_vector_index("v", field="v")
    made = index.index_filter({"g": 3})
    assert made["filter"] == {"g": 3} and made["index"] is None and index.stats()["filters"] == [{"g": 3}]
    assert index.index_filter({"g": 3})["filter"] == {"g": 3} and index.stats()["filters"] == [{"g": 3}]
    for g in range(4, 4 + specs.MAX_FILTER_INDEXES - 1):
        index.index_filter({"g": g})
    with pytest.raises(VectorIndexError, match="the most it keeps"):
        index.index_filter({"g": 99})
    with pytest.raises(VectorIndexError, match="non-empty"):
        index.index_filter({})
    with pytest.raises(QueryError):
        index.index_filter({"g": {"$bogus": 1}})
    assert {"g": 3} not in index.forget_filter({"g": 3})
    with pytest.raises(NotFound):
        index.forget_filter({"g": 3})
    found = c.find({"g": 4}, vector=x[4], n=3)
    assert [d["_id"] for d in found][0] == "d4" and all(d["g"] == 4 for d in found)
    again = mlwarehouse.connect(home=tmp_path).collection("items").vector_index("v")
    assert again.stats()["filters"] == index.stats()["filters"] and len(again.stats()["filters"]) == 7
