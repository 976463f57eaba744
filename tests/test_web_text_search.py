"""Text search and saved views of the list pages through FastAPI's TestClient: words match names, tags and
descriptions (any case, every word, metacharacters literal), combined with the Mongo filter; saved views are
checked, listed, opened by URL, replaced by name and deleted, and refused by a read-only UI or without X-MLW."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from mlwarehouse.errors import QueryError  # noqa: E402
from mlwarehouse.web import create_app  # noqa: E402
from mlwarehouse.web.data import text_filter  # noqa: E402
from mlwarehouse.web.views import COLLECTION  # noqa: E402

BASE = "http://127.0.0.1"  # a loopback name: the UI refuses other Host names by default
SAME_ORIGIN = {"X-MLW": "1", "Origin": BASE}
RUNS = [("mnist-mlp", ["Baseline"], "two layers"), ("cifar-resnet", ["big", "gpu"], "ResNet-18 on CIFAR"),
        ("mnist-cnn", ["gpu"], "a small conv net (v2.1)"), ("digits-tree", [], None)]


def fill(wh):
    """Project "search": a run, a model, a dataset and a task for each of :data:`RUNS`."""
    p = wh.project("search")
    for name, tags, description in RUNS:
        fields = {"description": description} if description else {}
        with p.runs.start(name, tags=tags, hyper_parameters={"lr": 0.1}, **fields):
            pass
        p.models.save({"w": [1.0]}, f"{name}-model", tags=tags, description=description, test_accuracy=0.5)
        p.datasets.save({"x": [1, 2]}, f"{name}-data", tags=tags, description=description)
    p.index.ensure_collection("tasks")
    for name, tags, _ in RUNS:
        p.insert("tasks", {"task_name": f"train-{name}", "status": "pending", "attempts": 0, "max_attempts": 3,
                           "tags": tags})
    return wh


@pytest.fixture
def filled(wh):
    return fill(wh)


def names(html: str, page: str) -> list[str]:
    """The names in a list page's table (its links to the items of that page)."""
    return re.findall(rf'<a href="/p/search/{page}/[^"]+">([^<]+)</a>', html)


def test_text_matches_names_tags_and_descriptions_on_every_page(filled):
    client = TestClient(create_app(filled), base_url=BASE)
    for page, suffix in (("runs", ""), ("models", "-model"), ("datasets", "-data")):
        assert sorted(names(client.get(f"/p/search/{page}?text=MNIST").text, page)) == \
            [f"mnist-cnn{suffix}", f"mnist-mlp{suffix}"]
        assert names(client.get(f"/p/search/{page}?text=baseline").text, page) == [f"mnist-mlp{suffix}"]  # a tag
        assert names(client.get(f"/p/search/{page}?text=resnet-18").text, page) == [f"cifar-resnet{suffix}"]
        assert names(client.get(f"/p/search/{page}?text=gpu+mnist").text, page) == [f"mnist-cnn{suffix}"]  # AND
        assert names(client.get(f"/p/search/{page}?text=(v2.1)").text, page) == [f"mnist-cnn{suffix}"]
        assert names(client.get(f"/p/search/{page}?text=v2x1").text, page) == []  # "." is literal, not any
        both = client.get(f"/p/search/{page}", params={"text": "gpu", "q": '{"name": {"$regex": "^cifar"}}'})
        assert names(both.text, page) == [f"cifar-resnet{suffix}"]  # and the Mongo filter too
        assert 'value="gpu"' in both.text and "clear</a>" in both.text
        assert len(names(client.get(f"/p/search/{page}?text=").text, page)) == 4
    tasks = client.get("/p/search/tasks?text=gpu").text
    assert sorted(re.findall(r'<a href="/p/search/tasks/[^"]+">([^<]+)</a>', tasks)) == \
        ["train-cifar-resnet", "train-mnist-cnn"]
    polled = client.get("/api/p/search/tasks/page", params={"text": "Train-MNIST", "q": '{"tags": "gpu"}'}).json()
    assert [t["task_name"] for t in polled["rows"]] == ["train-mnist-cnn"] and polled["total"] == 1


