"""The sweep view in a real browser: Playwright drives Debian's headless chromium against a served warehouse that
holds a task sweep run by a real worker (n_hidden x lr x seed) and a grid of runs logged by hand, and checks what a
person sees: an axis per swept parameter, brushing that reduces the table's rows, the scatter's groups over seeds.

Skipped (with the reason) where chromium or playwright is missing, except under CI (``$CI`` set), where that is a
failure, as in tests/test_browser.py. Screenshots go to ``$MLW_SCREENSHOTS`` if set, else to a temporary folder.
"""

from __future__ import annotations

import json
import textwrap
from urllib.parse import quote

import pytest
from test_browser import _serve, browser, pytestmark, shots  # noqa: F401  (fixtures and the skip mark)

from mlwarehouse.testing.browser import open_page

PROJECT = "sweep-ui"
TASKED = "sweep-tasks"
SWEEP = {"n_hidden": [16, 256], "lr": [0.001, 0.01, 0.1], "seed": [0, 1]}
SCRIPT = """
    import math
    import mlwarehouse
    run = mlwarehouse.current_run()
    for step in range(epochs):
        run.log("train", step=step, loss=math.exp(-lr * 20 * step) + 0.01 * seed)
    test_accuracy = 0.8 + 0.02 * math.log2(n_hidden / 16) - 0.04 * abs(math.log10(lr) + 2) + 0.005 * seed
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 12-task sweep run by a real worker (project sweep-tasks) and the 27-run grid of tests/test_web_sweep.py
    (project sweep-ui), served by uvicorn in a thread; yields (base URL, tasked project, grid project)."""
    from test_web_sweep import fill_grid

    import mlwarehouse
    from mlwarehouse.tasks.worker import Worker
    folder = tmp_path_factory.mktemp("sweep-browser")
    wh = mlwarehouse.connect(home=folder / "wh")
    tasked, grid = wh.project(TASKED), wh.project(PROJECT)
    script = folder / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    tasked.tasks.sweep("mlp", script, grid=SWEEP, hyper_parameters={"epochs": 6}, saved_result_keys=["test_accuracy"])
    assert Worker(tasked, "mlp", once=True, verbose=False, concurrency=4, lease_seconds=10).run() == 12
    fill_grid(grid)
    for i, optimizer in enumerate(["adam", "sgd", "rmsprop", "sgd", None]):
        hp = {"optimizer": optimizer, "lr": 0.01} if optimizer else {"lr": 0.01}
        with grid.runs.start("cat", hyper_parameters=hp) as run:
            run.log("valid", step=0, accuracy=0.5 + i / 10)
    grid.runs.flush()
    base, stop = _serve(wh)
    yield base, tasked, grid
    stop()
    wh.close()


@pytest.fixture
def page(browser):  # noqa: F811
    with open_page(browser, 1280, 900) as opened:
        yield opened


def open_sweep(page, base: str, project: str, **params) -> None:
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
    page.goto(f"{base}/p/{project}/sweep" + (f"?{query}" if query else ""))
    page.wait_for_selector("#sweep[data-ready]")


def visible_ids(page) -> list[str]:
    return page.locator("#sweep-runs tbody tr:not([hidden])").evaluate_all("rows => rows.map(r => r.dataset.id)")


def brush(page, axis: str, start: float, end: float) -> dict:
    """Drag along an axis from ``start`` to ``end`` (fractions of its height from the top) with the mouse, as a
    person does; returns the brush's range as the page states it (data-lo/data-hi, or data-categories)."""
    box = page.locator(f'svg.pc .axis[data-name="{axis}"] .hit').bounding_box()
    x = box["x"] + box["width"] / 2
    page.mouse.move(x, box["y"] + box["height"] * start)
    page.mouse.down()
    page.mouse.move(x, box["y"] + box["height"] * end, steps=8)
    page.mouse.up()
    return page.locator(f'svg.pc .axis[data-name="{axis}"] .brush').evaluate("b => ({...b.dataset})")


def click_axis(page, axis: str) -> None:
    box = page.locator(f'svg.pc .axis[data-name="{axis}"] .hit').bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def g4(value: float) -> str:
    """A number as the page writes it (``%.4g``, as mlw.num does)."""
    return f"{value:.4g}"


