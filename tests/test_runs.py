"""Runs: status, logs, summaries, best-run queries, standalone logs, and deletion."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.errors import InvalidDocument, NotFound, QueryError
from mlwarehouse.runs import summary
from mlwarehouse.runs.registry import current_run


def test_run_context_manager_logs_and_summaries(wh):
    with wh.runs.start("mlp", hyper_parameters={"lr": np.float32(0.5), "layers": (2, 3)}, tags=["a"]) as run:
        assert current_run() is run and mlwarehouse.current_run() is run
        assert run.status == "running" and run.name == "mlp" and run.hyper_parameters == {"lr": 0.5, "layers": [2, 3]}
        for step, loss in enumerate([1.0, 0.5, 0.7, 0.2]):
            run.log("train", step=step, epoch=step // 2, loss=loss, lr=0.1)
        run.log_valid(accuracy=0.6)
        run.log_valid(accuracy=0.9)
        run.log_valid(accuracy=0.8)
    assert current_run() is None
    assert run.status == "complete" and run.ended >= run.started
    loss = run.summary["train"]["loss"]
    assert loss == {"last": 0.2, "last_step": 3, "min": 0.2, "min_step": 3, "max": 1.0, "max_step": 0,
                    "count": 4, "nulls": 0}
    acc = run.summary["valid"]["accuracy"]
    assert (acc["max"], acc["max_step"], acc["last"], acc["count"]) == (0.9, 1, 0.8, 3)
    assert wh.runs.get(run.id).summary == run.summary


def test_failed_and_cancelled_runs_keep_the_error(wh):
    with pytest.raises(ZeroDivisionError):
        with wh.runs.start("bad") as run:
            run.log(loss=1.0)
            1 / 0
    run = wh.runs.get(run.id)
    assert run.status == "failed" and run.error.startswith("ZeroDivisionError")
    assert "1 / 0" in run.traceback and run.summary["train"]["loss"]["count"] == 1
    with pytest.raises(KeyboardInterrupt):
        with wh.runs.start("stopped"):
            raise KeyboardInterrupt
    assert wh.runs.find("stopped")[0].status == "cancelled"
    other = wh.runs.start("manual")
    assert other.fail("diverged").status == "failed" and other.error == "diverged"
    with pytest.raises(QueryError):
        other.finish("running")


def test_finish_inside_the_block_is_not_overridden(wh):
    with wh.runs.start("early") as run:
        run.finish("cancelled")
    assert wh.runs.get(run.id).status == "cancelled"


def test_auto_steps_per_kind_nonfinite_and_conversions(wh):
    import torch
    run = wh.runs.start()
    assert run.name.startswith("run-")
    run.log("train", loss=float("nan"))
    run.log("train", loss=np.float64(2.0), acc=torch.tensor(0.25), note="warmup", ok=True)
    run.log("train", loss=float("inf"))
    run.log("test", accuracy=0.5)
    run.log("train", step=10, loss=1.0)
    run.log("train", loss=0.5)
    assert run.nonfinite == 2
    history = run.history("train")
    assert [h["step"] for h in history] == [0, 1, 2, 10, 11]
    assert history[0]["loss"] is None and history[1] == {**history[1], "acc": 0.25, "note": "warmup", "ok": True}
    assert run.history("test")[0]["step"] == 0
    assert [h.keys() >= {"step", "loss"} and "acc" not in h for h in run.history("train", metrics=["loss"])]
    steps, values = run.metric("train", "loss")
    assert steps.dtype == np.int64 and steps.tolist() == [0, 1, 2, 10, 11]
    assert math.isnan(values[0]) and values[1:].tolist()[0] == 2.0 and math.isnan(values[2])
    run.finish()
    loss = run.summary["train"]["loss"]
    assert (loss["count"], loss["nulls"], loss["min"], loss["min_step"], loss["max"]) == (3, 2, 0.5, 11, 2.0)
    assert "note" not in run.summary["train"] and "ok" not in run.summary["train"]


def test_bad_log_calls_fail_on_the_callers_thread(wh):
    run = wh.runs.start("r")
    with pytest.raises(InvalidDocument, match="shape"):
        run.log(weights=np.zeros(3))
    with pytest.raises(InvalidDocument, match="run"):
        run.log(run=3)
    with pytest.raises(InvalidDocument, match="time"):
        run.log(time=3)
    with pytest.raises(InvalidDocument, match="kind"):
        run.log("not a kind", loss=1.0)
    with pytest.raises(InvalidDocument, match="step"):
        run.log(step=1.5, loss=1.0)
    with pytest.raises(InvalidDocument, match="64 bits"):
        run.log(big=1 << 70)
    with pytest.raises(InvalidDocument):
        wh.runs.start("r", status="done")
    with pytest.raises(InvalidDocument):
        wh.runs.start("r", tags=[1])
    run.log(loss=np.int64(3))
    assert run.history()[0]["loss"] == 3


def test_best_run_uses_an_index_and_modes(wh):
    for acc, loss in [(0.7, 0.3), (0.9, 0.5), (0.8, 0.1)]:
        with wh.runs.start(f"acc{acc}", group="g" if acc < 0.85 else "h") as run:
            run.log("valid", accuracy=acc - 0.2)
            run.log("valid", accuracy=acc, loss=loss)
    wh.runs.start("no-valid-logs").log("train", loss=0.0)
    assert wh.runs.best("valid.accuracy").name == "acc0.9"
    assert wh.runs.best(("valid", "loss"), mode="min").name == "acc0.8"
    assert wh.runs.best("valid.accuracy", where={"group": "g"}).name == "acc0.8"
    assert wh.runs.best("summary.valid.accuracy.last", mode="min").name == "acc0.7"
    keys = [ix["keys"] for ix in wh.index.indexes("runs")]
    assert [["summary.valid.accuracy.max", -1]] in keys or [("summary.valid.accuracy.max", -1)] in keys
    assert wh.runs.find(sort=[("summary.valid.accuracy.max", -1)], limit=1)[0].name == "acc0.9"
    with pytest.raises(NotFound):
        wh.runs.best("test.accuracy")
    with pytest.raises(QueryError):
        wh.runs.best("accuracy")
    with pytest.raises(QueryError):
        wh.runs.best("valid.accuracy", mode="best")
    with pytest.raises(QueryError, match="summary path"):
        wh.runs.best("summary.valid.accuracy.best")


def test_the_summary_layout_is_defined_once():
    assert summary.path("valid", "acc", summary.MAX) == "summary.valid.acc.max"
    assert summary.path("valid") == "summary.valid"
    assert summary.parse("summary.valid.acc.min_step") == ("valid", "acc", "min_step")
    for bad in ("summary.valid.acc", "runs.valid.acc.max", "summary.valid.acc.mean", "summary..acc.max"):
        with pytest.raises(QueryError):
            summary.parse(bad)
    assert summary.split_key("valid.acc") == ("valid", "acc") and summary.key("valid", "acc") == "valid.acc"
    doc = {summary.ROOT: {"train": {"loss": {summary.LAST: 1.0}, "odd": 3}, "bad": 1}}
    assert summary.metrics(doc) == {"train.loss": {"last": 1.0}}
    assert summary.of(doc, "train", "loss") == {"last": 1.0} and summary.of(doc, "train", "odd") is None
    by_metric, touched = {}, set()
    for step, value in enumerate([None, 2.0, 1, 3.5]):
        summary.fold(by_metric, {"step": step, "loss": value, "note": "x", "flag": True}, step, {"step"}, touched)
    assert touched == {"loss"} and set(by_metric["loss"]) == set(summary.STATS)
    assert by_metric["loss"] == {"last": 3.5, "last_step": 3, "min": 1, "min_step": 2, "max": 3.5, "max_step": 3,
                                 "count": 3, "nulls": 1}


def test_find_get_delete_and_datasets(wh):
    data = wh.datasets.save(np.arange(3), "d")
    run_a = wh.runs.start("a", datasets=[data, "01ABC"], task="01TASK")
    run_a.log(loss=1.0)
    run_a.finish()
    run_b = wh.runs.start("b")
    run_b.log(loss=2.0)
    assert [r.name for r in wh.runs.find()] == ["b", "a"]  # newest first
    assert wh.runs.get(run_a.id).datasets == [data.id, "01ABC"] and run_a.task == "01TASK"
    assert wh.runs.find(where={"status": "running"})[0].id == run_b.id
    with pytest.raises(NotFound):
        wh.runs.get("nope")
    assert wh.runs.delete("b") == 1
    assert wh.runs.find_logs(run=run_b) == [] and len(wh.runs.find_logs(run=run_a.id)) == 1
    assert current_run() is None  # the deleted running run is no longer current
    assert wh.runs.delete() == 1 and wh.runs.find_logs() == []


def test_a_run_picked_up_again_continues_its_steps_and_summaries(tmp_path):
    with mlwarehouse.connect(home=tmp_path / "w") as wh:
        run = wh.runs.start("long")
        run.log(loss=3.0)
        run.log(loss=1.0)
        run_id = run.id
    with mlwarehouse.connect(home=tmp_path / "w") as wh:
        run = wh.runs.get(run_id)
        run.log(loss=2.0)
        run.finish()
        assert [h["step"] for h in run.history()] == [0, 1, 2]
        loss = run.summary["train"]["loss"]
        assert (loss["count"], loss["min"], loss["min_step"], loss["last"], loss["last_step"]) == (3, 1.0, 1, 2.0, 2)


def test_standalone_logs_and_project_scope(wh):
    runs = wh.runs
    runs.log_point("train", accuracy=0.33)
    runs.log_point("train", accuracy=0.44, step=2, epoch=1)
    runs.log_point("valid", accuracy=float("nan"))
    other = wh.project("other").runs
    other.log_point("train", accuracy=0.99)
    assert [d["accuracy"] for d in runs.find_logs("train")] == [0.33, 0.44]
    assert runs.find_logs("train", where={"accuracy": {"$gt": 0.4}})[0]["step"] == 2
    assert runs.find_logs("valid")[0]["accuracy"] is None
    assert runs.find_logs(where={"kind": "valid"}, limit=5)[0]["run"] is None
    assert runs.delete_logs("train", where={"accuracy": 0.33}) == 1
    assert runs.delete_logs() == 2 and runs.find_logs() == []
    assert len(other.find_logs()) == 1
    with pytest.raises(InvalidDocument):
        runs.log_point("train", project="x")


def test_set_fields_and_close_flushes_unfinished_runs(tmp_path):
    with mlwarehouse.connect(home=tmp_path / "w") as wh:
        run = wh.runs.start("open")
        for step in range(1000):
            run.log(step=step, loss=1.0 / (step + 1))
        run.set(notes="kept open", test_accuracy=np.float32(0.5))
        with pytest.raises(InvalidDocument):
            run.set(status="complete")
    with mlwarehouse.connect(home=tmp_path / "w") as wh:
        run = wh.runs.get(run.id)
        assert run.status == "running" and run.notes == "kept open" and run.test_accuracy == 0.5
        assert wh.runs.count_logs() == 1000 and run.summary["train"]["loss"]["count"] == 1000
        assert wh.project().count("logs") < 10  # stored in blocks, not a row per point


def test_loading_a_dataset_inside_a_run_records_the_lineage(wh):
    import numpy as np
    record = wh.datasets.save(np.arange(3), "data")
    wh.datasets.load("data")  # no run: nothing to record
    with wh.runs.start("r") as run:
        wh.datasets.load("data")
        wh.datasets.load("data")
        other = wh.datasets.save(np.zeros(1), "other")
        run.use_datasets(other)
    assert wh.runs.get(run.id).datasets == [record.id, other.id]
    assert wh.runs.find(where={"datasets": record.id})[0].id == run.id


def test_review_corners_of_runs_and_logs(wh):
    from mlwarehouse.errors import InvalidDocument
    run = wh.runs.start("r")
    for step in range(10):
        run.log("train", step=step, loss=float("nan") if step == 9 else 1.0)
    run.log("events", note="text only")  # a kind without a numeric summary
    assert wh.sql("select count(*) as n from metrics where run_id = ?", [run.id])[0]["n"] >= 9  # no flush needed
    with pytest.raises(InvalidDocument, match="64 bits"):
        run.log("train", step=2**64, loss=1.0)
    run.fail("boom")
    run.finish()  # a second ending leaves the first as it is
    assert wh.runs.get(run.id).status == "failed" and wh.runs.get(run.id).error == "boom"
    again = wh.runs.get(run.id)  # picked up again: steps go on after the highest stored one of each kind
    again.log("train", loss=0.5)
    again.log("events", note="more")
    again.flush()
    assert [p["step"] for p in again.history("train")][-2:] == [9, 10]
    assert [p["step"] for p in again.history("events")] == [0, 1]
    assert wh.datasets.save(np.zeros(2), "d", tags="tabular").doc["tags"] == ["tabular"]
