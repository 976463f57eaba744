"""Text search and saved views in a real browser: chromium types into the search box of the list pages and the
rows follow (the address carrying the words), a view is saved, opened from the views menu in a fresh tab and
deleted, and a read-only UI lists views without a save button; columns chosen in the columns box are
saved with a view and shown again when it is opened. Skipped or failed as tests/test_browser.py's tests
are (it supplies the browser and the page)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from test_browser import browser, page, pytestmark, shots  # noqa: F401  (fixtures and the skip mark)
from test_web_text_search import fill, fill_columns

from mlwarehouse.testing.browser import serve_ui


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The same warehouse served twice: writable and read-only."""
    import mlwarehouse
    wh = fill_columns(fill(mlwarehouse.connect(home=tmp_path_factory.mktemp("browser-text") / "wh")))
    (writable, stop_writable), (read_only, stop_read_only) = serve_ui(wh, writable=True), serve_ui(wh)
    yield writable, read_only
    stop_writable()
    stop_read_only()
    wh.close()


def shown(tab, table: str) -> list[str]:
    return tab.locator(f"#{table} tbody tr td a[href*='/{table}/']").all_inner_texts()


def test_rows_follow_what_is_typed_and_a_view_is_saved_opened_and_deleted(browser, page, served, shots):  # noqa: F811
    from playwright.sync_api import expect
    base, read_only = served
    page.goto(f"{base}/p/search/runs")
    expect(page.locator("#runs tbody tr[data-id]")).to_have_count(4)
    box = page.locator("#text-search")
    box.press_sequentially("GPU", delay=40)
    page.wait_for_url("**text=GPU*")
    expect(page.locator("#runs tbody tr[data-id]")).to_have_count(2)
    assert sorted(shown(page, "runs")) == ["cifar-resnet", "mnist-cnn"]
    expect(box).to_be_focused()  # typing goes on where it was
    box.press_sequentially(" mnist", delay=40)
    page.wait_for_url("**text=GPU+mnist*")
    expect(page.locator("#runs tbody tr[data-id]")).to_have_count(1)
    assert shown(page, "runs") == ["mnist-cnn"]
    expect(box).to_have_value("GPU mnist")
    page.fill("input[name=q]", '{"hyper_parameters.lr": 0.1}')
    page.click("form.query button[type=submit]")
    page.wait_for_url("**q=*")
    page.click("#runs thead a.sort:text('name')")  # a sort column keeps the words and the filter
    page.wait_for_url("**sort=name*")
    carried = parse_qs(urlsplit(page.url).query)
    assert carried["text"] == ["GPU mnist"] and "q" in carried and shown(page, "runs") == ["mnist-cnn"]
    page.fill("#view-name", "small gpu")
    page.click("#save-view")
    expect(page.locator("#views-status")).to_contain_text("saved")
    expect(page.locator("#views-select option", has_text="small gpu")).to_have_count(1)
    page.screenshot(path=str(shots / "text-search.png"), full_page=True)

    fresh = browser.new_page()  # the view opens anywhere, from the menu
    try:
        fresh.goto(f"{base}/p/search/runs")
        expect(fresh.locator("#runs tbody tr[data-id]")).to_have_count(4)
        fresh.select_option("#views-select", label="small gpu")
        fresh.wait_for_url("**text=GPU+mnist*")
        expect(fresh.locator("#runs tbody tr[data-id]")).to_have_count(1)
        expect(fresh.locator("#text-search")).to_have_value("GPU mnist")
        expect(fresh.locator("#delete-view")).to_be_enabled()  # the view open is the one chosen
        fresh.click("#delete-view")
        expect(fresh.locator("#views-status")).to_contain_text("deleted")
        expect(fresh.locator("#views-select option", has_text="small gpu")).to_have_count(0)
    finally:
        fresh.close()

    page.goto(f"{read_only}/p/search/models?text=resnet")  # read-only: searched, no save button
    assert shown(page, "models") == ["cifar-resnet-model"]
    expect(page.locator("#views-select")).to_be_visible()
    expect(page.locator("#save-view")).to_have_count(0)


def test_the_task_board_keeps_the_search_while_it_polls(page, served):  # noqa: F811
    from playwright.sync_api import expect
    base, _ = served
    page.goto(f"{base}/p/search/tasks")
    expect(page.locator("#tasks tbody tr[data-id]")).to_have_count(4)
    page.locator("#text-search").press_sequentially("gpu", delay=40)
    page.wait_for_url("**text=gpu*")
    expect(page.locator("#tasks tbody tr[data-id]")).to_have_count(2)
    expect(page.locator("#live")).to_contain_text("updated", timeout=6000)  # tasks.js has polled since
    expect(page.locator("#tasks tbody tr[data-id]")).to_have_count(2)
    assert sorted(shown(page, "tasks")) == ["train-cifar-resnet", "train-mnist-cnn"]
    page.goto(f"{base}/p/search/datasets")
    page.locator("#text-search").press_sequentially("(v2.1)", delay=40)
    page.wait_for_url("**text=*")
    expect(page.locator("#datasets tbody tr")).to_have_count(1)
    assert shown(page, "datasets") == ["mnist-cnn-data"]


def heads(tab, table: str) -> list[str]:
    """The param/metric column heads of a table as shown (sort arrows left out)."""
    return [h.strip(" ▲▼") for h in tab.locator(f"#{table} thead th.param, #{table} thead th.metric")
            .all_inner_texts()]


def test_columns_are_chosen_saved_with_a_view_and_shown_when_it_opens(browser, page, served):  # noqa: F811
    from playwright.sync_api import expect
    base, _ = served
    page.goto(f"{base}/p/cols/runs")
    expect(page.locator("#runs tbody tr[data-id]")).to_have_count(2)
    assert heads(page, "runs") == ["batch", "depth", "lr", "train.loss", "valid.acc"]
    page.fill("#columns", "valid.acc,lr")
    page.press("#columns", "Enter")
    page.wait_for_url("**columns=valid.acc*")
    assert heads(page, "runs") == ["valid.acc", "lr"]
    expect(page.locator("#columns")).to_have_value("valid.acc,lr")
    page.click("#runs thead a.sort:text('name')")  # sorting keeps the columns
    page.wait_for_url("**sort=name*")
    assert heads(page, "runs") == ["valid.acc", "lr"]
    page.fill("#view-name", "acc and lr")
    page.click("#save-view")
    expect(page.locator("#views-status")).to_contain_text("saved")
    expect(page.locator("#views-select option", has_text="acc and lr")).to_have_count(1)

    fresh = browser.new_page()
    try:
        fresh.goto(f"{base}/p/cols/runs")
        assert len(heads(fresh, "runs")) == 5
        fresh.select_option("#views-select", label="acc and lr")
        fresh.wait_for_url("**columns=valid.acc*")
        assert heads(fresh, "runs") == ["valid.acc", "lr"]
        expect(fresh.locator("#columns")).to_have_value("valid.acc,lr")
        fresh.click("#delete-view")
        expect(fresh.locator("#views-status")).to_contain_text("deleted")
    finally:
        fresh.close()
