"""The run page's and the comparison's server side: every metric of a selection in one request, on the step, epoch
or wall-time axis, downsampled; run labels from the hyper-parameters that differ; the diff of runs; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from mlwarehouse.web import create_app  # noqa: E402
from mlwarehouse.web.runs_view import _spread_epochs, order_metrics, run_labels  # noqa: E402

BASE = "http://127.0.0.1"
PROJECT = "sweep"
EPOCHS, STEPS_PER_EPOCH = 4, 25


def fill_sweep(wh) -> dict:
    """Three finished runs of a small sweep (train loss per step, valid loss and accuracy per epoch, one test
    accuracy point each) and a running run with a few points."""
    p = wh.project(PROJECT)
    runs = []
    for i, (n_hidden, lr) in enumerate(((32, 0.01), (128, 0.01), (128, 0.1))):
        run = p.runs.start("digits-mlp", hyper_parameters={"n_hidden": n_hidden, "lr": lr, "seed": 0})
        step = 0
        for epoch in range(EPOCHS):
            for _ in range(STEPS_PER_EPOCH):
                run.log("train", step=step, epoch=epoch, loss=math.exp(-step * lr) + 0.02 * i)
                step += 1
            run.log("valid", step=step, epoch=epoch, loss=0.5 / (epoch + 1) + 0.01 * i,
                    accuracy=0.7 + 0.05 * epoch + 0.03 * i)
        run.log("test", step=step, accuracy=0.9 + 0.02 * i)
        run.finish()
        runs.append(run)
    live = p.runs.start("digits-mlp", hyper_parameters={"n_hidden": 64, "lr": 0.01, "seed": 0})
    for step in range(5):
        live.log("train", step=step, epoch=0, loss=1.0 - step / 10)
    live.flush()
    return {"project": p, "runs": runs, "live": live}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("web-runs") / "wh")
    filled = fill_sweep(wh)
    yield wh, filled
    wh.close()


@pytest.fixture(scope="module")
def client(sweep):
    return TestClient(create_app(sweep[0]), base_url=BASE)


def _points(client, ids, **params):
    r = client.get(f"/api/p/{PROJECT}/runs/points", params={"ids": ",".join(ids), **params})
    assert r.status_code == 200, r.text
    return r.json()


def test_metrics_are_ordered_losses_first_kinds_side_by_side():
    keys = ["test.accuracy", "train.accuracy", "valid.loss", "train.loss", "valid.accuracy", "extra.lr"]
    assert order_metrics(keys) == ["train.loss", "valid.loss", "train.accuracy", "valid.accuracy",
                                   "test.accuracy", "extra.lr"]


def test_one_request_carries_every_metric_of_a_run(client, sweep):
    run = sweep[1]["runs"][0]
    body = _points(client, [run.id])
    keys = [m["key"] for m in body["metrics"]]
    assert keys == ["train.loss", "valid.loss", "valid.accuracy", "test.accuracy"]
    by_key = {m["key"]: m for m in body["metrics"]}
    train = by_key["train.loss"]["series"][0]
    assert train["count"] == EPOCHS * STEPS_PER_EPOCH and train["x"] == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert train["y"][0] == pytest.approx(1.0) and train["y"][-1] == pytest.approx(math.exp(-99 * 0.01), rel=1e-6)
    assert by_key["valid.loss"]["series"][0]["x"] == [25, 50, 75, 100]
    assert by_key["test.accuracy"]["single"] and not by_key["train.loss"]["single"]
    assert by_key["test.accuracy"]["series"][0]["last"] == pytest.approx(0.9)
    assert body["runs"][0]["status"] == "complete"


def test_epoch_axis_spreads_each_epochs_points_and_puts_one_point_per_epoch_on_it(client, sweep):
    run = sweep[1]["runs"][1]
    body = _points(client, [run.id], x="epoch", metrics="train.loss,valid.loss,test.accuracy")
    by_key = {m["key"]: m["series"][0] for m in body["metrics"]}
    train = by_key["train.loss"]["x"]
    assert train[0] == 0 and train[1] == pytest.approx(1 / STEPS_PER_EPOCH) and train[-1] == pytest.approx(
        EPOCHS - 1 / STEPS_PER_EPOCH)
    assert train == sorted(train) and len(set(train)) == len(train)
    assert by_key["valid.loss"]["x"] == [0, 1, 2, 3]
    # the test point has no epoch: left out of the epoch chart, and counted
    assert by_key["test.accuracy"]["x"] == [] and by_key["test.accuracy"]["missing_x"] == 1
    assert list(_spread_epochs(np.array([float("nan"), 2.0, 2.0]))[1:]) == [2.0, 2.5]


def test_time_axis_is_seconds_since_the_run_started(client, sweep):
    run = sweep[1]["runs"][0]
    series = _points(client, [run.id], x="time", metrics="train.loss")["metrics"][0]["series"][0]
    assert series["count"] == 100 and series["missing_x"] == 0
    assert series["x"] == sorted(series["x"]) and 0 <= series["x"][0] < 30 and series["x"][-1] < 60


def test_downsampling_bounds_every_curve(client, sweep):
    ids = [r.id for r in sweep[1]["runs"]]
    body = _points(client, ids, metrics="train.loss", points=10)
    for s in body["metrics"][0]["series"]:
        assert s["count"] == 100 and len(s["x"]) <= 10 and s["x"][0] == 0 and s["x"][-1] == 99
    assert [s["id"] for s in body["metrics"][0]["series"]] == ids


def test_labels_are_the_parameters_that_differ(client, sweep):
    ids = [r.id for r in sweep[1]["runs"]]
    body = _points(client, ids, metrics="train.loss")
    assert [r["label"] for r in body["runs"]] == ["n_hidden=32 lr=0.01", "n_hidden=128 lr=0.01",
                                                  "n_hidden=128 lr=0.1"]
    two = _points(client, ids[1:], metrics="train.loss")
    assert [r["label"] for r in two["runs"]] == ["lr=0.01", "lr=0.1"]  # n_hidden is the same in these two
    docs = [{"_id": "A" * 10, "name": "a", "hyper_parameters": {"lr": 1}},
            {"_id": "B" * 10, "name": "b", "hyper_parameters": {"lr": 1}},
            {"_id": "C" * 10, "name": "b", "hyper_parameters": {"lr": 1}}]
    assert run_labels(docs) == {"A" * 10: "a", "B" * 10: "b ·BBBBBB", "C" * 10: "b ·CCCCCC"}


def test_compare_diff_marks_what_differs(client, sweep):
    runs = sweep[1]["runs"]
    r = client.get(f"/api/p/{PROJECT}/runs/compare", params={"ids": ",".join(r.id for r in runs)})
    assert r.status_code == 200
    body = r.json()
    params = {row["key"]: row for row in body["params"]}
    assert params["n_hidden"]["values"] == ["32", "128", "128"] and params["n_hidden"]["differs"]
    assert params["seed"]["values"] == ["0", "0", "0"] and not params["seed"]["differs"]
    metrics = {row["key"]: row for row in body["metrics"]}
    assert metrics["test.accuracy"]["differs"]
    assert [c["last"] for c in metrics["test.accuracy"]["stats"]] == pytest.approx([0.9, 0.92, 0.94])
    assert metrics["valid.accuracy"]["stats"][0]["count"] == EPOCHS and metrics["valid.accuracy"]["differs"]
    assert [row["key"] for row in body["metrics"]][:2] == ["train.loss", "valid.loss"]


def test_a_running_run_gains_points_between_requests(client, sweep):
    live = sweep[1]["live"]
    first = _points(client, [live.id])
    assert first["runs"][0]["status"] == "running" and first["metrics"][0]["series"][0]["count"] == 5
    assert _points(client, [live.id])["metrics"][0]["series"][0]["count"] == 5  # from the cache
    for step in range(5, 12):
        live.log("train", step=step, epoch=1, loss=0.5)
    live.log("valid", step=12, epoch=1, accuracy=0.8)
    live.flush()
    again = _points(client, [live.id])
    by_key = {m["key"]: m["series"][0] for m in again["metrics"]}
    assert by_key["train.loss"]["count"] == 12 and by_key["train.loss"]["x"][-1] == 11
    assert by_key["valid.accuracy"]["count"] == 1  # a metric that appeared since


@pytest.mark.parametrize("params, status, words", [
    ({"ids": "NOPE"}, 404, "NOPE"),
    ({"ids": ""}, 400, "select at least one run"),
    ({"x": "wall"}, 400, "x must be one of step, epoch, time"),
    ({"points": 2}, 400, "points must be between"),
    ({"points": "many"}, 400, "points"),
    ({"metrics": "loss"}, 400, "is not a metric of a kind"),
    ({"metrics": "train.$where"}, 400, "metric"),
    ({"ids": ",".join(f"r{i}" for i in range(201))}, 400, "at most 200 runs"),
])
def test_points_bad_input_is_a_clear_error(client, sweep, params, status, words):
    query = {"ids": sweep[1]["runs"][0].id, **params}
    r = client.get(f"/api/p/{PROJECT}/runs/points", params=query)
    assert r.status_code == status and words in r.json()["error"]


def test_compare_bad_input(client):
    r = client.get(f"/api/p/{PROJECT}/runs/compare", params={"ids": "NOPE"})
    assert r.status_code == 404 and "NOPE" in r.json()["error"]


def test_pages_load_the_run_charts(client, sweep):
    run = sweep[1]["runs"][0]
    page = client.get(f"/p/{PROJECT}/runs/{run.id}")
    assert page.status_code == 200
    assert "/static/runs.js" in page.text and "/static/runs.css" in page.text and 'id="charts"' in page.text
    listing = client.get(f"/p/{PROJECT}/runs")
    assert "/static/runs.js" in listing.text and 'id="diff"' in listing.text
    assert client.get("/static/runs.js").status_code == 200 and client.get("/static/runs.css").status_code == 200


def test_a_live_runs_history_is_extended_with_its_new_points_only(wh, monkeypatch):
    from mlwarehouse.web.data import HistoryCache
    from mlwarehouse.runs import blocks
    from mlwarehouse.web.runs_view import Histories, points
    p = wh.project("live")
    run = p.runs.start("growing")
    for step in range(50):
        run.log("train", step=step, loss=1.0 / (step + 1))
    run.flush()
    store = Histories()

    def curve(**caches):
        return points(p, [run.id], ["train.loss"], "step", 1000, **caches)["metrics"][0]["series"][0]

    assert curve(histories=store, curves=HistoryCache())["count"] == 50
    for step in range(50, 80):
        run.log("train", step=step, loss=0.01 * step)
    run.flush()
    reads = []
    read_columns = blocks.read_columns
    monkeypatch.setattr(blocks, "read_columns",
                        lambda *a, **k: reads.append(k.get("after")) or read_columns(*a, **k))
    grown = curve(histories=store, curves=HistoryCache())
    assert reads == [49]  # only the points after the last one read were asked for
    assert grown == curve() and grown["count"] == 80 and grown["x"][-1] == 79
    run.log("train", step=10, loss=5.0)  # logged out of order: the stored part is stale, read it all again
    run.log("train", step=80, loss=0.5)
    run.flush()
    reads.clear()
    again = curve(histories=store, curves=HistoryCache())
    assert reads[-1] is None and again == curve() and again["count"] == 82 and 5.0 in again["y"]
