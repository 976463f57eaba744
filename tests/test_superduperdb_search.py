"""SuperDuperDB's semantic search on the warehouse: the getting-started example continued with semantic indexes
and ``$like`` queries (with and without a filter, similar first or not), checked against brute force, in this
process and in a second one; measures by name and custom ones (reranking); errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_superduperdb import EXAMPLE, MY_MODULE  # noqa: E402  (the getting-started example, as written there)

from mlwarehouse.compat.superduperdb import SuperDuperClient  # noqa: E402
from mlwarehouse.compat.superduperdb_search import RERANK, css, dot, l2  # noqa: E402
from mlwarehouse.errors import (  # noqa: E402
    CodecError,
    DuplicateKey,
    NotFound,
    QueryError,
    VectorIndexError,
)
from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

#: a user's measures: SuperDuperDB's css as users wrote it, and one no index metric is (minus the L1 distance)
MY_MEASURES = textwrap.dedent("""\
    import torch


    def my_css(x, y):
        x = x.div(x.norm(dim=1)[:, None])
        y = y.div(y.norm(dim=1)[:, None])
        return torch.mm(x, y.transpose(0, 1))


    def neg_l1(x, y):
        return -(x[:, None, :] - y[None, :, :]).abs().sum(-1)
""")

MODULES = ("my_module", "my_measures")


@pytest.fixture
def modules(tmp_path, monkeypatch):
    (tmp_path / "my_module.py").write_text(MY_MODULE)
    (tmp_path / "my_measures.py").write_text(MY_MEASURES)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    yield tmp_path
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def example(modules):
    """The example as written, then a semantic index over its model; the collection and the example's model."""
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(EXAMPLE, "getting_started.py", "exec"), namespace)
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 64)
    docs = namespace["docs"]
    docs.create_semantic_index("linear_index", ["linear_embedding"], keys=["x"], measure="css")
    for i, doc in enumerate(docs.find({}, {"_id": 1})):
        docs.update_one({"_id": doc["_id"]}, {"$set": {"group": i % 3}})
    yield docs, linear
    docs.database.client.close()


def encode(x) -> dict:
    return {"_content": {"bytes": x.numpy().tobytes()}}


def query(seed: int = 1):
    return torch.randn(1024, generator=torch.Generator().manual_seed(seed))


SCORES = {
    "css": lambda q, m: (m / np.linalg.norm(m, axis=1, keepdims=True)) @ (q / np.linalg.norm(q)),
    "dot": lambda q, m: m @ q,
    "l2": lambda q, m: -np.linalg.norm(m - q, axis=1),
    "l1": lambda q, m: -np.abs(m - q).sum(1),
}


def brute_force(docs, linear, q, n, measure="css", filter=None, similar_first=False):
    """``[(id, score)]`` of a $like query by scoring every stored output with the measure."""
    everything = list(docs.find({}))
    matching = {d["_id"] for d in docs.find(filter or {}, {"_id": 1})}
    pool = everything if similar_first else [d for d in everything if d["_id"] in matching]
    outputs = np.stack([d["_outputs"]["x"]["linear_embedding"].numpy() for d in pool])
    scores = SCORES[measure](linear(q).detach().numpy(), outputs)
    ranked = [(pool[i]["_id"], float(scores[i])) for i in np.argsort(-scores, kind="stable")[:n]]
    return [r for r in ranked if r[0] in matching] if similar_first else ranked


def same(found, expected, atol=1e-4):
    assert [d["_id"] for d in found] == [i for i, _ in expected]
    np.testing.assert_allclose([d["_score"] for d in found], [s for _, s in expected], atol=atol, rtol=1e-5)


