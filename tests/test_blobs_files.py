"""FileBlobStore: the blob conformance suite, plus its file layout, temp files and multi-process writers; and the
read cache wrapper (CachedBlobStore) over a local inner store, which needs no server."""

from __future__ import annotations

import io
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from mlwarehouse.blobs.base import blob_key
from mlwarehouse.blobs.cache import CachedBlobStore
from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.errors import ConfigError, IntegrityError, NotFound
from mlwarehouse.testing.blob_conformance import BAD_KEYS, BlobStoreTests


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def blob_path(store: FileBlobStore | CachedBlobStore, key: str) -> Path:
    """Where ``store`` (a file store, or a cache's folder of copies) keeps ``key``."""
    return store.root / key[:2] / key[2:4] / key


class TestFileBlobStore(BlobStoreTests):
    large_size = 16 << 20
    mtime_resolution = 0.02

    @pytest.fixture
    def store(self, tmp_path):
        return FileBlobStore(tmp_path / "blobs")

    def corrupt(self, store, key, data=b"precious bytez"):
        blob_path(store, key).write_bytes(data)

    def test_layout(self, store):
        key = store.put(b"hello")
        assert blob_path(store, key).is_file()

    def test_put_again_refreshes_an_old_mtime(self, store):
        key = store.put(b"x" * 10)
        os.utime(blob_path(store, key), (1_000_000, 1_000_000))
        assert store.stat(key).mtime == 1_000_000
        store.put(b"x" * 10)
        assert store.stat(key).mtime > time.time() - 60

    def test_putting_the_same_bytes_repairs_other_bytes_of_the_same_size(self, store):
        key = store.put(b"precious bytes")
        self.corrupt(store, key)  # same length, other bytes: only a comparison can tell
        assert store.put(b"precious bytes") == key and store.get(key) == b"precious bytes"
        self.corrupt(store, key)
        assert store.put_file(io.BytesIO(b"precious bytes"))[0] == key and store.get(key) == b"precious bytes"

    def test_integrity_error_names_the_file(self, store):
        key = store.put(b"precious bytes")
        self.corrupt(store, key)
        with pytest.raises(IntegrityError) as err:
            store.get(key)
        assert key in str(err.value) and str(blob_path(store, key)) in str(err.value)

    @pytest.mark.parametrize("bad", BAD_KEYS)
    def test_bad_keys_never_reach_the_file_system(self, store, tmp_path, bad):
        (tmp_path / "secret").write_bytes(b"outside the store")
        for call in (store.get, store.stat, store.delete, lambda k: store.get_range(k, 0, 5)):
            with pytest.raises(NotFound):
                call(bad)
        assert store.exists(bad) is False
        assert (tmp_path / "secret").read_bytes() == b"outside the store"

    def test_list_skips_temp_files_and_removes_stale_ones(self, store):
        key = store.put(b"kept")
        folder = store.root / key[:2] / key[2:4]
        fresh, stale, stale_top = folder / ".tmp-1-2-fresh", folder / ".tmp-1-2-stale", store.root / ".tmp-3-4-old"
        for p in (fresh, stale, stale_top):
            p.write_bytes(b"partial")
        old = time.time() - 2 * 3600
        os.utime(stale, (old, old))
        os.utime(stale_top, (old, old))
        (store.root / "zz").mkdir()  # not a fan-out folder: ignored
        (folder / "README").write_text("not a blob")
        assert [i.key for i in store.list()] == [key]
        assert fresh.exists() and not stale.exists() and not stale_top.exists()

    def test_put_file_streams_paths_and_file_objects(self, store, tmp_path, monkeypatch):
        monkeypatch.setattr("mlwarehouse.blobs.common.CHUNK", 1 << 16)  # many chunks without a big file
        super().test_put_file_streams_paths_and_file_objects(store, tmp_path)
        assert not [p for p in all_files(store.root) if p.name.startswith(".tmp-")]


def _put_each_in_step(root: str, payloads: list[bytes], barrier) -> None:
    store = FileBlobStore(root)
    for payload in payloads:
        barrier.wait()  # all four processes put the same new bytes at the same moment
        assert store.get(store.put(payload)) == payload


