"""The vector search conformance suite: indexes over fields and listeners' outputs, filtered search, changes.

A test module subclasses :class:`VectorTests` and supplies a ``wh`` fixture (a fresh warehouse, see
``tests/test_vectors_backends.py``) and ``engine`` (None for the backend's default, or a named engine). Every
backend set must give the same answers: exact ones where the plan is exact, and every result satisfying its
filter whatever the plan.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.errors import NotFound, QueryError, VectorIndexError
from mlwarehouse.testing.listener_conformance import norm
from mlwarehouse.vectors import search as planning

__all__ = ["VectorTests", "embed_text", "exact_ids"]

DIMS = 16


def embed_text(text):
    """A listener model for texts: a normalised bag of hashed words (similar texts share words)."""
    v = np.zeros(DIMS, dtype=np.float32)
    for word in str(text).lower().split():
        v[int(hashlib.sha256(word.encode()).hexdigest(), 16) % DIMS] += 1.0
    return v / max(float(np.linalg.norm(v)), 1e-9)


def vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, DIMS)).astype(np.float32)


def exact_ids(docs: list[dict], query: np.ndarray, n: int, metric: str = "cosine", field: str = "v") -> list[str]:
    """The ids of the ``n`` nearest documents by brute force (the reference every engine is held to)."""
    m = np.stack([np.asarray(d[field], dtype=np.float32) for d in docs])
    q = np.asarray(query, dtype=np.float32)
    if metric == "cosine":
        m = m / np.linalg.norm(m, axis=1, keepdims=True)
        q = q / np.linalg.norm(q)
    scores = -((m - q) ** 2).sum(1) if metric == "l2" else m @ q
    order = np.argsort(-scores, kind="stable")[:n]
    return [docs[i]["_id"] for i in order]


class VectorTests:
    """Behaviour every backend set must show for vector indexes, through the public API."""

    engine: str | None = None

    def _filled(self, wh, n: int = 600, name: str = "points", metric: str = "cosine"):
        c = wh.collection(name)
        x = vectors(n)
        c.insert_many({"_id": f"p{i:04d}", "v": x[i], "g": i % 10, "price": float(i % 50), "tags": ["even"]
                       if i % 2 == 0 else ["odd"]} for i in range(n))
        index = c.create_vector_index("by_v", field="v", metric=metric, engine=self.engine)
        return c, x, index

    def _docs(self, c, flt=None):
        return [{**d, "v": np.asarray(d["v"])} for d in c.find(flt or {})]

    # -- search -------------------------------------------------------------------------------------------
    def test_filtered_search_is_exact_and_every_result_matches(self, wh):
        c, x, _ = self._filled(wh)
        for flt in ({"g": 3}, {"g": {"$in": [1, 2]}, "price": {"$lt": 20}}, {"tags": "odd"},
                    {"$or": [{"g": 0}, {"price": {"$gte": 45}}]}):
            matching = self._docs(c, flt)
            for q in x[:5]:
                found = c.find(flt, vector=q, n=7)
                assert [d["_id"] for d in found] == exact_ids(matching, q, 7), flt
                assert all(mlwarehouse.query.matches(dict(d), flt) for d in found)
                assert found.complete and found.matched in (None, len(matching))
                scores = [d["_score"] for d in found]
                assert scores == sorted(scores, reverse=True)

    def test_a_selective_filter_on_an_indexed_field_is_searched_exactly(self, wh):
        """A filter that an index of the collection serves and few documents match is an exact search of those
        documents (on pgvector too: its field may hold arrays, which once kept the index from serving it)."""
        c, x, _ = self._filled(wh, n=1500)
        c.update_many({"g": 7, "price": {"$lt": 10}}, {"$set": {"rare": True}})  # 30 of 1,500
        c.update_many({"_id": "p0003"}, {"$set": {"rare": [True, False]}})  # an array element matches too
        c.create_index("rare")
        matching = self._docs(c, {"rare": True})
        assert 20 <= len(matching) <= 40
        for q in x[:5]:
            found = c.find({"rare": True}, vector=q, n=10)
            assert found.plan == "exact" and found.complete
            assert [d["_id"] for d in found] == exact_ids(matching, q, 10)

    def test_filters_on_fields_indexed_before_the_index_and_changes_to_them(self, wh):
        """Fields indexed before the vector index (pgvector copies them beside the vectors and filters there):
        the same answers, exact where few match, and a document moved out of the filter by another connection,
        not yet seen by this one's index, is still never returned."""
        c = wh.collection("points")
        for field in ("g", "price"):
            c.create_index(field)
        x = vectors(600)
        c.insert_many({"_id": f"p{i:04d}", "v": x[i], "g": i % 10, "price": float(i % 50), "tags": ["even"]
                       if i % 2 == 0 else ["odd"]} for i in range(600))
        c.create_vector_index("by_v", field="v", engine=self.engine)
        for flt in ({"g": 3}, {"g": {"$in": [1, 2]}, "price": {"$lt": 20}}, {"tags": "odd", "g": {"$gt": 6}}):
            matching = self._docs(c, flt)
            for q in x[:5]:
                found = c.find(flt, vector=q, n=7)
                assert [d["_id"] for d in found] == exact_ids(matching, q, 7), flt
        hits = 0
        for q in x[:10]:  # many match: the graph may answer
            found = c.find({"price": {"$gte": 10}}, vector=q, n=10)
            assert len(found) == 10 and all(d["price"] >= 10 for d in found)
            hits += len({d["_id"] for d in found} & set(exact_ids(self._docs(c, {"price": {"$gte": 10}}), q, 10)))
        assert hits >= 90
        q = x[13]  # p0013: g 3
        assert c.find({"g": 3}, vector=q, n=1)[0]["_id"] == "p0013"
        other = mlwarehouse.connect()  # another process's write, not yet refreshed into this one's index
        other.collection("points").update_one({"_id": "p0013"}, {"$set": {"g": 4}})
        assert "p0013" not in [d["_id"] for d in c.find({"g": 3}, vector=q, n=5)]
        other.collection("points").update_one({"_id": "p0014"}, {"$set": {"g": 3, "v": q}})
        c.vector_index("by_v").refresh()
        assert c.find({"g": 3}, vector=q, n=1)[0]["_id"] == "p0014"
        other.collection("points").delete_one({"_id": "p0014"})
        c.delete_many({"g": 3, "_id": {"$ne": "p0023"}})  # this process's own: seen at once
        found = c.find({"g": 3}, vector=q, n=5)
        assert [d["_id"] for d in found] == ["p0023"] and found.matched == 1 and not found.complete
        other.close()

    def test_a_filter_index_answers_its_filter_as_exact_search_does(self, wh):
        """``index_filter`` (a partial HNSW index on pgvector, nothing to build for the embedded engine) changes no
        answer: searches with its filter equal exact search before and after writes (an array value whose element
        matches included), and another connection lists the same filters."""
        c = wh.collection("points")
        c.create_index("g")
        c.create_index("tags")
        x = vectors(600)
        c.insert_many({"_id": f"p{i:04d}", "v": x[i], "g": i % 10, "tags": ["even"] if i % 2 == 0 else ["odd"]}
                      for i in range(600))
        index = c.create_vector_index("by_v", field="v", engine=self.engine)
        filters = ({"g": 3}, {"g": {"$in": [1, 2]}, "tags": "odd"})
        for flt in filters:
            made = index.index_filter(flt)
            assert made["filter"] == flt and (made["index"] is not None) == (index.spec.engine == "pgvector")
        assert index.stats()["filters"] == list(filters)
        c.update_one({"_id": "p0005"}, {"$set": {"g": [3, 4]}})  # an element of an array matches
        c.insert_one({"_id": "new", "v": x[7] * 2, "g": 3, "tags": ["odd"]})
        c.delete_one({"_id": "p0013"})
        for flt in filters:
            matching = self._docs(c, flt)
            for q in x[:8]:
                found = c.find(flt, vector=q, n=7)
                assert [d["_id"] for d in found] == exact_ids(matching, q, 7), flt
                assert found.plan == "graph" or index.spec.engine != "pgvector"  # its own index, walked
        other = mlwarehouse.connect()
        assert other.collection("points").vector_index("by_v").stats()["filters"] == list(filters)
        other.close()
        assert index.forget_filter(filters[0]) == [filters[1]]

    def test_unfiltered_search_finds_the_nearest(self, wh):
        c, x, index = self._filled(wh)
        docs = self._docs(c)
        hits = 0
        for q in x[100:120]:
            found = c.find(vector=q, n=10)
            assert len(found) == 10 and found.matched is None
            hits += len(set(d["_id"] for d in found) & set(exact_ids(docs, q, 10)))
        assert hits / 200 >= 0.95
        top = c.find(like={"_id": "p0042"}, n=1)
        assert top[0]["_id"] == "p0042" and top[0]["_score"] == pytest.approx(1.0, abs=1e-4)
        batch = index.search(x[:3], 4)
        assert [r.ids[0] for r in batch] == ["p0000", "p0001", "p0002"]

    @pytest.mark.parametrize("plan", ["graph+filter", "graph+post-filter"])
    def test_the_graph_walk_with_a_filter(self, wh, monkeypatch, plan):
        monkeypatch.setattr(planning, "EXACT_LIMIT", 50)  # every filter below leaves more: the graph plans
        if plan == "graph+filter":  # the filter inside the walk, not applied to the walk's candidates
            monkeypatch.setattr(planning, "POST_FILTER_SHARE", 1.1)
        c, x, _ = self._filled(wh, n=1500)
        hits = total = 0
        for flt in ({"g": {"$lt": 5}}, {"tags": "even", "g": {"$ne": 4}}, {"price": {"$gte": 10}}):
            matching = self._docs(c, flt)
            for q in x[:10]:
                found = c.find(flt, vector=q, n=10)
                assert len(found) == 10 and all(mlwarehouse.query.matches(dict(d), flt) for d in found)
                assert found.complete
                if c.vector_index().spec.engine == "embedded":
                    assert found.plan == plan
                hits += len(set(d["_id"] for d in found) & set(exact_ids(matching, q, 10)))
                total += 10
        assert hits / total >= 0.9

    def test_fewer_matches_than_n_are_told(self, wh):
        c, x, _ = self._filled(wh, n=100)
        found = c.find({"g": 3, "price": {"$lt": 10}}, vector=x[0], n=10)
        assert found.matched == 2 and not found.complete and len(found) == 2
        nothing = c.find({"g": 99}, vector=x[0], n=5)
        assert list(nothing) == [] and nothing.matched == 0 and not nothing.complete

    @pytest.mark.parametrize("metric", ["l2", "ip"])
    def test_metrics_score_as_numpy(self, wh, metric):
        c, x, _ = self._filled(wh, n=200, metric=metric)
        docs = self._docs(c)
        found = c.find({"g": {"$lt": 5}}, vector=x[7], n=5)
        assert [d["_id"] for d in found] == exact_ids([d for d in docs if d["g"] < 5], x[7], 5, metric)
        best = np.asarray(found[0]["v"], dtype=np.float32)
        want = -float(np.linalg.norm(best - x[7])) if metric == "l2" else float(best @ x[7])
        assert found[0]["_score"] == pytest.approx(want, rel=1e-4, abs=1e-4)

    # -- changes ------------------------------------------------------------------------------------------
    def test_inserts_updates_and_deletes_are_seen_at_once_in_this_process(self, wh):
        c, x, _ = self._filled(wh, n=200)
        q = x[5]
        assert c.find(vector=q, n=1)[0]["_id"] == "p0005"
        c.delete_one({"_id": "p0005"})
        found = c.find(vector=q, n=5)
        assert "p0005" not in [d["_id"] for d in found]
        c.update_one({"_id": "p0006"}, {"$set": {"v": q}})
        assert c.find(vector=q, n=1)[0]["_id"] == "p0006"
        c.update_one({"_id": "p0006"}, {"$set": {"v": -q}})  # moved away: its old vector must not answer
        assert "p0006" not in [d["_id"] for d in c.find(vector=q, n=3)]
        c.insert_one({"_id": "new", "v": q * 2, "g": 3, "price": 1.0})
        assert c.find({"g": 3}, vector=q, n=1)[0]["_id"] == "new"
        c.update_one({"_id": "new"}, {"$set": {"g": 4}})  # out of the filter now
        assert "new" not in [d["_id"] for d in c.find({"g": 3}, vector=q, n=3)]
        c.insert_one({"_id": "novector", "g": 3})
        assert "novector" not in [d["_id"] for d in c.find({"g": 3}, vector=q, n=50)]

    def test_another_connection_sees_changes_and_reopens_from_the_snapshot(self, wh, monkeypatch):
        c, x, index = self._filled(wh, n=300)
        before = [d["_id"] for d in c.find({"g": {"$lt": 5}}, vector=x[1], n=5)]
        index.save()
        other = mlwarehouse.connect()  # the same warehouse, as another process reaches it
        oc = other.collection("points")
        assert [d["_id"] for d in oc.find({"g": {"$lt": 5}}, vector=x[1], n=5)] == before
        if self.engine != "pgvector" and oc.vector_index("by_v").spec.engine == "embedded":
            assert oc.vector_index("by_v").stats()["loaded_from"] == "snapshot"
        c.insert_one({"_id": "late", "v": x[1], "g": 0, "price": 0.0})
        c.delete_one({"_id": before[0]})
        oc.vector_index("by_v").refresh()  # another process's writes: seen at the next refresh (at most 1 s)
        found = [d["_id"] for d in oc.find({"g": {"$lt": 5}}, vector=x[1], n=5)]
        assert found[0] == "late" and before[0] not in found
        other.close()

    def test_index_over_a_listeners_outputs_searches_by_value(self, wh):
        c = wh.collection("texts")
        texts = ["red apple pie", "green apple tart", "blue sky today", "grey sky rain", "apple juice red",
                 "sky blue ocean", "rain and grey clouds", "pie with red cherries"]
        c.insert_many({"_id": f"t{i}", "text": t, "n": i} for i, t in enumerate(texts))
        c.attach("embed", embed_text, key="text")
        c.create_vector_index("by_text", listener="embed", engine=self.engine)
        found = c.find(like="red apple", n=3)
        assert {d["_id"] for d in found[:2]} == {"t0", "t4"}
        assert [d["_id"] for d in c.find({"n": {"$gte": 2}}, like="red apple", n=1)] == ["t4"]
        assert c.find(like={"text": "grey rain"}, n=1)[0]["_id"] == "t3"  # a document goes through its key
        c.insert_one({"_id": "t8", "text": "red apple red apple"})  # computed inline, searchable at once
        assert c.find(like="red apple", n=1)[0]["_id"] == "t8"
        c.update_one({"_id": "t8"}, {"$set": {"text": "nothing alike"}})
        assert c.find(like="red apple", n=1)[0]["_id"] != "t8"
        with pytest.raises(QueryError, match="by_text"):
            c.detach("embed")  # the index reads its outputs
        c.detach("embed", force=True)
        assert c.vector_indexes() == []

    # -- definitions and errors ---------------------------------------------------------------------------
    def test_definitions_listing_and_dropping(self, wh):
        c, x, _ = self._filled(wh, n=50)
        c.create_vector_index("by_v_l2", field="v", metric="l2", engine=self.engine)
        assert [i["name"] for i in c.vector_indexes()] == ["by_v", "by_v_l2"]
        assert c.vector_index().name == "by_v"  # the first is the default
        assert c.find(vector=x[3], n=1, index="by_v_l2")[0]["_id"] == "p0003"
        c.drop_vector_index("by_v_l2")
        assert [i["name"] for i in c.vector_indexes()] == ["by_v"]
        with pytest.raises(NotFound):
            c.vector_index("by_v_l2")
        c.drop()
        assert wh.collection("points").vector_indexes() == []

    def test_bad_requests_raise_typed_errors(self, wh):
        c, x, _ = self._filled(wh, n=30)
        with pytest.raises(VectorIndexError):
            c.find(vector=np.ones(3), n=5)  # wrong dimension
        with pytest.raises(VectorIndexError):
            c.find(vector=x[0], n=0)
        with pytest.raises(VectorIndexError):
            c.find(vector=[float("nan")] * DIMS)
        with pytest.raises(QueryError):
            c.find({"g": {"$bogus": 1}}, vector=x[0])
        with pytest.raises(QueryError):
            c.find(vector=x[0], sort=[("g", 1)])
        with pytest.raises(QueryError):
            c.find(n=3)
        with pytest.raises(NotFound):
            c.find(like={"_id": "missing"})
        with pytest.raises(NotFound):
            c.find(vector=x[0], index="nope")
        with pytest.raises(VectorIndexError):
            c.create_vector_index("bad name", field="v")
        with pytest.raises(VectorIndexError):
            c.create_vector_index("x", field="v", metric="hamming")
        with pytest.raises(NotFound):
            c.create_vector_index("x", listener="no_such_listener")
        with pytest.raises(mlwarehouse.DuplicateKey):
            c.create_vector_index("by_v", field="v")

    def test_projections_and_a_failing_model_on_the_query(self, wh):
        c, x, _ = self._filled(wh, n=40)
        found = c.find({"g": 1}, {"g": 1}, vector=x[1], n=2)
        assert [sorted(d) for d in found] == [["_id", "_score", "g"]] * 2
        assert all("v" not in d for d in c.find({}, {"v": 0}, vector=x[1], n=3))
        c.attach("unit", norm, key="v")
        c.create_vector_index("by_unit", listener="unit", engine=self.engine)
        assert c.find(like=x[4], n=1, index="by_unit")[0]["_id"] == "p0004"
        with pytest.raises(VectorIndexError, match="could not encode"):
            c.find(like="not numbers", n=1, index="by_unit")  # the model raises ValueError on it
