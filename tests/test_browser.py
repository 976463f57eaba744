"""The web UI in a real browser: Playwright drives Debian's headless chromium against a served warehouse.

Most tests look at a warehouse filled by the real demo (``mlw demo --epochs 3``: the digits dataset, a sweep of
six MLPs run by two workers, their runs, logs, checkpoints and models); a small hand-made project covers what the
demo does not produce (a task finishing while the page is open). Skipped (with the reason) where chromium or
playwright is missing, except under CI (``$CI`` set), where that is a failure. Screenshots go to
``$MLW_SCREENSHOTS`` if set, else to the test's temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlwarehouse.testing.browser import CHROMIUM, CHROMIUM_ARGS, launch, missing, open_page, serve_ui  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def _missing() -> str | None:
    return missing(("playwright", "fastapi", "uvicorn", "sklearn", "torch"))


_why = _missing()
if _why and os.environ.get("CI"):
    pytest.fail(f"browser tests cannot run under CI: {_why}", pytrace=False)
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

DEMO = "digits-demo"
SMALL = "ui-demo"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MLW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


_serve = serve_ui  # the name the other browser test files import


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The warehouse the real demo fills (a subprocess, as a user runs it), served; yields (base URL, project)."""
    import mlwarehouse
    home = tmp_path_factory.mktemp("demo") / "wh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLW_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "mlwarehouse.cli", "demo", "--home", str(home), "--epochs", "3"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"the demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wh = mlwarehouse.connect(home=home)
    base, stop = _serve(wh)
    yield base, wh.project(DEMO)
    stop()
    wh.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small hand-made project (tests/test_web.py's), for what the demo does not produce."""
    from test_web import fill_warehouse

    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("browser") / "wh")
    filled = fill_warehouse(wh)
    base, stop = _serve(wh)
    yield base, filled
    stop()
    wh.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        chromium = launch(pw)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    with open_page(browser) as opened:
        yield opened


def test_runs_page_lists_the_runs(page, demo, shots):
    base, p = demo
    runs = p.runs.find()
    assert len(runs) == 6
    page.goto(f"{base}/p/{DEMO}/runs")
    rows = page.locator("#runs tbody tr")
    assert rows.count() == 6
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.id)")) == sorted(r.id for r in runs)
    assert set(page.locator("#runs tbody td:nth-child(2)").all_inner_texts()) == {"digits-mlp"}
    assert page.locator("#runs .status.complete").count() == 6
    page.screenshot(path=str(shots / "runs.png"), full_page=True)


CANVAS_COLOURS = """([selector, colors]) => {
    const c = document.querySelector(selector + ' canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const want = colors.map(h => [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16)));
    const n = want.map(() => 0);
    for (let i = 0; i < d.length; i += 4) {
        if (d[i + 3] < 200) continue;
        want.forEach((w, k) => {
            if (Math.abs(d[i] - w[0]) + Math.abs(d[i + 1] - w[1]) + Math.abs(d[i + 2] - w[2]) < 60) n[k]++;
        });
    }
    return n;
}"""


def test_selecting_two_runs_draws_their_curves(page, demo, shots):
    from playwright.sync_api import expect
    base, p = demo
    first, second = p.runs.find(sort=[("hyper_parameters.n_hidden", 1), ("hyper_parameters.lr", 1)], limit=2)
    page.goto(f"{base}/p/{DEMO}/runs")
    page.check(f'input.pick[value="{first.id}"]')
    page.check(f'input.pick[value="{second.id}"]')
    page.select_option("#metric", "train.loss")
    page.click("#compare")
    chart = page.locator('.chart-card[data-metric="train.loss"]')
    expect(chart).to_have_attribute("data-series", "2")
    points = first.summary["train"]["loss"]["count"]
    assert chart.get_attribute("data-count") == chart.get_attribute("data-points") == str(2 * points)  # all drawn
    # the legend names each line by what differs between the two runs (the same n_hidden, two learning rates)
    differing = [k for k in first.hyper_parameters if first.hyper_parameters[k] != second.hyper_parameters[k]]
    assert differing == ["lr"]
    labels = {e.get_attribute("data-run"): e.inner_text().strip() for e in page.locator("#legend .entry").all()}
    assert labels == {r.id: f"lr={r.hyper_parameters['lr']}" for r in (first, second)}
    colors = [page.get_attribute(f'#runs tr[data-id="{r.id}"]', "data-color") for r in (first, second)]
    drawn = page.evaluate(CANVAS_COLOURS, ['.chart-card[data-metric="train.loss"]', colors])
    assert all(n > 50 for n in drawn), (colors, drawn)  # both runs' colours are drawn: real curves, not a frame
    page.screenshot(path=str(shots / "compare.png"), full_page=True)


