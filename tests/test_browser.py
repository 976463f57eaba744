"""The web UI in a real browser: Playwright drives Debian's headless chromium against a served warehouse.

Skipped (with the reason) where chromium or playwright is missing, except under CI (``$CI`` set), where that is a
failure. Screenshots go to ``$MLW_SCREENSHOTS`` if set, else to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MLW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing() -> str | None:
    for module in ("playwright", "fastapi", "uvicorn", "sklearn"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[dev]')"
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    return None


_why = _missing()
if _why and os.environ.get("CI"):
    pytest.fail(f"browser tests cannot run under CI: {_why}", pytrace=False)
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

PROJECT = "ui-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MLW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A filled warehouse served by uvicorn on 127.0.0.1 and a free port, in a thread of this process."""
    import uvicorn

    import mlwarehouse
    from mlwarehouse.web import create_app
    from test_web import fill_warehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("browser") / "wh")
    filled = fill_warehouse(wh)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(wh), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the UI server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", filled
    server.should_exit = True
    thread.join(timeout=10)
    wh.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=shutil.which(CHROMIUM) or CHROMIUM, headless=True,
                                      args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def test_runs_page_lists_the_runs(page, served, shots):
    base, filled = served
    page.goto(f"{base}/p/{PROJECT}/runs")
    rows = page.locator("#runs tbody tr")
    assert rows.count() == 3
    names = page.locator("#runs tbody td:nth-child(2)").all_inner_texts()
    assert sorted(names) == ["mlp-0", "mlp-1", "mlp-2"]
    page.screenshot(path=str(shots / "runs.png"), full_page=True)


def test_selecting_two_runs_draws_their_curves(page, served, shots):
    from playwright.sync_api import expect
    base, filled = served
    runs = filled["runs"]
    page.goto(f"{base}/p/{PROJECT}/runs")
    page.check(f'input.pick[value="{runs[0].id}"]')
    page.check(f'input.pick[value="{runs[2].id}"]')
    page.select_option("#metric", "train.loss")
    page.click("#compare")
    expect(page.locator("#chart")).to_have_attribute("data-series", "2")
    legend = page.locator("#chart .u-legend").inner_text()
    assert "mlp-0" in legend and "mlp-2" in legend and "mlp-1" not in legend
    # the two series' colours are on the canvas: real curves, not an empty frame
    colours = page.evaluate("""() => {
        const c = document.querySelector('#chart canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let blue = 0, red = 0;
        for (let i = 0; i < d.length; i += 4) {
            if (d[i] < 80 && d[i + 1] > 90 && d[i + 1] < 160 && d[i + 2] > 160) blue++;
            if (d[i] > 180 && d[i + 1] < 80 && d[i + 2] < 80) red++;
        }
        return [blue, red];
    }""")
    assert colours[0] > 50 and colours[1] > 50, colours
    assert "60 of 60 points" in page.inner_text("#compare-status")
    page.screenshot(path=str(shots / "compare.png"), full_page=True)


def test_leaderboard_sorts_by_a_metric(page, served, shots):
    base, _ = served
    page.goto(f"{base}/p/{PROJECT}/models")
    def first_column_values():
        cells = page.locator('#models tbody td[data-field="test_accuracy"]').all_inner_texts()
        return [float(c) for c in cells]

    page.click('#models thead a:text-is("test_accuracy")')
    page.wait_for_url("**sort=test_accuracy:-1**")
    assert first_column_values() == [0.97, 0.91, 0.85]
    page.click('#models thead a:has-text("test_accuracy")')
    page.wait_for_url("**sort=test_accuracy:1**")
    assert first_column_values() == [0.85, 0.91, 0.97]
    page.screenshot(path=str(shots / "leaderboard.png"), full_page=True)


def test_query_box_filters_and_shows_errors(page, served, shots):
    base, _ = served
    page.goto(f"{base}/p/{PROJECT}/runs")
    page.fill('form.query input[name="q"]', '{"hyper_parameters.n_hidden": {"$gt": 40}}')
    page.press('form.query input[name="q"]', "Enter")
    page.wait_for_url("**q=**")
    assert sorted(page.locator("#runs tbody td:nth-child(2)").all_inner_texts()) == ["mlp-1", "mlp-2"]
    page.fill('form.query input[name="q"]', '{"status": {"$near": 3}}')
    page.click("form.query button")
    alert = page.locator('[role="alert"]')
    alert.wait_for()
    assert "$near" in alert.inner_text()
    page.screenshot(path=str(shots / "query-error.png"), full_page=True)


def test_task_board_shows_finished_tasks_live(page, served, shots):
    from playwright.sync_api import expect
    base, filled = served
    page.goto(f"{base}/p/{PROJECT}/tasks")
    finished = page.locator('#tasks tbody tr[data-status="finished"]')
    assert finished.count() == 2
    assert "done: test_accuracy=0.97" in page.inner_text("#tasks")
    assert page.inner_text('#counts b[data-status="finished"]') == "2"
    # a task that finishes while the page is open shows up at the next poll
    p = filled["project"]
    p.update("tasks", {"status": "pending"}, {"$set": {"status": "finished", "output": "late finisher\n"}})
    expect(page.locator('#counts b[data-status="finished"]')).to_have_text("3", timeout=6000)
    expect(finished).to_have_count(3)
    assert "late finisher" in page.inner_text("#tasks")
    page.screenshot(path=str(shots / "tasks.png"), full_page=True)


def test_dataset_preview_shows_images(page, served, shots):
    base, filled = served
    page.goto(f"{base}/p/{PROJECT}/datasets")
    page.click("text=digits")
    page.wait_for_url(f"**/datasets/{filled['digits'].id}")
    images = page.locator('section.preview[data-leaf="0"] img')
    assert images.count() == 16
    sizes = page.evaluate("""() => [...document.querySelectorAll('section.preview[data-leaf="0"] img')]
                               .map(i => [i.complete, i.naturalWidth, i.naturalHeight])""")
    assert all(size == [True, 96, 96] for size in sizes), sizes
    assert "shown as 8x8" in page.inner_text("section.preview")
    page.screenshot(path=str(shots / "dataset.png"), full_page=True)


def test_unknown_id_is_a_404_page(page, served):
    base, _ = served
    response = page.goto(f"{base}/p/{PROJECT}/runs/NO-SUCH-RUN")
    assert response.status == 404
    assert "Not found" in page.inner_text("h1") and "NO-SUCH-RUN" in page.inner_text("main")