def test_an_axis_per_swept_parameter_and_a_line_per_run(page, served, shots):  # noqa: F811
    base, tasked, _ = served
    open_sweep(page, base, TASKED, task="mlp")
    runs = {t.run: t for t in tasked.tasks.find("mlp")}
    assert len(runs) == 12
    axes = page.locator("svg.pc .axis").evaluate_all("gs => gs.map(g => g.dataset.name)")
    assert axes == ["lr", "n_hidden", "seed", "result.test_accuracy"]  # epochs is the same in every run: no axis
    assert "epochs = 6" in page.inner_text("#sweep-fixed")
    lines = page.locator("svg.pc path.line").evaluate_all("ps => ps.map(p => p.dataset.id)")
    assert sorted(lines) == sorted(runs) and page.locator("svg.pc path.line.dim").count() == 0
    assert sorted(visible_ids(page)) == sorted(runs)
    # lr spans two decades: a log axis, its three values evenly spaced; n_hidden (16, 256) is linear with 2 ticks
    ticks = page.locator('svg.pc .axis[data-name="lr"] text.tick-label').evaluate_all(
        "ts => ts.map(t => [t.textContent, Number(t.getAttribute('y'))])")
    assert [t for t, _ in ticks] == ["0.001", "0.01", "0.1"]
    ys = [y for _, y in ticks]
    assert abs((ys[0] - ys[1]) - (ys[1] - ys[2])) < 0.5 and ys[0] > ys[2]
    assert page.locator('svg.pc .axis[data-name="n_hidden"] text.tick-label').all_text_contents() == ["16", "256"]
    # the table shows what the worker stored: each run's task result, best first
    shown = dict(zip(visible_ids(page), page.locator("#sweep-runs tbody td.metric").all_inner_texts()))
    assert shown == {run: g4(t.result["test_accuracy"]) for run, t in runs.items()}
    results = [t.result["test_accuracy"] for t in sorted(runs.values(), key=lambda t: -t.result["test_accuracy"])]
    assert page.locator("#sweep-runs tbody td.metric").all_inner_texts() == [g4(v) for v in results]
    first = lines[0]
    page.dispatch_event(f'svg.pc path.line[data-id="{first}"]', "mouseover")  # lines cross: no unique spot
    assert page.inner_text("#sweep-hover").startswith(f"mlp ({first}): lr=")  # the run under the pointer
    page.screenshot(path=str(shots / "sweep.png"), full_page=True)


def test_brushing_an_axis_reduces_the_table_rows(page, served, shots):  # noqa: F811
    base, tasked, _ = served
    open_sweep(page, base, TASKED, task="mlp")
    tasks = {t.run: t.hyper_parameters for t in tasked.tasks.find("mlp")}
    lr = brush(page, "lr", 0.02, 0.6)  # from the top (0.1) to below the middle (0.01): two of the three values
    lo, hi = float(lr["lo"]), float(lr["hi"])
    keep = sorted(r for r, hp in tasks.items() if lo <= hp["lr"] <= hi)
    assert 0 < len(keep) < 12 and {tasks[r]["lr"] for r in keep} == {0.01, 0.1}
    assert sorted(visible_ids(page)) == keep
    assert page.inner_text("#sweep-count").startswith(f"{len(keep)} of 12 selected")
    assert page.locator("svg.pc path.line:not(.dim)").count() == len(keep)
    assert page.locator("svg.scatter circle.pt:not(.dim)").count() == len(keep)
    page.screenshot(path=str(shots / "sweep-brushed.png"), full_page=True)
    n_hidden = brush(page, "n_hidden", 0.6, 0.98)  # a second axis: the runs in both ranges
    both = sorted(r for r in keep if float(n_hidden["lo"]) <= tasks[r]["n_hidden"] <= float(n_hidden["hi"]))
    assert {tasks[r]["n_hidden"] for r in both} == {16} and sorted(visible_ids(page)) == both
    click_axis(page, "lr")  # a click clears that axis' brush only
    assert sorted(visible_ids(page)) == sorted(r for r, hp in tasks.items() if hp["n_hidden"] == 16)
    page.click("#sweep-clear")
    assert len(visible_ids(page)) == 12 and page.locator("svg.pc path.line.dim").count() == 0


def test_brushing_the_metric_axis_keeps_the_best_runs(page, served):
    base, tasked, _ = served
    open_sweep(page, base, TASKED, task="mlp")
    results = {t.run: t.result["test_accuracy"] for t in tasked.tasks.find("mlp")}
    top = brush(page, "result.test_accuracy", 0.01, 0.3)
    best = sorted(r for r, v in results.items() if v >= float(top["lo"]))
    assert 0 < len(best) < 12 and sorted(visible_ids(page)) == best


