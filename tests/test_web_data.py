"""The UI's data pages and task board through FastAPI's TestClient (issue 17, items 5 and 6): item dataset pages
(items with their fields, thumbnails with labels, paging), previews captioned by their labels, downloads that
round-trip (weights, arrays, item fields, task output; served by a read-only UI), and the board's keyset paging
over a real warehouse of thousands of tasks."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from mlwarehouse.web import create_app  # noqa: E402

BASE = "http://localhost"
P = "data-ui"


def _client(wh, **options) -> TestClient:
    return TestClient(create_app(wh, **options), base_url=BASE)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _captions(html: str) -> list[str]:
    return re.findall(r'<figcaption class="label">([^<]*)</figcaption>', html)


def _rows(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr class="item" data-id="[^"]+" data-index="(\d+)"', html)]


# -- 5. item datasets ------------------------------------------------------------------------------------------
def test_an_item_dataset_shows_a_page_of_items_with_thumbnails_labels_and_paging(wh):
    p = wh.project(P)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (130, 12, 10), dtype=np.uint8)
    labels = rng.integers(0, 10, 130)
    ds = p.items.from_arrays("digits", {"image": images, "label": labels, "note": [f"n{i}" for i in range(130)]})
    client = _client(wh)
    page = client.get(f"/p/{P}/datasets/{ds.id}")
    assert page.status_code == 200
    html = page.text
    assert "no stored arrays" not in html and "items 1–48 of 130" in html
    assert _rows(html) == list(range(48))
    assert html.count('<figure class="thumb"><img src="data:image/png;base64,') == 48
    assert _captions(html) == [str(v) for v in labels[:48]]  # each thumbnail captioned by its own item's label
    assert "n0<" in html and "n47<" in html and "n48<" not in html  # scalar fields in their columns
    first = re.search(r'<img src="data:image/png;base64,([^"]+)"', html).group(1)
    from base64 import b64decode

    from PIL import Image
    shown = np.asarray(Image.open(io.BytesIO(b64decode(first))))
    assert shown.shape[:2] == (12 * 8, 10 * 8)  # scaled up by a whole factor, nearest neighbour
    assert np.array_equal(shown[::8, ::8], images[0])  # the item's own pixels

    second = client.get(f"/p/{P}/datasets/{ds.id}", params={"skip": 48}).text
    assert _rows(second) == list(range(48, 96)) and _captions(second) == [str(v) for v in labels[48:96]]
    assert 'rel="prev" href="?skip=0&limit=48"' in second and 'rel="next" href="?skip=96&limit=48"' in second
    last = client.get(f"/p/{P}/datasets/{ds.id}", params={"skip": 96}).text
    assert _rows(last) == list(range(96, 130)) and 'rel="next"' not in last and "items 97–130 of 130" in last

    threes = client.get(f"/p/{P}/datasets/{ds.id}", params={"q": '{"label": 3}', "limit": 500}).text
    assert _captions(threes) == ["3"] * int((labels == 3).sum())
    bad = client.get(f"/p/{P}/datasets/{ds.id}", params={"q": '{"label": {"$near": 3}}'})
    assert bad.status_code == 400 and "$near" in bad.text and 'role="alert"' in bad.text
    assert client.get(f"/p/{P}/datasets/{ds.id}", params={"limit": 0}).status_code == 400
    listing = client.get(f"/p/{P}/datasets").text
    assert "130 items" in listing


def test_item_images_stored_as_encoded_bytes_are_thumbnails_and_junk_is_not(wh):
    p = wh.project(P)
    red = np.zeros((300, 200, 3), np.uint8)
    red[..., 0] = 255
    items = [{"image": _png(red), "label": 0, "class": "red"},
             {"image": b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "label": 1, "class": "junk"},  # a PNG head, no image
             {"image": b"plain bytes", "label": 1, "class": "text"}]
    with p.items.create("files", classes=["red", "other"]) as ds:
        ds.append(items)
    html = _client(wh).get(f"/p/{P}/datasets/{ds.id}").text
    thumbs = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(thumbs) == 1  # re-encoded by the server, never embedded as stored
    from base64 import b64decode

    from PIL import Image
    thumb = Image.open(io.BytesIO(b64decode(thumbs[0])))
    assert max(thumb.size) <= 192 and thumb.getpixel((5, 5))[:3] == (255, 0, 0)
    assert _captions(html) == ["red"]  # label 0 named by the dataset's classes
    assert f"{len(items[1]['image'])} bytes" in html and "11 bytes" in html


# -- 5. array previews captioned by their labels ---------------------------------------------------------------
def test_array_previews_are_captioned_by_their_labels(wh):
    p = wh.project(P)
    rng = np.random.default_rng(2)
    X = rng.random((40, 8, 8)).astype(np.float32)
    y = rng.permutation(40)  # labels that are not the indices
    client = _client(wh)
    as_dict = p.datasets.save({"images": X, "labels": y, "weights": np.ones(40)}, "dict")
    html = client.get(f"/p/{P}/datasets/{as_dict.id}").text
    assert _captions(html) == [str(v) for v in y[:16]] and "captioned by <code>value[&#39;labels&#39;]" in html
    as_tuple = p.datasets.save((X, y), "tuple")
    assert _captions(client.get(f"/p/{P}/datasets/{as_tuple.id}").text) == [str(v) for v in y[:16]]
    named = p.datasets.save({"x": X, "y": y % 3}, "named", classes=["cat", "dog", "owl"])
    assert _captions(client.get(f"/p/{P}/datasets/{named.id}").text) == [["cat", "dog", "owl"][v] for v in y[:16] % 3]
    plain = client.get(f"/p/{P}/datasets/{p.datasets.save(X, 'plain').id}").text
    assert _captions(plain) == [] and re.findall(r"<figcaption>(\d+)</figcaption>", plain) == [str(i) for i in range(16)]


# -- 5. downloads ----------------------------------------------------------------------------------------------
def _download(client, url: str, suffix: str):
    r = client.get(url)
    assert r.status_code == 200, (url, r.text[:300])
    disposition = r.headers["content-disposition"]
    name = re.fullmatch(r'attachment; filename="([A-Za-z0-9._-]+)"; filename\*=UTF-8\'\'([A-Za-z0-9._%-]+)',
                        disposition)
    assert name and name.group(1).endswith(suffix), disposition
    if r.headers.get("content-encoding") != "gzip":  # text may be gzipped on the way; arrays go as they are
        assert int(r.headers["content-length"]) == len(r.content)
    else:
        assert suffix == ".txt"
    return r.content


def test_weights_arrays_item_fields_and_output_download_and_round_trip_from_a_read_only_ui(wh):
    import torch
    from safetensors.numpy import load as st_numpy
    from safetensors.torch import load as st_torch
    p = wh.project(P)
    rng = np.random.default_rng(3)
    arrays = {"w": rng.random((4, 3)).astype(np.float32), "layer": {"b": np.zeros((300, 300), np.float32),
                                                                    "n": np.arange(5, dtype=">i4")}}
    model = p.models.save(arrays, "mlp")
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)).to(torch.bfloat16)
    tmodel = p.models.save(net, "net")
    X = np.asfortranarray(rng.random((6, 5)))
    value = {"x": X, "y": np.arange(6, dtype=">i2"), "z": np.zeros((200, 300), np.float32)}
    dataset = p.datasets.save(value, "arrays")
    images = rng.integers(0, 256, (70, 32, 30, 3), dtype=np.uint8)
    items = p.items.from_arrays("items", {"image": images, "label": np.arange(70)}, shard_bytes=1 << 16)
    assert items.doc["shards"] > 1
    client = _client(wh)  # read-only: downloads are GETs and stay served
    assert client.app.state.writable is False and "read-only" in client.get(f"/p/{P}/datasets").text

    got = st_numpy(_download(client, f"/p/{P}/models/{model.id}/weights.safetensors", ".safetensors"))
    assert sorted(got) == ["layer.b", "layer.n", "w"]
    assert np.array_equal(got["w"], arrays["w"]) and np.array_equal(got["layer.b"], arrays["layer"]["b"])
    assert np.array_equal(got["layer.n"], np.arange(5)) and got["layer.n"].dtype == np.int32
    state = st_torch(_download(client, f"/p/{P}/models/{tmodel.id}/weights.safetensors", ".safetensors"))
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) and state[k].dtype == torch.bfloat16 for k, v in net.state_dict().items())
    page = client.get(f"/p/{P}/models/{model.id}").text
    assert f'href="/p/{P}/models/{model.id}/weights.safetensors"' in page

    page = client.get(f"/p/{P}/datasets/{dataset.id}").text
    for index, key in enumerate(("x", "y", "z")):
        assert f'href="/p/{P}/datasets/{dataset.id}/arrays/{index}.npy"' in page
        data = _download(client, f"/p/{P}/datasets/{dataset.id}/arrays/{index}.npy", ".npy")
        back = np.load(io.BytesIO(data), allow_pickle=False)
        assert np.array_equal(back, value[key]) and back.dtype == value[key].dtype
    assert np.load(io.BytesIO(_download(client, f"/p/{P}/datasets/{dataset.id}/arrays/0.npy", ".npy"))).flags.f_contiguous
    every = st_numpy(_download(client, f"/p/{P}/datasets/{dataset.id}/arrays.safetensors", ".safetensors"))
    assert sorted(every) == ["x", "y", "z"] and all(np.array_equal(every[k], value[k]) for k in value)

    page = client.get(f"/p/{P}/datasets/{items.id}").text
    assert f'href="/p/{P}/datasets/{items.id}/fields/image.npy"' in page
    column = np.load(io.BytesIO(_download(client, f"/p/{P}/datasets/{items.id}/fields/image.npy", ".npy")),
                     allow_pickle=False)
    assert np.array_equal(column, images)
    version2 = items.new_version(exclude={"label": {"$lt": 10}}).finish()
    column = np.load(io.BytesIO(_download(client, f"/p/{P}/datasets/{version2.id}/fields/image.npy", ".npy")))
    assert np.array_equal(column, images[10:])  # a version that keeps some rows of shared shards

    p.index.ensure_collection("tasks")
    long_output = "".join(f"line {i} é\n" for i in range(3000)).encode()
    blob = p.pack(long_output)
    inline = p.insert("tasks", {"task_name": 'say "hi"/../x', "status": "finished", "output": "short ✓\n"})
    stored = p.insert("tasks", {"task_name": "long", "status": "finished", "output": "tail only",
                                "output_blob": blob})
    text = _download(client, f"/p/{P}/tasks/{inline['_id']}/output.txt", ".txt")
    assert text.decode() == "short ✓\n"
    r = client.get(f"/p/{P}/tasks/{inline['_id']}/output.txt")
    assert r.headers["content-type"].startswith("text/plain") and '"hi"' not in r.headers["content-disposition"]
    assert _download(client, f"/p/{P}/tasks/{stored['_id']}/output.txt", ".txt") == long_output
    assert f'href="/p/{P}/tasks/{stored["_id"]}/output.txt"' in client.get(f"/p/{P}/tasks/{stored['_id']}").text


def test_downloads_refuse_what_they_cannot_serve(wh, monkeypatch):
    from mlwarehouse.web import downloads
    p = wh.project(P)
    client = _client(wh, writable=True)
    pickled = p.datasets.save({"obj": {1, 2, 3}, "x": np.arange(100_000)}, "mixed", allow_pickle=True)
    found = client.get(f"/p/{P}/datasets/{pickled.id}").text
    assert found.count('.npy</a>') == 1  # only the array: the pickled leaf has no link
    assert client.get(f"/p/{P}/datasets/{pickled.id}/arrays/0.npy").status_code == 404  # never unpickled
    assert client.get(f"/p/{P}/datasets/{pickled.id}/arrays/9.npy").status_code == 404
    assert client.get(f"/p/{P}/datasets/NOPE/arrays.safetensors").status_code == 404
    assert client.get(f"/p/{P}/models/NOPE/weights.safetensors").status_code == 404
    assert client.get(f"/p/{P}/tasks/NOPE/output.txt").status_code == 404
    assert client.post(f"/p/{P}/datasets/{pickled.id}/arrays.safetensors",
                       headers={"Origin": BASE}).status_code == 405  # downloads are GET only
    ragged = p.items.create("ragged")
    ragged.append([{"x": np.zeros(3)}, {"x": np.zeros(4)}])
    r = client.get(f"/p/{P}/datasets/{ragged.id}/fields/x.npy")
    assert r.status_code == 400 and "fixed shape" in r.text
    monkeypatch.setattr(downloads, "MAX_DOWNLOAD_BYTES", 1000)
    r = client.get(f"/p/{P}/datasets/{pickled.id}/arrays.safetensors")
    assert r.status_code == 400 and "more than the UI serves" in r.text
    assert downloads.safe_filename('a "b"/../c\r\nd', "é", suffix=".npy") == "a_b_._c_d.npy"
    assert downloads.safe_filename("", None, suffix=".txt") == "download.txt"


# -- 6. the task board: keyset paging over thousands of tasks, the tail of the output --------------------------
def test_the_task_board_pages_thousands_of_tasks(wh):
    p = wh.project(P)
    p.index.ensure_collection("tasks", scalar_fields=["task_name", "status", "project"])
    statuses = ("pending", "running", "finished", "failed", "cancelled")
    n = 3000
    p.insert_many("tasks", ({"task_name": f"t{i}", "status": statuses[i % 5], "attempts": 1, "max_attempts": 3,
                             "hyper_parameters": {"i": i}, "output": f"task {i} says\n" * 3} for i in range(n)))
    ids = [d["_id"] for d in p.find("tasks", sort=[("_id", -1)], projection={"_id": 1})]
    assert len(ids) == n
    client = _client(wh)
    url = f"/api/p/{P}/tasks/page"
    seen, cursor, offsets = [], None, []
    while True:
        page = client.get(url, params={"limit": 500, **({"before": cursor} if cursor else {})}).json()
        assert page["total"] == n and page["counts"] == {s: n // 5 for s in statuses}  # of the whole board
        offsets.append(page["offset"])
        seen += [r["id"] for r in page["rows"]]
        if page["older"] is None:
            break
        assert len(page["rows"]) == 500 == page["limit"]  # a page holds the limit
        cursor = page["older"]
    assert seen == ids and offsets == list(range(0, n, 500))  # each page continues where the last ended
    third = client.get(url, params={"limit": 500, "before": ids[999]}).json()
    back = client.get(url, params={"limit": 500, "after": third["newer"]}).json()
    assert [r["id"] for r in back["rows"]] == ids[500:1000] and back["offset"] == 500
    newest = client.get(url, params={"limit": 500, "after": ids[400]}).json()  # fewer than a page newer: page 1
    assert [r["id"] for r in newest["rows"]] == ids[:500] and newest["newer"] is None

    failed = client.get(url, params={"limit": 100, "q": '{"status": "failed"}', "before": ids[0]}).json()
    assert len(failed["rows"]) == 100 and {r["status"] for r in failed["rows"]} == {"failed"}
    assert failed["counts"]["failed"] == n // 5 and failed["counts"]["finished"] == 0 and failed["total"] == n // 5

    p.insert("tasks", {"task_name": "late", "status": "pending"})  # the second page holds still; the first moves
    assert [r["id"] for r in client.get(url, params={"limit": 500, "before": ids[499]}).json()["rows"]] == \
        ids[500:1000]
    first = client.get(url, params={"limit": 500}).json()
    assert first["rows"][0]["task_name"] == "late" and first["total"] == n + 1

    html = client.get(f"/p/{P}/tasks", params={"before": ids[499], "limit": 500}).text
    assert "tasks 502–1001 of 3001" in html  # one newer task since and html.count("<tr data-id=") == 500
    assert f'href="?before={ids[999]}&limit=500"' in html and f'href="?after={ids[500]}&limit=500"' in html
    assert client.get(f"/p/{P}/tasks").text.count("<tr data-id=") == 100  # the default page
    assert client.get(url, params={"before": "x", "after": "y"}).status_code == 400
    assert client.get(url, params={"q": "{bad"}).status_code == 400


def test_the_board_shows_the_end_of_a_long_output(wh):
    p = wh.project(P)
    p.index.ensure_collection("tasks")
    output = "".join(f"step {i}\n" for i in range(5000))
    task = p.insert("tasks", {"task_name": "long", "status": "running", "output": output,
                              "error": "Traceback...\nValueError: the end"})
    row = _client(wh).get(f"/api/p/{P}/tasks/page").json()["rows"][0]
    assert row["id"] == task["_id"] and row["output_tail"].endswith("step 4999\n")
    assert "ValueError: the end" in row["error_tail"]
    html = _client(wh).get(f"/p/{P}/tasks").text
    assert '<pre class="out">' in html and "step 4999" in html and "step 0\n" not in html
    assert json.loads(json.dumps(row))  # plain JSON
