"""The champion panel of the models page, its JSON API and the alias history page, against a real embedded
warehouse with models, evaluations and alias moves (set, re-set, promote, remove), names that hold HTML, ``/``
and ``@``, and the empty and error cases."""

from __future__ import annotations

import re
from urllib.parse import quote

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from mlwarehouse.web import create_app  # noqa: E402
from mlwarehouse.web.data import fmt  # noqa: E402

BASE = "http://localhost"
ODD = 'x<script>alert("n")</script>/y@z'  # a model name from a user: HTML, a slash and an "@"


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """mlp@champion: a (ci) -> b (bob) -> c (promoted) -> c again (re-set); mlp@staging: a, then removed;
    cnn@champion: d; an odd-named model's champion, evaluated on a query with a fold."""
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("champ") / "wh", project="lab")
    test = wh.datasets.save(np.arange(4), "march-test")
    a, b, c = (wh.models.save({"w": np.full(2, i)}, "mlp") for i in range(3))
    d = wh.models.save({"w": np.ones(3)}, "cnn")
    odd = wh.models.save({"w": np.ones(1)}, ODD)
    ev, al = wh.models.evaluations, wh.models.aliases
    for model, acc, loss in ((a, 0.91, 0.40), (b, 0.93, 0.30), (c, 0.95, 0.35)):
        ev.record(model, test, "accuracy", acc)
        ev.record(model, test, "loss", loss)
    ev.record(d, test, "accuracy", 0.5)
    ev.record(odd, {"collection": "products", "filter": {"split": "test"}}, "f1", 0.7, fold={"part": "valid"})
    moves = [al.set("mlp", "champion", a, by="ci", reason="first <b>"),
             al.set("mlp", "champion", b, by="bob", reason="better"),
             al.promote("mlp", "champion", c, evaluation=(test, "accuracy"), margin=0.01, by="gate"),
             al.set("mlp", "champion", c, by="ops", reason="set again")]
    al.set("mlp", "staging", a)
    removed = al.remove("mlp", "staging", by="ops", reason="retired")
    al.set("cnn", "champion", d)
    al.set(ODD, "champion", odd, by="<i>me</i>")
    yield wh, {"test": test, "a": a.id, "b": b.id, "c": c.id, "d": d.id, "odd": odd.id, "moves": moves,
               "removed": removed}
    wh.close()


@pytest.fixture(scope="module")
def client(filled):
    return TestClient(create_app(filled[0]), base_url=BASE)


def _by_spelling(client) -> dict:
    r = client.get("/api/p/lab/aliases")
    assert r.status_code == 200
    return {a["spelling"]: a for a in r.json()["aliases"]}


def test_api_lists_every_alias_with_holder_changes_evaluations_and_deltas(client, filled):
    wh, f = filled
    body = client.get("/api/p/lab/aliases").json()
    assert [a["spelling"] for a in body["aliases"]] == ["cnn@champion", "mlp@champion", "mlp@staging",
                                                      f"{ODD}@champion"]  # by name, then alias
    assert (body["total"], body["held"], body["removed"]) == (4, 3, 1)
    champ = {a["spelling"]: a for a in body["aliases"]}["mlp@champion"]
    head = wh.models.aliases.head("mlp@champion").doc
    assert champ["model"] == f["c"] and champ["version"] == 4 and champ["changes"] == 4
    assert (champ["by"], champ["reason"], champ["changed"]) == ("ops", "set again", head["changed"])
    # the re-set names c as its own previous: the panel walks back to b, and c's tenure began with the promotion
    assert head["previous"] == f["c"] and champ["previous"] == f["b"]
    assert champ["since"] == f["moves"][2].doc["changed"]
    assert champ["model_href"] == f"/p/lab/models/{f['c']}" and champ["previous_href"] == f"/p/lab/models/{f['b']}"
    assert champ["history_href"] == "/p/lab/alias?name=mlp&alias=champion"
    evals = {e["metric"]: e for e in champ["evaluations"]}
    stored = {e.metric: e.value for e in wh.models.evaluations.find(f["c"])}
    before = {e.metric: e.value for e in wh.models.evaluations.find(f["b"])}
    assert set(evals) == {"accuracy", "loss"}
    for metric in evals:
        assert evals[metric]["value"] == stored[metric] and evals[metric]["previous_value"] == before[metric]
        assert evals[metric]["delta"] == pytest.approx(stored[metric] - before[metric])
        assert evals[metric]["data"] == f["test"].id and evals[metric]["data_label"] == "march-test v1"
    assert evals["accuracy"]["change"] == "improved" and evals["accuracy"]["direction"] == "max"
    assert evals["loss"]["change"] == "worse" and evals["loss"]["direction"] == "min"  # 0.30 -> 0.35
    assert champ["headline"] == f"accuracy improved from 0.93 to 0.95 at {champ['since'][:19].replace('T', ' ')}"


