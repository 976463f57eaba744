"""The sweep view through FastAPI's TestClient: the columnar JSON of a filter's runs and of a task sweep's runs
(hyper-parameters, summaries, task results), the page, and bad input. A real embedded warehouse holds the runs: a
grid logged through ``run.log``, and a sweep run by a real worker."""

from __future__ import annotations

import itertools
import math
import textwrap

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from mlwarehouse.web import create_app, sweep  # noqa: E402

PROJECT = "sweeps"
BASE = "http://localhost"
GRID = {"n_hidden": [16, 64, 256], "lr": [0.001, 0.01, 0.1], "seed": [0, 1, 2]}


def accuracy(n_hidden: int, lr: float, seed: int) -> float:
    """The validation accuracy a grid run logs last: better with more units and lr near 0.01, a little per seed."""
    return 0.7 + 0.05 * math.log2(n_hidden / 16) - 0.05 * abs(math.log10(lr) + 2) + 0.01 * seed


def fill_grid(p, steps: int = 12, name: str = "grid") -> list:
    """One run per point of GRID (plus two fixed parameters), logging train.loss and valid.accuracy curves."""
    runs = []
    for n_hidden, lr, seed in itertools.product(*GRID.values()):
        hp = {"n_hidden": n_hidden, "lr": lr, "seed": seed, "optimizer": "adam", "epochs": steps}
        with p.runs.start(name, hyper_parameters=hp) as run:
            for step in range(steps):
                run.log("train", step=step, loss=math.exp(-lr * 10 * step) + 0.01 * seed)
                run.log("valid", step=step, accuracy=accuracy(n_hidden, lr, seed) - 0.01 * (steps - 1 - step))
        runs.append(run)
    p.runs.flush()
    return runs


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("sweep") / "wh")
    p = wh.project(PROJECT)
    runs = fill_grid(p)
    with p.runs.start("odd", hyper_parameters={"activation": "relu", "dropout": True, "width": [1, 2]}) as run:
        run.log("valid", step=0, accuracy=0.5)
    with p.runs.start("odd", hyper_parameters={"activation": "tanh", "dropout": False, "width": [1, 2]}) as run:
        run.log("valid", step=0, accuracy=0.6)
    with p.runs.start("odd", hyper_parameters={"dropout": True, "width": [1, 2]}):
        pass
    p.runs.flush()
    yield wh, p, runs
    wh.close()


@pytest.fixture(scope="module")
def client(filled):
    return TestClient(create_app(filled[0]), base_url=BASE)


def column(data: dict, name: str) -> dict:
    (found,) = [c for c in data["params"] + data["metrics"] if c["name"] == name]
    return found


def by_id(data: dict, name: str) -> dict:
    """A column's values by run id (category codes turned back into their labels)."""
    c = column(data, name)
    values = [c["categories"][v] if c.get("type") == "category" and v is not None else v for v in c["values"]]
    return dict(zip(data["runs"]["id"], values))