def test_bad_text_is_shown_inline(filled):
    client = TestClient(create_app(filled), base_url=BASE)
    r = client.get("/p/search/runs", params={"text": "x" * 101})
    assert r.status_code == 400 and "at most 100 characters" in r.text and "Traceback" not in r.text
    r = client.get("/p/search/models", params={"text": " ".join("w" * 17)})
    assert r.status_code == 400 and "at most 16 words" in r.text
    with pytest.raises(QueryError, match="no text search"):
        text_filter("collections", "a")
    assert text_filter("runs", "  ", {"a": 1}) == {"a": 1} and text_filter("runs", "") is None


def test_saved_views_are_saved_listed_opened_and_deleted(filled):
    client = TestClient(create_app(filled, writable=True), base_url=BASE)
    view = {"name": "gpu runs", "page": "runs", "q": '{"status": "complete"}', "text": "gpu", "sort": "name:1"}
    r = client.post("/api/p/search/views", json=view, headers=SAME_ORIGIN)
    assert r.status_code == 201, r.text
    saved = r.json()["view"]
    assert saved["url"].startswith("/p/search/runs?") and "text=gpu" in saved["url"] and "sort=name%3A1" in saved["url"]
    opened = client.get(saved["url"])
    assert names(opened.text, "runs") == ["cifar-resnet", "mnist-cnn"]  # the filter, the words and the sort
    again = client.post("/api/p/search/views", json={**view, "text": "mnist"}, headers=SAME_ORIGIN).json()["view"]
    listed = client.get("/api/p/search/views?page=runs").json()["views"]
    assert [v["name"] for v in listed] == ["gpu runs"] and listed[0]["text"] == "mnist"  # replaced by name
    assert client.get("/api/p/search/views?page=models").json()["views"] == []
    assert filled.project("search").collection(COLLECTION).count_documents({}) == 1  # a users' collection
    assert 'id="save-view"' in client.get("/p/search/runs").text
    r = client.delete(f"/api/p/search/views/{again['id']}", headers=SAME_ORIGIN)
    assert r.status_code == 200 and client.get("/api/p/search/views").json()["views"] == []
    assert client.delete(f"/api/p/search/views/{again['id']}", headers=SAME_ORIGIN).status_code == 404


@pytest.mark.parametrize("body, message", [
    ({"name": "", "page": "runs"}, "name"), ({"name": "v", "page": "nope"}, "page"),
    ({"name": "v", "page": "runs", "q": "{oops"}, "JSON"), ({"name": "v", "page": "runs", "sort": "a b:2"}, "sort"),
    ({"name": "v", "page": "runs", "evil": 1}, "unknown view field"), ([1, 2], "JSON object"),
    ({"name": "v", "page": "runs", "columns": "a"}, "columns")])
def test_bad_views_are_refused_with_a_reason(filled, body, message):
    client = TestClient(create_app(filled, writable=True), base_url=BASE)
    r = client.post("/api/p/search/views", json=body, headers=SAME_ORIGIN)
    assert r.status_code == 400 and message.lower() in r.json()["error"].lower(), r.text
    assert filled.project("search").collection(COLLECTION).count_documents({}) == 0


def test_read_only_ui_lists_views_but_refuses_changes(filled):
    views = filled.project("search").collection(COLLECTION)
    views.insert_one({"name": "kept", "page": "models", "q": "", "text": "resnet", "sort": "", "columns": None})
    client = TestClient(create_app(filled), base_url=BASE)
    listed = client.get("/api/p/search/views?page=models").json()
    assert [v["url"] for v in listed["views"]] == ["/p/search/models?text=resnet"] and listed["writable"] is False
    r = client.post("/api/p/search/views", json={"name": "x", "page": "runs"}, headers=SAME_ORIGIN)
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert client.delete(f"/api/p/search/views/{listed['views'][0]['id']}", headers=SAME_ORIGIN).status_code == 403
    page = client.get("/p/search/models").text
    assert 'id="views-select"' in page and 'id="save-view"' not in page
    writable = TestClient(create_app(filled, writable=True), base_url=BASE)
    no_header = writable.post("/api/p/search/views", json={"name": "x", "page": "runs"}, headers={"Origin": BASE})
    assert no_header.status_code == 403 and "X-MLW" in no_header.json()["error"]
    cross = writable.post("/api/p/search/views", json={"name": "x", "page": "runs"},
                          headers={"X-MLW": "1", "Origin": "http://evil.example"})
    assert cross.status_code == 403 and views.count_documents({}) == 1


