"""The data pages and the task board in a real browser (issue 17, items 5 and 6): Playwright drives Debian's
headless chromium at 1,280 x 900 against a served, read-only warehouse, and checks what a person sees: item
thumbnails with their labels and paging, previews captioned by labels, downloads that save files which load
back, the board's output tail on screen and wrapped, and its pages over thousands of tasks. Skipped as
tests/test_browser.py is where chromium or playwright is missing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from test_browser import _serve, browser, page, pytestmark, shots  # noqa: F401  (fixtures and the skip)

P = "data-browser"
N_TASKS = 2500


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A project with an item dataset of images, a whole dataset of images and shuffled labels, a model, and
    N_TASKS tasks (one with a long output, long hyper-parameters and an error); served read-only."""
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("browser-data") / "wh")
    p = wh.project(P)
    rng = np.random.default_rng(7)
    digits = np.zeros((150, 16, 16), np.uint8)
    for i in range(150):  # a bright square whose place depends on the item: a real picture, not noise
        r, c = divmod(i % 9, 3)
        digits[i, 2 + 4 * r:6 + 4 * r, 2 + 4 * c:6 + 4 * c] = 255
    labels = rng.integers(0, 10, 150)
    items = p.items.from_arrays("shapes", {"image": digits, "label": labels})
    X = rng.random((30, 8, 8)).astype(np.float32)
    y = rng.permutation(30) + 100
    whole = p.datasets.save({"images": X, "labels": y}, "shuffled")
    model = p.models.save({"dense": {"w": rng.random((5, 3)).astype(np.float32), "b": np.arange(3.0)}}, "mlp")
    p.index.ensure_collection("tasks", scalar_fields=["task_name", "status", "project"])
    statuses = ("pending", "running", "finished", "failed")
    p.insert_many("tasks", ({"task_name": f"job-{i}", "status": statuses[i % 4], "attempts": 1, "max_attempts": 3,
                             "hyper_parameters": {"i": i}, "output": f"job {i} ok\n"} for i in range(N_TASKS - 1)))
    long_output = "".join(f"epoch {i:03d} loss {1 / (i + 1):.5f} " + "x" * (i % 7) + "\n" for i in range(300))
    long_output += "Z" * 400 + "\nthe very last line\n"  # an unbroken 400-character run must wrap too
    talker = p.insert("tasks", {
        "task_name": "talker", "status": "running", "attempts": 1, "max_attempts": 3, "worker": "gpu-node-17:4242",
        "hyper_parameters": {"learning_rate_schedule": "cosine-with-warmup-" + "w" * 80, "layers": list(range(30))},
        "result": None, "started": "2024-05-01T10:00:00.000000Z", "output": long_output})
    base, stop = _serve(wh)
    yield {"base": base, "project": p, "items": items, "labels": labels, "digits": digits, "whole": whole,
           "y": y, "model": model, "talker": talker}
    stop()
    wh.close()