def test_the_grid_comes_back_as_columns_of_the_stored_values(client, filled):
    _, p, runs = filled
    r = client.get(f"/api/p/{PROJECT}/sweep", params={"q": '{"name": "grid"}'})
    assert r.status_code == 200
    data = r.json()
    assert data["count"] == data["total"] == 27 and sorted(data["runs"]["id"]) == sorted(run.id for run in runs)
    assert set(data["runs"]["name"]) == {"grid"} and set(data["runs"]["status"]) == {"complete"}
    varying = [c["name"] for c in data["params"] if c["varies"]]
    fixed = [c["name"] for c in data["params"] if not c["varies"]]
    assert varying == ["lr", "n_hidden", "seed"] and fixed == ["epochs", "optimizer"]  # varying ones first
    stored = {run.id: p.runs.get(run.id) for run in runs}
    for name in ("lr", "n_hidden", "seed", "epochs", "optimizer"):
        assert by_id(data, name) == {i: r.hyper_parameters[name] for i, r in stored.items()}
    lr, n_hidden = column(data, "lr"), column(data, "n_hidden")
    assert (lr["type"], lr["scale"], lr["min"], lr["max"], lr["distinct"]) == ("number", "log", 0.001, 0.1, 3)
    assert (n_hidden["scale"], n_hidden["distinct"]) == ("linear", 3)  # 256 / 16 is not two decades
    assert column(data, "optimizer") == {"name": "optimizer", "type": "category", "categories": ["adam"],
                                         "values": [0] * 27, "distinct": 1, "missing": 0, "varies": False}
    assert by_id(data, "valid.accuracy") == {i: r.summary["valid"]["accuracy"]["last"] for i, r in stored.items()}
    assert by_id(data, "train.loss") == {i: r.summary["train"]["loss"]["last"] for i, r in stored.items()}
    assert column(data, "train.loss")["direction"] == "min" and column(data, "valid.accuracy")["direction"] == "max"
    assert data["metric"] == "valid.accuracy" and data["stat"] == "last"
    best = client.get(f"/api/p/{PROJECT}/sweep", params={"q": '{"name": "grid"}', "stat": "max"}).json()
    assert by_id(best, "train.loss") == {i: r.summary["train"]["loss"]["max"] for i, r in stored.items()}
    assert by_id(best, "train.loss") != by_id(data, "train.loss")
    started = [p.runs.get(i).doc["started"] for i in data["runs"]["id"]]
    assert started == sorted(started)  # oldest first: the order the sweep ran in


def test_a_filter_narrows_the_set_and_what_varies(client, filled):
    _, p, _ = filled
    q = '{"name": "grid", "hyper_parameters.seed": 0, "hyper_parameters.lr": {"$gte": 0.01}}'
    data = client.get(f"/api/p/{PROJECT}/sweep", params={"q": q}).json()
    expected = p.runs.find(where={"name": "grid", "hyper_parameters.seed": 0, "hyper_parameters.lr": {"$gte": 0.01}})
    assert len(expected) == 6 and sorted(data["runs"]["id"]) == sorted(r.id for r in expected)
    assert [c["name"] for c in data["params"] if c["varies"]] == ["lr", "n_hidden"]  # one seed left: not an axis
    assert column(data, "lr")["scale"] == "linear"  # 0.01 to 0.1
    limited = client.get(f"/api/p/{PROJECT}/sweep", params={"q": '{"name": "grid"}', "limit": 5}).json()
    assert limited["count"] == 5 and limited["total"] == 27


def test_categories_booleans_lists_and_missing_values(client, filled):
    data = client.get(f"/api/p/{PROJECT}/sweep", params={"q": '{"name": "odd"}'}).json()
    activation, dropout, width = column(data, "activation"), column(data, "dropout"), column(data, "width")
    assert activation["type"] == "category" and activation["categories"] == ["relu", "tanh"]
    assert sorted(by_id(data, "activation").values(), key=lambda v: (v is None, v)) == ["relu", "tanh", None]
    assert activation["missing"] == 1 and activation["varies"]
    assert dropout["categories"] == ["false", "true"] and dropout["varies"]  # booleans are categories, not 0/1
    assert width["categories"] == ["[1, 2]"] and not width["varies"]
    assert sorted(by_id(data, "valid.accuracy").values(), key=lambda v: (v is None, v)) == [0.5, 0.6, None]


