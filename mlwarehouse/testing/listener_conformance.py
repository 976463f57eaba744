"""The listeners' conformance suite: models attached to a collection on any backend set.

Part of :class:`mlwarehouse.testing.collection_conformance.CollectionTests`, which test modules subclass. The
listeners' models are the top-level functions of this module (a listener's callable is stored by import path, so a
worker can import it); :data:`CALLS` counts their calls, so a test can tell a recomputation from a reuse.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlwarehouse import schema
from mlwarehouse.collections import ListenerError
from mlwarehouse.collections.worker import ListenerWorker
from mlwarehouse.errors import DuplicateKey, NotFound, QueryError

__all__ = ["ListenerTests", "CALLS", "double", "plus_one", "lengths", "broken", "norm"]

#: calls of each listener model of this module, by function name (reset by the tests that read it)
CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


def double(x):
    """A listener model: twice its input."""
    _count("double")
    return x * 2


def plus_one(x):
    """A listener model over another listener's output."""
    _count("plus_one")
    return x + 1


def lengths(x):
    """A listener model returning JSON."""
    _count("lengths")
    return {"n": len(x), "upper": str(x).upper()}


def norm(x):
    """A listener model returning an array (an embedding-like output)."""
    _count("norm")
    x = np.asarray(x, dtype=np.float32)
    return x / max(float(np.linalg.norm(x)), 1e-9)


def broken(x):
    """A listener model that always raises."""
    _count("broken")
    raise ValueError(f"broken model cannot take {x!r}")


