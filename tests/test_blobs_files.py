"""FileBlobStore: the blob conformance suite, plus its file layout, temp files and multi-process writers."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from mlwarehouse.blobs.base import blob_key
from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.errors import IntegrityError, NotFound
from mlwarehouse.testing.blob_conformance import BAD_KEYS, BlobStoreTests


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def blob_path(store: FileBlobStore, key: str) -> Path:
    return store.root / key[:2] / key[2:4] / key


class TestFileBlobStore(BlobStoreTests):
    large_size = 16 << 20
    mtime_resolution = 0.02

    @pytest.fixture
    def store(self, tmp_path):
        return FileBlobStore(tmp_path / "blobs")

    def corrupt(self, store, key):
        blob_path(store, key).write_bytes(b"precious bytez")

    def test_layout(self, store):
        key = store.put(b"hello")
        assert blob_path(store, key).is_file()

    def test_put_again_refreshes_an_old_mtime(self, store):
        key = store.put(b"x" * 10)
        os.utime(blob_path(store, key), (1_000_000, 1_000_000))
        assert store.stat(key).mtime == 1_000_000
        store.put(b"x" * 10)
        assert store.stat(key).mtime > time.time() - 60

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
        monkeypatch.setattr("mlwarehouse.blobs.files._CHUNK", 1 << 16)  # many chunks without a big file
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