def test_concurrent_puts_of_the_same_content_from_processes(tmp_path):
    root = tmp_path / "shared"
    payloads = [os.urandom(256 << 10) for _ in range(10)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_put_each_in_step, args=(str(root), payloads, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    keys = [blob_key(p) for p in payloads]
    assert all_files(root) == sorted(root / k[:2] / k[2:4] / k for k in keys)  # one file each, no temp files
    store = FileBlobStore(root)
    assert [store.get(k) for k in keys] == payloads


class TestCachedFileBlobStore(BlobStoreTests):
    """The read cache over a local inner store: the whole suite, with every blob read whole kept locally."""

    large_size = 16 << 20
    mtime_resolution = 0.02

    @pytest.fixture
    def store(self, tmp_path):
        return CachedBlobStore(FileBlobStore(tmp_path / "inner", fsync=False), tmp_path / "cache", 64 << 20)

    def corrupt(self, store, key, data=b"precious bytez"):
        blob_path(store.inner, key).write_bytes(data)
        if blob_path(store, key).exists():
            blob_path(store, key).write_bytes(data)


@pytest.fixture
def cached(tmp_path):
    return CachedBlobStore(FileBlobStore(tmp_path / "inner", fsync=False), tmp_path / "cache", 1 << 20)


def test_cache_keeps_blobs_read_whole_and_serves_them(cached):
    data = os.urandom(100_000)
    key = cached.put(data)
    assert not blob_path(cached, key).exists()  # writes go to the inner store only
    assert cached.get(key) == data and blob_path(cached, key).read_bytes() == data
    blob_path(cached.inner, key).write_bytes(b"changed behind the cache")  # content-addressed: never stale
    assert cached.get(key) == data and cached.get_range(key, 10, 5) == data[10:15]
    assert (cached.name, cached.mtime_resolution) == (cached.inner.name, cached.inner.mtime_resolution)
    assert cached.delete(key) and not blob_path(cached, key).exists() and not cached.exists(key)


def test_a_damaged_copy_is_dropped_and_fetched_again(cached):
    data = os.urandom(50_000)
    key = cached.put(data)
    cached.get(key)
    blob_path(cached, key).write_bytes(b"rotten")
    assert cached.get(key) == data  # fetched again from the inner store, never the rotten copy
    assert blob_path(cached, key).read_bytes() == data
    blob_path(cached, key).write_bytes(b"x" * len(data))  # same size, new bytes: a range is not served from it
    assert cached.get_range(key, 0, 4) == data[:4]
    assert not blob_path(cached, key).exists()


def test_a_range_is_served_from_a_copy_only_once_it_was_verified(cached, monkeypatch):
    data = os.urandom(60_000)
    key = cached.put(data)
    cached.get(key)
    other = CachedBlobStore(cached.inner, cached.root, cached.max_bytes)  # another process: nothing verified
    reads = []
    monkeypatch.setattr(cached.inner, "get_range", lambda *a: reads.append(a) or b"")
    assert other.get_range(key, 100, 10) == data[100:110] and not reads  # verified whole, then served
    assert other._verified and other.get_range(key, 0, 3) == data[:3]


def test_cache_stays_within_its_bound_and_evicts_the_least_recently_used(cached):
    keys = [cached.put(os.urandom(200_000)) for _ in range(8)]

    def read(key):
        cached.get(key)
        time.sleep(0.02)  # distinct modification times, however coarse the file system's clock

    for key in keys[:5]:
        read(key)  # 1,000,000 bytes: within the 1 MiB bound
    read(keys[0])  # used again: keys 1 and 2 are now the least recently used
    read(keys[5])  # over the bound: room down to 80% is made before the copy is written
    assert [blob_path(cached, k).exists() for k in keys[:6]] == [True, False, False, True, True, True]
    for key in keys[6:]:
        read(key)
        assert 0 < cached.used_bytes() <= cached.max_bytes
    big = cached.put(os.urandom(300_000))  # over a quarter of the bound: read, never kept
    cached.get(big)
    assert not blob_path(cached, big).exists()
    assert int((cached.root / ".used").read_text()) == cached.used_bytes()
    with pytest.raises(ConfigError):
        CachedBlobStore(cached.inner, cached.root, 0)


def test_cache_recounts_a_lost_count(cached):
    key = cached.put(b"a" * 1000)
    cached.get(key)
    (cached.root / ".used").write_text("garbled")
    cached.get(cached.put(b"b" * 1000))
    assert int((cached.root / ".used").read_text()) == cached.used_bytes() == 2000


def test_cache_refuses_bad_keys_before_touching_files(cached, tmp_path):
    (tmp_path / "secret").write_bytes(b"outside the cache")
    for bad in BAD_KEYS:
        for call in (cached.get, cached.delete, lambda k: cached.get_range(k, 0, 5)):
            with pytest.raises(NotFound):
                call(bad)
    assert (tmp_path / "secret").read_bytes() == b"outside the cache"


def test_cache_passes_public_attributes_of_the_inner_store(cached):
    assert cached.fsync is False  # FileBlobStore's own attribute, as if unwrapped
    with pytest.raises(AttributeError):
        cached._nothing_private


def _read_through_one_cache(inner_root: str, cache_root: str, keys: list[str], rounds: int) -> None:
    store = CachedBlobStore(FileBlobStore(inner_root, fsync=False), cache_root, 1 << 20)
    for _ in range(rounds):
        for key in keys:
            assert blob_key(store.get(key)) == key


def test_processes_sharing_one_cache_keep_it_within_its_bound(tmp_path):
    inner = FileBlobStore(tmp_path / "inner", fsync=False)
    keys = [inner.put(os.urandom(150_000)) for _ in range(12)]  # 1.8 MB through a 1 MiB cache
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_read_through_one_cache,
                         args=(str(inner.root), str(tmp_path / "cache"), keys[i:] + keys[:i], 3)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = CachedBlobStore(inner, tmp_path / "cache", 1 << 20)
    assert 0 < store.used_bytes() <= 1 << 20
    assert int((store.root / ".used").read_text()) == store.used_bytes()
    assert not [p for p in all_files(store.root) if p.name.startswith(".tmp-")]
