"""The web UI's lineage: a section of links on the run, model, dataset, task and collection pages, and the model
page's graph."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mlwarehouse.web import create_app  # noqa: E402

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("webl") / "wh", project="lab")
    data = wh.datasets.save(np.arange(4), "digits")
    task = wh.tasks.create("train", "json:dumps")
    with wh.runs.start("mlp", datasets=[data], task=task.id) as run:
        wh.models.checkpoint({"w": np.zeros(2)}, epoch=0)
        model = wh.models.save({"w": np.ones(2)}, "mlp <b>", dataset=data)
    old = wh.datasets.save(np.arange(2), "old")
    wh.runs.start("early", datasets=[old]).finish()
    wh.datasets.delete("old", force=True)
    yield wh, {"data": data.id, "task": task.id, "run": run.id, "model": model.id, "old": old.id}
    wh.close()


@pytest.fixture(scope="module")
def client(filled):
    return TestClient(create_app(filled[0]), base_url=BASE)


def section(html: str) -> str:
    start = html.index('<section class="lineage">')
    return html[start:html.index("</section>", start)]


def test_every_entity_page_links_its_lineage(client, filled):
    _, ids = filled
    pages = {"runs": ids["run"], "models": ids["model"], "datasets": ids["data"], "tasks": ids["task"]}
    for page, ident in pages.items():
        response = client.get(f"/p/lab/{page}/{ident}")
        assert response.status_code == 200, page
        assert "<h2>Lineage</h2>" in response.text, page
    run = section(client.get(f"/p/lab/runs/{ids['run']}").text)
    assert f'href="/p/lab/datasets/{ids["data"]}"' in run and f'href="/p/lab/tasks/{ids["task"]}"' in run
    assert f'href="/p/lab/models/{ids["model"]}"' in run and "checkpoint" in run
    data = section(client.get(f"/p/lab/datasets/{ids['data']}").text)
    assert f'href="/p/lab/runs/{ids["run"]}"' in data and f'href="/p/lab/models/{ids["model"]}"' in data
    task = section(client.get(f"/p/lab/tasks/{ids['task']}").text)
    assert f'href="/p/lab/runs/{ids["run"]}"' in task and "Came from <small>0</small>" in task


def test_the_model_page_draws_a_graph_of_links(client, filled):
    _, ids = filled
    html = section(client.get(f"/p/lab/models/{ids['model']}").text)
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert svg.count("<line") == 3  # dataset -> model, run -> model, task -> run
    links = re.findall(r'<a href="([^"]+)"', svg)
    assert sorted(links) == sorted([f"/p/lab/datasets/{ids['data']}", f"/p/lab/runs/{ids['run']}",
                                    f"/p/lab/tasks/{ids['task']}"])
    assert "mlp &lt;b&gt;" in svg and "<b>" not in svg  # names are escaped


def test_a_deleted_node_is_shown_without_a_link(client, filled):
    wh, ids = filled
    early = wh.runs.find("early")[0].id
    html = section(client.get(f"/p/lab/runs/{early}").text)
    assert "(deleted)" in html and ids["old"] in html
    assert f'href="/p/lab/datasets/{ids["old"]}"' not in html


def test_the_collection_page_links_what_was_trained_on_it(tmp_path):
    torch = pytest.importorskip("torch")
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh", project="lab") as wh:
        points = wh.collection("points <i>")
        points.insert_many({"x": np.array([i, 1.0], np.float32), "y": i % 2} for i in range(40))
        fit = wh.training.fit(torch.nn.Linear(2, 2), points, inputs="x", target="y", epochs=1, name="probe")
        client = TestClient(create_app(wh), base_url=BASE)
        page = client.get("/p/lab/collection", params={"name": "points <i>"})
        assert page.status_code == 200
        made = section(page.text)
        assert f'href="/p/lab/runs/{fit.runs[0]}"' in made and f'href="/p/lab/models/{fit.model.id}"' in made
        assert "<i>" not in page.text  # the collection's name is escaped everywhere on the page
