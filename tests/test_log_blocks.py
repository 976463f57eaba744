"""Logs stored as blocks of points (mlwarehouse.runs.blocks) on every backend set: what is logged reads back point
for point through every reader (history, metric, find/count/delete of logs, the resumed step, the chart columns),
a block is one row for many points, and documents of the older one-point layout read as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlwarehouse import schema
from mlwarehouse.runs import blocks, summary
from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

PROJECT = "blocks"
LOGS = schema.LOGS.name


class BlockTests:
    def test_points_read_back_as_logged(self, wh):
        run = wh.runs.start("r")
        for step in range(10_000):  # more than a block holds, in one write or several
            run.log("train", step=step, epoch=step // 1000, loss=1.0 / (step + 1), acc=step % 7)
        run.log("train", step=3, lr=0.5)  # another set of metrics: another block
        run.log("train", step=5, loss=float("nan"), acc=1)  # a logged NaN is a null, not a missing point
        run.log("valid", step=9_999, acc=0.25, note="text")
        run.flush()
        stored = wh.project().count(LOGS, {"run": run.id})
        assert 4 <= stored <= 12  # 10,003 points in a handful of rows
        assert wh.runs.count_logs(run=run) == 10_003 and wh.runs.count_logs("valid", run=run) == 1
        history = run.history("train")
        assert len(history) == 10_002 and [p["step"] for p in history] == sorted(p["step"] for p in history)
        assert history[0] == {"step": 0, "epoch": 0, "time": history[0]["time"], "loss": 1.0, "acc": 0}
        fives = [p for p in history if p["step"] == 5]
        assert fives[1] == {"step": 5, "time": fives[1]["time"], "loss": None, "acc": 1}  # ties in logging order
        threes = [p for p in history if p["step"] == 3]
        assert threes[0]["loss"] == 0.25 and threes[1]["lr"] == 0.5 and set(threes[1]) == {"step", "time", "lr"}
        steps, values = run.metric("train", "loss")
        assert len(steps) == 10_001 and steps[0] == 0 and values[0] == 1.0
        assert int((steps == 5).sum()) == 2 and math.isnan(values[np.flatnonzero(steps == 5)[1]])
        assert np.all(np.diff(steps) >= 0)
        lr_steps, lr = run.metric("train", "lr")
        assert lr_steps.tolist() == [3] and lr.tolist() == [0.5]
        assert run.history("valid", metrics=["note"]) == [{"step": 9_999, "time": run.history("valid")[0]["time"],
                                                           "note": "text"}]
        assert wh.runs.get(run.id).summary["train"]["loss"]["count"] == 10_000  # numbers logged, not blocks

    def test_find_count_and_delete_points_by_any_field(self, wh):
        run = wh.runs.start("r")
        for step in range(100):
            run.log("train", step=step, loss=float(step))
        run.log("valid", step=99, loss=0.5)
        run.flush()
        found = wh.runs.find_logs("train", where={"loss": {"$gte": 95}}, run=run)
        assert [p["step"] for p in found] == [95, 96, 97, 98, 99]
        mixed = wh.runs.find_logs(where={"run": run.id, "kind": "train", "loss": {"$gte": 98}})  # split: blocks, points
        assert [p["step"] for p in mixed] == [98, 99]
        assert wh.runs.count_logs(where={"$or": [{"kind": "valid"}, {"step": 0}]}, run=run) == 2
        assert all(p["run"] == run.id and p["kind"] == "train" and p["project"] == PROJECT for p in found)
        assert len({p["_id"] for p in wh.runs.find_logs(run=run)}) == 101  # every point has an id of its own
        assert wh.runs.find_logs(run=run, sort=[("loss", -1)], limit=2)[0]["loss"] == 99.0
        assert wh.runs.count_logs(where={"loss": {"$lt": 10}}, run=run) == 11  # 10 train points and the valid one
        assert wh.runs.delete_logs("train", where={"step": {"$gte": 50}}, run=run) == 50  # a block rewritten
        assert [p["step"] for p in wh.runs.find_logs("train", run=run)] == list(range(50))
        assert wh.runs.count_logs(run=run) == 51
        assert wh.runs.delete_logs("valid", run=run) == 1  # whole blocks
        assert wh.runs.count_logs(run=run) == 50

    def test_a_resumed_run_continues_after_its_highest_step(self, wh):
        run = wh.runs.start("r")
        run.log("train", step=41, loss=1.0)
        run.log("train", step=7, loss=2.0)
        run.finish()
        again = wh.runs.get(run.id)
        again.log("train", loss=0.5)  # no step: after the highest stored one
        again.flush()
        assert [p["step"] for p in again.history("train")] == [7, 41, 42]

    def test_log_point_returns_the_stored_points_id(self, wh):
        run = wh.runs.start("r")
        doc = wh.runs.log_point("train", run=run, step=3, loss=0.5)
        (stored,) = wh.runs.find_logs("train", run=run)
        assert doc["_id"] == stored["_id"] and stored["loss"] == 0.5 and doc["time"] == stored["time"]
        wh.runs.log_point("valid", run=run, step=4, loss=np.float64(0.25), n=np.int64(7))  # numpy scalars
        (numbers,) = wh.runs.find_logs("valid", run=run)
        assert (numbers["loss"], numbers["n"]) == (0.25, 7) and type(numbers["n"]) is int

    def test_chart_columns_after_a_step(self, wh):
        run = wh.runs.start("r")
        for step in range(30):
            run.log("train", step=step, epoch=step // 10, loss=float(step))
        run.flush()
        steps, epochs, loss = blocks.read_columns(wh.project(), run.id, "train", ["step", "epoch", "loss"], after=24)
        assert steps == [25, 26, 27, 28, 29] and epochs == [2] * 5 and loss == [25.0, 26.0, 27.0, 28.0, 29.0]
        assert blocks.read_columns(wh.project(), run.id, "train", ["missing"]) == [[None] * 30]

    def test_documents_of_the_older_layout_read_as_before(self, wh):
        run = wh.runs.start("old")
        p = wh.project()
        p.insert_stamped(LOGS, [{"_id": f"01HV00000000000000000OLD{i:02d}", "project": PROJECT,
                                 "time": "2024-01-02T03:04:05.000006Z", "run": run.id, "kind": "train", "step": i,
                                 "loss": 1.0 / (i + 1)} for i in range(5)])
        run = wh.runs.get(run.id)
        run.log("train", loss=0.01)  # a run picked up again resumes after the older documents' highest step
        run.flush()
        assert [d["step"] for d in run.history("train")] == [0, 1, 2, 3, 4, 5]
        steps, values = run.metric("train", "loss")
        assert steps.tolist() == [0, 1, 2, 3, 4, 5] and values[-1] == 0.01
        assert wh.runs.count_logs(run=run) == 6
        assert wh.runs.delete_logs("train", where={"step": {"$lt": 2}}, run=run) == 2
        assert [d["step"] for d in wh.runs.find_logs(run=run)] == [2, 3, 4, 5]


_VALUES = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-2 ** 63, 2 ** 63 - 1),
                    st.none(), st.booleans(), st.sampled_from(["a", "b"]), st.integers(-5, 5))


@settings(max_examples=300, deadline=None)
@given(before=st.lists(_VALUES, max_size=6), values=st.lists(_VALUES, max_size=40))
def test_a_column_folds_into_the_same_summary_as_its_points_one_by_one(before, values):
    """summary.fold_column (numpy, the writer's path) against summary.fold (a point at a time): the same stats,
    first minimum and maximum kept, after any earlier points."""
    def fold_points(column, start):
        sums, touched = {}, set()
        for i, v in enumerate(before):
            summary.fold(sums, {"m": v}, i, (), touched)
        for i, v in enumerate(column):
            summary.fold(sums, {"m": v}, start + i, (), touched)
        return sums, touched
    expected = fold_points(values, len(before))
    sums, touched = fold_points([], 0)
    summary.fold_column(sums, "m", values, list(range(len(before), len(before) + len(values))), touched)
    assert (sums, touched) == expected
    assert [type(x) for x in sums.get("m", {}).values()] == [type(x) for x in expected[0].get("m", {}).values()]


def test_a_batch_larger_than_a_block_is_split_in_logging_order():
    points = [{"run": "r", "kind": "train", "step": i, "time": i, "loss": 1.0} for i in range(blocks.MAX_POINTS + 5)]
    points.insert(3, {"run": "r", "kind": "train", "step": 3, "time": 3, "acc": 1.0})  # another field set
    groups = blocks.group(points)
    assert [len(g) for g in groups] == [blocks.MAX_POINTS, 1, 5]
    made = blocks.build(points, ["a", "b", "c"], "p")
    assert [b["n"] for b in made] == [blocks.MAX_POINTS, 1, 5] and made[0]["step"] == 0
    assert made[2]["last"] == blocks.MAX_POINTS + 4 and made[1][blocks.NAMES] == ["acc"]
    assert blocks.points_of(made[1]) == [{"_id": "b.0", "project": "p", "run": "r", "kind": "train", "step": 3,
                                          "time": "1970-01-01T00:00:00.000003Z", "acc": 1.0}]


class TestSQLiteAndFiles(BlockTests):
    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)

    def test_the_sql_metrics_view_has_a_row_per_point_and_metric(self, wh):
        run = wh.runs.start("r")
        for step in range(5000):
            run.log("train", step=step, loss=1.0, acc=0.5, note="x")
        run.finish()
        rows = wh.sql("SELECT metric, count(*) AS n, min(step) AS lo, max(step) AS hi FROM metrics "
                      "WHERE run_id = ? GROUP BY metric ORDER BY metric", [run.id])
        assert rows == [{"metric": "acc", "n": 5000, "lo": 0, "hi": 4999},
                        {"metric": "loss", "n": 5000, "lo": 0, "hi": 4999}]


class TestPostgresAndS3(BlockTests):
    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestMongoAndGridFS(BlockTests):
    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)
