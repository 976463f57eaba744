"""The run page and the run comparison in a real browser (Playwright, Debian's headless chromium), checked by what
a person sees: the pixels of each run's colour on every small multiple, the legend's text, the numbers, the diff
table, a drawn path that smoothing changes, and a running run's chart that gains points while the page is open.

The warehouse is a real embedded one (tests/test_web_runs.py's sweep: runs with several metrics over epochs, a
one-point test metric, a running run), plus a noisy run for smoothing. Skipped (with the reason) where chromium or
playwright is missing, except under CI (``$CI`` set), where that is a failure, as in tests/test_browser.py.
"""

from __future__ import annotations

import math

import pytest
from test_browser import _serve, browser, pytestmark, shots  # noqa: F401  (fixtures and the skip mark)

from mlwarehouse.testing.browser import open_page

PROJECT = "sweep"

# Pixels of each colour (opaque, within a small distance: antialiased edges and faint raw lines do not count) on
# the canvas of the chart card `selector`.
COUNT = """([selector, colors]) => {
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
# A fingerprint of what a chart card's canvas shows
PIXELS = """(selector) => {
    const c = document.querySelector(selector + ' canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let h = 0;
    for (let i = 0; i < d.length; i += 1) h = (h * 31 + d[i]) | 0;
    return h;
}"""
SET_RANGE = """([selector, value]) => {
    const input = document.querySelector(selector);
    input.value = value;
    input.dispatchEvent(new Event('input', {bubbles: true}));
}"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from test_web_runs import fill_sweep

    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("browser-runs") / "wh")
    filled = fill_sweep(wh)
    p = filled["project"]
    with p.runs.start("noisy", hyper_parameters={"n_hidden": 16, "lr": 0.5, "seed": 1}) as noisy:
        for step in range(300):
            noisy.log("train", step=step, loss=1.0 + (0.6 if step % 2 else -0.6) + 0.001 * step)
    filled["noisy"] = noisy
    base, stop = _serve(wh)
    yield base, filled
    stop()
    wh.close()


@pytest.fixture
def page(browser):  # noqa: F811
    with open_page(browser, 1280, 1000) as opened:
        yield opened


def _card(key: str) -> str:
    return f'.chart-card[data-metric="{key}"]'


def _hover(page, key: str) -> str:
    """The readout under the cursor at 60% of a chart's width; a chart redrawn under the cursor is hovered again."""
    over, readout = page.locator(f"{_card(key)} .u-over"), page.locator(f"{_card(key)} .readout")
    for _ in range(20):
        over.wait_for(state="visible")
        box = over.bounding_box()
        if box is not None:
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] / 2)
            text = readout.inner_text()
            if text:
                return text
        page.mouse.move(0, 0)
        page.wait_for_timeout(50)
    raise AssertionError(f"no readout under the cursor on {key}")


def test_run_page_draws_every_metric_as_a_small_multiple(page, sweep, shots):  # noqa: F811
    from playwright.sync_api import expect
    base, filled = sweep
    run = filled["runs"][0]
    page.goto(f"{base}/p/{PROJECT}/runs/{run.id}")
    cards = page.locator(".chart-card")
    expect(cards).to_have_count(3)
    assert cards.evaluate_all("cs => cs.map(c => c.dataset.metric)") == ["train.loss", "valid.loss",
                                                                         "valid.accuracy"]  # losses first
    # the one-point metric is a number, not a chart
    expect(page.locator('.number-card[data-metric="test.accuracy"] .value')).to_have_text("0.9")
    assert page.locator(_card("test.accuracy")).count() == 0
    for key in ("train.loss", "valid.loss", "valid.accuracy"):
        (blue,) = page.evaluate(COUNT, [_card(key), ["#1f77b4"]])
        assert blue > 40, (key, blue)  # each chart draws its curve in the run's colour
    assert page.get_attribute(_card("train.loss"), "data-count") == "100"
    assert _hover(page, "train.loss").startswith("step ")
    page.screenshot(path=str(shots / "run-multiples.png"), full_page=True)

    before = page.evaluate(PIXELS, _card("train.loss"))
    page.select_option("#x-axis", "epoch")
    expect(page.locator(f"{_card('train.loss')} .readout")).to_have_text("")
    page.wait_for_function("(b) => document.querySelector('#charts').dataset.signature.startsWith('epoch')")
    readout = _hover(page, "train.loss")
    assert readout.startswith("epoch ") and 0 < float(readout.split()[1].rstrip(":")) < 4, readout
    assert page.evaluate(PIXELS, _card("train.loss")) != before
    page.select_option("#x-axis", "time")
    page.wait_for_function("() => document.querySelector('#charts').dataset.signature.startsWith('time')")
    assert _hover(page, "valid.loss").startswith("wall time (s) ")
    page.screenshot(path=str(shots / "run-time-axis.png"), full_page=True)