def test_removed_first_and_odd_aliases(client, filled):
    _, f = filled
    shown = _by_spelling(client)
    staging = shown["mlp@staging"]
    assert staging["removed"] is True and staging["model"] is None and staging["model_href"] is None
    assert staging["previous"] == f["a"] and staging["changes"] == 2 and staging["evaluations"] == []
    assert (staging["by"], staging["reason"]) == ("ops", "retired")
    assert staging["headline"].startswith("removed at ") and f["a"] in staging["headline"]
    cnn = shown["cnn@champion"]
    assert cnn["model"] == f["d"] and cnn["previous"] is None and cnn["changes"] == 1
    assert cnn["headline"].startswith("first holder since ")
    assert [(e["metric"], e["value"], e["delta"]) for e in cnn["evaluations"]] == [("accuracy", 0.5, None)]
    odd = shown[f"{ODD}@champion"]
    (e,) = odd["evaluations"]
    assert odd["model"] == f["odd"] and e["data_label"] == 'products where {"split": "test"}'
    assert e["fold"] == '{"part":"valid"}' and e["data_href"] is None


def test_models_page_shows_the_panel_escaped(client, filled):
    _, f = filled
    r = client.get("/p/lab/models")
    assert r.status_code == 200
    html = r.text
    assert html.index('id="champions"') < html.index('id="models"')  # above the leaderboard
    rows = dict(re.findall(r'<tr data-spelling="([^"]*)" data-model="([^"]*)"', html))
    assert rows["mlp@champion"] == f["c"] and rows["cnn@champion"] == f["d"] and rows["mlp@staging"] == ""
    assert '<tr data-spelling="mlp@staging" data-model="" class="removed">' in html
    assert f'<a href="/p/lab/models/{f["c"]}">{f["c"]}</a>' in html
    assert f'<a href="/p/lab/models/{f["b"]}" title="{f["b"]}">{f["b"][-8:]}</a>' in html  # previous holder
    assert '<span class="changed">' in html and 'by <span class="by">bob</span>' not in html  # c's change: ops
    assert 'title="set again"><span class="changed">' in html and 'by <span class="by">ops</span>' in html
    assert '<a class="history" href="/p/lab/alias?name=mlp&amp;alias=champion">4 changes</a>' in html
    assert "accuracy improved from 0.93 to 0.95 at" in html
    assert 'was 0.93, +0.02</span>' in html and 'was 0.3, +0.05</span>' in html
    assert '<div class="eval worse" data-metric="loss">' in html
    assert '<b id="champions-held">3</b>' in html and '<b id="champions-removed">1</b>' in html
    assert "mlw.championsPanel(" in html and "<script>alert" not in html and "<i>me</i>" not in html
    assert "x&lt;script&gt;alert(&#34;n&#34;)&lt;/script&gt;/y@z@champion" in html and "&lt;i&gt;me&lt;/i&gt;" in html
    # the leaderboard under it is unchanged: its rows are the stored models, newest first
    assert re.findall(r'<tr data-id="([^"]+)"', html) == [f["odd"], f["d"], f["c"], f["b"], f["a"]]


def test_history_page_and_api_list_every_change_newest_first(client, filled):
    _, f = filled
    page = client.get("/p/lab/alias", params={"name": "mlp", "alias": "champion"})
    assert page.status_code == 200
    versions = re.findall(r'<tr data-version="(\d+)" data-model="([^"]*)"', page.text)
    assert versions == [("4", f["c"]), ("3", f["c"]), ("2", f["b"]), ("1", f["a"])]
    assert "first &lt;b&gt;" in page.text and "first <b>" not in page.text and "4 changes" in page.text
    api = client.get("/api/p/lab/alias", params={"name": "mlp", "alias": "champion"}).json()
    assert [(c["version"], c["model"], c["previous"], c["by"], c["reason"]) for c in api["changes"]] == [
        (4, f["c"], f["c"], "ops", "set again"), (3, f["c"], f["b"], "gate", None),
        (2, f["b"], f["a"], "bob", "better"), (1, f["a"], None, "ci", "first <b>")]
    assert [c["changed"] for c in api["changes"]] == [m.doc["changed"] for m in reversed(f["moves"])]
    assert api["total"] == 4 and api["model"] == f["c"] and api["removed"] is False
    newest = client.get("/api/p/lab/alias", params={"name": "mlp", "alias": "champion", "limit": 2}).json()
    assert [c["version"] for c in newest["changes"]] == [4, 3] and newest["total"] == 4
    shortened = client.get("/p/lab/alias", params={"name": "mlp", "alias": "champion", "limit": 2}).text
    assert "the newest 2 shown" in shortened
    staging = client.get("/p/lab/alias", params={"name": "mlp", "alias": "staging"}).text
    assert '<tr data-version="2" data-model="" class="removed">' in staging and "retired" in staging


