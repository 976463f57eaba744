"""FileBlobStore: content addressing, atomic writes, verification on read, key validation, concurrency."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from mlwarehouse.blobs.base import blob_key
from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.errors import IntegrityError, NotFound


@pytest.fixture
def store(tmp_path):
    return FileBlobStore(tmp_path / "blobs")


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_get_layout(store):
    key = store.put(b"hello")
    assert key == hashlib.sha256(b"hello").hexdigest()
    assert store.get(key) == b"hello"
    assert (store.root / key[:2] / key[2:4] / key).is_file()
    assert store.exists(key)
    info = store.stat(key)
    assert (info.key, info.size) == (key, 5)


def test_put_accepts_buffers_and_is_idempotent(store):
    k1 = store.put(bytearray(b"abc"))
    k2 = store.put(memoryview(b"abc"))
    assert k1 == k2 == store.put(b"abc")
    assert [i.key for i in store.list()] == [k1]


def test_put_again_refreshes_mtime(store):
    key = store.put(b"x" * 10)
    path = store.root / key[:2] / key[2:4] / key
    os.utime(path, (1_000_000, 1_000_000))
    assert store.stat(key).mtime == 1_000_000
    store.put(b"x" * 10)
    assert store.stat(key).mtime > time.time() - 60


def test_empty_blob(store):
    key = store.put(b"")
    assert store.get(key) == b""
    assert store.get_range(key, 0, 10) == b""


def test_corrupted_blob_raises_integrity_error(store):
    key = store.put(b"precious bytes")
    path = store.root / key[:2] / key[2:4] / key
    path.write_bytes(b"precious bytez")
    with pytest.raises(IntegrityError) as err:
        store.get(key)
    assert key in str(err.value) and str(path) in str(err.value)


def test_missing_blob_raises_not_found(store):
    key = blob_key(b"never stored")
    for call in (store.get, store.stat, lambda k: store.get_range(k, 0, 1)):
        with pytest.raises(NotFound, match=key):
            call(key)
    assert not store.exists(key)
    assert store.delete(key) is False


@pytest.mark.parametrize("bad", ["../../etc/passwd", "../secret", "A" * 64, "ab" * 31, "g" * 64, "",
                                 "/" + "a" * 63, "a" * 63 + "\n", None, 42])
def test_bad_keys_never_reach_the_file_system(store, tmp_path, bad):
    (tmp_path / "secret").write_bytes(b"outside the store")
    for call in (store.get, store.stat, store.delete, lambda k: store.get_range(k, 0, 5)):
        with pytest.raises(NotFound):
            call(bad)
    assert store.exists(bad) is False
    assert (tmp_path / "secret").read_bytes() == b"outside the store"


def test_get_range_reads_a_slice_without_the_rest(store):
    data = bytes(range(256)) * 100
    key = store.put(data)
    assert store.supports_ranges
    assert store.get_range(key, 1000, 17) == data[1000:1017]
    assert store.get_range(key, len(data) - 3, 10) == data[-3:]
    assert store.get_range(key, len(data) + 5, 10) == b""
    with pytest.raises(ValueError):
        store.get_range(key, -1, 2)


def test_delete_and_list(store):
    keys = {store.put(bytes([i]) * (i + 1)) for i in range(20)}
    listed = {i.key: i.size for i in store.list()}
    assert listed.keys() == keys
    assert all(size == len(store.get(k)) for k, size in listed.items())
    victim = sorted(keys)[0]
    assert store.delete(victim) is True
    assert not store.exists(victim)
    assert {i.key for i in store.list()} == keys - {victim}


def test_list_skips_temp_files_and_removes_stale_ones(store):
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


def test_put_file_streams_paths_and_file_objects(store, tmp_path, monkeypatch):
    monkeypatch.setattr("mlwarehouse.blobs.files._CHUNK", 1 << 16)  # many chunks without a big file
    data = os.urandom(1_000_003)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    key, size = store.put_file(src)
    assert (key, size) == (blob_key(data), len(data))
    assert store.get(key) == data
    assert store.put_file(io.BytesIO(data)) == (key, size)  # existing content: no second copy, no temp left

    class ReadOnly:  # a file object without readinto
        def __init__(self, payload):
            self.inner = io.BytesIO(payload)

        def read(self, n=-1):
            return self.inner.read(n)

    assert store.put_file(ReadOnly(b"small")) == (blob_key(b"small"), 5)
    assert not [p for p in all_files(store.root) if p.name.startswith(".tmp-")]
    with pytest.raises(NotFound):
        store.put_file(tmp_path / "missing.bin")


def _put_each_in_step(root: str, payloads: list[bytes], barrier) -> None:
    store = FileBlobStore(root)
    for payload in payloads:
        barrier.wait()  # all four processes put the same new bytes at the same moment
        assert store.get(store.put(payload)) == payload


def test_concurrent_puts_of_the_same_content(tmp_path):
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