def test_smoothing_and_log_y_change_the_drawn_path(page, sweep, shots):  # noqa: F811
    base, filled = sweep
    page.goto(f"{base}/p/{PROJECT}/runs/{filled['noisy'].id}")
    card = _card("train.loss")
    page.locator(card).wait_for()
    page.wait_for_function(f"() => document.querySelector('{card} canvas')")
    (raw,) = page.evaluate(COUNT, [card, ["#1f77b4"]])
    raw_pixels = page.evaluate(PIXELS, card)
    page.evaluate(SET_RANGE, ["#smoothing", "0.9"])
    assert page.inner_text("#smoothing-value") == "0.9"
    page.wait_for_function(f"(h) => ({PIXELS})('{card}') !== h", arg=raw_pixels)
    (smooth,) = page.evaluate(COUNT, [card, ["#1f77b4"]])
    # the raw curve zigzags over the whole band (+-0.6 every step); the smoothed one is a thin line through it,
    # and the raw one is only drawn faintly behind it
    assert raw > 3 * smooth > 0, (raw, smooth)
    page.screenshot(path=str(shots / "run-smoothed.png"), full_page=True)
    smoothed_pixels = page.evaluate(PIXELS, card)
    page.check("#log-y")
    page.wait_for_function(f"(h) => ({PIXELS})('{card}') !== h", arg=smoothed_pixels)
    page.evaluate(SET_RANGE, ["#smoothing", "0"])
    page.wait_for_function(f"(n) => ({COUNT})(['{card}', ['#1f77b4']])[0] > n", arg=smooth * 2)


def test_compare_labels_lines_by_differing_parameters_with_the_rows_colours(page, sweep, shots):  # noqa: F811
    from playwright.sync_api import expect
    base, filled = sweep
    runs = filled["runs"]
    page.goto(f"{base}/p/{PROJECT}/runs")
    colors = {}
    for run in runs:
        row = page.locator(f'#runs tbody tr[data-id="{run.id}"]')
        colors[run.id] = row.get_attribute("data-color")
        swatch = row.locator(".swatch").evaluate("s => getComputedStyle(s).backgroundColor")
        assert swatch.startswith("rgb(") and swatch != "rgba(0, 0, 0, 0)"
        page.check(f'input.pick[value="{run.id}"]')
    assert len(set(colors.values())) == 3
    page.click("#compare")
    cards = page.locator(".chart-card")
    expect(cards).to_have_count(3)
    legend = page.locator("#legend .entry")
    expect(legend).to_have_count(3)
    by_run = {e.get_attribute("data-run"): e for e in legend.all()}
    assert by_run[runs[0].id].inner_text().strip() == "n_hidden=32 lr=0.01"
    assert by_run[runs[1].id].inner_text().strip() == "n_hidden=128 lr=0.01"
    assert by_run[runs[2].id].inner_text().strip() == "n_hidden=128 lr=0.1"
    for run in runs:  # the legend's swatch is the row's colour
        row_bg = page.locator(f'#runs tr[data-id="{run.id}"] .swatch').evaluate(
            "s => getComputedStyle(s).backgroundColor")
        assert by_run[run.id].locator(".swatch").evaluate("s => getComputedStyle(s).backgroundColor") == row_bg
    wanted = [colors[r.id] for r in runs]
    for key in ("train.loss", "valid.loss", "valid.accuracy"):
        assert page.get_attribute(_card(key), "data-series") == "3"
        counts = page.evaluate(COUNT, [_card(key), wanted])
        assert all(n > 15 for n in counts), (key, wanted, counts)  # every run's line is drawn on every chart
    numbers = page.locator('.number-card[data-metric="test.accuracy"] .number')
    assert numbers.count() == 3
    third = numbers.locator(f'xpath=self::*[@data-run="{runs[2].id}"]').inner_text().split()
    assert third == ["n_hidden=128", "lr=0.1", "0.94"]
    status = page.inner_text("#compare-status")
    assert status.startswith("3 runs: 3 charts, 1 shown as numbers") and status.count("digits-mlp") == 0
    # the diff: parameters and summaries side by side, the rows that differ marked
    diff = page.locator("#diff-table")
    assert diff.locator('tr[data-key="n_hidden"]').get_attribute("class") == "differs"
    columns = diff.locator("thead th.run").evaluate_all("ths => ths.map(t => t.dataset.run)")
    assert sorted(columns) == sorted(r.id for r in runs)  # one column per run, in the table's order
    assert diff.locator("thead th.run").all_inner_texts() == [by_run[i].inner_text() for i in columns]
    lr = {r.id: str(r.hyper_parameters["lr"]) for r in runs}
    assert diff.locator('tr[data-key="lr"] td').all_inner_texts() == [lr[i] for i in columns]
    changed = diff.locator('tr[data-key="lr"] td').evaluate_all("tds => tds.map(t => t.classList.contains('changed'))")
    assert changed == [lr[i] != lr[columns[0]] for i in columns]  # marked where it differs from the first run
    assert diff.locator('tr[data-key="seed"]').get_attribute("class") == "same"
    tests = {r.id: f"{0.9 + 0.02 * k:.4g}" for k, r in enumerate(runs)}
    assert diff.locator('tr[data-key="test.accuracy"] td').all_inner_texts() == [tests[i] for i in columns]
    page.screenshot(path=str(shots / "compare-multiples.png"), full_page=True)
    page.check("#diff-only")
    expect(diff.locator('tr[data-key="seed"]')).to_be_hidden()
    expect(diff.locator('tr[data-key="n_hidden"]')).to_be_visible()
    page.select_option("#metric", "valid.accuracy")  # one metric: one wide chart
    expect(cards).to_have_count(1)
    assert page.get_attribute(_card("valid.accuracy"), "data-series") == "3"
    assert all(n > 15 for n in page.evaluate(COUNT, [_card("valid.accuracy"), wanted]))


