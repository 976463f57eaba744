"""The champion panel in a real browser: Playwright drives headless chromium against a served warehouse, and the
panel follows alias moves made by the test (another writer) without a reload.

Skipped (with the reason) where chromium or playwright is missing, except under CI (``$CI`` set), where that is a
failure, as in tests/test_browser.py. Screenshots go to ``$MLW_SCREENSHOTS`` if set, else to a temporary folder.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_browser import _serve, browser, pytestmark, shots  # noqa: F401  (fixtures and the skip mark)

from mlwarehouse.testing.browser import open_page

PROJECT = "live"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A warehouse with three models named mlp (evaluated) and no alias yet, served by uvicorn in a thread."""
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("champ-browser") / "wh", project=PROJECT)
    test = wh.datasets.save(np.arange(4), "march-test")
    models = [wh.models.save({"w": np.full(2, i)}, "mlp") for i in range(3)]
    for model, acc in zip(models, (0.91, 0.94, 0.96)):
        wh.models.evaluations.record(model, test, "accuracy", acc)
    base, stop = _serve(wh)
    yield base, wh, test, models
    stop()
    wh.close()


@pytest.fixture
def page(browser):  # noqa: F811
    with open_page(browser, 1400, 900) as opened:
        yield opened


def test_the_panel_follows_alias_moves_without_a_reload(page, served, shots):  # noqa: F811
    from playwright.sync_api import expect
    base, wh, test, (a, b, c) = served
    aliases = wh.models.aliases
    page.goto(f"{base}/p/{PROJECT}/models")
    expect(page.locator("#aliases tr.none")).to_contain_text("no alias is set in this project")
    page.evaluate("window.__sameDocument = 1")  # gone if the page reloads

    aliases.set("mlp", "champion", a, by="ci")  # another writer moves the alias while the page is open
    row = page.locator('#aliases tr[data-spelling="mlp@champion"]')
    expect(row).to_have_attribute("data-model", a.id, timeout=8000)
    expect(row.locator("td.headline")).to_contain_text("first holder since")
    expect(row.locator("td.set .by")).to_have_text("ci")

    aliases.promote("mlp", "champion", b, evaluation=(test, "accuracy"), by="gate")
    expect(row).to_have_attribute("data-model", b.id, timeout=8000)
    expect(row).to_have_class("moved")
    expect(row.locator("td.headline")).to_contain_text("accuracy improved from 0.91 to 0.94 at")
    expect(row.locator(".eval.improved .delta")).to_have_text("was 0.91, +0.03")
    expect(row.locator("td.previous a")).to_have_attribute("href", f"/p/{PROJECT}/models/{a.id}")
    expect(row.locator("a.history")).to_have_text("2 changes")
    expect(page.locator("#champions-held")).to_have_text("1")
    page.screenshot(path=str(shots / "champions-live.png"), full_page=True)

    aliases.set("mlp", "staging", c)
    aliases.remove("mlp", "staging", reason="retired")
    staging = page.locator('#aliases tr[data-spelling="mlp@staging"]')
    expect(staging).to_have_class("removed", timeout=8000)
    expect(staging.locator("td.holder")).to_have_text("removed")
    expect(page.locator("#champions-removed")).to_have_text("1")
    assert page.evaluate("window.__sameDocument") == 1  # every change came in without a reload

    page.click('#aliases tr[data-spelling="mlp@champion"] a.history')
    page.wait_for_url("**/alias?name=mlp&alias=champion")
    versions = page.locator("#alias-history tbody tr").evaluate_all(
        "rows => rows.map(r => [r.dataset.version, r.dataset.model])")
    assert versions == [["2", b.id], ["1", a.id]]


def test_the_drawn_rows_match_the_server_rendered_ones(page, served):
    """The first poll re-draws the panel from JSON: the text a user reads must not change with it."""
    from playwright.sync_api import expect

    from mlwarehouse.web.data import fmt
    base, wh, _, _ = served
    page.goto(f"{base}/p/{PROJECT}/models")
    assert page.locator('#aliases tr[data-spelling]').count() >= 1
    rendered = page.inner_text("#aliases tbody")
    expect(page.locator("#champions-live")).to_contain_text("live, updated", timeout=8000)
    assert page.inner_text("#aliases tbody") == rendered
    values = [0.94, 0.029999999999999916, -0.25, 1.5e-05, 123456.789, 0.00012345, 9.99996, 2.0, 7, 0.1 + 0.2]
    drawn = page.evaluate("values => values.map(v => mlw.num(v))", values)
    assert drawn == [fmt(v) for v in values]
    signed = page.evaluate("values => values.map(v => mlw.num(v, true))", [0.03, -0.05, 0.0, 2.5e-06])
    assert signed == ["%+.4g" % v for v in (0.03, -0.05, 0.0, 2.5e-06)]