def test_a_task_sweep_run_by_a_real_worker(wh, tmp_path):
    from mlwarehouse.tasks.worker import Worker
    p = wh.project("tasked")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import mlwarehouse
        run = mlwarehouse.current_run()
        for step in range(5):
            run.log("train", step=step, loss=1.0 / (1 + lr * step * n_hidden))
        test_accuracy = 0.5 + lr * n_hidden / 100
    """))
    tasks = p.tasks.sweep("mlp", script, grid={"n_hidden": [8, 32], "lr": [0.1, 1.0]},
                          saved_result_keys=["test_accuracy"])
    p.tasks.create("other", script, hyper_parameters={"n_hidden": 1, "lr": 0.5}, saved_result_keys=["test_accuracy"])
    with p.runs.start("by-hand", hyper_parameters={"n_hidden": 8, "lr": 0.1}):
        pass
    assert Worker(p, None, once=True, verbose=False, concurrency=3, lease_seconds=10).run() == 5
    client = TestClient(create_app(wh), base_url=BASE)
    data = client.get(f"/api/p/{p.name}/sweep", params={"task": "mlp"}).json()
    done = [t.refresh() for t in tasks]
    assert data["task"] == "mlp" and data["total"] == data["count"] == 4
    assert sorted(data["runs"]["id"]) == sorted(t.run for t in done)  # not the other task's, nor the hand-made run
    assert by_id(data, "result.test_accuracy") == {t.run: t.result["test_accuracy"] for t in done}
    assert by_id(data, "result.test_accuracy") == {t.run: 0.5 + t.hyper_parameters["lr"] * t.hyper_parameters[
        "n_hidden"] / 100 for t in done}
    assert dict(zip(data["runs"]["id"], data["runs"]["task"])) == {t.run: t.id for t in done}
    assert data["metric"] == "result.test_accuracy"  # a test result first
    assert by_id(data, "train.loss") == {t.run: p.runs.get(t.run).summary["train"]["loss"]["last"] for t in done}
    narrowed = client.get(f"/api/p/{p.name}/sweep", params={"task": "mlp", "q": '{"hyper_parameters.lr": 1.0}'})
    assert sorted(by_id(narrowed.json(), "n_hidden").values()) == [8, 32]
    everything = client.get(f"/api/p/{p.name}/sweep").json()  # a filter's runs show their tasks' results too
    assert everything["count"] == 6 and sum(v is not None for v in column(everything, "result.test_accuracy")[
        "values"]) == 5
    r = client.get(f"/api/p/{p.name}/sweep", params={"task": "nope"})
    assert r.status_code == 404 and "no task named 'nope'" in r.json()["error"]
    page = client.get(f"/p/{p.name}/sweep", params={"task": "mlp"})
    assert page.status_code == 200 and "runs of task <code>mlp</code>, 4 in all" in page.text
    assert '<option value="mlp">' in page.text and '<option value="other">' in page.text  # the task names offered
    assert client.get(f"/p/{p.name}/sweep", params={"task": "nope"}).status_code == 404


def test_a_sweep_of_more_tasks_than_one_query_lists(wh, tmp_path, monkeypatch):
    """The task ids are read in chunks: a sweep of thousands of tasks stays under the query's term limit."""
    monkeypatch.setattr(sweep, "CHUNK", 3)
    p = wh.project("chunked")
    script = tmp_path / "noop.py"
    script.write_text("x = 1\n")
    tasks = p.tasks.sweep("big", script, grid={"i": list(range(8))})
    runs = [p.runs.start("big", hyper_parameters=t.hyper_parameters, task=t) for t in reversed(tasks)]
    for run in runs:
        run.finish()
    data = sweep.sweep_data(p, None, task="big")
    assert data["total"] == data["count"] == 8 and data["runs"]["id"] == [r.id for r in runs]  # oldest first
    assert sweep.sweep_data(p, None, task="big", limit=5)["runs"]["id"] == [r.id for r in runs[:5]]
    assert sweep.sweep_data(p, None, task="big", limit=5)["total"] == 8
    assert sweep.sweep_data(p, {"hyper_parameters.i": {"$lt": 2}}, task="big")["total"] == 2


