"""Blobs in MongoDB's GridFS, beside the MongoDB index: one GridFS file per blob, named by its key.

A blob's bytes are a GridFS file (bucket ``mlw_blobs`` by default) whose ``filename`` is the key and whose
``metadata.mtime`` is the time of the last put (servers differ in how they store ``uploadDate``, and some cannot
change it; metadata they all keep). Reads fetch chunks by number, a window at a time, so a range read touches
only its chunks and no reply outgrows the server's message limit; every read is checked (chunk numbers and
lengths, and for whole blobs the sha256 key), raising IntegrityError rather than returning bad bytes.

Puts are idempotent: an existing blob only gets its mtime refreshed. Two writers putting the same new bytes at
once may both upload; afterwards each keeps only the oldest copy (lowest file id), and readers always read that
one, so a duplicate never outlives the race and never changes what is read. Streamed puts (:meth:`put_file`)
upload under a temporary name while hashing, then rename the file to its key (temporary files older than an
hour, left by a crashed writer, are removed by :meth:`list`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, BinaryIO

from mlwarehouse.blobs.base import BlobInfo, BlobStore, blob_key, check_key
from mlwarehouse.blobs.common import STALE_TMP_S, HashingReader, verified
from mlwarehouse.drivers.mongo import Connection
from mlwarehouse.errors import IntegrityError, NotFound

import gridfs  # noqa: E402  # isort: skip  (after drivers.mongo, which explains a missing pymongo)

__all__ = ["GridFSBlobStore"]

_TMP = "tmp-"
_WINDOW = 8 << 20  # bytes of chunks fetched per query when reading


def _mtime(doc: dict) -> float:
    meta = doc.get("metadata") or {}
    if isinstance(meta.get("mtime"), (int, float)):
        return float(meta["mtime"])
    stamp = doc.get("uploadDate")
    if isinstance(stamp, str):  # some wire-compatible servers return the date as ISO text
        stamp = datetime.fromisoformat(stamp)
    if isinstance(stamp, datetime):
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()
    return 0.0


class GridFSBlobStore(BlobStore):
    """Content-addressed blobs in GridFS, in the database a ``mongodb://`` URI names."""

    name = "gridfs"

    def __init__(self, uri: str, *, bucket: str = "mlw_blobs", database: str | None = None, timeout: float = 3.0):
        self.conn = Connection(uri, database=database, timeout=timeout, what="GridFS blob store")
        self.bucket_name = bucket
        self._pid = 0
        self._bucket: gridfs.GridFSBucket | None = None
        with self.conn.errors():
            self._files.create_index("filename")

    def __repr__(self) -> str:
        return f"GridFSBlobStore({self.conn.where!r}, database={self.conn.database!r}, bucket={self.bucket_name!r})"

    @property
    def bucket(self) -> gridfs.GridFSBucket:
        if self._pid != os.getpid():
            self._bucket = gridfs.GridFSBucket(self.conn.db(), bucket_name=self.bucket_name)
            self._pid = os.getpid()
        return self._bucket

    @property
    def _files(self):
        return self.conn.db()[f"{self.bucket_name}.files"]

    def _copies(self, key: str) -> list[dict]:
        """The GridFS files holding ``key``, oldest (the one read) first."""
        docs = list(self._files.find({"filename": key}, {"_id": 1, "length": 1, "uploadDate": 1, "metadata": 1}))
        return sorted(docs, key=lambda d: d["_id"])

    def _file(self, key: str) -> dict:
        check_key(key)
        copies = self._copies(key)
        if not copies:
            raise NotFound(f"no blob {key} in GridFS bucket {self.bucket_name!r} at {self.conn.where}")
        return copies[0]

    def _refresh(self, copies: list[dict]) -> None:
        now = time.time()
        for doc in copies:
            self._files.update_one({"_id": doc["_id"]}, {"$set": {"metadata": {"mtime": now}}})

    @staticmethod
    def _intact(copies: list[dict], size: int) -> bool:
        """Whether every copy has the blob's size (one truncated by a crash is replaced by the put, not
        trusted; the bytes of one of the right size are not read back, which would cost a download)."""
        return all(int(d["length"]) == size for d in copies)

    def _drop_damaged(self, copies: list[dict], size: int) -> None:
        """After the good copy is stored: remove the copies of the wrong size, so a read never meets one."""
        for doc in copies:
            if int(doc["length"]) != size:
                self._delete_file(doc["_id"])

    def _keep_oldest(self, key: str, mine: Any) -> None:
        """After an upload: if another writer stored the same key first, drop our copy."""
        copies = self._copies(key)
        if copies and copies[0]["_id"] != mine and any(d["_id"] == mine for d in copies):
            self._delete_file(mine)

    def _delete_file(self, file_id: Any) -> None:
        """Remove one GridFS file (its chunks too); one that someone else removed meanwhile is gone already."""
        try:
            self.bucket.delete(file_id)
        except gridfs.errors.NoFile:
            pass

    # -- writes --------------------------------------------------------------------------------------------
    def put(self, data: bytes | bytearray | memoryview) -> str:
        key = blob_key(data)
        with self.conn.errors():
            size = memoryview(data).nbytes
            copies = self._copies(key)
            if copies and self._intact(copies, size):
                self._refresh(copies)
                return key
            file_id = self.bucket.upload_from_stream(key, bytes(data), metadata={"mtime": time.time()})
            self._drop_damaged(copies, size)
            self._keep_oldest(key, file_id)
        return key

    def _put_stream(self, source: BinaryIO) -> tuple[str, int]:
        """Stream a file object into GridFS under a temporary name while hashing it, then rename; ``(key, size)``."""
        reader = HashingReader(source)
        with self.conn.errors():
            tmp_name = f"{_TMP}{os.urandom(8).hex()}"
            file_id = self.bucket.upload_from_stream(tmp_name, reader, metadata={"mtime": time.time()})
            key = reader.hexdigest()
            copies = self._copies(key)
            if copies and self._intact(copies, reader.size):
                self._delete_file(file_id)
                self._refresh(copies)
                return key, reader.size
            self.bucket.rename(file_id, key)
            self._drop_damaged(copies, reader.size)
            self._keep_oldest(key, file_id)
        return key, reader.size

    def delete(self, key: str) -> bool:
        check_key(key)
        with self.conn.errors():
            copies = self._copies(key)
            for doc in copies:
                self._delete_file(doc["_id"])
        return bool(copies)

    # -- reads ---------------------------------------------------------------------------------------------
    def _read(self, doc: dict, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a GridFS file, fetched a window of chunks at a time (a single cursor over
        every chunk can exceed a server's message size), each chunk checked for its place and length."""
        size, chunk_size = int(doc["length"]), int(doc["chunkSize"])
        end = min(end, size)
        if start >= end:
            return b""
        first, last = start // chunk_size, (end - 1) // chunk_size
        window = max(1, _WINDOW // chunk_size)
        chunks = self.conn.db()[f"{self.bucket_name}.chunks"]
        out = bytearray()
        for low in range(first, last + 1, window):
            high = min(low + window, last + 1)
            got = sorted(chunks.find({"files_id": doc["_id"], "n": {"$gte": low, "$lt": high}}, {"n": 1, "data": 1}),
                         key=lambda c: c["n"])
            if [c["n"] for c in got] != list(range(low, high)):
                raise IntegrityError(f"blob {key} in GridFS bucket {self.bucket_name!r} is damaged: chunks "
                                     f"{low}..{high - 1} came back as {[c['n'] for c in got]}")
            for c in got:
                expected = min(chunk_size, size - c["n"] * chunk_size)
                if len(c["data"]) != expected:
                    raise IntegrityError(f"blob {key} in GridFS bucket {self.bucket_name!r} is damaged: chunk "
                                         f"{c['n']} holds {len(c['data'])} bytes, not {expected}")
                out += c["data"]
        offset = start - first * chunk_size
        return bytes(out[offset:offset + end - start])

    def get(self, key: str) -> bytes:
        with self.conn.errors():
            doc = self._file(key)
            data = self._read(doc, key, 0, int(doc["length"]))
        return verified(key, data, f"its file in GridFS bucket {self.bucket_name!r}")

    def _read_range(self, key: str, start: int, length: int) -> bytes:
        with self.conn.errors():
            doc = self._file(key)
            return self._read(doc, key, start, start + length)

    def exists(self, key: str) -> bool:
        try:
            check_key(key)
        except NotFound:
            return False
        with self.conn.errors():
            return self._files.find_one({"filename": key}, {"_id": 1}) is not None

    def stat(self, key: str) -> BlobInfo:
        with self.conn.errors():
            doc = self._file(key)
        return BlobInfo(key, int(doc["length"]), _mtime(doc))

    def list(self) -> Iterator[BlobInfo]:
        """Every blob (one entry per key); removes temporary uploads left by crashed writers."""
        found: dict[str, BlobInfo] = {}
        stale: list[Any] = []
        stale_before = time.time() - STALE_TMP_S
        with self.conn.errors():
            for doc in self._files.find({}, {"_id": 1, "filename": 1, "length": 1, "uploadDate": 1, "metadata": 1}):
                name = doc.get("filename")
                if isinstance(name, str) and name.startswith(_TMP):
                    if _mtime(doc) < stale_before:
                        stale.append(doc["_id"])
                    continue
                try:
                    check_key(name)
                except NotFound:
                    continue  # not ours: another program's file in the same bucket
                info = BlobInfo(name, int(doc["length"]), _mtime(doc))
                if name not in found or found[name].mtime < info.mtime:
                    found[name] = info
            for file_id in stale:
                self._delete_file(file_id)
        return iter([found[k] for k in sorted(found)])

    def close(self) -> None:
        self.conn.close()