def test_scatter_groups_over_seeds_with_mean_and_band(page, served, shots):  # noqa: F811
    base, _, grid = served
    open_sweep(page, base, PROJECT, q='{"name": "grid"}')
    runs = grid.runs.find(where={"name": "grid"})
    assert len(runs) == 27
    assert page.input_value("#sweep-metric") == "valid.accuracy" and page.input_value("#sweep-group") == "seed"
    page.select_option("#sweep-x", "lr")
    assert page.locator("svg.scatter circle.pt").count() == 27
    # one group per (lr, n_hidden), over its three seeds; the band per n_hidden, along lr
    expected = {}
    for run in sorted(runs, key=lambda r: r.doc["started"]):
        hp = run.hyper_parameters
        expected.setdefault((g4(hp["lr"]), str(hp["n_hidden"])), []).append(run.summary["valid"]["accuracy"]["last"])
    rows = page.locator("#sweep-groups tbody tr").evaluate_all("""rows => rows.map(r => Object.fromEntries(
        [...r.cells].map(c => [c.dataset.field, c.textContent])))""")
    assert len(rows) == 9
    for row in rows:
        values = expected[(row["lr"], row["n_hidden"])]
        assert row["n"] == "3"
        assert (row["mean"], row["min"], row["max"]) == (g4(sum(values) / 3), g4(min(values)), g4(max(values)))
    means = [sum(v) / 3 for v in expected.values()]
    assert [row["mean"] for row in rows] == [g4(m) for m in sorted(means, reverse=True)]  # best first
    bands = page.locator("svg.scatter polygon.band")
    assert bands.count() == 3 and page.locator("svg.scatter circle.mean").count() == 9
    assert sorted(json.loads(s)[0] for s in bands.evaluate_all("ps => ps.map(p => p.dataset.series)")) == [16, 64, 256]
    assert page.locator("#sweep-legend .item").all_inner_texts() == ["n_hidden=16", "n_hidden=64", "n_hidden=256"]
    page.screenshot(path=str(shots / "sweep-groups.png"), full_page=True)
    page.select_option("#sweep-y", "train.loss")  # lower is better: the groups sort ascending
    losses = page.locator('#sweep-groups td[data-field="mean"]').all_inner_texts()
    assert [float(v) for v in losses] == sorted(float(v) for v in losses)
    page.select_option("#sweep-group", "")  # no grouping: points only
    assert bands.count() == 0 and page.locator("#sweep-groups tbody tr").count() == 0


def test_another_stat_reloads_the_values(page, served):
    base, _, grid = served
    open_sweep(page, base, PROJECT, q='{"name": "grid"}')
    page.select_option("#sweep-metric", "train.loss")
    page.select_option("#sweep-stat", "max")
    page.wait_for_function("() => document.querySelector('#sweep-runs th:last-child').textContent.includes('max')")
    shown = dict(zip(visible_ids(page), page.locator("#sweep-runs tbody td.metric").all_inner_texts()))
    assert shown == {r.id: g4(r.summary["train"]["loss"]["max"]) for r in grid.runs.find(where={"name": "grid"})}


def test_the_runs_page_links_to_the_sweep_view_of_its_filter(page, served):
    base, _, grid = served
    q = '{"hyper_parameters.seed": 1}'
    page.goto(f"{base}/p/{PROJECT}/runs?q={quote(q)}")
    page.click("#sweep-link")
    page.wait_for_selector("#sweep[data-ready]")
    assert page.input_value('form.sweep-query input[name="q"]') == q
    expected = sorted(r.id for r in grid.runs.find(where={"hyper_parameters.seed": 1}))
    assert len(expected) == 9 and sorted(visible_ids(page)) == expected
    axes = page.locator("svg.pc .axis").evaluate_all("gs => gs.map(g => g.dataset.name)")
    assert axes == ["lr", "n_hidden", "valid.accuracy"]  # one seed: no seed axis


def test_a_categorical_axis_brushes_by_category(page, served):
    base, _, grid = served
    open_sweep(page, base, PROJECT, q='{"name": "cat"}')
    runs = {r.id: r.hyper_parameters.get("optimizer") for r in grid.runs.find(where={"name": "cat"})}
    assert page.locator("svg.pc .axis").evaluate_all("gs => gs.map(g => g.dataset.name)") == [
        "optimizer", "valid.accuracy"]  # lr is 0.01 in every run
    labels = page.locator('svg.pc .axis[data-name="optimizer"] text.tick-label').all_text_contents()
    assert labels == ["adam", "rmsprop", "sgd", "none"]  # sorted categories, and a place for the missing value
    chosen = brush(page, "optimizer", 0.01, 0.3)
    assert json.loads(chosen["categories"]) == ["sgd"]
    assert sorted(visible_ids(page)) == sorted(i for i, o in runs.items() if o == "sgd")
    assert len(visible_ids(page)) == 2
    assert sorted(page.locator('#sweep-runs tbody tr:not([hidden]) td[data-field="optimizer"]').all_inner_texts()) \
        == ["sgd", "sgd"]


def test_a_bad_filter_is_shown_inline(page, served):
    base, _, _ = served
    bad = quote('{"lr": {"$bad": 1}}')
    response = page.goto(f"{base}/p/{PROJECT}/sweep?q={bad}")
    assert response.status == 400
    assert "$bad" in page.inner_text('[role="alert"]') and page.locator("#sweep").count() == 0