def _out(doc: dict, key: str, name: str):
    """The output of listener ``name`` for ``key`` in a read document (None if it has none)."""
    node = doc.get("_outputs")
    for part in [*key.split("."), name]:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class ListenerTests:
    """Behaviour every (index, blob store) pair must show for listeners, through the public API."""

    @pytest.fixture
    def wh(self):  # pragma: no cover - supplied by subclasses
        raise NotImplementedError

    @pytest.fixture(autouse=True)
    def _calls(self):
        CALLS.clear()
        yield
        CALLS.clear()

    # -- listeners ---------------------------------------------------------------------------------------------
    def test_listener_backfills_computes_on_insert_and_on_update_of_its_key(self, wh):
        c = wh.collection("numbers")
        c.insert_many([{"_id": f"n{i}", "x": i, "y": "keep"} for i in range(5)])
        listener = c.attach("twice", double, key="x")
        assert listener.name == "twice" and [x.name for x in c.listeners()] == ["twice"]
        assert c.listener("twice").key == "x" and CALLS["double"] == 5
        assert {d["_id"]: _out(d, "x", "twice") for d in c.find()} == {f"n{i}": 2 * i for i in range(5)}
        assert c.progress("twice") == {"done": 5, "pending": 0, "failed": 0, "skipped": 0}
        c.insert_one({"_id": "n9", "x": 9})
        assert _out(c.find_one({"_id": "n9"}), "x", "twice") == 18 and CALLS["double"] == 6
        c.update_one({"_id": "n1"}, {"$set": {"y": "other field"}})
        c.update_many({}, {"$set": {"z": 1}})
        assert CALLS["double"] == 6  # the key did not change: no call
        assert _out(c.find_one({"_id": "n1"}), "x", "twice") == 2
        c.update_one({"_id": "n1"}, {"$inc": {"x": 10}})
        assert CALLS["double"] == 7 and _out(c.find_one({"_id": "n1"}), "x", "twice") == 22
        c.replace_one({"_id": "n2"}, {"x": 100})
        assert CALLS["double"] == 8 and _out(c.find_one({"_id": "n2"}), "x", "twice") == 200
        # an output is queryable, sortable and projectable, and the listener's state by projection
        assert [d["_id"] for d in c.find({"_outputs.x.twice": {"$gte": 100}})] == ["n2"]
        assert [d["_id"] for d in c.find(sort=[("_outputs.x.twice", -1)], limit=3)] == ["n2", "n1", "n9"]
        assert c.find_one({"_id": "n4"}, {"_outputs.x.twice": 1}) == {"_id": "n4", "_outputs": {"x": {"twice": 8}}}
        state = c.find_one({"_id": "n1"}, {"_listeners": 1})["_listeners"]["twice"]
        assert state["status"] == "done" and state["model"] == {"target": f"{__name__}:double"}
        c.update_one({"_id": "n3"}, {"$unset": {"x": ""}})  # the key is gone: no output, skipped
        assert "_outputs" not in c.find_one({"_id": "n3"})
        assert c.progress("twice") == {"done": 5, "pending": 0, "failed": 0, "skipped": 1}
        with pytest.raises(DuplicateKey):
            c.attach("twice", double, key="y")
        with pytest.raises(NotFound):
            c.listener("nope")

    def test_listener_outputs_of_any_type_and_documents_lacking_the_key(self, wh):
        c = wh.collection("texts")
        c.insert_many([{"_id": "t1", "s": "ab", "v": [3.0, 4.0]}, {"_id": "t2", "other": 1}])
        c.attach("meta", lengths, key="s")
        c.attach("unit", norm, key="v")
        t1, t2 = c.find_one({"_id": "t1"}), c.find_one({"_id": "t2"})
        assert _out(t1, "s", "meta") == {"n": 2, "upper": "AB"}
        unit = _out(t1, "v", "unit")
        assert isinstance(unit, np.ndarray) and unit.dtype == np.float32 and np.allclose(unit, [0.6, 0.8])
        assert "_outputs" not in t2
        assert c.progress("meta")["skipped"] == 1 and c.progress("unit")["skipped"] == 1

    def test_delete_and_detach_remove_outputs(self, wh):
        c = wh.collection("detaching")
        rng = np.random.default_rng(2)
        c.insert_many([{"_id": f"d{i}", "v": rng.standard_normal(1000), "x": i} for i in range(4)])
        c.attach("unit", norm, key="v")  # outputs large enough to be blobs
        c.attach("twice", double, key="x")
        out_keys = set(c.find_one({"_id": "d0"}, {"_blobs": 1})["_blobs"])
        assert len(out_keys) == 2  # the input and the output
        c.delete_one({"_id": "d0"})
        assert not any(wh.blobs.exists(k) for k in out_keys)
        assert c.count_documents({"_outputs.x.twice": {"$exists": True}}) == 3
        old_keys = set(c.find_one({"_id": "d1"}, {"_blobs": 1})["_blobs"])
        c.update_one({"_id": "d1"}, {"$set": {"v": rng.standard_normal(1000)}})  # a new input and a new output
        new_keys = set(c.find_one({"_id": "d1"}, {"_blobs": 1})["_blobs"])
        assert len(new_keys) == 2 and not new_keys & old_keys and not any(wh.blobs.exists(k) for k in old_keys)
        before = {k for d in c.find({}, {"_blobs": 1}) for k in d["_blobs"]}  # inputs and outputs
        assert c.detach("unit") == 3
        assert [x.name for x in c.listeners()] == ["twice"]
        left = {k for d in c.find({}, {"_blobs": 1}) for k in d["_blobs"]}
        assert len(before) == 6 and len(left) == 3 and all(wh.blobs.exists(k) for k in left)
        assert not any(wh.blobs.exists(k) for k in before - left)  # the outputs' blobs went
        for doc in c.find({}, {"_listeners": 1, "_outputs": 1}):
            assert set(doc["_outputs"]) == {"x"} and set(doc["_listeners"]) == {"twice"}
        c.insert_one({"_id": "d9", "v": rng.standard_normal(1000), "x": 9})
        assert set(c.find_one({"_id": "d9"})["_outputs"]) == {"x"}  # a detached listener computes no more
        assert c.detach("twice") == 4
        assert all("_outputs" not in d and "_listeners" not in d for d in c.find({}, {"_listeners": 1, "x": 1,
                                                                                   "_outputs": 1}))
        with pytest.raises(NotFound):
            c.detach("twice")
        c.attach("unit", norm, key="v")
        c.drop()  # documents, listeners, the catalog entry and every blob go
        assert c.count_documents() == 0 and c.listeners() == [] and "detaching" not in wh.project().catalog.names()
        assert list(wh.blobs.list()) == []

    def test_dependency_chain_detach_refused_and_forced(self, wh):
        c = wh.collection("chain")
        c.insert_many([{"_id": f"c{i}", "x": i} for i in range(3)])
        c.attach("a", double, key="x")
        c.attach("b", plus_one, key="_outputs.x.a")
        assert c.listener("b").upstream == ("a",)
        assert {d["_id"]: _out(d, "_outputs.x.a", "b") for d in c.find()} == {"c0": 1, "c1": 3, "c2": 5}
        c.insert_one({"_id": "c3", "x": 3})
        doc = c.find_one({"_id": "c3"})
        assert _out(doc, "x", "a") == 6 and _out(doc, "_outputs.x.a", "b") == 7
        c.update_one({"_id": "c0"}, {"$set": {"x": 50}})  # a, then b, recomputed in order
        doc = c.find_one({"_id": "c0"})
        assert _out(doc, "x", "a") == 100 and _out(doc, "_outputs.x.a", "b") == 101
        assert CALLS == {"double": 5, "plus_one": 5}
        assert c.progress("b") == {"done": 4, "pending": 0, "failed": 0, "skipped": 0}
        with pytest.raises(QueryError, match="'b'"):
            c.detach("a")
        assert {x.name for x in c.listeners()} == {"a", "b"} and _out(c.find_one({"_id": "c1"}), "x", "a") == 2
        assert c.detach("a", force=True) == 8
        assert c.listeners() == [] and c.count_documents({"_outputs": {"$exists": True}}) == 0
        assert c.count_documents({"_listeners": {"$exists": True}}) == 0

    def test_where_filter(self, wh):
        c = wh.collection("filtered")
        c.insert_many([{"_id": f"w{i}", "x": i, "kind": "ab"[i % 2]} for i in range(4)])
        c.attach("only_a", double, key="x", where={"kind": "a"})
        assert CALLS["double"] == 2
        assert {d["_id"]: _out(d, "x", "only_a") for d in c.find()} == {"w0": 0, "w1": None, "w2": 4, "w3": None}
        assert c.progress("only_a") == {"done": 2, "pending": 0, "failed": 0, "skipped": 2}
        c.insert_many([{"_id": "w4", "x": 4, "kind": "a"}, {"_id": "w5", "x": 5, "kind": "b"}])
        assert CALLS["double"] == 3 and _out(c.find_one({"_id": "w4"}), "x", "only_a") == 8
        c.update_one({"_id": "w2"}, {"$set": {"kind": "b"}})  # stops matching: its output goes
        assert "_outputs" not in c.find_one({"_id": "w2"}) and CALLS["double"] == 3
        c.update_one({"_id": "w1"}, {"$set": {"kind": "a"}})  # starts matching: computed
        assert _out(c.find_one({"_id": "w1"}), "x", "only_a") == 2 and CALLS["double"] == 4
        assert c.progress("only_a") == {"done": 3, "pending": 0, "failed": 0, "skipped": 3}

    def test_inline_model_that_raises_inserts_nothing(self, wh):
        c = wh.collection("fragile")
        c.attach("bad", broken, key="x")
        with pytest.raises(ListenerError, match="broken model"):
            c.insert_many([{"_id": "f1", "x": 1}, {"_id": "f2", "x": 2}])
        assert c.count_documents() == 0
        with pytest.raises(ListenerError):
            c.insert_one({"x": 3})
        assert c.count_documents() == 0
        c.insert_one({"_id": "no_key", "y": 1})  # the model is not called: skipped
        assert c.progress("bad") == {"done": 0, "pending": 0, "failed": 0, "skipped": 1}
        with pytest.raises(ListenerError):  # an update that gives it an input: marked failed, and raised
            c.update_one({"_id": "no_key"}, {"$set": {"x": 1}})
        assert c.find_one({"_id": "no_key"})["x"] == 1
        assert c.find_one({"_id": "no_key"}, {"_listeners": 1})["_listeners"]["bad"]["status"] == "failed"

    def test_worker_listeners_compute_what_inline_ones_do(self, wh):
        c = wh.collection("queued")
        c.insert_many([{"_id": f"q{i}", "x": i, "v": [float(i), 1.0]} for i in range(5)])
        c.attach("inline", double, key="x")
        c.attach("worked", double, key="x", compute="workers", batch_size=2)
        c.attach("unit", norm, key="v", compute="workers")
        assert c.progress("worked") == {"done": 0, "pending": 5, "failed": 0, "skipped": 0}
        assert wh.tasks.has_unfinished(schema.LISTENER_TASK)
        c.insert_one({"_id": "q9", "x": 9, "v": [0.0, 2.0]})
        assert _out(c.find_one({"_id": "q9"}), "x", "worked") is None
        assert ListenerWorker(wh.project(), once=True).run() >= 4
        docs = list(c.find())
        assert len(docs) == 6
        for doc in docs:
            assert _out(doc, "x", "worked") == _out(doc, "x", "inline") == doc["x"] * 2
            assert np.allclose(_out(doc, "v", "unit"), norm(doc["v"]))
        assert c.progress("worked") == {"done": 6, "pending": 0, "failed": 0, "skipped": 0}
        assert not wh.tasks.has_unfinished(schema.LISTENER_TASK)
        calls = CALLS["double"]
        c.update_one({"_id": "q1"}, {"$set": {"x": 7}})
        c.update_one({"_id": "q2"}, {"$set": {"other": 1}})
        assert _out(c.find_one({"_id": "q1"}), "x", "inline") == 14  # inline now, the worker's after a run
        ListenerWorker(wh.project(), once=True).run()
        assert _out(c.find_one({"_id": "q1"}), "x", "worked") == 14 and CALLS["double"] == calls + 2
        assert c.detach("worked") == 6

    def test_a_chain_across_workers_and_inline_listeners(self, wh):
        c = wh.collection("mixed_chain")
        c.attach("a", double, key="x", compute="workers")
        c.attach("b", plus_one, key="_outputs.x.a")  # inline, after a worker's output
        c.attach("c", plus_one, key="_outputs._outputs.x.a.b", compute="workers")
        c.insert_many([{"_id": f"m{i}", "x": i} for i in range(3)])
        assert c.progress("b")["pending"] == 3  # waiting for a
        ListenerWorker(wh.project(), once=True).run()
        expect = {f"m{i}": (2 * i, 2 * i + 1, 2 * i + 2) for i in range(3)}
        got = {d["_id"]: (_out(d, "x", "a"), _out(d, "_outputs.x.a", "b"), _out(d, "_outputs._outputs.x.a.b", "c"))
               for d in c.find()}
        assert got == expect
        c.update_one({"_id": "m1"}, {"$set": {"x": 10}})
        ListenerWorker(wh.project(), once=True).run()
        doc = c.find_one({"_id": "m1"})
        assert (_out(doc, "x", "a"), _out(doc, "_outputs.x.a", "b"), _out(doc, "_outputs._outputs.x.a.b", "c")) \
            == (20, 21, 22)
        assert [c.progress(n)["done"] for n in "abc"] == [3, 3, 3]
        assert CALLS == {"double": 4, "plus_one": 8}

    def test_torch_module_listeners_inline_and_on_workers(self, wh):
        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 2)
        c = wh.collection("embedded")
        c.insert_many([{"_id": f"t{i}", "v": torch.full((4,), float(i))} for i in range(3)])
        c.attach("lin", net, key="v")
        c.attach("lin_w", net, key="v", compute="workers", batch_size=2)
        assert sorted(r.name for r in wh.models.find()) == ["embedded.lin", "embedded.lin_w"]
        c.insert_one({"_id": "t9", "v": np.ones(4, dtype=np.float32)})  # an array: given to the module as a tensor
        ListenerWorker(wh.project(), once=True).run()
        with torch.no_grad():
            for doc in c.find():
                v = doc["v"]
                want = net(v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)))
                for name in ("lin", "lin_w"):
                    assert isinstance(_out(doc, "v", name), torch.Tensor)
                    assert torch.allclose(_out(doc, "v", name), want, atol=1e-6), (doc["_id"], name)
        assert c.detach("lin") == 4 and [r.name for r in wh.models.find()] == ["embedded.lin_w"]

    def test_worker_model_that_raises_marks_documents_failed(self, wh):
        c = wh.collection("failing")
        c.insert_many([{"_id": f"e{i}", "x": i} for i in range(3)] + [{"_id": "e_none", "y": 0}])
        c.attach("bad", broken, key="x", compute="workers")
        ListenerWorker(wh.project(), once=True).run()
        assert c.progress("bad") == {"done": 0, "pending": 0, "failed": 3, "skipped": 1}
        failed = list(c.find({"_listeners.bad.status": "failed"}, {"_listeners": 1}))
        assert [d["_id"] for d in failed] == ["e0", "e1", "e2"]
        for doc in failed:
            state = doc["_listeners"]["bad"]
            assert state["status"] == "failed"
            assert "Traceback" in state["error"] and "broken model cannot take" in state["error"]
        assert c.count_documents({"_outputs": {"$exists": True}}) == 0 and c.count_documents() == 4
        tasks = wh.tasks.find(schema.LISTENER_TASK)
        assert tasks and {t.status for t in tasks} == {"failed"}
        assert "broken model cannot take" in tasks[0].doc["error"]
        # a retry puts them back to pending; they fail again, and nothing else changed
        assert c.retry("bad") == 3
        ListenerWorker(wh.project(), once=True).run()
        assert c.progress("bad")["failed"] == 3 and CALLS["broken"] == 2  # once a batch: a batch fails whole
