"""The blob conformance suite: what every :class:`~mlwarehouse.blobs.base.BlobStore` must do, run per backend.

A backend's test module subclasses :class:`BlobStoreTests`, supplies a ``store`` fixture (an empty store; it may
share a server with other tests) and implements :meth:`BlobStoreTests.corrupt`::

    class TestFileBlobStore(BlobStoreTests):
        @pytest.fixture
        def store(self, tmp_path):
            return FileBlobStore(tmp_path / "blobs")

        def corrupt(self, store, key, data=b"precious bytez"):
            ...  # overwrite the stored bytes with ``data`` behind the store's back

Class attributes tune the costly tests: ``large_size`` (a blob big enough to take the backend's large-blob
path, e.g. multipart uploads) and ``mtime_resolution`` (seconds between two distinguishable modification times).
A wrapper such as :class:`~mlwarehouse.blobs.cache.CachedBlobStore` runs the same suite: its ``corrupt`` damages
the inner store's bytes and any local copy.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import pytest

from mlwarehouse.blobs.base import BlobStore, blob_key
from mlwarehouse.errors import IntegrityError, NotFound, QueryError, WarehouseError

__all__ = ["BlobStoreTests", "BAD_KEYS", "flip_a_bit"]

#: strings (and non-strings) that are not blob keys: every call must refuse them before touching storage
BAD_KEYS = ["../../etc/passwd", "../secret", "A" * 64, "ab" * 31, "g" * 64, "", "/" + "a" * 63, "a" * 63 + "\n",
            None, 42]


def flip_a_bit(store, key: str, where: float = 0.5) -> None:
    """Damage a local folder's blob behind the store's back: one bit flipped at ``where`` of its length."""
    path = store._path(key)
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.chmod(0o644)
    path.write_bytes(bytes(data))


class BlobStoreTests:
    """Subclass per backend; see the module notes."""

    large_size: int = 20 << 20
    mtime_resolution: float = 0.05

    @pytest.fixture
    def store(self) -> BlobStore:
        raise NotImplementedError("a BlobStoreTests subclass supplies the store fixture")

    def corrupt(self, store: BlobStore, key: str, data: bytes = b"precious bytez") -> None:
        """Replace the bytes stored under ``key`` with ``data``, bypassing the store's checks."""
        raise NotImplementedError

    def test_put_get_round_trip(self, store):
        key = store.put(b"hello")
        assert key == hashlib.sha256(b"hello").hexdigest()
        assert store.get(key) == b"hello"
        assert store.exists(key)
        info = store.stat(key)
        assert (info.key, info.size) == (key, 5)

    def test_put_accepts_buffers_and_is_idempotent(self, store):
        k1 = store.put(bytearray(b"abc"))
        k2 = store.put(memoryview(b"abc"))
        assert k1 == k2 == store.put(b"abc") == blob_key(b"abc")
        assert [i.key for i in store.list()] == [k1]

    def test_put_again_refreshes_mtime(self, store):
        key = store.put(b"x" * 10)
        before = store.stat(key).mtime
        assert before > time.time() - 60
        time.sleep(self.mtime_resolution)
        assert store.put(b"x" * 10) == key
        assert store.stat(key).mtime > before
        assert store.get(key) == b"x" * 10

    def test_empty_blob(self, store):
        key = store.put(b"")
        assert key == blob_key(b"")
        assert store.get(key) == b""
        assert store.get_range(key, 0, 10) == b""
        assert store.stat(key).size == 0

    def test_corrupted_blob_raises_integrity_error(self, store):
        key = store.put(b"precious bytes")
        self.corrupt(store, key)
        with pytest.raises(IntegrityError) as err:
            store.get(key)
        assert key in str(err.value)

    def test_zero_length_blob_is_an_integrity_error(self, store):
        key = store.put(b"precious bytes")
        self.corrupt(store, key, b"")  # a crash artefact: the name is there, the bytes are not
        with pytest.raises(IntegrityError) as err:
            store.get(key)
        assert key in str(err.value)

    @pytest.mark.parametrize("how", ["put", "put_file"])
    def test_putting_the_same_bytes_repairs_a_truncated_blob(self, store, how):
        data = os.urandom(1000)
        key = store.put(data)
        for damage in (b"", data[:10]):
            self.corrupt(store, key, damage)
            put = store.put(data) if how == "put" else store.put_file(io.BytesIO(data))[0]
            assert put == key
            assert store.get(key) == data
            assert store.stat(key).size == len(data)

    def test_missing_blob_raises_not_found(self, store):
        key = blob_key(b"never stored")
        for call in (store.get, store.stat, lambda k: store.get_range(k, 0, 1), lambda k: store.get_range(k, 0, 0)):
            with pytest.raises(NotFound, match=key):
                call(key)
        assert not store.exists(key)
        assert store.delete(key) is False

    @pytest.mark.parametrize("bad", BAD_KEYS)
    def test_bad_keys_are_refused(self, store, bad):
        kept = store.put(b"kept")
        for call in (store.get, store.stat, store.delete, lambda k: store.get_range(k, 0, 5)):
            with pytest.raises(NotFound):
                call(bad)
        assert store.exists(bad) is False
        assert [i.key for i in store.list()] == [kept]
        assert store.get(kept) == b"kept"

    def test_get_range(self, store):
        data = bytes(range(256)) * 100
        key = store.put(data)
        assert store.get_range(key, 1000, 17) == data[1000:1017]
        assert store.get_range(key, 0, 1) == data[:1]
        assert store.get_range(key, len(data) - 3, 10) == data[-3:]
        assert store.get_range(key, len(data), 10) == b""
        assert store.get_range(key, len(data) + 5, 10) == b""
        assert store.get_range(key, 5, 0) == b""
        store.get(key)  # a second ranged pass after a whole read (a cache may serve it from a local copy)
        assert store.get_range(key, 1000, 17) == data[1000:1017]
        assert store.get_range(key, len(data) - 3, 10) == data[-3:]

    @pytest.mark.parametrize("start, length", [(-1, 2), (0, -1), (-5, -5)])
    def test_bad_range_raises_query_error(self, store, start, length):
        key = store.put(b"ranged bytes")
        for target in (key, blob_key(b"never stored")):  # refused before any storage is touched
            with pytest.raises(QueryError, match="get_range needs start >= 0") as err:
                store.get_range(target, start, length)
            assert isinstance(err.value, WarehouseError)
        assert store.get_range(key, 0, 6) == b"ranged"

    def test_delete_and_list(self, store):
        keys = {store.put(bytes([i]) * (i + 1)) for i in range(20)}
        listed = {i.key: i.size for i in store.list()}
        assert listed.keys() == keys
        assert all(size == len(store.get(k)) for k, size in listed.items())
        assert all(info.mtime > time.time() - 60 for info in store.list())
        victim = sorted(keys)[0]
        assert store.delete(victim) is True
        assert not store.exists(victim)
        assert store.delete(victim) is False
        with pytest.raises(NotFound):
            store.get(victim)
        assert {i.key for i in store.list()} == keys - {victim}

    def test_concurrent_puts_from_threads(self, store):
        payloads = [os.urandom(64 << 10) for _ in range(5)]
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def writer():
            try:
                for payload in payloads:
                    barrier.wait()  # all four threads put the same new bytes at the same moment
                    assert store.get(store.put(payload)) == payload
            except BaseException as exc:  # reported below, in the test's own thread
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(i.key for i in store.list()) == sorted(blob_key(p) for p in payloads)

    def test_large_blob(self, store):
        data = os.urandom(1 << 20) * (self.large_size >> 20)  # cheap to make, still one hash of many MB
        key = store.put(data)
        assert key == blob_key(data)
        assert store.stat(key).size == len(data)
        assert store.get(key) == data
        assert store.get_range(key, len(data) - 5, 5) == data[-5:]
        assert store.put(data) == key

    def test_put_file_streams_paths_and_file_objects(self, store, tmp_path):
        data = os.urandom(1_000_003)
        src = tmp_path / "big.bin"
        src.write_bytes(data)
        key, size = store.put_file(src)
        assert (key, size) == (blob_key(data), len(data))
        assert store.get(key) == data
        assert store.put_file(io.BytesIO(data)) == (key, size)  # existing content: nothing stored twice

        class ReadOnly:  # a file object that can neither seek nor readinto
            def __init__(self, payload):
                self.inner = io.BytesIO(payload)

            def read(self, n=-1):
                return self.inner.read(n)

        class Trickle(ReadOnly):  # a pipe-like file object: short reads, whatever size is asked for
            def read(self, n=-1):
                return self.inner.read(n if n is None or n < 0 else min(n, 1000))

        assert store.put_file(ReadOnly(b"small")) == (blob_key(b"small"), 5)
        trickled = os.urandom(300_001)  # more than a GridFS chunk, in reads of 1000 bytes
        assert store.put_file(Trickle(trickled)) == (blob_key(trickled), len(trickled))
        assert store.get(blob_key(trickled)) == trickled
        assert sorted(i.key for i in store.list()) == sorted([key, blob_key(b"small"), blob_key(trickled)])
        with pytest.raises(NotFound):
            store.put_file(tmp_path / "missing.bin")

    def test_put_file_of_a_large_file(self, store, tmp_path):
        data = os.urandom(1 << 20) * (self.large_size >> 20)
        src = tmp_path / "large.bin"
        src.write_bytes(data)
        assert store.put_file(src) == (blob_key(data), len(data))
        assert store.get(blob_key(data)) == data
