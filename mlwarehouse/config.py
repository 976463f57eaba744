"""Where a warehouse lives: URIs, environment variables and defaults.

Resolution order for the index: the ``uri`` argument, ``$MLW_URI``, then the embedded default in ``$MLW_HOME``
or ``./.mlwarehouse``. For blobs: the ``blobs`` argument, ``$MLW_BLOBS``, then the backend's natural partner
(a ``blobs/`` folder beside an SQLite file).

Index URIs: ``sqlite:///abs/path/index.sqlite``, ``sqlite:relative/path.sqlite``, or a plain folder path (the
embedded layout: ``<folder>/index.sqlite`` + ``<folder>/blobs``), ``postgresql://...`` or ``mongodb://...``.
Blob URIs: ``file:///abs/path`` or a folder path, ``s3://bucket/prefix?endpoint_url=...`` or ``mongodb://...``
(GridFS). ``cache_dir=/local/folder`` in an ``s3://`` URI puts a 1 GiB local read cache in front of the bucket
(:class:`~mlwarehouse.blobs.cache.CachedBlobStore`). GridFS has none by default: it sits beside the MongoDB index,
which every reader already reaches, and a cache needs a folder and disk space the user chooses (wrap it in a
``CachedBlobStore`` for a far server).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlparse

from mlwarehouse.errors import ConfigError

__all__ = ["Settings", "resolve", "open_index", "open_blobs", "DEFAULT_HOME"]

DEFAULT_HOME = ".mlwarehouse"
_POSTGRES_SCHEMES = ("postgresql", "postgres")
#: libpq's "host=... dbname=..." form, which would otherwise name a folder
_CONNINFO = re.compile(r"^\s*(host|hostaddr|port|dbname|user|password|service|sslmode|options)\s*=\S*(\s+\w+\s*=|\s*$)")
_MONGO_SCHEMES = ("mongodb", "mongodb+srv")  # a MongoDB URI names the index and, by default, GridFS blobs there


@dataclass(frozen=True)
class Settings:
    index_uri: str
    blobs_uri: str


def _home(home: str | os.PathLike | None) -> Path:
    return Path(home or os.environ.get("MLW_HOME") or DEFAULT_HOME).expanduser().absolute()


def _sqlite_path(uri: str) -> Path | None:
    """The file an SQLite URI or plain path names, or None if ``uri`` is not an SQLite location."""
    if uri.startswith("sqlite:"):
        rest = uri[len("sqlite:"):]
        if rest.startswith("///"):
            return Path(unquote(rest[2:]))
        if rest.startswith("//"):
            raise ConfigError(f"{uri!r}: write sqlite:///absolute/path or sqlite:relative/path")
        return Path(unquote(rest)).absolute()
    if "://" in uri:
        return None
    if _CONNINFO.match(uri):  # not a folder: never make one named after a password
        raise ConfigError("the index location looks like a PostgreSQL key=value connection string; write it as a "
                          "URI: postgresql://user:password@host:port/dbname")
    path = Path(uri).expanduser().absolute()
    return path / "index.sqlite" if path.suffix not in (".sqlite", ".db", ".sqlite3") else path


def resolve(uri: str | None = None, blobs: str | None = None, home: str | os.PathLike | None = None) -> Settings:
    """Turn arguments, environment and defaults into concrete URIs."""
    index_uri = uri or os.environ.get("MLW_URI") or str(_home(home))
    blobs_uri = blobs or os.environ.get("MLW_BLOBS")
    if not blobs_uri:
        path = _sqlite_path(index_uri)
        if path is None and urlparse(index_uri).scheme in _MONGO_SCHEMES:
            return Settings(index_uri=index_uri, blobs_uri=index_uri)
        if path is None and urlparse(index_uri).scheme in _POSTGRES_SCHEMES:
            raise ConfigError("a PostgreSQL index has no default blob store: pass blobs=... (e.g. "
                              "s3://bucket/prefix or a shared folder) or set MLW_BLOBS")
        if path is None:
            raise ConfigError(f"{index_uri!r} needs a blob store: pass blobs=... or set MLW_BLOBS")
        blobs_uri = str(path.parent / "blobs")
    return Settings(index_uri=index_uri, blobs_uri=blobs_uri)


def open_index(uri: str):
    """Open the index backend a URI names."""
    path = _sqlite_path(uri)
    if path is not None:
        from mlwarehouse.index.sqlite import SQLiteIndex
        _folder(path.parent, f"the folder of the SQLite index {path}")
        return SQLiteIndex(path)
    scheme = urlparse(uri).scheme
    if scheme in _POSTGRES_SCHEMES:
        from mlwarehouse.index.postgres import PostgresIndex
        return PostgresIndex(uri)
    if scheme in _MONGO_SCHEMES:
        from mlwarehouse.index.mongo import MongoIndex
        return MongoIndex(uri)
    raise ConfigError(f"no index backend for {scheme!r} URIs ({uri!r}): use an SQLite file or folder, "
                      "postgresql://... or mongodb://...")


def open_blobs(uri: str):
    """Open the blob backend a URI names (behind a local read cache if an ``s3://`` URI asks for one)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        from mlwarehouse.blobs.files import FileBlobStore
        root = Path(unquote(parsed.path) if parsed.scheme == "file" else uri).expanduser().absolute()
        return FileBlobStore(_folder(root, "the blob folder"))
    if parsed.scheme == "s3":
        from mlwarehouse.blobs.s3 import S3BlobStore
        query = parse_qsl(parsed.query)
        cache_dir = dict(query).get("cache_dir")
        if cache_dir is None:
            return S3BlobStore(uri)
        rest = parsed._replace(query=urlencode([(k, v) for k, v in query if k != "cache_dir"])).geturl()
        return _cached(S3BlobStore(rest), cache_dir)
    if parsed.scheme in _MONGO_SCHEMES:
        from mlwarehouse.blobs.gridfs import GridFSBlobStore
        return GridFSBlobStore(uri)
    raise ConfigError(f"no blob backend for {parsed.scheme!r} URIs ({uri!r}); use a folder, s3://bucket/prefix "
                      f"or mongodb://host/database")


def _folder(path: Path, what: str) -> Path:
    """``path`` made a folder if it is not one; ConfigError naming it when it cannot be (a file, or one above it).

    A folder that exists is left alone, so a read-only one still opens for reading.
    """
    if path.is_dir():
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else exc.strerror or str(exc)
        raise ConfigError(f"cannot use {what} {path}: {why} (check MLW_HOME, MLW_URI and MLW_BLOBS)") from exc
    return path


def _cached(store, cache_dir: str):
    """``store`` behind a local read cache of 1 GiB in ``cache_dir`` (closed again if the cache cannot open)."""
    from mlwarehouse.blobs.cache import CachedBlobStore
    try:
        return CachedBlobStore(store, Path(cache_dir).expanduser())
    except BaseException:
        store.close()
        raise
