"""What the browser tests and the screenshots share: where chromium is, why a browser cannot run here, the UI served
by uvicorn in a thread on 127.0.0.1, and a page that fails on any JavaScript error."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from mlwarehouse.testing.processes import HOST, free_port

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "missing", "serve_ui", "launch", "open_page"]

CHROMIUM = os.environ.get("MLW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def missing(modules: Sequence[str] = ("playwright", "fastapi", "uvicorn")) -> str | None:
    """Why a browser cannot be driven here (a module or chromium missing), or None."""
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[dev,torch]')"
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    return None


def serve_ui(wh, *, writable: bool = False) -> tuple[str, Callable[[], None]]:
    """Serve ``wh``'s UI with uvicorn on 127.0.0.1 and a free port, in a thread; returns (base URL, stop)."""
    import uvicorn

    from mlwarehouse.web import create_app
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(wh, writable=writable), host=HOST, port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the UI server did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
    return f"http://{HOST}:{port}", stop


def launch(playwright):
    """Headless chromium (Debian's, or ``$MLW_CHROMIUM``) from a started Playwright."""
    return playwright.chromium.launch(executable_path=shutil.which(CHROMIUM) or CHROMIUM, headless=True,
                                      args=CHROMIUM_ARGS)


@contextmanager
def open_page(browser, width: int = 1280, height: int = 900) -> Iterator:
    """A page in a fresh context of ``width`` x ``height``; AssertionError at the end if a script raised."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors: {errors}"
