"""Vector search in a real browser: chromium uploads an image through the collection page's search form, and the
nearest documents come back with their thumbnails loaded; a click on a result searches like it. Skipped or failed
as tests/test_browser.py's tests are (it supplies the server, the browser and the page)."""

from __future__ import annotations

import pytest
from test_browser import _serve, browser, page, pytestmark, shots  # noqa: F401  (fixtures and the skip mark)
from test_web_search import COLOURS, embed_image, png

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("browser-search") / "wh")
    c = wh.project("shop").collection("photos")
    c.insert_many({"_id": f"{name}{k}", "colour": name, "photo": Image.new("RGB", (80, 50 + k), rgb)}
                  for name, rgb in COLOURS.items() for k in range(2))
    c.attach("hist", embed_image, key="photo")
    c.create_vector_index("by_colour", listener="hist")
    base, stop = _serve(wh)
    yield base
    stop()
    wh.close()


def test_search_by_an_uploaded_image_in_the_browser(page, photos, shots, tmp_path):  # noqa: F811
    from playwright.sync_api import expect
    query = tmp_path / "query.png"
    query.write_bytes(png((25, 195, 35)))
    page.goto(f"{photos}/p/shop/collection?name=photos")
    expect(page.locator("#vector-indexes tr[data-index=by_colour]")).to_contain_text("8")
    page.set_input_files("#search-by-image input[type=file]", str(query))
    page.fill("#search-by-image input[name=n]", "2")
    page.click("#search-by-image button[type=submit]")
    page.wait_for_url("**/collection/search")
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(2)
    ids = page.locator("#results tbody td:nth-child(3) code").all_inner_texts()
    assert set(ids) == {"green0", "green1"}
    thumbs = page.locator("#results img.thumb")
    expect(thumbs).to_have_count(2)
    page.wait_for_function("() => [...document.querySelectorAll('#results img.thumb')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    widths = thumbs.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert widths == [80, 80]  # the thumbnails were served and decoded
    page.screenshot(path=str(shots / "search.png"), full_page=True)
    page.click("#results tbody tr:nth-child(1) td:nth-child(3) a")  # search like the first result
    page.wait_for_url("**like=green*")
    expect(page.locator("#results tbody tr")).to_have_count(2)
    page.fill("#search-by-value input[name=q]", "{nope")
    page.click("#search-by-value button[type=submit]")
    expect(page.locator('[role="alert"]')).to_contain_text("filter")
