"""The prefetch pool of streams: jobs run lowest rank first, a waiting consumer runs queued jobs itself, the
threads outlive streams (a cold stream starts none once the pool exists) and a forked child gets its own."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from mlwarehouse.datasets.items import ItemDatasets
from mlwarehouse.datasets.prefetch import RankedPool, ranked_pool
from mlwarehouse.errors import IntegrityError


def test_a_waiting_caller_runs_queued_jobs_lowest_rank_first_and_no_later_ones():
    pool = RankedPool("mlw-test-ranked")  # no threads yet: only callers of wait() run jobs
    ran = []
    jobs = {rank: pool.submit(rank, lambda r: ran.append((r, threading.current_thread().name)) or r, rank)
            for rank in (5, 1, 7, 3)}
    assert pool.wait(jobs[5]) == 5
    assert ran == [(r, threading.current_thread().name) for r in (1, 3, 5)]
    assert not jobs[7].done()  # ranked after the one waited for: left to the pool's threads
    pool.grow(1)
    assert jobs[7].result(timeout=30) == 7 and ran[-1] == (7, "mlw-test-ranked_0")


def test_a_job_error_reaches_whoever_waits_for_it():
    pool = RankedPool("mlw-test-errors")

    def fail():
        raise IntegrityError("bad shard")
    with pytest.raises(IntegrityError, match="bad shard"):
        pool.wait(pool.submit(0, fail))
    cancelled = pool.submit(1, lambda: 1)
    assert cancelled.cancel()
    assert pool.wait(pool.submit(2, lambda: 2)) == 2  # the cancelled job is skipped, not run


@pytest.fixture
def ds(wh):
    labels = np.arange(3000)
    x = np.zeros((len(labels), 16, 16), np.uint8)
    x[:, 4:12, 4:12] = (labels[:, None] % 251).reshape(-1, 1, 1)
    return ItemDatasets(wh.project("p")).from_arrays("pool", {"x": x, "label": labels}, shard_bytes=1 << 16)


def test_cold_streams_share_the_process_pool_and_start_no_threads(ds):
    list(ds.stream(batch_size=100, memory=0))  # the pool exists now, with as many threads as a stream asks for
    before = set(threading.enumerate())
    for seed in range(3):
        got = np.concatenate([b["label"] for b in ds.stream(batch_size=100, seed=seed, memory=0)])
        assert sorted(got.tolist()) == list(range(3000))
        assert np.array_equal(got, np.concatenate([b["label"] for b in ds.stream(batch_size=100, seed=seed)]))
    assert not {t for t in set(threading.enumerate()) - before if t.name.startswith("mlw-prefetch")}


def test_a_forked_child_streams_with_its_own_pool(ds):
    parent_pool = ranked_pool(2)
    list(ds.stream(batch_size=500, memory=0))
    pid = os.fork()
    if pid == 0:  # the child: the parent's threads are not here
        try:
            ok = ranked_pool(1) is not parent_pool and sum(
                len(b["label"]) for b in ds.stream(batch_size=500, memory=0)) == 3000
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
