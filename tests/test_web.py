"""The web UI through FastAPI's TestClient: pages, the JSON API, downsampling, previews, bad input and 404s."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import zstandard

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from mlwarehouse.web import create_app  # noqa: E402
from mlwarehouse.web.arrays import image_view, leaves, to_png  # noqa: E402
from mlwarehouse.web.downsample import minmax_downsample  # noqa: E402

PROJECT = "ui-demo"
BASE = "http://localhost"  # a loopback name: the UI refuses other Host names by default
SAME_ORIGIN = {"X-MLW": "1", "Origin": BASE}  # what the UI's own pages send with a change


def fill_warehouse(wh, steps: int = 60) -> dict:
    """A small project for the UI: three runs with train/valid curves, models with metrics, tasks in every end
    state, and a dataset of 8x8 digit images stored as N x 64 (plus 3 x 16 x 16 x 3 colour images)."""
    from sklearn.datasets import load_digits
    p = wh.project(PROJECT)
    runs = []
    for i, lr in enumerate((0.001, 0.01, 0.1)):
        with p.runs.start(f"mlp-{i}", hyper_parameters={"lr": lr, "n_hidden": 32 * (i + 1)}) as run:
            for step in range(steps):
                run.log("train", step=step, loss=math.exp(-step * lr * 3) + 0.05 * i, accuracy=1 - 0.5 ** (step / 10))
                if step % 10 == 9:
                    run.log("valid", step=step, loss=math.exp(-step * lr * 2) + 0.1, accuracy=0.8 + 0.05 * i)
        runs.append(run)
    p.runs.flush()
    models = []
    for i, run in enumerate(runs):
        models.append(p.models.save({"w": np.full(4, i, np.float32)}, "mlp", epoch=steps, run=run,
                                    test_accuracy=[0.91, 0.97, 0.85][i], valid_accuracy=[0.9, 0.95, 0.88][i],
                                    lr=run.hyper_parameters["lr"]))
    p.index.ensure_collection("tasks", scalar_fields=["task_name", "status", "project"])
    tasks = []
    for i, (status, output, error) in enumerate([
            ("finished", "epoch 1 loss 0.5\nepoch 2 loss 0.25\ndone: test_accuracy=0.97\n", None),
            ("finished", "epoch 1 loss 0.7\ndone\n", None),
            ("failed", "starting\n", "Traceback (most recent call last):\nValueError: lr too large"),
            ("pending", None, None)]):
        ended = status in ("finished", "failed")
        tasks.append(p.insert("tasks", {
            "task_name": "digits-mlp", "status": status, "priority": 0, "hyper_parameters": {"lr": 0.01 * (i + 1)},
            "attempts": 0 if status == "pending" else (3 if status == "failed" else 1), "max_attempts": 3,
            "result": {"test_accuracy": 0.9 + i / 100} if status == "finished" else None, "error": error,
            "output": output, "worker": None if status == "pending" else f"host:{100 + i}",
            "started": None if status == "pending" else "2024-05-01T10:00:00.000000Z",
            "ended": "2024-05-01T10:01:00.000000Z" if ended else None, "created": "2024-05-01T09:59:00.000000Z"}))
    digits = load_digits()
    X = (digits.data[:200] / 16.0).astype(np.float32)
    y = digits.target[:200].astype(np.int64)
    digits_rec = p.datasets.save((X, y), "digits", description="8x8 digits", tags=["images", "8x8"])
    colour = np.zeros((3, 16, 16, 3), np.uint8)
    colour[:, :8, :, 0] = 255
    colour_rec = p.datasets.save({"images": colour, "labels": np.arange(3)}, "colour")
    return {"project": p, "runs": runs, "models": models, "tasks": tasks, "digits": digits_rec,
            "colour": colour_rec}


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("web") / "wh")
    filled = fill_warehouse(wh)
    yield wh, filled
    wh.close()


@pytest.fixture(scope="module")
def client(filled):
    return TestClient(create_app(filled[0]), base_url=BASE)


# -- downsampling and images ----------------------------------------------------------------------------------
def test_minmax_downsample_keeps_extremes_and_order():
    rng = np.random.default_rng(0)
    x = np.arange(100_000, dtype=np.float64)
    y = rng.normal(size=x.size)
    y[12_345] = 50.0
    y[77_777] = -50.0
    y[500] = np.nan
    dx, dy = minmax_downsample(x, y, 1000)
    assert len(dx) <= 1000
    assert np.all(np.diff(dx) > 0)
    assert dx[0] == 0 and dx[-1] == 99_999
    assert 12_345 in dx and 77_777 in dx and 500 not in dx
    assert dy.max() == 50.0 and dy.min() == -50.0
    short_x, short_y = minmax_downsample(x[:10], y[:10], 1000)
    assert np.array_equal(short_x, x[:10]) and np.array_equal(short_y, y[:10])
    with pytest.raises(ValueError):
        minmax_downsample(x, y, 2)


def test_image_layouts():
    assert image_view((10, 64), "float32")[:2] == ("flat", (8, 8))
    assert image_view((10, 28, 28), "uint8")[0] == "hw"
    assert image_view((10, 16, 16, 3), "uint8")[0] == "hwc"
    assert image_view((10, 3, 32, 32), "float32")[:2] == ("chw", (32, 32, 3))
    assert image_view((10,), "int64") is None
    assert image_view((10, 10), "float32") is None  # 10 is not a square
    assert image_view((10, 64), "<U3") is None
    png = to_png(np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert int.from_bytes(png[16:20], "big") == 96  # 8 px scaled 12x with nearest-neighbour


# -- pages ----------------------------------------------------------------------------------------------------
def test_projects_page(client):
    r = client.get("/")
    assert r.status_code == 200
    assert f"/p/{PROJECT}/runs" in r.text


def test_runs_page_lists_runs_with_params_and_metrics(client, filled):
    r = client.get(f"/p/{PROJECT}/runs")
    assert r.status_code == 200
    for run in filled[1]["runs"]:
        assert run.id in r.text and run.name in r.text
    assert "n_hidden" in r.text and "valid.accuracy" in r.text and "train.loss" in r.text
    assert "/static/vendor/uPlot.iife.min.js" in r.text


def test_runs_query_box_filters(client):
    r = client.get(f"/p/{PROJECT}/runs", params={"q": '{"hyper_parameters.lr": {"$gte": 0.01}}'})
    assert r.status_code == 200
    assert "mlp-1" in r.text and "mlp-2" in r.text and "mlp-0" not in r.text


@pytest.mark.parametrize("q, words", [
    ('{"status": ', "not valid JSON"),
    ('["status"]', "must be a JSON object"),
    ('{"status": {"$bogus": 1}}', "$bogus"),
])
def test_bad_query_shows_the_message_inline(client, q, words):
    for page in ("runs", "models", "tasks", "datasets"):
        r = client.get(f"/p/{PROJECT}/{page}", params={"q": q})
        assert r.status_code == 400
        assert words in r.text and 'role="alert"' in r.text
        assert "Traceback" not in r.text
    api = client.get(f"/api/p/{PROJECT}/runs", params={"q": q})
    assert api.status_code == 400 and words in api.json()["error"]


def test_metric_api_downsamples_and_names_runs(client, filled):
    runs = filled[1]["runs"]
    r = client.get(f"/api/p/{PROJECT}/runs/metric",
                   params={"ids": f"{runs[0].id},{runs[1].id}", "kind": "train", "metric": "loss", "points": 20})
    assert r.status_code == 200
    body = r.json()
    assert [s["name"] for s in body["series"]] == ["mlp-0", "mlp-1"]
    for s in body["series"]:
        assert s["count"] == 60 and len(s["steps"]) <= 20 and s["steps"][0] == 0 and s["steps"][-1] == 59
    valid = client.get(f"/api/p/{PROJECT}/runs/metric", params={"ids": runs[0].id, "kind": "valid",
                                                                "metric": "accuracy"}).json()
    assert valid["series"][0]["steps"] == [9, 19, 29, 39, 49, 59]


def test_charted_history_is_reread_when_the_run_logs_more(tmp_path):
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        p = wh.project("live")
        client = TestClient(create_app(wh), base_url=BASE)
        run = p.runs.start("growing")
        url = f"/api/p/live/runs/metric?ids={run.id}&kind=train&metric=loss"
        for step in range(10):
            run.log("train", step=step, loss=1.0 / (step + 1))
        run.flush()
        assert client.get(url).json()["series"][0]["count"] == 10
        assert client.get(url).json()["series"][0]["count"] == 10  # served from the cache
        for step in range(10, 25):
            run.log("train", step=step, loss=float("nan") if step == 12 else 0.01)
        run.finish()
        series = client.get(url).json()["series"][0]
        assert series["count"] == 24 and series["steps"][-1] == 24 and 12 not in series["steps"]


def test_metric_api_bad_input(client, filled):
    run = filled[1]["runs"][0]
    url = f"/api/p/{PROJECT}/runs/metric"
    missing = client.get(url, params={"ids": "nope", "metric": "loss"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    bad = client.get(url, params={"ids": run.id, "metric": "$where"})
    assert bad.status_code == 400 and "error" in bad.json()
    few = client.get(url, params={"ids": run.id, "metric": "loss", "points": 2})
    assert few.status_code == 400 and "points" in few.json()["error"]
    typed = client.get(url, params={"ids": run.id, "metric": "loss", "points": "many"})
    assert typed.status_code == 400 and "points" in typed.json()["error"]


def test_run_page(client, filled):
    run = filled[1]["runs"][2]
    r = client.get(f"/p/{PROJECT}/runs/{run.id}")
    assert r.status_code == 200 and "mlp-2" in r.text and "train.accuracy" in r.text


def test_leaderboard_sorts_by_any_metric(client, filled):
    def order(sort):
        r = client.get(f"/p/{PROJECT}/models", params={"sort": sort})
        assert r.status_code == 200
        return [m.id for m in sorted(filled[1]["models"], key=lambda m: r.text.index(m.id))]
    by_test = order("test_accuracy:-1")
    assert [m.test_accuracy for m in filled[1]["models"] if m.id == by_test[0]] == [0.97]
    by_valid_up = order("valid_accuracy:1")
    assert [m.valid_accuracy for m in filled[1]["models"] if m.id == by_valid_up[0]] == [0.88]
    api = client.get(f"/api/p/{PROJECT}/models", params={"sort": "lr:-1"}).json()
    assert [row["lr"] for row in api["rows"]] == [0.1, 0.01, 0.001]
    assert {"test_accuracy", "valid_accuracy", "lr"} <= set(api["metrics"])
    assert all("weights" not in row for row in api["rows"])
    bad = client.get(f"/p/{PROJECT}/models", params={"sort": "test_accuracy:up"})
    assert bad.status_code == 400 and "field:1 or field:-1" in bad.text


def test_leaderboard_shows_final_models_ranked_by_a_metric_with_a_checkpoint_toggle(tmp_path):
    """The models page used to mix every checkpoint with the final models, newest first."""
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        p = wh.project("board")
        finals = [p.models.save({"w": np.full(2, i, np.float32)}, "mlp", test_accuracy=acc, n_hidden=8 * (i + 1))
                  for i, acc in enumerate([0.8, 0.95, 0.9])]
        ckpts = [p.models.checkpoint({"w": np.zeros(2, np.float32)}, run="R", epoch=e, name="mlp-ckpt",
                                     metrics={"test_accuracy": 0.99 - e / 100}) for e in range(4)]
        client = TestClient(create_app(wh), base_url=BASE)
        api = client.get("/api/p/board/models").json()
        assert [row["_id"] for row in api["rows"]] == [finals[1].id, finals[2].id, finals[0].id]
        assert api["ranked"] == "test_accuracy:-1" and api["total"] == 3 and api["hidden_checkpoints"] == 4
        both = client.get("/api/p/board/models", params={"checkpoints": "true"}).json()
        assert both["total"] == 7 and both["rows"][0]["_id"] == ckpts[0].id
        page = client.get("/p/board/models")
        assert page.status_code == 200 and "Ranked by <b>test_accuracy</b>" in page.text
        assert all(c.id not in page.text for c in ckpts) and "4 checkpoints hidden" in page.text
        assert 'href="?checkpoints=1&sort=test_accuracy%3A-1"' in page.text
        shown = client.get("/p/board/models", params={"checkpoints": "1", "sort": "n_hidden:1"})
        assert all(c.id in shown.text for c in ckpts) and "final models only" in shown.text
        assert "checkpoints=1" in shown.text.split('data-field="test_accuracy"')[1].split("</th>")[0]
        assert shown.text.index(finals[0].id) < shown.text.index(finals[2].id)  # n_hidden ascending


def test_rank_metric_prefers_test_metrics_and_knows_lower_is_better():
    from mlwarehouse.web.data import rank_metric
    assert rank_metric(["lr", "n_hidden", "test_accuracy", "valid_accuracy"]) == ("test_accuracy", -1)
    assert rank_metric(["lr", "valid_loss"]) == ("valid_loss", 1)
    assert rank_metric(["lr", "f1"]) == ("f1", -1)
    assert rank_metric(["lr", "n_hidden"]) is None  # nothing looks like a metric: newest first


def test_task_board_and_api(client, filled):
    r = client.get(f"/p/{PROJECT}/tasks")
    assert r.status_code == 200
    assert "done: test_accuracy=0.97" in r.text and "ValueError: lr too large" in r.text
    body = client.get(f"/api/p/{PROJECT}/tasks", params={"q": '{"status": "finished"}'}).json()
    assert len(body["rows"]) == 2 and body["counts"]["finished"] == 2 and body["counts"]["failed"] == 0
    task = filled[1]["tasks"][0]
    detail = client.get(f"/p/{PROJECT}/tasks/{task['_id']}")
    assert detail.status_code == 200 and "epoch 2 loss 0.25" in detail.text


def test_read_only_refuses_changes(client, filled):
    task = filled[1]["tasks"][2]
    r = client.post(f"/api/p/{PROJECT}/tasks/{task['_id']}/retry", headers=SAME_ORIGIN)
    assert r.status_code == 403 and "read-only" in r.json()["error"]


def test_writable_retry_and_cancel(tmp_path):
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        p = wh.project("w")
        p.index.ensure_collection("tasks")
        failed = p.insert("tasks", {"task_name": "t", "status": "failed", "attempts": 3, "max_attempts": 3})
        client = TestClient(create_app(wh, writable=True), base_url=BASE)
        url = f"/api/p/w/tasks/{failed['_id']}/retry"
        assert client.post(url).status_code == 403  # no X-MLW header: a cross-site form cannot send it
        assert client.post(url, headers=SAME_ORIGIN).json() == {"changed": 1}
        assert p.find_one("tasks", {"_id": failed["_id"]})["status"] == "pending"
        assert client.post(f"/api/p/w/tasks/{failed['_id']}/cancel", headers=SAME_ORIGIN).json()["changed"] == 1
        assert client.post("/api/p/w/tasks/nope/cancel", headers=SAME_ORIGIN).status_code == 404
        assert 'data-action="retry"' in client.get("/p/w/tasks").text


def test_datasets_pages_show_shapes_and_images(client, filled):
    listing = client.get(f"/p/{PROJECT}/datasets")
    assert listing.status_code == 200 and "digits" in listing.text and "colour" in listing.text
    digits = filled[1]["digits"]
    r = client.get(f"/p/{PROJECT}/datasets/{digits.id}")
    assert r.status_code == 200
    assert "200 × 64" in r.text and "float32" in r.text and "int64" in r.text
    assert "shown as 8x8" in r.text
    assert r.text.count('src="data:image/png;base64,') == 16
    colour = client.get(f"/p/{PROJECT}/datasets/{filled[1]['colour'].id}")
    assert colour.text.count('src="data:image/png;base64,') == 3 and "3 × 16 × 16 × 3" in colour.text
    png = client.get(f"/api/p/{PROJECT}/datasets/{digits.id}/preview.png", params={"leaf": 0, "index": 3})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    labels = client.get(f"/api/p/{PROJECT}/datasets/{digits.id}/preview.png", params={"leaf": 1})
    assert labels.status_code == 404 and "not an array of images" in labels.json()["error"]


def test_leaves_walk_tuples_and_dicts():
    tree = {"_tuple": [{"_blob": "a", "codec": "npy"}, {"x": {"_blob": "b", "codec": "npy"}, "n": 3}]}
    assert [leaf.path for leaf in leaves(tree)] == ["value[0]", "value[1]['x']"]


@pytest.mark.parametrize("path", [
    "/p/ui-demo/runs/NOPE", "/p/ui-demo/models/NOPE", "/p/ui-demo/tasks/NOPE", "/p/ui-demo/datasets/NOPE",
    "/p/no-such-project/runs", "/no/such/page",
])
def test_unknown_ids_are_404_pages(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert "text/html" in r.headers["content-type"]
    assert "Not found" in r.text and "Traceback" not in r.text


def test_static_assets_are_vendored(client):
    js = client.get("/static/vendor/uPlot.iife.min.js")
    assert js.status_code == 200 and "uPlot" in js.text
    assert client.get("/static/vendor/uPlot.LICENSE").status_code == 200
    assert client.get("/static/app.js").status_code == 200


def test_odd_names_and_documents_from_other_tools_render(tmp_path):
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        client = TestClient(create_app(wh), base_url=BASE)
        p = wh.project("q?x #1")
        with p.runs.start("r", hyper_parameters={"batch size": 32}) as run:
            run.log("train", step=0, loss=1.0)
        assert client.get("/p/q%3Fx%20%231", follow_redirects=False).headers["location"] == "/p/q%3Fx%20%231/runs"
        page = client.get("/p/q%3Fx%20%231/runs").text
        assert 'href="/p/q%3Fx%20%231/runs/' in page
        assert "sort=hyper_parameters.batch" not in page and "batch size" in page  # no link that would 400
        odd = [("runs", {"_id": "r1", "name": "odd", "summary": {"train": 3}, "hyper_parameters": [1],
                         "started": 1e300}),
               ("models", {"_id": "m1", "name": "w", "run": 12345, "architecture": [1, 2],
                           "weights": [[["a", 1], "not a reference"], ["short"]]}),
               ("datasets", {"_id": "d1", "name": "d", "tags": 7}),
               ("tasks", {"_id": "t1", "name": "t", "status": "done", "output_blob": {"_blob": "nope"}})]
        for collection, doc in odd:
            wh.index.insert_one(collection, {"project": "q?x #1", **doc})
        base = "/p/q%3Fx%20%231"
        for url in ("/runs", "/runs/r1", "/models", "/models/m1", "/datasets", "/tasks", "/tasks/t1"):
            assert client.get(base + url).status_code == 200, url


def test_host_header_is_checked_and_cross_site_writes_refused(tmp_path):
    """DNS rebinding: a page of another name resolved to 127.0.0.1 is refused; writes need the UI's own origin."""
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        p = wh.project("w")
        p.index.ensure_collection("tasks")
        failed = p.insert("tasks", {"task_name": "t", "status": "failed", "attempts": 3, "max_attempts": 3})
        app = create_app(wh, writable=True)
        for host in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765", "LOCALHOST"):
            assert TestClient(app, base_url=f"http://{host}").get("/").status_code == 200, host
        for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example", "localhost.evil"):
            r = TestClient(app, base_url=f"http://{host}").get("/api/projects")
            assert r.status_code == 400 and "not served here" in r.text, host
        client = TestClient(app, base_url="http://127.0.0.1:8765")
        url = f"/api/p/w/tasks/{failed['_id']}/retry"
        for headers in ({"X-MLW": "1"}, {"X-MLW": "1", "Origin": "http://evil.example"},
                        {"X-MLW": "1", "Origin": "http://127.0.0.1:9999"}, {"X-MLW": "1", "Origin": "null"},
                        {"X-MLW": "1", "Origin": "http://127.0.0.1:8765", "Sec-Fetch-Site": "cross-site"},
                        {"X-MLW": "1", "Referer": "http://evil.example/page"}):
            assert client.post(url, headers=headers).status_code == 403, headers
        assert p.find_one("tasks", {"_id": failed["_id"]})["status"] == "failed"
        assert client.post(url, headers={"X-MLW": "1", "Referer": "http://127.0.0.1:8765/p/w/tasks"}).json() == \
            {"changed": 1}
        other = TestClient(create_app(wh, allowed_hosts=["ui.lab.example"]), base_url="http://ui.lab.example:80")
        assert other.get("/api/projects").status_code == 200
        anyone = TestClient(create_app(wh, allowed_hosts=["*"]), base_url="http://any.example")
        assert anyone.get("/").status_code == 200


