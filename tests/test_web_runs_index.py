"""The UI's sorts are index reads: a runs page or a leaderboard sorted by a metric column makes the index that serves
it, as the registries' own finds do."""

from __future__ import annotations

from fastapi.testclient import TestClient

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
