"""The collection pages through FastAPI's TestClient: documents with previews, listeners' progress, failed
outputs (escaped), thumbnails, WAV audio, and stored data treated as untrusted."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from fastapi.testclient import TestClient  # noqa: E402

from mlwarehouse.collections import Audio, ListenerError  # noqa: E402
from mlwarehouse.web import create_app  # noqa: E402

BASE = "http://localhost"
PAGE = "/p/shop/collection"
N = 4
EVIL = "<script>alert('pwned')</script>"


def explode(value):
    """A listener model that always fails, with markup in its message."""
    raise ValueError(f"cannot embed {EVIL}")


def encode_point(point) -> bytes:
    return np.asarray(point, np.float64).tobytes()


def decode_point(data: bytes):
    raise AssertionError("the UI must never decode a user type")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    import mlwarehouse
    wh = mlwarehouse.connect(home=tmp_path_factory.mktemp("webc") / "wh")
    c = wh.project("shop").collection("items")
    c.register_type("point", encode_point, decode_point)
    from mlwarehouse.collections import Encoded
    docs = []
    for i in range(N):
        image = Image.new("RGB", (300 + i, 200), (255, 10 * i, 0))
        clip = Audio((np.sin(np.arange(800) / 10) * 0.5).astype(np.float32), 8000)
        docs.append({"_id": f"item{i}", "price": 10 - i, "name": f"{EVIL} {i}", "photo": image, "clip": clip,
                     "x": torch.full((4,), float(i)), "raw": b"\x00" * (100 + i),
                     "where": Encoded("point", encode_point([i, i]))})
    c.insert_many(docs)
    c.attach("embed", torch.nn.Linear(4, 2), key="x")
    with pytest.raises(ListenerError):
        c.attach("broken", explode, key="price")
    client = TestClient(create_app(wh), base_url=BASE)
    yield wh, c, client
    wh.close()


def test_the_collections_page_lists_collections_with_counts_and_progress(shop):
    _, _, client = shop
    page = client.get("/p/shop/collections")
    assert page.status_code == 200
    assert 'href="/p/shop/collection?name=items"' in page.text
    assert f"<code>embed</code> on <code>x</code> (inline):\n{N} / 0 / 0 / 0" in page.text
    assert f"<code>broken</code> on <code>price</code> (inline):\n0 / 0 / {N} / 0" in page.text
    assert 'href="/p/shop/collections"' in client.get("/").text  # linked from the project list and the nav
    assert 'href="/p/shop/collections"' in page.text
    assert client.get("/p/nowhere/collections").status_code == 404


def test_the_collection_page_shows_documents_previews_and_listener_progress(shop):
    _, _, client = shop
    page = client.get(PAGE, params={"name": "items"})
    assert page.status_code == 200, page.text
    text = page.text
    for i in range(N):
        assert f"<code>item{i}</code>" in text
    assert "tensor float32[4]" in text and "tensor float32[2]" in text  # the input and the listener's output
    assert "100 bytes" in text
    assert "Encoded(&#39;point&#39;, 16 bytes)" in text  # never decoded
    assert 'class="thumb" src="/api/p/shop/collection/image?name=items&amp;id=item0&amp;field=photo"' in text
    assert '<audio controls preload="none" src="/api/p/shop/collection/audio?name=items&amp;id=item0&amp;field=clip"' \
        in text
    assert "image 300x200 RGB" in text
    assert f'<td class="num">{N}</td><td class="num">0</td>' in text  # embed: done, pending
    assert EVIL not in text and "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; 0" in text


def test_failed_outputs_show_their_errors_escaped(shop):
    _, _, client = shop
    text = client.get(PAGE, params={"name": "items"}).text
    section = text[text.index('data-listener="broken"'):]
    assert "Failed outputs of broken" in section
    assert section.count("<details>") == N
    assert "ValueError: cannot embed &lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in section
    assert "<script>" not in text


def test_the_page_filters_sorts_pages_and_shows_bad_queries_inline(shop):
    _, _, client = shop
    page = client.get(PAGE, params={"name": "items", "q": '{"price": {"$lt": 9}}', "sort": "price:1", "limit": 1})
    assert page.status_code == 200
    table = page.text[page.text.index('<table id="documents">'):]
    assert "<code>item3</code>" in table and "<code>item2</code>" not in table
    assert "next 1" in page.text and "1–1 of 2" in page.text
    bad = client.get(PAGE, params={"name": "items", "q": "{nope"})
    assert bad.status_code == 400 and 'role="alert"' in bad.text
    assert client.get(PAGE, params={"name": "missing"}).status_code == 404


def test_the_thumbnail_endpoint_serves_a_small_png(shop):
    _, _, client = shop
    r = client.get("/api/p/shop/collection/image", params={"name": "items", "id": "item1", "field": "photo"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "PNG" and max(thumb.size) == 128 and thumb.size[1] < 128
    assert thumb.convert("RGB").getpixel((5, 5)) == (255, 10, 0)


def test_the_audio_endpoint_serves_wav(shop):
    _, c, client = shop
    r = client.get("/api/p/shop/collection/audio", params={"name": "items", "id": "item2", "field": "clip"})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(r.content)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 800)
        pcm = np.frombuffer(w.readframes(800), "<i2")
    expected = c.find_one({"_id": "item2"}, {"clip": 1})["clip"].samples
    assert np.abs(pcm / 32767 - expected).max() < 1e-3


@pytest.mark.parametrize("params, status", [
    ({"name": "items", "id": "item0", "field": "price"}, 400),    # not an image
    ({"name": "items", "id": "item0", "field": "where"}, 400),    # a user type: never decoded
    ({"name": "items", "id": "nope", "field": "photo"}, 404),
    ({"name": "items", "id": "item0", "field": "missing"}, 404),
    ({"name": "items", "id": "item0", "field": "a..b"}, 400),
    ({"name": "other", "id": "item0", "field": "photo"}, 404),
])
def test_media_endpoints_refuse_what_is_not_there(shop, params, status):
    _, _, client = shop
    r = client.get("/api/p/shop/collection/image", params=params)
    assert r.status_code == status, r.text
    assert "error" in r.json()


def test_a_decompression_bomb_is_not_decoded(shop, monkeypatch):
    _, _, client = shop
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # every stored photo is now "too large"
    page = client.get(PAGE, params={"name": "items"})
    assert page.status_code == 200 and "unreadable image" in page.text and "decompression bomb" in page.text
    r = client.get("/api/p/shop/collection/image", params={"name": "items", "id": "item0", "field": "photo"})
    assert r.status_code == 400


def test_the_host_guard_covers_the_collection_pages(shop):
    wh, _, _ = shop
    evil = TestClient(create_app(wh), base_url="http://evil.example")
    assert evil.get(PAGE, params={"name": "items"}).status_code == 400
    assert evil.get("/api/p/shop/collection/audio", params={"name": "items", "id": "item0",
                                                            "field": "clip"}).status_code == 400