def test_like_queries_on_the_getting_started_example_match_brute_force(example):
    docs, linear = example
    q = query()
    found = docs.find({"$like": {"document": {"x": encode(q)}, "n": 10}})
    assert len(found) == 10 and all(set(d) >= {"_id", "x", "_fold", "_outputs", "_score"} for d in found)
    same(found, brute_force(docs, linear, q, 10))
    # the filter without $like applies: matches then similar (default), or similar then matches
    flt = {"group": 1}
    found = docs.find({"$like": {"document": {"x": encode(q)}, "n": 10}, **flt})
    assert len(found) == 10 and {d["group"] for d in found} == {1}
    same(found, brute_force(docs, linear, q, 10, filter=flt))
    found = docs.find({"$like": {"document": {"x": encode(q)}, "n": 10}, **flt}, similar_first=True)
    expected = brute_force(docs, linear, q, 10, filter=flt, similar_first=True)
    assert 0 < len(expected) < 10
    same(found, expected)
    # fewer matching documents than n: all of them, nearest first
    valid = {"_fold": "valid"}
    found = docs.find({"$like": {"document": {"x": q}, "n": 50}, **valid})
    assert len(found) == docs.count_documents(valid)
    same(found, brute_force(docs, linear, q, 50, filter=valid))
    # a projection, find_one, like= and an inserted document found at once
    found = docs.find({"$like": {"document": {"x": encode(q)}, "n": 3}}, {"_id": 1})
    assert [set(d) for d in found] == [{"_id", "_score"}] * 3
    same(found, brute_force(docs, linear, q, 3))
    assert docs.find_one({"$like": {"document": {"x": encode(q)}, "n": 5}})["_id"] == found[0]["_id"]
    same(docs.find(like={"x": q}, n=3), brute_force(docs, linear, q, 3))
    new = docs.insert_one({"x": encode(q), "group": 1}).inserted_id
    found = docs.find({"$like": {"document": {"x": encode(q)}, "n": 3}, "group": 1})
    assert found[0]["_id"] == new and found[0]["_score"] == pytest.approx(1.0, abs=1e-5)
    same(found, brute_force(docs, linear, q, 3, filter={"group": 1}))
    docs.delete_one({"_id": new})
    first = found[1]["_id"]  # a stored document's own vector
    assert docs.find({"$like": {"document": {"_id": first}, "n": 1}})[0]["_id"] == first
    assert new not in [d["_id"] for d in docs.find({"$like": {"document": {"x": q}, "n": 3}})]


def test_measures_by_name_and_the_default_semantic_index(example):
    docs, linear = example
    q = query(2)
    docs.create_semantic_index("by_dot", "linear_embedding", measure="dot")
    docs.create_measure("l2")
    assert docs.create_measure("our_dot", dot) == {"name": "our_dot", "function": None, "metric": "ip"}
    assert docs.create_measure("our_l2", "mlwarehouse.compat.superduperdb_search:l2")["function"] is None
    m, v = np.random.default_rng(0).standard_normal((2, 5, 3))
    for function, measure in ((css, "css"), (dot, "dot"), (l2, "l2")):  # the built-in functions, as measures
        np.testing.assert_allclose(function(torch.from_numpy(v[:1]), m)[0], SCORES[measure](v[0], m), rtol=1e-5)
    docs.create_semantic_index("by_l2", ["linear_embedding"], measure="l2")
    assert docs.list_semantic_indexes() == ["linear_index", "by_dot", "by_l2"]
    assert [x["metric"] for x in docs.native.vector_indexes()] == ["cosine", "ip", "l2"]
    like = {"$like": {"document": {"x": encode(q)}, "n": 8}, "group": {"$in": [0, 2]}}
    for index, measure in (("by_dot", "dot"), ("by_l2", "l2"), ("linear_index", "css")):
        same(docs.find(like, semantic_index=index), brute_force(docs, linear, q, 8, measure, like_rest(like)))
    assert docs.semantic_index == "linear_index"  # the first created
    docs.semantic_index = "by_l2"
    fresh = SuperDuperClient().my_database.my_collection  # another client reads the same records
    assert fresh.semantic_index == "by_l2"
    same(fresh.find(like), brute_force(docs, linear, q, 8, "l2", like_rest(like)))
    same(fresh.find(like, semantic_index="linear_index"), brute_force(docs, linear, q, 8, "css", like_rest(like)))
    docs.delete_semantic_index("by_l2")  # the default goes back to the first
    assert fresh.semantic_index == "linear_index" and fresh.list_semantic_indexes() == ["linear_index", "by_dot"]
    assert [x["name"] for x in docs.native.vector_indexes()] == ["linear_index", "by_dot"]
    same(fresh.find(like), brute_force(docs, linear, q, 8, "css", like_rest(like)))
    docs.delete_model("linear_embedding")  # its semantic indexes go with it
    assert docs.list_semantic_indexes() == [] and docs.semantic_index is None and docs.native.vector_indexes() == []


def like_rest(like: dict) -> dict:
    return {k: v for k, v in like.items() if k != "$like"}