def fill_columns(wh):
    """Project "cols": two runs with three hyper-parameters and two metrics, two models with three numbers."""
    p = wh.project("cols")
    for i, name in enumerate(("alpha", "beta")):
        run = p.runs.start(name, hyper_parameters={"lr": 0.1 * (i + 1), "depth": 2 + i, "batch": 32})
        run.log("train", step=0, loss=1.0 - i / 4)
        run.log("valid", step=0, acc=0.5 + i / 4)
        run.finish()
        p.models.save({"w": [1.0]}, f"{name}-model", test_accuracy=0.8 + i / 10, valid_loss=0.3, width=64 * (i + 1))
    return wh


def heads(html: str, table: str) -> list[str]:
    """The param/metric (or, for models, metric) column heads of a list page's table, in order."""
    head = re.search(rf'<table id="{table}".*?</thead>', html, re.S).group(0)
    cell = r'<th class="(?:param|metric)"[^>]*>(?:<a [^>]*>)?([^<▼▲]+?)\s*[▼▲]?(?:</a>)?</th>'
    return re.findall(cell, head, re.S)


def test_columns_choose_and_order_the_param_and_metric_columns(wh):
    client = TestClient(create_app(fill_columns(wh)), base_url=BASE)
    assert heads(client.get("/p/cols/runs").text, "runs") == ["batch", "depth", "lr", "train.loss", "valid.acc"]
    page = client.get("/p/cols/runs", params={"columns": "valid.acc, lr,nope,lr"}).text
    assert heads(page, "runs") == ["valid.acc", "lr"]  # in the order asked, repeats dropped, params and metrics
    assert 'id="columns-ignored"' in page and "nope" in page  # a name no run has is said to be ignored
    assert 'name="columns" id="columns" value="valid.acc, lr,nope,lr"' in page  # the box holds the choice
    assert "&columns=valid.acc%2C%20lr%2Cnope%2Clr" in page  # sort links keep it
    cells = re.findall(r'<td class="num"[^>]*>([^<]*)</td>', page)
    assert sorted(cells) == ["0.1", "0.2", "0.5", "0.75"]  # two cells a run
    models = client.get("/p/cols/models", params={"columns": "width,test_accuracy"}).text
    assert heads(models, "models") == ["width", "test_accuracy"]
    assert heads(client.get("/p/cols/models").text, "models") == ["test_accuracy", "valid_loss", "width"]
    escaped = client.get("/p/cols/runs", params={"columns": '"><script>x</script>'}).text
    assert "<script>x</script>" not in escaped and "&#34;&gt;&lt;script&gt;" in escaped


@pytest.mark.parametrize("columns, message", [(",".join(f"c{i}" for i in range(101)), "at most 100 columns"),
                                              ("x" * 101, "1 to 100 printable"), ("a,b\x07", "printable")])
def test_bad_columns_are_refused_inline(wh, columns, message):
    client = TestClient(create_app(fill_columns(wh)), base_url=BASE)
    for page in ("runs", "models"):
        r = client.get(f"/p/cols/{page}", params={"columns": columns})
        assert r.status_code == 400 and message in r.text and "Traceback" not in r.text, r.text[:300]


def test_a_view_saved_with_columns_opens_with_them(wh):
    client = TestClient(create_app(fill_columns(wh), writable=True), base_url=BASE)
    view = {"name": "by acc", "page": "runs", "sort": "name:1", "columns": ["valid.acc", "depth"]}
    saved = client.post("/api/p/cols/views", json=view, headers=SAME_ORIGIN).json()["view"]
    assert saved["columns"] == ["valid.acc", "depth"]
    assert saved["url"] == "/p/cols/runs?sort=name%3A1&columns=valid.acc%2Cdepth"
    assert client.get("/api/p/cols/views?page=runs").json()["views"][0]["url"] == saved["url"]
    assert heads(client.get(saved["url"]).text, "runs") == ["valid.acc", "depth"]
    for body, message in (({**view, "columns": ["a,b"]}, "without a comma"), ({**view, "columns": [3]}, "columns"),
                          ({**view, "page": "tasks"}, "runs, models pages only")):
        r = client.post("/api/p/cols/views", json=body, headers=SAME_ORIGIN)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    plain = client.post("/api/p/cols/views", json={**view, "name": "plain", "columns": []}, headers=SAME_ORIGIN)
    assert plain.json()["view"]["columns"] is None and "columns" not in plain.json()["view"]["url"]