def test_the_page_and_the_runs_page_link(client):
    r = client.get(f"/p/{PROJECT}/sweep", params={"q": '{"name": "grid"}'})
    assert r.status_code == 200
    assert "/static/sweep.js" in r.text and "/static/sweep.css" in r.text and 'id="sweep-parallel"' in r.text
    assert "27 in all" in r.text
    assert 'data-q="{&#34;name&#34;: &#34;grid&#34;}"' in r.text  # the filter travels escaped to the script
    runs = client.get(f"/p/{PROJECT}/runs", params={"q": '{"name": "grid"}'})
    assert f'href="/p/{PROJECT}/sweep?q=%7B%22name%22%3A%20%22grid%22%7D"' in runs.text
    assert f'href="/p/{PROJECT}/sweep"' in client.get(f"/p/{PROJECT}/runs").text
    assert client.get("/static/sweep.js").status_code == 200
    hostile = client.get(f"/p/{PROJECT}/sweep", params={"q": '{"name": "\\"><script>alert(1)</script>"}'})
    assert hostile.status_code == 200 and "<script>alert(1)" not in hostile.text


@pytest.mark.parametrize("params, status, words", [
    ({"q": "{not json"}, 400, "not valid JSON"),
    ({"q": '{"status": {"$near": 1}}'}, 400, "$near"),
    ({"q": "[1, 2]"}, 400, "JSON object"),
    ({"stat": "mean"}, 400, "stat must be one of last, min, max"),
    ({"limit": 0}, 400, "limit"),
    ({"limit": 10_001}, 400, "limit"),
    ({"task": "x" * 201}, 400, "task= is a task name"),
])
def test_bad_input_is_a_clear_error(client, params, status, words):
    r = client.get(f"/api/p/{PROJECT}/sweep", params=params)
    assert r.status_code == status and words in r.json()["error"]
    page = client.get(f"/p/{PROJECT}/sweep", params=params)
    assert page.status_code == status and words in page.text.replace("&#34;", '"').replace("&#39;", "'")
    if "limit" not in params:
        assert 'role="alert"' in page.text and "sweep.js" not in page.text  # shown inline, nothing to draw


def test_an_unknown_project_is_a_404(client):
    assert client.get("/p/no-such-project/sweep").status_code == 404
    empty = client.get("/api/p/no-such-project/sweep").json()
    assert empty["count"] == 0 and empty["params"] == [] and empty["metric"] is None


def test_default_metric_prefers_test_then_validation_scores():
    assert sweep.default_metric(["train.loss", "valid.loss", "valid.accuracy"]) == "valid.accuracy"
    assert sweep.default_metric(["train.loss", "valid.loss", "result.test_f1"]) == "result.test_f1"
    assert sweep.default_metric(["train.loss", "test.loss"]) == "test.loss"
    assert sweep.default_metric(["train.loss"]) == "train.loss"
    assert sweep.default_metric([]) is None


def test_task_results_are_flattened_and_only_numbers_are_metrics(wh):
    p = wh.project("results")
    p.index.ensure_collection("tasks", scalar_fields=["task_name", "status", "project"])
    results = [{"scores": {"acc": 0.9, "f1": 0.8}, "best": True, "note": "fine", "epochs": 3},
               {"scores": {"acc": 0.7}, "best": False, "note": None, "epochs": 5}, None]
    runs = []
    for i, result in enumerate(results):
        task = p.insert("tasks", {"task_name": "nested", "status": "finished", "hyper_parameters": {"i": i},
                                  "result": result})
        run = p.runs.start("nested", hyper_parameters={"i": i}, task=task["_id"])
        run.finish()
        runs.append(run.id)
    data = sweep.sweep_data(p, None, task="nested")
    assert [m["name"] for m in data["metrics"]] == ["result.epochs", "result.scores.acc", "result.scores.f1"]
    assert by_id(data, "result.scores.acc") == dict(zip(runs, [0.9, 0.7, None]))
    assert by_id(data, "result.scores.f1") == dict(zip(runs, [0.8, None, None]))
    assert by_id(data, "result.epochs") == dict(zip(runs, [3, 5, None]))
    assert data["metric"] == "result.scores.acc"  # no test_ or valid_ result: the first score-like one
