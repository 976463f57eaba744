"""Evaluations: unique per (model, data, metric), replace on request, queries (best on a test set, every evaluation
of a model), query specs with folds as data, lineage edges, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from mlwarehouse.errors import InvalidDocument, NotFound, QueryError
from mlwarehouse.training.folds import Folds


@pytest.fixture
def lab(wh):
    march = wh.datasets.save(np.arange(4), "test", tags=["march"])
    april = wh.datasets.save(np.arange(5), "test")
    a = wh.models.save({"w": np.ones(2)}, "mlp")
    b = wh.models.save({"w": np.zeros(2)}, "mlp")
    c = wh.models.save({"w": np.zeros(1)}, "cnn")
    return wh, march, april, a, b, c


def test_unique_per_key_and_replace(lab):
    wh, march, _, a, _, _ = lab
    ev = wh.models.evaluations
    first = ev.record(a, march, "accuracy", 0.8, note="first")
    again = ev.record(a.id, march.id, "accuracy", 0.9)
    assert again.id == first.id and again.value == 0.8 and again.note == "first"  # stored one returned
    replaced = ev.record(a, march, "accuracy", 0.85, replace=True, threshold=0.5)
    assert replaced.id == first.id and replaced.value == 0.85 and replaced.threshold == 0.5
    assert "note" not in replaced.doc and "updated" in replaced.doc
    assert len(ev.find(a)) == 1 and wh.project().count("evaluations") == 1
    assert ev.get(a, march, "accuracy").value == 0.85


def test_queries(lab):
    wh, march, april, a, b, c = lab
    ev = wh.models.evaluations
    ev.record(a, march, "accuracy", 0.8)
    ev.record(b, march, "accuracy", 0.9)
    ev.record(c, march, "accuracy", 0.95)
    ev.record(a, april, "accuracy", 0.99)
    ev.record(a, march, "loss", 0.2)
    ev.record(b, march, "loss", 0.1)
    assert ev.best("accuracy", data=march).id == c.id  # the best model on the March test set
    assert ev.best("accuracy", data=march, name="mlp").id == b.id
    assert ev.best("loss", data=march, mode="min").id == b.id
    assert ev.best("accuracy", data=april).id == a.id
    assert {e.metric for e in ev.find(a)} == {"accuracy", "loss"} and len(ev.find(a)) == 3  # every evaluation
    assert len(ev.find(data=march, metric="accuracy")) == 3 and len(ev.find(name="mlp")) == 5
    assert len(ev.find(where={"value": {"$gt": 0.9}})) == 2
    wh.models.delete(name="cnn")  # a deleted model is never the best
    assert ev.best("accuracy", data=march).id == b.id
    wh.models.aliases.set("mlp", "champion", b)
    assert {e.metric for e in ev.find("mlp@champion")} == {"accuracy", "loss"}
    with pytest.raises(NotFound):
        ev.best("f1", data=march)


def test_query_specs_and_folds(lab):
    wh, march, _, a, _, _ = lab
    ev = wh.models.evaluations
    spec = {"collection": "products", "filter": {"split": "test", "price": {"$gt": 1}}}
    same = {"filter": {"price": {"$gt": 1}, "split": "test"}, "collection": "products"}
    one = ev.record(a, spec, "accuracy", 0.7, fold=Folds(valid=0.2, seed=1))
    assert ev.record(a, same, "accuracy", 0.1, fold={"valid": 0.2, "seed": 1}).id == one.id  # same key
    other = ev.record(a, spec, "accuracy", 0.6, fold=Folds(valid=0.2, seed=2))
    plain = ev.record(a, spec, "accuracy", 0.5)
    assert len({(e.data, e.fold) for e in (one, other, plain)}) == 3 and one.data.startswith("q:")
    assert one.data == other.data == plain.data and plain.fold == "" and len(ev.find(a, spec)) == 3
    assert one.data_kind == "query" and '"$gt"' in one.query
    folded = ev.record(a, march, "accuracy", 0.4, fold="valid")
    assert folded.data == march.id and folded.fold == '"valid"' and folded.id != ev.record(a, march, "accuracy", 1).id
    assert ev.get(a, march, "accuracy", fold="valid").value == 0.4
    assert ev.best("accuracy", data=spec, fold=Folds(valid=0.2, seed=2)).id == a.id


def test_lineage_edges(lab):
    wh, march, _, a, _, _ = lab
    with wh.runs.start("eval") as run:
        e = wh.models.evaluations.record(a, march, "accuracy", 0.8)
    assert e.run == run.id
    up = {(n.id, n.kind, n.relation) for n in wh.lineage.upstream(e.id, depth=1)}
    assert up == {(a.id, "model", "evaluated"), (march.id, "dataset", "evaluated_on"), (run.id, "run", "computed")}
    assert any(n.id == e.id and n.kind == "evaluation" for n in wh.lineage.downstream(a))


def test_bad_input(lab):
    wh, march, _, a, _, _ = lab
    ev = wh.models.evaluations
    with pytest.raises(NotFound):
        ev.record("01ABCDEFGHJKMNPQRSTVWXYZ00", march, "accuracy", 0.5)
    with pytest.raises(NotFound):
        ev.record(a, "01ABCDEFGHJKMNPQRSTVWXYZ00", "accuracy", 0.5)
    for value in (float("nan"), "0.5", True, None):
        with pytest.raises(InvalidDocument):
            ev.record(a, march, "accuracy", value)
    for metric in ("", "a b", "$x", None):
        with pytest.raises(QueryError):
            ev.record(a, march, metric, 0.5)
    with pytest.raises(QueryError):
        ev.record(a, {"collection": "x", "filter": {}, "extra": 1}, "accuracy", 0.5)
    with pytest.raises(QueryError):
        ev.record(a, 3.5, "accuracy", 0.5)
    with pytest.raises(InvalidDocument):
        ev.record(a, march, "accuracy", 0.5, model_name="x")
    with pytest.raises(QueryError):
        ev.best("accuracy", data=march, mode="top")
    with pytest.raises(QueryError):
        ev.delete()
    assert wh.project().count("evaluations") == 0