def test_a_custom_importable_measure_reranks(example):
    from my_measures import my_css, neg_l1
    docs, linear = example
    q = query(3)
    docs.create_measure("l1", neg_l1, metric="l2")
    docs.create_semantic_index("by_l1", ["linear_embedding"], measure="l1")
    assert docs.native.vector_index("by_l1").spec.metric == "l2"  # the ANN part: the closest built-in metric
    like = {"$like": {"document": {"x": encode(q)}, "n": 5}}
    found = docs.find(like, semantic_index="by_l1")
    same(found, brute_force(docs, linear, q, 5, "l1"), atol=1e-3)
    flt = {"group": 2}
    same(docs.find({**like, **flt}, semantic_index="by_l1"), brute_force(docs, linear, q, 5, "l1", flt), atol=1e-3)
    same(docs.find({**like, **flt}, semantic_index="by_l1", similar_first=True),
         brute_force(docs, linear, q, 5, "l1", flt, similar_first=True), atol=1e-3)
    # a measure function given to create_semantic_index is registered under its name
    docs.create_semantic_index("by_my_css", ["linear_embedding"], measure=my_css)
    assert docs.list_measures() == ["l1", "my_css"]
    record = docs.catalog.record(docs.name)["measures"]["my_css"]
    assert record == {"name": "my_css", "function": "my_measures:my_css", "metric": "cosine"}
    same(docs.find(like, semantic_index="by_my_css"), brute_force(docs, linear, q, 5, "css"))
    assert RERANK == 4


def run(script: str, env: dict, cwd) -> str:
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


#: the same queries from a second process, printed as JSON
SECOND = textwrap.dedent("""\
    import json, torch
    from mlwarehouse.compat.superduperdb import SuperDuperClient
    docs = SuperDuperClient().my_database.my_collection
    q = torch.randn(1024, generator=torch.Generator().manual_seed(1))
    like = {'$like': {'document': {'x': {'_content': {'bytes': q.numpy().tobytes()}}}, 'n': 10}}
    out = {'default': docs.semantic_index, 'indexes': docs.list_semantic_indexes()}
    for key, kw in (('plain', {}), ('filtered', {'group': 1}), ('first', {'group': 1})):
        found = docs.find({**like, **kw}, similar_first=key == 'first', semantic_index='linear_index')
        out[key] = [[d['_id'], d['_score']] for d in found]
    out['l1'] = [[d['_id'], d['_score']] for d in docs.find(like)]
    print(json.dumps(out))
""")


def test_a_second_process_gives_the_same_answers(example, modules, subprocess_env):
    from my_measures import neg_l1
    docs, linear = example
    docs.create_measure("l1", neg_l1, metric="l2")
    docs.create_semantic_index("by_l1", ["linear_embedding"], measure="l1")
    docs.semantic_index = "by_l1"
    env = {**subprocess_env, "PYTHONPATH": f"{modules}:{subprocess_env['PYTHONPATH']}",
           "MLW_TRUSTED_MODULES": "my_module,my_measures"}
    out = json.loads(run(SECOND, env, modules).strip().splitlines()[-1])
    assert out["default"] == "by_l1" and out["indexes"] == ["linear_index", "by_l1"]
    q = query(1)
    like = {"$like": {"document": {"x": encode(q)}, "n": 10}}
    for key, kw in (("plain", {}), ("filtered", {"group": 1}), ("first", {"group": 1})):
        here = docs.find({**like, **kw}, similar_first=key == "first", semantic_index="linear_index")
        assert [d["_id"] for d in here] == [i for i, _ in out[key]]
        np.testing.assert_allclose([d["_score"] for d in here], [s for _, s in out[key]], atol=1e-5)
        same(here, brute_force(docs, linear, q, 10, filter=kw, similar_first=key == "first"))
    same(docs.find(like), [tuple(x) for x in out["l1"]], atol=1e-3)
    same(docs.find(like), brute_force(docs, linear, q, 10, "l1"), atol=1e-3)
    # a process that does not trust the measure's module is refused before importing it
    env["MLW_TRUSTED_MODULES"] = "my_module"
    refused = run("from mlwarehouse.compat.superduperdb import SuperDuperClient\n"
                  "from mlwarehouse.errors import PickleNotAllowed\n"
                  "import torch\n"
                  "docs = SuperDuperClient().my_database.my_collection\n"
                  "try:\n"
                  "    docs.find({'$like': {'document': {'x': torch.zeros(1024)}, 'n': 3}})\n"
                  "except PickleNotAllowed as exc:\n"
                  "    print('refused', exc)\n", env, modules)
    assert "refused" in refused and "my_measures" in refused