def test_redos_and_oversized_queries_are_shown_inline(client):
    """A catastrophic pattern (issue 12: one GET froze the UI) or a too deep / too large filter is a 400 with
    the message, never a hang or a 500."""
    deep = '{"n": 1}'
    for _ in range(300):
        deep = '{"$or": [' + deep + ', {"n": 2}]}'
    cases = [('{"_id": {"$regex": "^((\\\\w+)+)+!"}}', "exponential"), (deep, "MAX_DEPTH"),
             ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
             ('{"$or": [' + ", ".join(f'{{"n": {i}}}' for i in range(500)) + "]}", "MAX_PREDICATES"),
             ('{"n": {"$in": [' + ",".join(["0"] * 16_000) + "]}}", "MAX_TERMS")]
    for q, limit in cases:
        for page in ("runs", "models", "tasks", "datasets"):
            r = client.get(f"/p/{PROJECT}/{page}", params={"q": q})
            assert r.status_code == 400 and limit in r.text, (page, limit, r.status_code)
        r = client.get(f"/api/p/{PROJECT}/runs", params={"q": q})
        assert r.status_code == 400 and limit in r.json()["error"]


def test_project_names_with_a_slash_are_reachable(tmp_path):
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh") as wh:
        client = TestClient(create_app(wh), base_url=BASE)
        p = wh.project("team/vision")
        with p.runs.start("r") as run:
            run.log("train", step=0, loss=1.0)
        wh.tasks.create("t", "builtins:dict")  # another project: the slash one must not see it
        assert client.get("/p/team%2Fvision", follow_redirects=False).headers["location"] == "/p/team%2Fvision/runs"
        page = client.get("/p/team%2Fvision/runs")
        assert page.status_code == 200 and f'href="/p/team%2Fvision/runs/{run.id}"' in page.text
        assert client.get(f"/p/team%2Fvision/runs/{run.id}").status_code == 200
        assert client.get("/api/p/team%2Fvision/runs").json()["total"] == 1
        chart = client.get("/api/p/team%2Fvision/runs/metric",
                           params={"ids": run.id, "kind": "train", "metric": "loss"})
        assert chart.status_code == 200 and chart.json()["series"][0]["count"] == 1
        assert client.get("/p/team%2Fvision/tasks").status_code == 200
        assert client.get("/p/team%2Fnope/runs").status_code == 404


def test_a_compressed_array_shows_its_shape_and_a_crafted_head_cannot_expand(wh):
    from mlwarehouse.web.arrays import describe, leaves
    record = wh.datasets.save(np.zeros((300, 400), np.float32), "z")  # zeros: stored compressed
    (leaf,) = leaves(record.doc["value"])
    assert leaf.ref.get("z") == "zstd"
    assert describe(wh.blobs, leaf).shape == (300, 400)
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(b"\0" * (64 << 20))
    key = wh.blobs.put(bomb)  # a head that would expand to 64 MiB if decompressed whole
    crafted = leaves({"_blob": key, "codec": "npy", "size": len(bomb), "z": "zstd", "raw": 64 << 20})[0]
    tracemalloc.start()
    try:
        assert describe(wh.blobs, crafted).shape is None  # no npy header in it: shown without a shape
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()
