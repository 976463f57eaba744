"""Lineage: the edges every save, run, listener and vector index records, traversals both ways, and deletes
refused while derived things live (forced ones leave tombstones)."""

from __future__ import annotations

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.errors import DependencyError, QueryError
from mlwarehouse.lineage import Lineage, Node


def trained(wh):
    """dataset -> run -> (checkpoints, model); the model also trained_on the dataset; a task ran the run."""
    data = wh.datasets.save(np.arange(10), "digits")
    task = wh.tasks.create("train", "json:dumps")
    with wh.runs.start("mlp", datasets=[data], task=task.id) as run:
        for epoch in range(3):
            wh.models.checkpoint({"w": np.full(2, epoch)}, epoch=epoch, keep_last=2)
        model = wh.models.save({"w": np.ones(2)}, "mlp", dataset=data, accuracy=0.9)
    return data, task, run, model


def ids(nodes):
    return [n.id for n in nodes]


def test_hooks_record_edges_and_traversals_answer_both_ways(wh):
    data, task, run, model = trained(wh)
    assert isinstance(wh.lineage, Lineage) and wh.lineage is wh.project().lineage
    up = wh.lineage.upstream(model)
    assert {(n.id, n.kind, n.relation, n.distance) for n in up} == {
        (data.id, "dataset", "trained_on", 1), (run.id, "run", "produced", 1), (task.id, "task", "ran", 2)}
    assert all(isinstance(n, Node) and not n.deleted for n in up)
    assert [n.name for n in up if n.kind == "dataset"] == ["digits v1"]
    down = wh.lineage.downstream(data.id)
    kinds = {n.id: n.kind for n in down}
    assert kinds[model.id] == "model" and kinds[run.id] == "run"
    assert sorted(k for k in kinds.values() if k == "checkpoint") == ["checkpoint"] * 2  # the pruned one forgotten
    assert [n.distance for n in down] == sorted(n.distance for n in down)  # nearest first, each once
    assert len(ids(down)) == len(set(ids(down)))
    assert ids(wh.lineage.downstream(data, depth=1)) == ids([n for n in down if n.distance == 1])
    assert wh.lineage.upstream(model, depth=0) == []
    # "which models were trained on v1": downstream of the version, models only
    assert [n.id for n in down if n.kind == "model"] == [model.id]
    edges = wh.lineage.edges(run)
    assert {(e.src, e.relation) for e in edges if e.dst == run.id} == {(data.id, "input"), (task.id, "ran")}
    assert {e.dst_kind for e in edges if e.src == run.id} == {"model", "checkpoint"}


def test_record_is_idempotent_keeps_fields_and_resolves_kinds(wh):
    data, _, run, model = trained(wh)
    other = wh.datasets.save(np.zeros(3), "extra")
    before = len(wh.lineage.edges(model))
    wh.lineage.record(other, model.id, "evaluated_on", split="test", folds=[0, 1])
    wh.lineage.record(other.id, {"_id": model.id}, "evaluated_on", split="test")  # the same edge: nothing new
    wh.lineage.record(data, model, "trained_on", fit="F1")  # a stored edge recorded again takes the new fields
    assert [e.fields for e in wh.lineage.edges(model) if e.relation == "trained_on"] == [{"fit": "F1"}]
    assert wh.lineage.record_many([(other, model, "evaluated_on"), (data, model, "trained_on")]) == 0
    edges = [e for e in wh.lineage.edges(model) if e.relation == "evaluated_on"]
    assert len(wh.lineage.edges(model)) == before + 1 and len(edges) == 1
    assert edges[0].fields == {"split": "test", "folds": [0, 1]}
    assert (edges[0].src_kind, edges[0].src_name, edges[0].dst_kind) == ("dataset", "extra v1", "model")
    wh.lineage.record("01NOTSTORED0000000000000000", model, "input")  # an id no collection holds
    assert {n.kind for n in wh.lineage.upstream(model) if n.id.startswith("01NOT")} == {"unknown"}
    with pytest.raises(QueryError):
        wh.lineage.record(model, model, "loop")
    with pytest.raises(QueryError):
        wh.lineage.record(model, data, "")
    with pytest.raises(QueryError):
        wh.lineage.upstream(model, depth=-1)


def test_use_datasets_and_load_inside_a_run_record_inputs(wh):
    a = wh.datasets.save(np.arange(3), "a")
    b = wh.datasets.save(np.arange(4), "b")
    with wh.runs.start("r") as run:
        run.use_datasets(a)
        run.use_datasets(a.id)  # once
        wh.datasets.load("b")
    assert {(n.id, n.relation) for n in wh.lineage.upstream(run)} == {(a.id, "input"), (b.id, "input")}
    assert len([e for e in wh.lineage.edges(run) if e.src == a.id]) == 1


def test_deletes_are_refused_while_derived_things_live(wh):
    data, task, run, model = trained(wh)
    with pytest.raises(DependencyError, match="force=True") as refused:
        wh.datasets.delete("digits")
    assert {n.id for n in refused.value.dependents} == {run.id, model.id}
    assert isinstance(refused.value, QueryError)
    with pytest.raises(DependencyError, match="model mlp"):
        wh.runs.delete("mlp")
    with pytest.raises(DependencyError):
        wh.tasks.delete("train")
    assert wh.datasets.find("digits") and wh.runs.find("mlp") and wh.tasks.find("train")  # nothing deleted
    assert {n.id for n in wh.lineage.impact(data)} >= {run.id, model.id}
    # from the leaves up, each delete is allowed; checkpoints never hold their run back
    assert wh.models.delete("mlp") == 1
    assert wh.runs.delete("mlp") == 1
    assert wh.tasks.delete("train") == 1
    assert wh.datasets.delete("digits") == 1
    up = {n.id: n for n in wh.lineage.upstream(model)}
    assert up[run.id].deleted and up[data.id].deleted and up[task.id].deleted
    assert {t["_id"] for t in wh.lineage.tombstones()} == {data.id, task.id, run.id, model.id}
    assert wh.lineage.impact(data) == [n for n in wh.lineage.downstream(data) if n.kind == "checkpoint"]


