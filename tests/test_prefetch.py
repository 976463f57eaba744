"""The prefetch pool of streams: jobs run lowest rank first, a waiting consumer runs queued jobs itself, the
threads outlive streams (a cold stream starts none once the pool exists) and a forked child gets its own."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from mlwarehouse.datasets import prefetch
from mlwarehouse.datasets.items import ItemDatasets
from mlwarehouse.datasets.prefetch import RankedPool, ranked_pool, run_ranked
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


def test_parts_run_at_the_rank_of_their_job_and_wait_behind_lower_ranks_only():
    """A job's parts (:func:`run_ranked`, as a shard's decode cuts itself) are queued at the job's rank; whoever
    waits for them runs queued work of that rank or lower first, lowest first, and never later work."""
    pool = ranked_pool(1)
    gate, held = threading.Event(), threading.Semaphore(0)

    def hold():
        held.release()
        return gate.wait(30)
    blockers = [pool.submit(-10 ** 9, hold) for _ in pool._threads]  # one for each thread of the pool
    assert all(held.acquire(timeout=30) for _ in blockers)  # every thread holds one: none is left queued
    ran = []
    earlier = pool.submit(-5, ran.append, "earlier shard")
    later = pool.submit(10 ** 9, ran.append, "later shard")

    def shard_job():
        return run_ranked([(lambda part: ran.append((part, prefetch._local.rank)) or part, i) for i in range(3)], 1)
    job = pool.submit(-3, shard_job)
    try:
        assert pool.wait(job) == [0, 1, 2]  # this thread ran the job, the earlier shard first, then its parts
        assert ran == ["earlier shard", (0, -3), (1, -3), (2, -3)] and earlier.done()
        assert not later.done()  # ranked after: left to the pool
        assert getattr(prefetch._local, "rank", None) is None  # restored once the job ended
    finally:
        gate.set()
    assert later.result(timeout=30) is None and all(b.result(timeout=30) for b in blockers)
    assert run_ranked([(lambda v: v * 2, 4), (lambda v: v + 1, 4)], 1) == [8, 5]  # outside any job: a fresh rank


def test_a_job_waiting_for_its_parts_runs_no_other_job_that_could_need_its_lock():
    """A shard decoding a column holds the shard's lock while it waits for the column's parts; a job queued
    meanwhile for the same shard would wait for that lock on the same thread. The waiter runs only parts."""
    pool = ranked_pool(1)
    gate, held = threading.Event(), threading.Semaphore(0)

    def hold():
        held.release()
        return gate.wait(30)
    blockers = [pool.submit(-10 ** 9, hold) for _ in pool._threads]
    assert all(held.acquire(timeout=30) for _ in blockers)
    lock, got = threading.Lock(), []

    def same_shard():  # would deadlock on the waiting thread (a Lock is not reentrant)
        got.append(lock.acquire(timeout=5))
        if got[-1]:
            lock.release()

    def decoding():
        with lock:
            other = pool.submit(-3, same_shard)  # queued before the parts, at the same rank
            parts = run_ranked([(lambda i: i * i, i) for i in range(4)], 1)
        return parts, other
    try:
        parts, other = pool.wait(pool.submit(-3, decoding))
        assert parts == [0, 1, 4, 9] and not other.done() and got == []
    finally:
        gate.set()
    assert other.result(timeout=30) is None and got == [True]


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
