"""Vector search on the collection pages through FastAPI's TestClient: the indexes' figures, search by a document's
id, by text through a listener, by an uploaded image through an image-embedding listener, thumbnails in the
results, and bad requests shown on the page (400, never 500)."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
Image = pytest.importorskip("PIL.Image")

from fastapi.testclient import TestClient  # noqa: E402

from mlwarehouse.testing.vector_conformance import embed_text  # noqa: E402
from mlwarehouse.web import create_app  # noqa: E402
from mlwarehouse.web.search import MAX_UPLOAD_BYTES, form_parts  # noqa: E402

BASE = "http://localhost"
SEARCH = "/p/shop/collection/search"
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (20, 40, 220), "yellow": (230, 220, 30)}
TEXTS = ["red apple pie", "green apple tart", "blue sky today", "grey sky rain", "apple juice red",
         "sky blue ocean"]
EVIL = "<script>alert('pwned')</script>"


def embed_image(image):
    """A listener model for images: the normalised 4x4x4 colour histogram (alike colours, alike vectors)."""
    rgb = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.int64) // 64
    counts = np.bincount((rgb[..., 0] * 16 + rgb[..., 1] * 4 + rgb[..., 2]).ravel(), minlength=64)
    v = counts.astype(np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-9)


def png(colour, size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("webs") / "wh")
    p = wh.project("shop")
    texts = p.collection("texts")
    texts.insert_many({"_id": f"t{i}", "text": t, "n": i, "note": EVIL if i == 1 else ""}
                      for i, t in enumerate(TEXTS))
    texts.attach("embed", embed_text, key="text")
    texts.create_vector_index("by_text", listener="embed")
    photos = p.collection("photos")
    photos.insert_many({"_id": f"{name}{k}", "colour": name, "k": k,
                        "photo": Image.new("RGB", (60 + k, 40), tuple(max(0, x - 15 * k) for x in rgb))}
                       for name, rgb in COLOURS.items() for k in range(2))
    photos.attach("hist", embed_image, key="photo")  # stored by import path: this test module
    photos.create_vector_index("by_colour", listener="hist")
    p.collection("plain").insert_one({"_id": "x", "a": 1})
    client = TestClient(create_app(wh), base_url=BASE)
    yield wh, client
    wh.close()


def results(text: str) -> str:
    return text[text.index('<table id="results">'):]


def ids_in(text: str) -> list[str]:
    import re
    return re.findall(r"<code>([^<]+)</code></a>", results(text))


def test_the_collection_page_shows_the_indexes_and_the_search_box(shop):
    _, client = shop
    page = client.get("/p/shop/collection", params={"name": "texts"})
    assert page.status_code == 200
    section = page.text[page.text.index('id="vector-search"'):]
    assert '<tr data-index="by_text"><td><code>by_text</code></td><td>listener embed' in section
    assert "(texts)" in section and "embedded" in section and ">cosine<" in section
    assert '<td class="num">6</td>' in section and '<td class="num">16</td>' in section  # vectors, dims
    assert 'action="/p/shop/collection/search"' in section and 'name="text"' in section
    assert 'id="search-by-image"' not in section  # no listener of texts takes images
    photos = client.get("/p/shop/collection", params={"name": "photos"}).text
    assert 'id="search-by-image"' in photos and 'enctype="multipart/form-data"' in photos
    assert 'name="text"' not in photos
    plain = client.get("/p/shop/collection", params={"name": "plain"}).text
    assert 'id="vector-search"' not in plain  # no index, no search box


def test_search_like_a_document_by_id(shop):
    _, client = shop
    page = client.get(SEARCH, params={"name": "texts", "like": "t0", "n": 3})
    assert page.status_code == 200, page.text
    assert ids_in(page.text) == ["t0", "t4", "t1"]
    assert '<td class="num score">1.0000</td>' in results(page.text)
    assert "3 of n=3" in page.text and 'id="fewer"' not in page.text
    assert EVIL not in page.text and "&lt;script&gt;" in page.text  # stored text escaped
    # each result links to a search like it
    assert 'href="/p/shop/collection/search?name=texts&amp;index=by_text&amp;like=t4&amp;q=&amp;n=3"' in page.text


def test_search_by_text_with_a_filter_and_fewer_than_n(shop):
    _, client = shop
    page = client.get(SEARCH, params={"name": "texts", "text": "red apple", "q": '{"n": {"$gte": 2}}', "n": 2})
    assert page.status_code == 200, page.text
    found = ids_in(page.text)
    assert len(found) == 2 and found[0] == "t4"  # the rest score 0: their order is a tie
    assert "4 documents match the filter" in page.text
    few = client.get(SEARCH, params={"name": "texts", "text": "sky", "q": '{"n": {"$gt": 3}}', "n": 5})
    assert few.status_code == 200
    assert 'id="fewer"' in few.text and "fewer than n=5 documents match the filter" in few.text
    assert sorted(ids_in(few.text)) == ["t4", "t5"]
    assert ids_in(few.text)[0] == "t5"  # "sky blue ocean" is nearer "sky"


def test_search_by_an_uploaded_image_shows_thumbnails(shop):
    _, client = shop
    page = client.post(SEARCH, headers={"Origin": BASE},
                       data={"name": "photos", "index": "by_colour", "n": "2", "q": ""},
                       files={"image": ("query.png", png((225, 25, 25)), "image/png")})
    assert page.status_code == 200, page.text
    assert set(ids_in(page.text)) == {"red0", "red1"}  # one histogram bin: a tie
    table = results(page.text)
    assert 'class="thumb" src="/api/p/shop/collection/image?name=photos&amp;id=red0&amp;field=photo"' in table
    thumb = client.get("/api/p/shop/collection/image", params={"name": "photos", "id": "red0", "field": "photo"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    filtered = client.post(SEARCH, headers={"Origin": BASE},
                           data={"name": "photos", "n": "2", "q": '{"colour": {"$ne": "red"}}'},
                           files={"image": ("q.png", png((20, 45, 215)), "image/png")})
    assert filtered.status_code == 200 and set(ids_in(filtered.text)) == {"blue0", "blue1"}
    assert "6 documents match the filter" in filtered.text


def test_the_upload_form_needs_the_uis_own_origin(shop):
    _, client = shop
    refused = client.post(SEARCH, headers={"Origin": "http://evil.example"}, data={"name": "photos"},
                          files={"image": ("q.png", png((1, 2, 3)), "image/png")})
    assert refused.status_code == 403


def test_the_search_page_without_a_query_shows_the_form(shop):
    _, client = shop
    page = client.get(SEARCH, params={"name": "texts"})
    assert page.status_code == 200
    assert 'id="search-by-value"' in page.text and 'id="results"' not in page.text and 'role="alert"' not in page.text


@pytest.mark.parametrize("params, message", [
    ({"name": "texts", "like": "t0", "q": "{nope"}, "filter"),
    ({"name": "texts", "like": "t0", "q": '{"n": {"$bogus": 1}}'}, "$bogus"),
    ({"name": "texts", "like": "missing"}, "no document &#39;missing&#39;"),
    ({"name": "texts", "like": "t0", "index": "nope"}, "no vector index &#39;nope&#39;"),
    ({"name": "plain", "like": "x"}, "NotFound"),
    ({"name": "photos", "text": "red"}, "VectorIndexError"),  # a text for a model of images
])
def test_bad_searches_are_shown_on_the_page_with_400(shop, params, message):
    _, client = shop
    page = client.get(SEARCH, params=params)
    assert page.status_code == 400, page.text
    assert 'role="alert"' in page.text and message in page.text
    assert "internal error" not in page.text


def test_bad_uploads_are_400(shop):
    _, client = shop
    not_an_image = client.post(SEARCH, headers={"Origin": BASE}, data={"name": "photos"},
                               files={"image": ("q.png", b"not a png", "image/png")})
    assert not_an_image.status_code == 400 and "not an image" in not_an_image.text
    no_file = client.post(SEARCH, headers={"Origin": BASE}, data={"name": "photos"},
                          files={"image": ("", b"", "application/octet-stream")})
    assert no_file.status_code == 400 and "choose an image" in no_file.text
    too_big = client.post(SEARCH, headers={"Origin": BASE}, data={"name": "photos"},
                          files={"image": ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 70000), "image/png")})
    assert too_big.status_code == 400 and "over the" in too_big.text
    not_a_form = client.post(SEARCH, headers={"Origin": BASE, "Content-Type": "application/json"}, content=b"{}")
    assert not_a_form.status_code == 400
    assert client.get(SEARCH, params={"name": "missing", "like": "x"}).status_code == 404
    assert client.get(SEARCH, params={"name": "texts", "like": "t0", "n": 0}).status_code == 400


def test_form_parts_reads_fields_and_files():
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nphotos\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG\r\n\x00\xff" + f"\r\n--{boundary}--\r\n".encode()
    parts = form_parts(body, f"multipart/form-data; boundary={boundary}")
    assert parts == {"name": "photos", "image": ("a.png", b"\x89PNG\r\n\x00\xff")}
