"""The two built-ins: imputation (a classifier trained from a collection, attached so every document gets its
prediction) and representation training (a contrastive encoder that beats the untrained one on held-out pairs,
served behind the listener with its vector index rebuilt); and SuperDuperDB's ``create_imputation``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sklearn.datasets import load_digits  # noqa: E402

from mlwarehouse.compat.superduperdb import SuperDuperClient  # noqa: E402
from mlwarehouse.errors import NotFound, QueryError  # noqa: E402


def _net(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y.astype(np.int64)


def test_imputation_reaches_its_accuracy_and_predicts_every_new_document(wh):
    X, y = _digits()
    c = wh.collection("digits")
    c.insert_many({"image": X[i], "label": int(y[i])} for i in range(1500))
    imputed = wh.training.impute(c, "guess", _net(), input="image", target="label", metrics=["accuracy"],
                                 epochs=12, batch_size=64, lr=3e-3, folds=0.2)
    accuracy = imputed.model.valid["accuracy"]
    print(f"imputation: valid-fold accuracy {accuracy:.3f}")
    assert accuracy >= 0.9, accuracy
    # every stored document has its prediction; new ones get theirs on insert, from the trained model
    assert c.count_documents({"_outputs.image.guess": {"$exists": True}}) == 1500
    new = c.insert_many({"image": X[i]} for i in range(1500, len(y))).inserted_ids
    docs = {d["_id"]: d for d in c.find({"_id": {"$in": new}})}
    predicted = np.array([int(docs[i]["_outputs"]["image"]["guess"]) for i in new])
    with torch.no_grad():
        expected = imputed.model.load()(torch.from_numpy(X[1500:])).argmax(1).numpy()
    assert (predicted == expected).all()
    print(f"imputation: accuracy of the predictions attached to {len(new)} new documents "
          f"{(predicted == y[1500:]).mean():.3f}")
    assert (predicted == y[1500:]).mean() > 0.85
    # lineage: the collection -> the fit's run and model -> the attached predictor
    downstream = {n.id for n in wh.lineage.downstream(imputed.model.id)}
    assert imputed.listener.model["id"] in downstream


def test_imputation_refuses_bad_requests(wh):
    c = wh.collection("d")
    c.insert_one({"image": np.zeros(64, np.float32), "label": 1})
    with pytest.raises(QueryError, match="must differ"):
        wh.training.impute(c, "g", _net(), input="image", target="image")
    with pytest.raises(QueryError, match="collection"):
        wh.training.impute("d", "g", _net(), input="image", target="label")


def _pairs(n: int, seed: int = 0):
    """Two views of n items: the same 8 signal dimensions (a fixed mixing) under 24 dimensions of large noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    mix = rng.normal(size=(8, 8))
    def view():
        return np.hstack([z @ mix + 0.1 * rng.normal(size=(n, 8)), 3.0 * rng.normal(size=(n, 24))]).astype(np.float32)
    return view(), view()


def _recall_at_10(c, ids: list[str], queries: dict) -> float:
    hits = 0
    for doc_id in ids:
        found = c.find(like=queries[doc_id], n=10)
        hits += doc_id in {d["_id"] for d in found}
    return hits / len(ids)


def test_representation_training_improves_recall_and_rebuilds_the_index(wh):
    a, b = _pairs(1500)
    c = wh.collection("pairs")
    ids = c.insert_many({"a": a[i], "b": b[i]} for i in range(len(a))).inserted_ids
    torch.manual_seed(0)
    encoder = torch.nn.Linear(32, 16)
    c.attach("embed", encoder, key="a", example_inputs=(torch.zeros(2, 32),))
    c.create_vector_index("search", listener="embed", metric="cosine")
    queries = {i: b[k] for k, i in enumerate(ids)}
    # held-out pairs: the documents the representation fit validates on
    _, held_out = wh.training.split(c, keys=["a", "b"], folds=0.2)
    before = _recall_at_10(c, held_out[:150], queries)
    result = wh.training.represent(c, encoder, views=("a", "b"), listener="embed", epochs=6, lr=0.01,
                                   batch_size=128, folds=0.2)
    assert sorted(result.fit.valid_ids()) == sorted(held_out)
    assert [spec["name"] for spec in c.vector_indexes()] == ["search"]
    after = _recall_at_10(c, held_out[:150], queries)
    print(f"recall@10 on held-out pairs: untrained {before:.3f}, trained {after:.3f}")
    assert after > before + 0.3 and after >= 0.6, (before, after)
    history = result.fit.history
    assert history[-1]["valid"]["match"] > history[0]["valid"]["match"]
    assert c.listener("embed").model["id"] != result.model.id  # the served copy is the listener's own record
    assert c.count_documents({"_outputs.a.embed": {"$exists": True}}) == len(ids)


def test_representation_needs_two_views_and_a_listener_that_reads_one(wh):
    c = wh.collection("p")
    c.insert_one({"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32), "c": np.zeros(4, np.float32)})
    with pytest.raises(QueryError, match="two views"):
        wh.training.represent(c, torch.nn.Linear(4, 2), views=["a"])
    with pytest.raises(NotFound):
        wh.training.represent(c, torch.nn.Linear(4, 2), views=["a", "b"], listener="nope")
    c.attach("e", torch.nn.Linear(4, 2), key="c", example_inputs=(torch.zeros(2, 4),))
    with pytest.raises(QueryError, match="not one of the views"):
        wh.training.represent(c, torch.nn.Linear(4, 2), views=["a", "b"], listener="e")


def test_superduperdb_create_imputation_trains_on_the_stored_folds(tmp_path):
    X, y = _digits()
    with SuperDuperClient(home=tmp_path / "wh") as client:
        docs = client.shop.digits
        docs.insert_many([{"image": X[i], "label": int(y[i])} for i in range(1200)])
        docs.create_model("exported", _net(), key="image", example_inputs=(torch.zeros(2, 64),))
        with pytest.raises(QueryError, match="exported graph"):
            docs.create_imputation("label_model", "exported", "cross_entropy", "label")
        docs.create_model("classifier", _net(), key="image")  # TorchScript: trainable
        imputed = docs.create_imputation("label_model", "classifier", "cross_entropy", "label",
                                         metrics=["accuracy"], epochs=10, lr=3e-3, batch_size=64)
        stored_valid = {d["_id"] for d in docs.native.find({"_fold": "valid"}, ["_id"])}
        assert set(imputed.fit.valid_ids()) == stored_valid and stored_valid
        assert imputed.model.valid["accuracy"] > 0.8
        assert "label_model" in docs.list_models()
        doc = docs.find_one({"_id": docs.insert_one({"image": X[1500]}).inserted_id})
        assert int(doc["_outputs"]["image"]["label_model"]) in range(10)