# -- 5. data pages ---------------------------------------------------------------------------------------------
def test_item_dataset_shows_thumbnails_with_their_labels_and_pages(page, served, shots):  # noqa: F811
    base, items, labels = served["base"], served["items"], served["labels"]
    page.goto(f"{base}/p/{P}/datasets")
    assert "150 items" in page.inner_text("#datasets")
    page.click('#datasets a:text-is("shapes")')
    page.wait_for_url(f"**/datasets/{items.id}")
    assert "no stored arrays" not in page.inner_text("main")
    figures = page.locator("#items figure.thumb")
    assert figures.count() == 48 and "items 1–48 of 150" in page.inner_text("nav.pager")
    shown = page.evaluate("""() => [...document.querySelectorAll('#items tr.item')].map(r => {
        const img = r.querySelector('img'), box = img.getBoundingClientRect();
        return {index: +r.dataset.index, label: r.querySelector('figcaption').innerText, ok: img.complete,
                w: img.naturalWidth, h: img.naturalHeight, seen: box.width > 40 && box.height > 40};
    })""")
    assert [s["index"] for s in shown] == list(range(48))
    assert [s["label"] for s in shown] == [str(v) for v in labels[:48]]  # each picture with its own label
    assert all(s["ok"] and s["w"] == s["h"] == 96 and s["seen"] for s in shown), shown[:3]
    bright = page.evaluate("""() => [...document.querySelectorAll('#items img')].slice(0, 9).map(img => {
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        let sx = 0, sy = 0, n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] > 128) { const p = i / 4; sx += p % c.width; sy += Math.floor(p / c.width); n++; }
        return [Math.round(sx / n / 24), Math.round(sy / n / 24)];
    })""")
    assert bright == [[1 + (i % 3), 1 + i // 3] for i in range(9)], bright  # the square where each item has it
    page.screenshot(path=str(shots / "items.png"), full_page=True)
    page.locator("nav.pager a.next").first.click()
    page.wait_for_url("**skip=48**")
    second = page.locator("#items tr.item").evaluate_all("rows => rows.map(r => [+r.dataset.index, "
                                                        "r.querySelector('figcaption').innerText])")
    assert second == [[i, str(labels[i])] for i in range(48, 96)]
    page.locator("nav.pager a.next").first.click()
    page.locator("nav.pager a.next").first.click()
    page.wait_for_url("**skip=144**")
    assert page.locator("#items tr.item").count() == 6 and page.locator("nav.pager a.next").count() == 0
    page.fill('input[name="q"]', '{"label": 4}')
    page.press('input[name="q"]', "Enter")
    page.wait_for_url("**q=**")
    assert set(page.locator("#items figcaption").all_inner_texts()) == {"4"}
    assert page.locator("#items tr.item").count() == min(48, int((labels == 4).sum()))


def test_array_previews_are_captioned_by_label(page, served, shots):  # noqa: F811
    base, whole, y = served["base"], served["whole"], served["y"]
    page.goto(f"{base}/p/{P}/datasets/{whole.id}")
    captions = page.locator('section.preview[data-leaf="0"] figcaption').all_inner_texts()
    assert captions == [str(v) for v in y[:16]]  # the labels, not the positions 0..15
    assert "captioned by value['labels']" in page.inner_text('section.preview[data-leaf="0"] h2')
    page.screenshot(path=str(shots / "preview-labels.png"), full_page=True)


def _save(tab, link, tmp_path) -> tuple[str, bytes]:
    with tab.expect_download() as info:
        tab.click(link)
    download = info.value
    target = tmp_path / download.suggested_filename
    download.save_as(target)
    return download.suggested_filename, target.read_bytes()


def test_downloads_from_a_read_only_ui_load_back(page, served, tmp_path):  # noqa: F811
    from safetensors.numpy import load
    base, p = served["base"], served["project"]
    page.goto(f"{base}/p/{P}/models/{served['model'].id}")
    assert page.inner_text("header .mode") == "read-only"
    name, data = _save(page, "#download-weights", tmp_path)
    weights = load(data)
    stored = p.models.get(served["model"].id).load()
    assert name.endswith(".safetensors") and sorted(weights) == ["dense.b", "dense.w"]
    assert np.array_equal(weights["dense.w"], stored["dense"]["w"]) and np.array_equal(weights["dense.b"], [0, 1, 2])
    page.goto(f"{base}/p/{P}/datasets/{served['whole'].id}")
    name, data = _save(page, "#download-all", tmp_path)
    arrays = load(data)
    assert name == "shuffled-v1.safetensors" and np.array_equal(arrays["labels"], served["y"])
    name, data = _save(page, '#arrays tr[data-leaf="1"] a.download', tmp_path)
    assert name == "shuffled-v1-labels.npy"
    assert np.array_equal(np.load(io.BytesIO(data), allow_pickle=False), served["y"])
    page.goto(f"{base}/p/{P}/datasets/{served['items'].id}")
    name, data = _save(page, '#item-fields tr[data-field="image"] a.download', tmp_path)
    assert name == "shapes-v1-image.npy"
    assert np.array_equal(np.load(io.BytesIO(data), allow_pickle=False), served["digits"])
    page.goto(f"{base}/p/{P}/tasks/{served['talker']['_id']}")
    name, data = _save(page, "#download-output", tmp_path)
    assert name.endswith(".txt") and data.decode() == served["talker"]["output"]


# -- 6. the task board -----------------------------------------------------------------------------------------
TAIL_GEOMETRY = """([id, early]) => {
    const row = document.querySelector(`#tasks tr[data-id="${id}"]`);
    const box = row.querySelector('td.output .tail'), pre = box.querySelector('pre.out');
    const seen = (text) => {
        const node = [...pre.childNodes].find(n => n.nodeType === 3);
        const at = node.data.indexOf(text), range = document.createRange();
        range.setStart(node, at); range.setEnd(node, at + text.length);
        const r = range.getBoundingClientRect(), b = box.getBoundingClientRect();
        return r.width > 0 && r.top >= b.top - 1 && r.bottom <= b.bottom + 1 && r.left >= b.left - 1
            && r.right <= b.right + 1 && r.right <= window.innerWidth;
    };
    const cell = row.querySelector('td.output').getBoundingClientRect();
    return {cellLeft: cell.left, cellRight: cell.right, page: document.documentElement.scrollWidth,
            window: window.innerWidth, last: seen('the very last line'), early: seen(early),
            wrapped: pre.scrollWidth <= pre.clientWidth + 1};
}"""


def test_the_board_shows_the_output_tail_on_screen_and_wrapped(page, served, shots):  # noqa: F811
    from playwright.sync_api import expect
    base, talker = served["base"], served["talker"]
    page.goto(f"{base}/p/{P}/tasks")
    tail = talker["output"][-2000:]  # what the board holds; its first whole line is far above the end
    early = tail.split("\n")[1]
    assert early.startswith("epoch ")
    geometry = page.evaluate(TAIL_GEOMETRY, [talker["_id"], early])
    assert geometry["cellRight"] <= geometry["window"] == 1280 and geometry["page"] <= 1280, geometry
    assert geometry["cellRight"] - geometry["cellLeft"] > 250, geometry  # a readable column, not a sliver
    assert geometry["last"] and not geometry["early"] and geometry["wrapped"], geometry  # the end, wrapped
    page.screenshot(path=str(shots / "tasks-tail.png"))
    expect(page.locator("#live")).to_contain_text("updated", timeout=6000)  # re-drawn by the poll: still so
    geometry = page.evaluate(TAIL_GEOMETRY, [talker["_id"], early])
    assert geometry["last"] and not geometry["early"] and geometry["cellRight"] <= 1280, geometry


def test_the_board_pages_through_thousands_of_tasks(page, served, shots):  # noqa: F811
    from playwright.sync_api import expect
    base, p = served["base"], served["project"]
    ids = [d["_id"] for d in p.find("tasks", sort=[("_id", -1)], projection={"_id": 1})]
    assert len(ids) == N_TASKS
    page.goto(f"{base}/p/{P}/tasks")
    rows = page.locator("#tasks tbody tr")
    shown = lambda: rows.evaluate_all("rows => rows.map(r => r.dataset.id)")  # noqa: E731
    assert shown() == ids[:100] and page.inner_text("#task-pager .range") == f"tasks 1–100 of {N_TASKS}"
    assert page.locator("#task-pager a.newer").is_hidden()
    page.click("#task-pager a.older")
    page.wait_for_url("**before=**")
    assert shown() == ids[100:200] and page.inner_text("#task-pager .range") == f"tasks 101–200 of {N_TASKS}"
    page.click("#task-pager a.older")
    page.wait_for_url(f"**before={ids[199]}**")
    assert shown() == ids[200:300]
    p.insert("tasks", {"task_name": "newcomer", "status": "pending", "attempts": 0, "max_attempts": 3})
    expect(page.locator('#counts b[data-status="pending"]')).to_have_text(str(N_TASKS // 4 + 1), timeout=6000)
    expect(page.locator("#task-pager .range")).to_have_text(f"tasks 202–301 of {N_TASKS + 1}")
    assert shown() == ids[200:300]  # the page a person reads holds still while tasks arrive
    page.screenshot(path=str(shots / "tasks-page3.png"))
    page.click("#task-pager a.newer")
    page.wait_for_url("**after=**")
    assert shown() == ids[100:200]
    page.click("#task-pager a.newest")
    expect(rows.first).to_contain_text("newcomer")
    assert shown()[1:] == ids[:99]