def test_a_forced_delete_leaves_a_tombstone_and_lineage_still_answers(wh):
    data, task, run, model = trained(wh)
    assert wh.datasets.delete("digits", force=True) == 1
    (tomb,) = wh.lineage.tombstones([data.id])
    assert (tomb["kind"], tomb["name"]) == ("dataset", "digits v1") and tomb["deleted"]
    up = {n.id: n for n in wh.lineage.upstream(model)}
    assert up[data.id].deleted and not up[run.id].deleted
    assert {n.id for n in wh.lineage.downstream(data)} >= {run.id, model.id}  # made from it, though it is gone
    assert wh.lineage.node(data.id).kind == "dataset"
    assert wh.runs.delete(force=True) == 1 and wh.tasks.delete(force=True) == 1
    assert wh.lineage.upstream(model)[0].deleted


def test_retention_prunes_checkpoints_without_refusal_and_forgets_them(wh):
    with wh.runs.start("r") as run:
        kept = [wh.models.checkpoint({"w": np.full(2, e)}, epoch=e, keep_last=1) for e in range(3)]
    down = wh.lineage.downstream(run)
    assert ids(down) == [kept[-1].id]
    assert wh.lineage.tombstones() == []


def test_item_datasets_refuse_and_force(wh):
    ds = wh.items.from_arrays("pix", {"x": np.zeros((4, 2), np.float32)})
    run = wh.runs.start("r", datasets=[ds])
    wh.models.save({"w": np.ones(1)}, "m", dataset=ds)
    run.finish()
    with pytest.raises(DependencyError):
        ds.delete()
    with pytest.raises(DependencyError):
        wh.items.delete("pix")
    assert wh.items.find("pix")
    assert wh.items.delete("pix", force=True) == 1
    assert [n.deleted for n in wh.lineage.upstream(run) if n.id == ds.id] == [True]


def test_listeners_and_vector_indexes(wh):
    torch = pytest.importorskip("torch")
    c = wh.collection("docs")
    c.insert_many([{"_id": f"d{i}", "x": torch.full((4,), float(i))} for i in range(4)])
    listener = c.attach("embed", torch.nn.Linear(4, 3), key="x")
    c.create_vector_index("by_embed", listener="embed")
    model_id = listener.model["id"]
    down = {n.kind: n for n in wh.lineage.downstream(model_id)}
    assert down["listener"].id == listener.id and down["listener"].name == "docs.embed"
    assert down["vector_index"].distance == 2 and down["vector_index"].name == "docs.by_embed"
    catalog = wh.catalog.record("docs")
    assert {n.kind for n in wh.lineage.upstream(listener.id)} == {"model", "collection"}
    assert any(n.id == catalog["_id"] for n in wh.lineage.upstream(down["vector_index"].id, depth=2))
    with pytest.raises(DependencyError, match="listener"):
        wh.models.delete("docs.embed")
    c.detach("embed", force=True)  # takes its model and its index along: lineage keeps their tombstones
    gone = {n.kind: n.deleted for n in wh.lineage.downstream(model_id)}
    assert gone == {"listener": True, "vector_index": True}
    assert [n.deleted for n in wh.lineage.upstream(listener.id) if n.kind == "model"] == [True]
    c.drop()
    assert any(t["_id"] == catalog["_id"] for t in wh.lineage.tombstones())


def test_an_index_over_a_stored_field_comes_from_its_collection(wh):
    c = wh.collection("vecs")
    c.insert_many([{"_id": f"v{i}", "v": [float(i), 1.0]} for i in range(3)])
    c.create_vector_index("by_v", field="v")
    (up,) = wh.lineage.upstream(c.vector_index("by_v").spec.id)
    assert (up.kind, up.name, up.relation) == ("collection", "vecs", "indexes")
    with wh.runs.start("fit") as run:  # a collection object is a node too (its catalog record)
        wh.lineage.record(c, run, "input", where={"n": {"$gt": 2}}, folds=np.arange(2))
    (edge,) = [e for e in wh.lineage.edges(run) if e.relation == "input"]
    assert (edge.src, edge.src_kind) == (up.id, "collection")
    assert edge.fields == {"where": {"n": {"$gt": 2}}, "folds": [0, 1]}  # a filter's "$" keys are kept
    with pytest.raises(QueryError):
        wh.lineage.record(c, run, "scored", score=float("nan"))


def test_the_tensorhub_layer_deletes_as_the_original_did(tmp_path):
    from mlwarehouse.compat.tensorhub import TensorHub
    hub = TensorHub(project_name="p", uri=str(tmp_path / "th"), blobs=str(tmp_path / "th" / "blobs"))
    data = hub.project.datasets.save(np.arange(3), "d")
    with hub.project.runs.start("r", datasets=[data]):
        hub.project.models.save({"w": np.ones(1)}, "m", dataset=data)
    assert hub.delete_datasets(dataset_name="d") == 1  # forced: TensorHub never refused
    assert hub.project.lineage.tombstones([data.id])
    hub.close()


def test_lineage_lives_per_project_and_a_fresh_warehouse_reads_none(tmp_path):
    with mlwarehouse.connect(home=tmp_path / "w") as wh:
        assert wh.lineage.upstream("01ANYTHING00000000000000000") == []  # no collection is created by a read
        assert "lineage" not in wh.index.collections()
        _, _, _, model = trained(wh)
        assert wh.project("other").lineage.upstream(model) == []
