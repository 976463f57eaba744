"""The UI's sorts are index reads: a runs page or a leaderboard sorted by a metric column makes the index that serves
it, as the registries' own finds do."""

from __future__ import annotations

from fastapi.testclient import TestClient

from mlwarehouse import schema
from mlwarehouse.query import parse_filter
from mlwarehouse.web import create_app


def _keys(wh, collection: str) -> list[list[tuple]]:
    return [[tuple(k) for k in ix["keys"]] for ix in wh.index.indexes(collection)]


def test_sorting_runs_and_models_by_a_metric_column_makes_its_index(wh):
    for i in range(3):
        with wh.runs.start("r", lr=0.1 * (i + 1)) as run:
            run.log("valid", step=0, acc=0.5 + i / 10)
        wh.models.save({"w": [float(i)]}, "mlp", test_accuracy=0.8 + i / 100)
    client = TestClient(create_app(wh), base_url="http://127.0.0.1")
    project = wh.project().name
    page = client.get(f"/p/{project}/runs", params={"sort": "summary.valid.acc.last:-1"})
    assert page.status_code == 200
    assert any(("summary.valid.acc.last", -1) in keys for keys in _keys(wh, "runs")), _keys(wh, "runs")
    board = client.get(f"/p/{project}/models", params={"sort": "test_accuracy:-1"})
    assert board.status_code == 200
    assert any(("test_accuracy", -1) in keys for keys in _keys(wh, "models")), _keys(wh, "models")


def test_the_runs_page_and_a_names_runs_are_read_in_index_order(wh):
    """The runs page (newest first) and a name's runs (the sweep view's order, oldest first) read one index range in
    their order: no scan of the project's runs and no sort of its own, whatever the project holds."""
    p, other = wh.project(), wh.project("other")
    for project, n in ((p, 300), (other, 50)):
        project.ensure(schema.RUNS)
        project.insert_many("runs", [{"name": "sweep" if i % 3 == 0 else f"run-{i}", "status": "complete",
                                      "started": f"2024-05-01T10:{i % 60:02d}:{i % 7:02d}.000000Z",
                                      "hyper_parameters": {"lr": i / 1000}, "summary": {}} for i in range(n)])
    stored = p.find("runs")
    for flt, sort in (({}, [("started", -1)]), ({"name": "sweep"}, [("started", 1), ("_id", 1)]),
                      ({"name": "sweep"}, [("started", -1)])):
        node = parse_filter(p.scope(flt))
        sql, params = wh.index._statement("find", "runs", node, wh.index._scalar_fields("runs"), sort, 1000, 0)
        plan = " | ".join(r["detail"] for r in wh.index.sql("EXPLAIN QUERY PLAN " + sql, params))
        assert "USING INDEX ix_runs_" in plan and "TEMP B-TREE" not in plan and "SCAN" not in plan, (flt, sort, plan)
        want = [d for d in stored if all(d.get(k) == v for k, v in flt.items())]
        want.sort(key=lambda d: d["_id"])
        want.sort(key=lambda d: d["started"], reverse=sort[0][1] == -1)  # stable: ties by _id, ascending
        assert [d["_id"] for d in p.find("runs", flt, sort=sort)] == [d["_id"] for d in want], (flt, sort)


def test_the_runs_table_escapes_what_users_logged(wh):
    with wh.runs.start("r", hyper_parameters={"note": "<b>bold</b>", "tag": '"quoted" & <i>', "lr": 0.5}) as run:
        run.log("valid", step=0, acc=0.25)
    client = TestClient(create_app(wh), base_url="http://127.0.0.1")
    page = client.get(f"/p/{wh.project().name}/runs")
    assert page.status_code == 200
    assert "<b>bold</b>" not in page.text and "&lt;b&gt;bold&lt;/b&gt;" in page.text
    assert "<i>" not in page.text and "&#34;quoted&#34; &amp; &lt;i&gt;" in page.text
    assert '<td class="num">0.5</td>' in page.text  # a number needs no escaping
    assert '<td class="num" title="min 0.25 (step 0), max 0.25 (step 0), 1 points">0.25</td>' in page.text