def test_an_odd_name_reaches_its_history_through_the_panel_link(client, filled):
    _, f = filled
    href = _by_spelling(client)[f"{ODD}@champion"]["history_href"]
    assert href == f"/p/lab/alias?name={quote(ODD, safe='')}&alias=champion"
    page = client.get(href)
    assert page.status_code == 200 and f'data-model="{f["odd"]}"' in page.text
    assert "<script>alert" not in page.text and "&lt;i&gt;me&lt;/i&gt;" in page.text


def test_bad_and_unknown_aliases(client):
    unknown = client.get("/p/lab/alias", params={"name": "mlp", "alias": "nobody"})
    assert unknown.status_code == 404 and "mlp@nobody was never set" in unknown.text
    assert client.get("/api/p/lab/alias", params={"name": "mlp", "alias": "nobody"}).status_code == 404
    for params, words in (({"name": "mlp", "alias": "-bad"}, "alias="), ({"alias": "champion"}, "name="),
                          ({"name": "mlp", "alias": "x" * 65}, "alias=")):
        r = client.get("/api/p/lab/alias", params=params)
        assert r.status_code == 400 and words in r.json()["error"], params
        assert client.get("/p/lab/alias", params=params).status_code == 400
    assert client.get("/api/p/lab/alias", params={"name": "mlp", "alias": "champion", "limit": 0}).status_code == 400


def test_empty_state_and_a_panel_that_follows_moves(tmp_path):
    import mlwarehouse
    with mlwarehouse.connect(home=tmp_path / "wh", project="fresh") as wh:
        client = TestClient(create_app(wh), base_url=BASE)
        test = wh.datasets.save(np.arange(3), "t")
        a = wh.models.save({"w": np.zeros(1)}, "m", epoch=1)
        b = wh.models.save({"w": np.ones(1)}, "m", epoch=2)
        page = client.get("/p/fresh/models").text
        assert "no alias is set in this project" in page and "data-spelling" not in page
        assert client.get("/api/p/fresh/aliases").json() == {"aliases": [], "total": 0, "held": 0, "removed": 0}
        wh.models.evaluations.record(a, test, "val_loss", 0.5)
        wh.models.evaluations.record(b, test, "val_loss", 0.25)
        wh.models.aliases.set("m", "best", a)
        (first,) = client.get("/api/p/fresh/aliases").json()["aliases"]
        assert first["model"] == a.id and first["previous"] is None and first["evaluations"][0]["delta"] is None
        wh.models.aliases.promote("m", "best", b, evaluation=(test, "val_loss"), mode="min")
        (moved,) = client.get("/api/p/fresh/aliases").json()["aliases"]
        (e,) = moved["evaluations"]
        assert moved["model"] == b.id and moved["previous"] == a.id and moved["changes"] == 2
        assert (e["value"], e["previous_value"], e["delta"], e["change"]) == (0.25, 0.5, -0.25, "improved")
        assert moved["headline"].startswith(f"val_loss improved from {fmt(0.5)} to {fmt(0.25)} at ")
        wh.models.aliases.set("m", "old", a)
        wh.models.aliases.remove("m", "old")
        wh.models.delete(where={"_id": a.id})  # a holds no alias now; its name stays in the history
        shown = {x["spelling"]: x for x in client.get("/api/p/fresh/aliases").json()["aliases"]}
        assert shown["m@best"]["previous"] == a.id and shown["m@best"]["previous_href"] is None
        assert shown["m@best"]["previous_deleted"] is True and shown["m@old"]["removed"] is True
        html = client.get("/p/fresh/models").text
        assert f'<span title="{a.id}">{a.id[-8:]}</span> <span class="muted">(deleted)</span>' in html
        history = client.get("/p/fresh/alias", params={"name": "m", "alias": "best"}).text
        assert f"{a.id} <span class=\"muted\">(deleted)</span>" in history


def test_a_project_without_aliases_keeps_its_pages(client):
    assert client.get("/api/p/nothing-here/aliases").json()["aliases"] == []
    assert client.get("/p/nothing-here/models").status_code == 404  # as before: no such project
    assert client.get("/p/lab/models", params={"q": '{"$bad": 1}'}).status_code == 400  # the panel still renders
    assert 'id="champions"' in client.get("/p/lab/models", params={"q": '{"$bad": 1}'}).text
