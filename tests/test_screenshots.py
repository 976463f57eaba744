"""The README's screenshots generator (scripts/screenshots) end to end: a real demo warehouse, the UI served on
127.0.0.1, headless chromium saving each page; every PNG is checked to be a real picture of the page.

Skipped (with the reason) where chromium, playwright or Pillow is missing, except under CI (``$CI`` set), where that
is a failure, as in tests/test_browser.py.
"""

from __future__ import annotations

import os

import pytest

from mlwarehouse.testing import screenshots

_why = screenshots.missing()
if _why and os.environ.get("CI"):
    pytest.fail(f"the screenshots test cannot run under CI: {_why}", pytrace=False)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=_why or "")]

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_warehouse_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MLW_") and name != "MLW_CHROMIUM":
            monkeypatch.delenv(name)


def test_every_page_is_saved_as_a_drawn_png_1280_wide(tmp_path):
    from PIL import Image
    out = tmp_path / "images"
    saved = screenshots.generate(out, epochs=2)
    assert sorted(saved) == sorted(screenshots.PAGES)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.png" for name in screenshots.PAGES)
    for name, path in saved.items():
        assert path == out / f"{name}.png" and path.read_bytes()[:8] == PNG, name
        assert 5_000 < path.stat().st_size < 300_000, (name, path.stat().st_size)
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width == screenshots.WIDTH, (name, image.size)
            assert screenshots.HEIGHT <= image.height <= screenshots.TALLEST, (name, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert len(colours) > 50, (name, len(colours))  # text, tables and charts, not a blank or flat page
            # no colour covers nearly all of it (an empty page is its background and little else)
            assert max(n for n, _ in colours) < 0.97 * image.width * image.height, name
