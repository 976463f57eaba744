"""MongoDB connections shared by the MongoDB index and the GridFS blob store: URIs, clients, error mapping.

A :class:`Connection` holds one pymongo client per process (a client must not cross a ``fork``), pings the
server when it is created so that a wrong address or wrong credentials fail at once (within ``timeout``
seconds), and maps driver errors to :mod:`mlwarehouse.errors` in :func:`map_error`, the one place this is done.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

from mlwarehouse.errors import (
    BackendError,
    ConfigError,
    DuplicateKey,
    IntegrityError,
    InvalidDocument,
    NotFound,
    Unavailable,
    WarehouseError,
)

try:
    import bson
    import gridfs.errors
    import pymongo
    from pymongo import errors as perr
except ImportError as exc:  # pragma: no cover - the optional dependency is missing
    raise ConfigError("the MongoDB backends need pymongo: pip install 'mlwarehouse[mongo]'") from exc

__all__ = ["DEFAULT_DATABASE", "describe_uri", "map_error", "Connection"]

DEFAULT_DATABASE = "mlwarehouse"


def describe_uri(uri: str) -> tuple[str, str | None, str]:
    """``(host:port list, user or None, database)`` of a MongoDB URI, without resolving anything."""
    parts = urlsplit(uri)
    if parts.scheme not in ("mongodb", "mongodb+srv"):
        raise ConfigError(f"not a MongoDB URI: {uri!r} (use mongodb://host:port/database)")
    netloc = parts.netloc
    user = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        user = unquote(auth.split(":", 1)[0]) or None
    if not netloc:
        raise ConfigError(f"{uri!r} names no host (use mongodb://host:port/database)")
    hosts = ",".join(h if ":" in h or parts.scheme == "mongodb+srv" else f"{h}:27017" for h in netloc.split(","))
    database = unquote(parts.path.lstrip("/")) or DEFAULT_DATABASE
    return hosts, user, database


def map_error(exc: BaseException, *, where: str, user: str | None = None) -> WarehouseError:
    """Translate a driver error into :mod:`mlwarehouse.errors`."""
    if isinstance(exc, WarehouseError):
        return exc
    if isinstance(exc, perr.OperationFailure) and (exc.code in (18, 13) or "auth" in str(exc).lower()):
        if user:
            return Unavailable(f"MongoDB at {where} refused user {user!r}: check username/password (and authSource) "
                               f"({exc})")
        return Unavailable(f"MongoDB at {where} requires authentication: pass a username and password ({exc})")
    if isinstance(exc, perr.DuplicateKeyError):
        return DuplicateKey(f"MongoDB at {where}: duplicate key: {exc}")
    if isinstance(exc, perr.ConfigurationError):
        return ConfigError(f"MongoDB URI for {where}: {exc}")
    if isinstance(exc, (perr.ServerSelectionTimeoutError, perr.ConnectionFailure)):
        first = str(exc).split(", Timeout:")[0]
        return Unavailable(f"cannot reach MongoDB at {where}: is the server running and the host:port right? "
                           f"({first})")
    if isinstance(exc, (bson.errors.InvalidDocument, bson.errors.InvalidStringData, UnicodeEncodeError)):
        return InvalidDocument(f"MongoDB cannot store a value: {exc}")
    if isinstance(exc, gridfs.errors.NoFile):  # a GridFS file removed by another writer meanwhile
        return NotFound(f"MongoDB at {where}: {exc}")
    if isinstance(exc, gridfs.errors.CorruptGridFile):
        return IntegrityError(f"MongoDB at {where}: a damaged GridFS file: {exc}")
    if isinstance(exc, perr.PyMongoError):
        return BackendError(f"MongoDB at {where}: {exc}")
    return BackendError(f"MongoDB at {where}: {type(exc).__name__}: {exc}")


class Connection:
    """A database on a MongoDB server, reachable from any thread and any (forked) process."""

    def __init__(self, uri: str, *, database: str | None = None, timeout: float = 3.0, what: str = "MongoDB"):
        self.uri = uri
        self.where, self.user, default_db = describe_uri(uri)
        self.database = database or default_db
        self.timeout = timeout
        self._lock = threading.Lock()
        self._client: pymongo.MongoClient | None = None
        self._pid = 0
        self._closed = False
        self._what = what
        try:
            with self.errors():
                self.db().command("ping")
        except WarehouseError:
            self.close()
            raise
        except Exception as exc:  # a server that answers authentication with something the driver cannot parse
            self.close()
            if self.user:
                raise Unavailable(f"MongoDB at {self.where} could not authenticate user {self.user!r}: check "
                                  "username/password, and that the server has authentication enabled "
                                  f"({type(exc).__name__}: {exc})") from exc
            raise BackendError(f"MongoDB at {self.where}: {type(exc).__name__}: {exc}") from exc

    @property
    def client(self) -> pymongo.MongoClient:
        if self._closed:
            raise BackendError(f"the {self._what} at {self.where} is closed")
        if self._pid != os.getpid():  # first use, or a forked child
            with self._lock:
                if self._pid != os.getpid():
                    ms = int(self.timeout * 1000)
                    self._client = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms,
                                                       document_class=dict, connect=False)
                    self._pid = os.getpid()
        return self._client

    def db(self):
        return self.client[self.database]

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except (perr.PyMongoError, bson.errors.BSONError, UnicodeEncodeError) as exc:
            raise map_error(exc, where=self.where, user=self.user) from exc

    def drop_database(self) -> None:
        """Remove the whole database (tests)."""
        with self.errors():
            self.client.drop_database(self.database)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None
