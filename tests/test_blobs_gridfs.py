"""GridFSBlobStore against a local nx-27017 server (or $MLW_TEST_MONGO_URI): the blob conformance suite,
duplicate uploads from racing writers, temporary uploads, the read cache in front of GridFS, and error mapping."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: F401
from mlwarehouse.testing.servers import in_ci

if not in_ci():  # in CI a missing driver is an error, never a skip
    pytest.importorskip("pymongo", reason="the GridFS backend needs pymongo (pip install -e '.[mongo]')")

from mlwarehouse.blobs.base import blob_key  # noqa: E402
from mlwarehouse.blobs.cache import CachedBlobStore  # noqa: E402
from mlwarehouse.blobs.gridfs import GridFSBlobStore  # noqa: E402
from mlwarehouse.config import open_blobs  # noqa: E402
from mlwarehouse.errors import IntegrityError, Unavailable  # noqa: E402
from mlwarehouse.testing.blob_conformance import BlobStoreTests  # noqa: E402


def make(mongo_server, **options) -> GridFSBlobStore:  # noqa: F811
    return GridFSBlobStore(fresh_uri(mongo_server), **options)


def drop(store: GridFSBlobStore) -> None:
    store.conn.drop_database()
    store.close()


def corrupt(store: GridFSBlobStore, key: str, data: bytes = b"precious bytez") -> None:
    """Replace the file under ``key`` with ``data``, written straight through GridFS."""
    for doc in store._copies(key):
        store.bucket.delete(doc["_id"])
    store.bucket.upload_from_stream(key, data, metadata={"mtime": time.time()})


class TestGridFSBlobStore(BlobStoreTests):
    large_size = 52 << 20  # above nx-27017's 48 MB reply limit: reads must go a window of chunks at a time
    mtime_resolution = 0.05

    @pytest.fixture
    def store(self, mongo_server):  # noqa: F811
        store = make(mongo_server)
        yield store
        drop(store)

    def corrupt(self, store, key, data=b"precious bytez"):
        corrupt(store, key, data)


@pytest.fixture
def store(mongo_server):  # noqa: F811
    s = make(mongo_server)
    yield s
    drop(s)


def test_racing_duplicates_collapse_to_the_oldest(store):
    data = b"same bytes" * 1000
    first = store.bucket.upload_from_stream(blob_key(data), data, metadata={"mtime": time.time()})
    second = store.bucket.upload_from_stream(blob_key(data), data, metadata={"mtime": time.time()})
    store._keep_oldest(blob_key(data), second)  # what the second writer does after its upload
    assert [d["_id"] for d in store._copies(blob_key(data))] == [first]
    assert store.get(blob_key(data)) == data and [i.key for i in store.list()] == [blob_key(data)]


def test_list_removes_stale_temporary_uploads_and_ignores_foreign_files(store):
    kept = store.put(b"kept")
    store.bucket.upload_from_stream("tmp-crashed", b"partial", metadata={"mtime": time.time() - 7200})
    store.bucket.upload_from_stream("tmp-in-flight", b"partial", metadata={"mtime": time.time()})
    store.bucket.upload_from_stream("notes.txt", b"someone else's file")
    assert [i.key for i in store.list()] == [kept]
    names = sorted(d["filename"] for d in store._files.find({}, {"filename": 1}))
    assert names == sorted([kept, "tmp-in-flight", "notes.txt"])


def _put_many(uri, payloads, queue):
    s = GridFSBlobStore(uri)
    try:
        queue.put([s.put(p) for p in payloads])
    finally:
        s.close()


@pytest.mark.slow
def test_processes_putting_the_same_bytes(store):
    payloads = [os.urandom(300_000) for _ in range(4)]
    uri = store.conn.uri
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_put_many, args=(uri, payloads, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(r == [blob_key(p) for p in payloads] for r in results)
    assert sorted(i.key for i in store.list()) == sorted(blob_key(p) for p in payloads)
    assert all(store.get(blob_key(p)) == p for p in payloads)


def test_the_read_cache_wraps_gridfs_too(store, tmp_path):
    cached = CachedBlobStore(store, tmp_path / "cache", 1 << 20)
    data = os.urandom(100_000)
    key = cached.put(data)
    assert cached.get(key) == data and cached.used_bytes() == len(data)
    corrupt(store, key)  # the local copy still holds the verified bytes
    assert cached.get(key) == data and cached.get_range(key, 5, 5) == data[5:10]
    copy = cached.root / key[:2] / key[2:4] / key
    copy.write_bytes(b"rotten")  # a damaged copy is dropped and GridFS asked again, which is damaged too
    with pytest.raises(IntegrityError):
        cached.get(key)
    assert not copy.exists() and cached.delete(key) and not store.exists(key)


def test_open_blobs_with_a_mongodb_uri(mongo_server):  # noqa: F811
    s = open_blobs(fresh_uri(mongo_server))
    assert isinstance(s, GridFSBlobStore) and s.bucket_name == "mlw_blobs"
    assert s.get(s.put(b"x")) == b"x"
    drop(s)


def test_unreachable_server_fails_fast_naming_it():
    start = time.monotonic()
    with pytest.raises(Unavailable, match="127.0.0.1:9"):
        GridFSBlobStore("mongodb://127.0.0.1:9/x", timeout=1.0)
    assert time.monotonic() - start < 5
