"""The web UI (``mlw ui``): runs, curves, leaderboards, the task board and dataset previews, served by FastAPI.

Needs the ``ui`` extra (``pip install mlwarehouse[ui]``). Binds to 127.0.0.1 and is read-only by default.
"""

from __future__ import annotations

import gc

__all__ = ["create_app", "serve"]


def create_app(warehouse, *, writable: bool = False, allowed_hosts=None):
    """The ASGI app of the UI for ``warehouse`` (see :mod:`mlwarehouse.web.app`); ``allowed_hosts`` are the
    ``Host`` names it answers (default: loopback names; see :mod:`mlwarehouse.web.guard`)."""
    try:
        from mlwarehouse.web.app import create_app as _create_app
    except ImportError as exc:
        from mlwarehouse.errors import ConfigError
        raise ConfigError(f"the web UI needs its extra ({exc.name} is missing): pip install 'mlwarehouse[ui]'") from exc
    return _create_app(warehouse, writable=writable, allowed_hosts=allowed_hosts)


def serve(warehouse, host: str = "127.0.0.1", port: int = 8765, writable: bool = False,
          allowed_hosts=None) -> None:
    """Serve the UI until interrupted. Only bind to another host than 127.0.0.1 on a network you trust:
    the UI has no authentication. ``allowed_hosts`` (``mlw ui --allow-host``): ``Host`` names served besides
    the loopback names and the bound address."""
    try:
        import uvicorn
    except ImportError as exc:
        from mlwarehouse.errors import ConfigError
        raise ConfigError("the web UI needs its extra: pip install 'mlwarehouse[ui]'") from exc
    from mlwarehouse.web.guard import LOOPBACK
    names = [*LOOPBACK, *(allowed_hosts or ())]
    if host not in ("0.0.0.0", "::", ""):
        names.append(f"[{host}]" if ":" in host else host)
    app = create_app(warehouse, writable=writable, allowed_hosts=names)
    # The serving process's start-up objects (modules, the warehouse) stay for its life: frozen, the collector's
    # full passes skip them (on a 1,000-row runs page, one request in three paid ~25 ms for such a pass)
    gc.collect()
    gc.freeze()
    print(f"mlwarehouse UI on http://{host}:{port}/ ({'writable' if writable else 'read-only'}); Ctrl-C stops it",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
