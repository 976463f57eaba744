"""A local MongoDB wire-protocol server for the tests: ``nx-27017`` (PyPI), on 127.0.0.1 with a free port.

No real ``mongod`` is needed: nx-27017 speaks the wire protocol over SQLite files kept in a temporary folder
(one file per database). It is started as ``python -m nx_27017.nx_27017`` in its own session and stopped by its
process id (:func:`mlwarehouse.testing.processes.stop`). It has no authentication, and its query engine has bugs
(``$addToSet`` on a missing field, ``true == 1``, range queries that skip array elements); the MongoDB backend
works around them, so the same tests pass on it and on a real server.

Tests use the session fixture :func:`mongo_server`: the server named by ``$MLW_TEST_MONGO_URI`` if set (a real
MongoDB), else an nx-27017 it starts itself. Where nx-27017 is not installed the Mongo tests are skipped, except
in CI (``CI=true``), where a server that cannot start fails the run. :func:`fresh_uri` gives each test its own
database on that server.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mlwarehouse.testing.processes import HOST, Server, ServerError, free_port, in_ci, launch, port_open, session_server

__all__ = ["start_nx27017", "have_nx27017", "mongo_server", "fresh_uri"]


def have_nx27017() -> bool:
    return importlib.util.find_spec("nx_27017") is not None


def start_nx27017(*, timeout: float = 30.0, data_dir: str | None = None) -> Server:
    """Start nx-27017 on 127.0.0.1 with a fresh data folder (or the folder of a server that was stopped without
    :func:`~mlwarehouse.testing.processes.stop`, to restart it on its files); ``uri`` is
    ``mongodb://127.0.0.1:PORT/``."""
    if not have_nx27017():
        raise ServerError("the nx-27017 server is not installed: pip install nx-27017 (the dev extra)")
    data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="mlw-nx27017-"))
    (data_dir / "data").mkdir(exist_ok=True)
    (data_dir / "nx.pid").unlink(missing_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "nx_27017.nx_27017", "--data-dir", str(data_dir / "data"), "--host", HOST,
           "--port", str(port), "--pid-file", str(data_dir / "nx.pid"), "--log-file", str(data_dir / "nx.log")]
    uri = f"mongodb://{HOST}:{port}/"
    server = Server("nx27017", 0, str(data_dir), uri, {"MLW_TEST_MONGO_URI": uri})

    def ready() -> bool:
        if not port_open(port):
            return False
        import pymongo
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=1000)
        try:
            client.admin.command("ping")
        finally:
            client.close()
        return True

    return launch(server, cmd, data_dir / "output.log", ready, timeout=timeout, what="nx-27017", cwd=data_dir)


def fresh_uri(base: str, prefix: str = "mlwt") -> str:
    """``base`` with a new, unused database name in its path (query options kept; a user keeps authenticating
    against the database ``base`` named, or ``admin``)."""
    parts = urlsplit(base)
    query = parts.query
    if "@" in parts.netloc and "authsource=" not in query.lower():
        source = parts.path.strip("/") or "admin"
        query = f"{query}&authSource={source}" if query else f"authSource={source}"
    return urlunsplit((parts.scheme, parts.netloc, f"/{prefix}_{secrets.token_hex(5)}", query, ""))


try:
    import pytest
except ImportError:  # the server starter works without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def mongo_server() -> Iterator[str]:
        """The URI of a MongoDB(-compatible) server for this test session."""
        def start() -> Server:
            if not in_ci() and (importlib.util.find_spec("pymongo") is None or not have_nx27017()):
                pytest.skip("no MongoDB server: install pymongo and nx-27017 (pip install -e '.[dev]') "
                            "or set MLW_TEST_MONGO_URI")
            return start_nx27017()  # in CI a failure here is an error, never a skip

        yield from session_server(os.environ.get("MLW_TEST_MONGO_URI") or None, start)
