"""Request checks in front of every route: the ``Host`` header, and the origin of requests that change things.

The UI has no authentication and usually listens on loopback, so what protects it is that a browser's other tabs
cannot talk to it. A DNS-rebinding page (``evil.example`` re-resolved to 127.0.0.1) is same-origin with the UI
unless the UI refuses ``Host`` names it was not started for: only loopback names by default (``localhost``,
``127.0.0.1``, ``[::1]``, any port), others by name (``allowed_hosts``, ``"*"`` for any). A request that is not
GET/HEAD/OPTIONS must also come from the UI's own pages: its ``Origin`` (or, without one, its ``Referer``) must
name the same host and port, or ``Sec-Fetch-Site`` must say ``same-origin``; else 403.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.responses import PlainTextResponse

__all__ = ["LOOPBACK", "HostGuard", "host_name"]

LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
_SAFE = {"GET", "HEAD", "OPTIONS"}


def host_name(host: str) -> str:
    """The name of a ``Host`` value without its port, lower-case (``[::1]:8765`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostGuard:
    """ASGI middleware: 400 for a ``Host`` not allowed, 403 for a cross-site write."""

    def __init__(self, app, allowed_hosts: Iterable[str] | None = None):
        self.app = app
        names = list(LOOPBACK if allowed_hosts is None else allowed_hosts)
        self.any_host = "*" in names
        self.allowed = {host_name(n) for n in names if n != "*"}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get("host", "")
        if not host or (not self.any_host and host_name(host) not in self.allowed):
            response = PlainTextResponse(f"host {host!r} is not served here (start the UI with --allow-host "
                                         "to serve another name)", status_code=400)
            return await response(scope, receive, send)
        if scope["type"] == "http" and scope.get("method", "GET") not in _SAFE and not _same_origin(headers, host):
            response = PlainTextResponse("cross-site request refused: changes must come from the UI's own pages",
                                         status_code=403)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _same_origin(headers: dict[str, str], host: str) -> bool:
    site = headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return False
    source = headers.get("origin") or headers.get("referer")
    if source is None or source == "null":
        return site == "same-origin"
    netloc = urlsplit(source).netloc.lower()
    return netloc == host.strip().lower()