def test_a_running_runs_charts_gain_points_while_the_page_is_open(page, sweep, shots):  # noqa: F811
    from playwright.sync_api import expect
    base, filled = sweep
    live = filled["live"]
    page.goto(f"{base}/p/{PROJECT}/runs/{live.id}")
    card = page.locator(_card("train.loss"))
    expect(card).to_have_attribute("data-count", "5")
    expect(page.locator("#charts-live")).to_have_text("live")
    assert page.locator(_card("valid.accuracy")).count() == 0
    before = page.evaluate(PIXELS, _card("train.loss"))
    for step in range(5, 40):
        live.log("train", step=step, epoch=1, loss=0.5 + 0.4 * math.sin(step / 3))
    live.log("valid", step=40, epoch=1, accuracy=0.8)
    live.log("valid", step=41, epoch=2, accuracy=0.85)
    live.flush()
    expect(card).to_have_attribute("data-count", "40", timeout=8000)
    assert page.evaluate(PIXELS, _card("train.loss")) != before
    (blue,) = page.evaluate(COUNT, [_card("train.loss"), ["#1f77b4"]])
    assert blue > 100, blue
    expect(page.locator(_card("valid.accuracy"))).to_have_attribute("data-count", "2", timeout=8000)
    page.screenshot(path=str(shots / "run-live.png"), full_page=True)
    # the comparison refreshes too while one of its runs is running
    compare = page.context.new_page()
    compare.goto(f"{base}/p/{PROJECT}/runs")
    finished = filled["runs"][0]
    compare.check(f'input.pick[value="{live.id}"]')
    compare.check(f'input.pick[value="{finished.id}"]')
    compare.click("#compare")
    both = compare.locator(_card("train.loss"))
    expect(both).to_have_attribute("data-count", "140")  # 40 + the finished run's 100
    for step in range(42, 60):
        live.log("train", step=step, epoch=2, loss=0.3)
    live.flush()
    expect(both).to_have_attribute("data-count", "158", timeout=8000)
    colors = [compare.get_attribute(f'#runs tr[data-id="{r.id}"]', "data-color") for r in (live, finished)]
    assert all(n > 15 for n in compare.evaluate(COUNT, [_card("train.loss"), colors]))
    live.finish()
    expect(page.locator("#run-status")).to_have_text("complete", timeout=8000)
    expect(page.locator("#charts-live")).to_have_text("")