def test_create_model_with_a_semantic_index(modules):
    docs = SuperDuperClient().db.coll
    torch.manual_seed(5)
    model = torch.nn.Linear(32, 8)
    with pytest.raises(TypeError, match="semantic_index=True"):
        docs.create_model("m", model, key="x", measure="dot")
    with pytest.raises(NotFound, match="'nope'"):
        docs.create_model("m", model, key="x", semantic_index=True, measure="nope")
    assert docs.list_models() == []  # nothing attached
    xs = [torch.randn(32) for _ in range(40)]
    docs.insert_many([{"x": x, "k": i % 2} for i, x in enumerate(xs)])
    docs.create_model("m", model, key="x", semantic_index=True, measure="dot")
    assert docs.list_semantic_indexes() == ["m"] and docs.semantic_index == "m"
    q = torch.randn(32)
    found = docs.find({"$like": {"document": {"x": q}, "n": 4}, "k": 1})
    stored = list(docs.find({"k": 1}))
    scores = np.stack([d["_outputs"]["x"]["m"].numpy() for d in stored]) @ model(q).detach().numpy()
    expected = [(stored[i]["_id"], float(scores[i])) for i in np.argsort(-scores)[:4]]
    same(found, expected)
    assert docs.delete_model("m") == 40 and docs.list_semantic_indexes() == []


def test_errors_are_typed(example):
    docs, _ = example
    like = {"$like": {"document": {"x": torch.zeros(1024)}, "n": 3}}
    with pytest.raises(NotFound, match="'nope'.*'linear_index'"):
        docs.find(like, semantic_index="nope")
    with pytest.raises(NotFound, match="'nope'"):
        docs.semantic_index = "nope"
    with pytest.raises(NotFound, match="'nope'"):
        docs.delete_semantic_index("nope")
    with pytest.raises(CodecError, match="cannot be imported by another process"):
        docs.create_measure("lam", lambda x, y: x @ y.T)

    def local(x, y):
        return x @ y.T
    with pytest.raises(CodecError, match="cannot be imported by another process"):
        docs.create_measure("local", local)
    with pytest.raises(CodecError, match="cannot be imported by another process"):
        docs.create_semantic_index("by_lambda", ["linear_embedding"], measure=lambda x, y: x @ y.T)
    with pytest.raises(VectorIndexError, match="not a built-in measure"):
        docs.create_measure("mine")
    with pytest.raises(NotFound, match="no measure 'mine'"):
        docs.create_semantic_index("by_mine", ["linear_embedding"], measure="mine")
    with pytest.raises(NotFound, match="'no_model'"):
        docs.create_semantic_index("by_none", ["no_model"])
    with pytest.raises(VectorIndexError, match="keys"):
        docs.create_semantic_index("by_y", ["linear_embedding"], keys=["y"])
    with pytest.raises(NotImplementedError, match="training"):
        docs.create_semantic_index("trained", ["linear_embedding"], loss="ranking")
    with pytest.raises(DuplicateKey, match="'linear_index'"):
        docs.create_semantic_index("linear_index", ["linear_embedding"])
    with pytest.raises(QueryError, match=r"\$like is"):
        docs.find({"$like": {"x": torch.zeros(1024)}})
    with pytest.raises(QueryError, match="positive integer"):
        docs.find({"$like": {"document": {"x": torch.zeros(1024)}, "n": 0}})
    with pytest.raises(QueryError, match="limit"):
        docs.find(like, limit=3)
    with pytest.raises(VectorIndexError, match="'x'"):
        docs.find({"$like": {"document": {"y": torch.zeros(1024)}, "n": 3}})
    assert docs.list_semantic_indexes() == ["linear_index"] and docs.list_measures() == []
    docs.delete_semantic_index("linear_index")
    with pytest.raises(NotFound, match="no semantic index"):
        docs.find(like)


def test_like_queries_on_mongodb(modules, mongo_server):  # noqa: F811
    client = SuperDuperClient(host=fresh_uri(mongo_server))
    try:
        docs = client.my_database.my_collection
        torch.manual_seed(7)
        model = torch.nn.Linear(16, 4)
        docs.create_model("m", model, key="x", semantic_index=True)
        docs.insert_many([{"x": torch.randn(16), "k": i % 2} for i in range(30)])
        q = torch.randn(16)
        found = docs.find({"$like": {"document": {"x": q}, "n": 5}, "k": 0})
        stored = list(docs.find({"k": 0}))
        scores = SCORES["css"](model(q).detach().numpy(), np.stack([d["_outputs"]["x"]["m"].numpy() for d in stored]))
        same(found, [(stored[i]["_id"], float(scores[i])) for i in np.argsort(-scores)[:5]])
    finally:
        client.warehouse.index.conn.drop_database()
        client.close()
