"""The shard cache: hits, damaged copies, and a size bound that holds with several processes at once."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

import pytest

from mlwarehouse.datasets.shardcache import ShardCache
from mlwarehouse.errors import ConfigError


def blob(i: int, size: int) -> tuple[str, bytes]:
    data = os.urandom(size - 4) + i.to_bytes(4, "little")
    return hashlib.sha256(data).hexdigest(), data


def test_hits_misses_and_damaged_copies(tmp_path):
    cache = ShardCache(tmp_path / "c", max_bytes=10_000)
    key, data = blob(0, 1000)
    calls = []
    fetch = lambda k: calls.append(k) or data  # noqa: E731
    assert cache.get(key, fetch) == data and cache.get(key, fetch) == data
    assert calls == [key] and cache.stats.hits == 1
    (tmp_path / "c" / key).write_bytes(b"garbage")
    assert cache.get(key, fetch) == data and len(calls) == 2
    big_key, big = blob(1, 20_000)
    assert cache.get(big_key, lambda k: big) == big and not (tmp_path / "c" / big_key).exists()
    with pytest.raises(ConfigError):
        ShardCache(tmp_path / "x", max_bytes=0)


def test_bound_and_lru_eviction(tmp_path):
    cache = ShardCache(tmp_path / "c", max_bytes=5_000)
    blobs = [blob(i, 1000) for i in range(12)]
    for key, data in blobs:
        cache.get(key, lambda k, d=data: d)
        assert cache.used_bytes() <= 5_000
    assert len(cache.entries()) == 5 and cache.stats.evicted == 7
    assert all((tmp_path / "c" / k).exists() for k, _ in blobs[-5:])


def _hammer(root: str, seed: int, sizes: list[int], out) -> None:
    cache = ShardCache(root, max_bytes=50_000)
    worst = 0
    for j, size in enumerate(sizes):
        key, data = blob(seed * 1000 + j % 7, size)
        cache.get(key, lambda k, d=data: d)
        worst = max(worst, cache.used_bytes())
    out.put(worst)


@pytest.mark.slow
def test_bound_holds_across_processes(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path / "c"), s, [3000 + 1000 * (j % 9) for j in range(60)],
                                               out)) for s in range(4)]
    for p in procs:
        p.start()
    worst = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert max(worst) <= 50_000
    assert ShardCache(tmp_path / "c", 50_000).used_bytes() <= 50_000
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith(".tmp-")]


def test_temporary_files_of_a_killed_writer_are_swept(tmp_path):
    cache = ShardCache(tmp_path / "c", 10_000)
    leftover = tmp_path / "c" / ".tmp-deadbeef-1-2"
    leftover.write_bytes(b"x" * 5_000)
    cache.put("a" * 64, b"y" * 100)
    assert not leftover.exists()
    leftover.write_bytes(b"x" * 5_000)
    cache.clear()
    assert not leftover.exists() and cache.used_bytes() == 0
