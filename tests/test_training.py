"""Fits on the embedded warehouse: from a collection and from an item dataset, early stopping, the record of what a
fit saw, resuming after a crash, and the errors of bad specs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sklearn.datasets import load_digits  # noqa: E402

from mlwarehouse.errors import DependencyError, NotFound, QueryError  # noqa: E402
from mlwarehouse.training import EarlyStopping, Folds, TrainingError  # noqa: E402


def _digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y.astype(np.int64)


def _net(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


@pytest.fixture
def digits(wh):
    X, y = _digits()
    c = wh.collection("digits")
    c.insert_many({"image": X[i], "label": int(y[i]), "odd": bool(y[i] % 2)} for i in range(len(y)))
    return c


def test_fit_from_a_collection_logs_checkpoints_and_saves_the_model(wh, digits):
    fit = wh.training.fit(_net(), digits, inputs="image", target="label", metrics=["accuracy"], epochs=6,
                          batch_size=64, lr=3e-3, folds=Folds(valid=0.2, seed=3), keep_last=2, keep_best=1,
                          name="digits-mlp")
    assert fit.status == "complete" and fit.epochs_done == 6 and len(fit.history) == 6
    model = fit.model
    assert model.name == "digits-mlp" and model.fit == fit.id and model.valid["accuracy"] > 0.85
    # the final model reproduces its stored validation accuracy on exactly the documents the fit validated on
    valid = {d["_id"]: d for d in digits.find({"_id": {"$in": fit.valid_ids()}})}
    X = torch.from_numpy(np.stack([valid[i]["image"] for i in fit.valid_ids()]))
    y = torch.tensor([valid[i]["label"] for i in fit.valid_ids()])
    with torch.no_grad():
        accuracy = float((model.load()(X).argmax(1) == y).double().mean())
    assert accuracy == pytest.approx(model.valid["accuracy"], abs=1e-9)
    # one run, one train and one valid point per epoch; retention left the 2 last and the best epoch
    run = wh.runs.get(fit.runs[0])
    assert run.status == "complete" and run.fit == fit.id
    assert [p["epoch"] for p in run.history("valid")] == list(range(6))
    assert [p["epoch"] for p in run.history("train")] == list(range(6))
    checkpoints = wh.models.find("digits-mlp", checkpoints=True, where={"checkpoint": True})
    assert {c.epoch for c in checkpoints} >= {4, 5} and len(checkpoints) <= 3
    # what the fit saw: the two folds, disjoint, the same split the Folds give
    train, valid_ids = fit.train_ids(), fit.valid_ids()
    assert not set(train) & set(valid_ids) and len(train) + len(valid_ids) == 1797
    assert (train, valid_ids) == Folds(valid=0.2, seed=3).split(sorted(d["_id"] for d in digits.find({}, ["_id"])))
    assert wh.training.of_model(model).id == fit.id
    assert wh.training.find("digits-mlp")[0].id == fit.id


def test_early_stopping_restores_the_best_epoch(wh, digits):
    # a learning rate far too high: the validation loss gets worse after an epoch or two
    fit = wh.training.fit(_net(1), digits, inputs="image", target="label", metrics=["accuracy"], epochs=30,
                          batch_size=32, lr=0.5, optimizer="sgd", folds=0.3,
                          early_stopping=EarlyStopping("valid.accuracy", patience=2))
    assert fit.stopped_early and fit.epochs_done < 30
    curve = [h["valid"]["accuracy"] for h in fit.history]
    top = max(curve)
    assert fit.epochs_done == curve.index(top) + 3  # the first best epoch, then `patience` without improvement
    assert fit.best["value"] == top and curve[fit.best["epoch"]] == top  # (the last of equal epochs)
    assert fit.model.epoch == fit.best["epoch"] and fit.model.valid["accuracy"] == top
    assert fit.best_checkpoint.epoch == fit.best["epoch"]


def test_a_fit_filters_documents_and_skips_those_without_the_keys(wh, digits):
    digits.insert_many([{"image": np.zeros(64, np.float32)}] * 5)  # no label: never selected
    fit = wh.training.fit(_net(), digits, filter={"odd": True}, inputs="image", target="label", epochs=1)
    labels = {d["label"] for d in digits.find({"_id": {"$in": fit.train_ids() + fit.valid_ids()}})}
    assert labels <= {1, 3, 5, 7, 9}
    assert len(fit.train_ids()) + len(fit.valid_ids()) == digits.count_documents({"odd": True})


def test_new_documents_after_a_fit_do_not_change_its_record(wh, digits):
    fit = wh.training.fit(_net(), digits, inputs="image", target="label", epochs=1)
    before = (fit.train_ids(), fit.valid_ids())
    X, y = _digits()
    digits.insert_many({"image": X[i], "label": int(y[i])} for i in range(100))
    assert (fit.refresh().train_ids(), fit.refresh().valid_ids()) == before


def test_a_fit_records_its_lineage_and_holds_back_a_drop_of_its_collection(wh, digits):
    fit = wh.training.fit(_net(), digits, inputs="image", target="label", epochs=1, name="traced")
    collection = wh.catalog.record("digits")["_id"]
    up = {n.id: n for n in wh.lineage.upstream(fit.model.id)}
    assert fit.runs[0] in up and collection in up  # model <- run <- the collection it was trained on
    down = {n.id for n in wh.lineage.downstream(collection)}
    assert {fit.runs[0], fit.model.id} <= down
    with pytest.raises(DependencyError, match="collection 'digits'"):
        digits.drop()
    assert digits.count_documents({}) == 1797 and wh.catalog.record("digits") is not None  # nothing deleted
    digits.drop(force=True)
    assert wh.collection("digits").count_documents({}) == 0
    assert [n.deleted for n in wh.lineage.upstream(fit.model.id) if n.id == collection] == [True]


def test_fit_from_an_item_dataset(wh):
    X, y = _digits()
    ds = wh.items.from_arrays("digits", {"image": X, "label": y})
    fit = wh.training.fit(_net(), ds, inputs="image", target="label", metrics=["accuracy"], epochs=4, lr=3e-3,
                          batch_size=64, filter={"label": {"$lt": 5}})
    assert fit.model.valid["accuracy"] > 0.8
    assert len(fit.train_ids()) + len(fit.valid_ids()) == int((y < 5).sum())
    assert wh.runs.get(fit.runs[0]).datasets == [ds.id]
    assert fit.model.dataset == ds.id
    # the same fit named by its spelling, as a task carries it
    again = wh.training.fit(_net(), f"items:digits@{ds.version}", inputs="image", target="label", epochs=1,
                            filter={"label": {"$lt": 5}})
    assert again.train_ids() == fit.train_ids()


class Crash(Exception):
    pass


def test_a_crashed_fit_resumes_from_its_last_checkpoint_and_logs_each_epoch_once(wh, digits):
    calls = {"n": 0}
    train, _ = Folds().split(sorted(d["_id"] for d in digits.find({}, ["_id"])))
    batches = -(-len(train) // 64)

    def crashing(out, y):  # a loss that fails in the middle of the fourth epoch, the first time round
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 3 * batches + batches // 2 and torch.is_grad_enabled():
            raise Crash("power cut")
        return torch.nn.functional.cross_entropy(out, y)

    options = dict(inputs="image", target="label", epochs=6, batch_size=64, lr=3e-3, key="nightly", name="mlp",
                   metrics=["accuracy"])
    with pytest.raises(Crash):
        wh.training.fit(_net(), digits, loss=crashing, **options)
    crashed = wh.training.find("mlp")[0]
    assert crashed.status == "failed" and crashed.epochs_done == 3
    fit = wh.training.fit(_net(5), digits, loss=crashing, **options)  # other initial weights: replaced on resume
    assert fit.id == crashed.id and fit.status == "complete" and fit.epochs_done == 6 and len(fit.runs) == 2
    epochs = [p["epoch"] for r in fit.runs for p in wh.runs.get(r).history("valid")]
    assert sorted(epochs) == list(range(6))
    assert [h["epoch"] for h in fit.history] == list(range(6))
    # a completed fit with the same key is returned, not trained again
    assert wh.training.fit(_net(), digits, loss=crashing, **options).id == fit.id
    with pytest.raises(QueryError, match="another spec"):
        wh.training.fit(_net(), digits, loss=crashing, **{**options, "lr": 0.1})


def test_bad_specs_raise_before_anything_is_written(wh, digits):
    net = _net()
    with pytest.raises(QueryError, match="loss"):
        wh.training.fit(net, digits, inputs="image", target="label", loss="hinge")
    with pytest.raises(QueryError, match="optimizer"):
        wh.training.fit(net, digits, inputs="image", target="label", optimizer="lion")
    with pytest.raises(QueryError, match="folds"):
        wh.training.fit(net, digits, inputs="image", target="label", folds=1.5)
    with pytest.raises(QueryError, match="epochs"):
        wh.training.fit(net, digits, inputs="image", target="label", epochs=0)
    with pytest.raises(QueryError, match="early stopping"):
        wh.training.fit(net, digits, inputs="image", target="label", early_stopping="accuracy")
    with pytest.raises(NotFound):
        wh.training.fit(net, "collection:nothing", inputs="image", target="label")
    assert wh.training.find() == []
    with pytest.raises(TrainingError, match="no training documents"):
        wh.training.fit(net, digits, inputs="image", target="label", filter={"label": 99})
    with pytest.raises(TrainingError, match="model or loss raised"):
        wh.training.fit(net, digits, inputs="image", target="odd", loss="cross_entropy")