def test_leaderboard_sorts_by_test_accuracy(page, demo, shots):
    base, p = demo
    page.goto(f"{base}/p/{DEMO}/models")

    def shown() -> list[float]:
        cells = page.locator('#models tbody td[data-field="test_accuracy"]').all_inner_texts()
        return [float(c) for c in cells if c]  # checkpoints carry no test accuracy

    stored = sorted((m.test_accuracy for m in p.models.find(name="digits-mlp")), reverse=True)
    assert "Ranked by test_accuracy" in page.inner_text("#ranking")  # final models, best first, by default
    assert shown() == [float(f"{a:.4g}") for a in stored] and len(stored) == 6
    page.click('#models thead a:has-text("test_accuracy")')
    page.wait_for_url("**sort=test_accuracy:1**")
    assert shown() == sorted(shown()) and shown()[0] == float(f"{stored[-1]:.4g}")
    page.click('#models thead a:has-text("test_accuracy")')
    page.wait_for_url("**sort=test_accuracy:-1**")
    assert shown() == [float(f"{a:.4g}") for a in stored]
    page.screenshot(path=str(shots / "leaderboard.png"), full_page=True)


def test_query_box_filters_and_shows_errors(page, demo, shots):
    base, p = demo
    page.goto(f"{base}/p/{DEMO}/runs")
    query = '{"hyper_parameters.n_hidden": {"$gt": 40}}'
    page.fill('form.query input[name="q"]', query)
    page.press('form.query input[name="q"]', "Enter")
    page.wait_for_url("**q=**")
    ids = page.locator("#runs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)")
    expected = [r.id for r in p.runs.find(where={"hyper_parameters.n_hidden": {"$gt": 40}})]
    assert len(expected) == 4 and sorted(ids) == sorted(expected)
    page.screenshot(path=str(shots / "query.png"), full_page=True)
    page.fill('form.query input[name="q"]', '{"status": {"$near": 3}}')
    page.click("form.query button")
    alert = page.locator('[role="alert"]')
    alert.wait_for()
    assert "$near" in alert.inner_text()
    page.screenshot(path=str(shots / "query-error.png"), full_page=True)


def test_task_board_shows_finished_tasks(page, demo, shots):
    base, p = demo
    page.goto(f"{base}/p/{DEMO}/tasks")
    finished = page.locator('#tasks tbody tr[data-status="finished"]')
    assert finished.count() == 6 and page.locator("#tasks tbody tr").count() == 6
    assert page.inner_text('#counts b[data-status="finished"]') == "6"
    assert "test_accuracy" in page.inner_text("#tasks")
    page.screenshot(path=str(shots / "tasks.png"), full_page=True)


def test_a_task_finishing_while_the_board_is_open_shows_up(page, small, shots):
    from playwright.sync_api import expect
    base, filled = small
    page.goto(f"{base}/p/{SMALL}/tasks")
    finished = page.locator('#tasks tbody tr[data-status="finished"]')
    assert finished.count() == 2
    filled["project"].update("tasks", {"status": "pending"},
                             {"$set": {"status": "finished", "output": "late finisher\n"}})
    expect(page.locator('#counts b[data-status="finished"]')).to_have_text("3", timeout=6000)
    expect(finished).to_have_count(3)
    assert "late finisher" in page.inner_text("#tasks")
    page.screenshot(path=str(shots / "tasks-live.png"), full_page=True)


def test_digits_dataset_preview_shows_images(page, demo, shots):
    base, p = demo
    digits = p.datasets.get("digits")
    page.goto(f"{base}/p/{DEMO}/datasets")
    page.click('#datasets a:text-is("digits")')
    page.wait_for_url(f"**/datasets/{digits.id}")
    images = page.locator('section.preview[data-leaf="0"] img')
    assert images.count() == 16
    sizes = page.evaluate("""() => [...document.querySelectorAll('section.preview[data-leaf="0"] img')]
                               .map(i => [i.complete, i.naturalWidth, i.naturalHeight])""")
    assert all(size == [True, 96, 96] for size in sizes), sizes
    assert "shown as 8x8" in page.inner_text("section.preview")
    # the pixels are digits, not a blank square: a rendered image has both dark and light pixels
    spread = page.evaluate("""() => {
        const img = document.querySelector('section.preview[data-leaf="0"] img');
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0;
        for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
        return hi - lo;
    }""")
    assert spread > 100, spread
    page.screenshot(path=str(shots / "dataset.png"), full_page=True)


def test_unknown_id_is_a_404_page(page, demo):
    base, _ = demo
    response = page.goto(f"{base}/p/{DEMO}/runs/NO-SUCH-RUN")
    assert response.status == 404
    assert "Not found" in page.inner_text("h1") and "NO-SUCH-RUN" in page.inner_text("main")
