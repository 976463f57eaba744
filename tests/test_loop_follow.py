"""The in-process deployer (``follow``): swaps when the alias moves, every call answered by exactly one model while
swaps happen from other threads, a holder that cannot load keeps the old one serving, a removed alias keeps the
last model, NotFound for an alias never set, close stops the thread, and a move by another process is seen."""

from __future__ import annotations

import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import PYTHON, wait_for

from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.loops.follow import follow
from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3, sqlite_and_files
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

torch = pytest.importorskip("torch")

POLL = 0.05
PROJECT = "follow"


def _linear(value: float):
    net = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.constant_(net.weight, value)
    return net


@pytest.fixture
def lab(wh):
    ones = wh.models.save(_linear(1.0), "mlp")
    twos = wh.models.save(_linear(2.0), "mlp")
    wh.models.aliases.set("mlp", "champion", ones)
    return wh, ones, twos


X = torch.ones(3, 4)  # ones answer 4, twos answer 8


def _answer(out) -> float:
    values = set(out.flatten().tolist())
    assert len(values) == 1, f"one call mixed answers: {values}"
    return values.pop()


def test_swaps_when_the_alias_moves(lab):
    wh, ones, twos = lab
    swapped = []
    with follow(wh, "mlp@champion", poll=POLL, on_swap=lambda old, new: swapped.append((old, new))) as served:
        assert (served.model_id, served.version, served.swaps) == (ones.id, 1, 0)
        assert _answer(served(X)) == 4.0 and not served(X).requires_grad  # no_grad
        start = time.monotonic()
        wh.models.aliases.set("mlp", "champion", twos)
        wait_for(lambda: served.model_id == twos.id, timeout=5)
        assert time.monotonic() - start < 2.0  # within poll + load time
        assert _answer(served(X)) == 8.0 and (served.version, served.swaps) == (2, 1)
        assert swapped == [(ones.id, twos.id)] and served.last_error is None
        wh.models.aliases.set("mlp", "champion", twos)  # set again to the holder: a new version, no swap
        wait_for(lambda: served.version == 3, timeout=5)
        assert served.swaps == 1 and served.model_id == twos.id


def test_calls_from_threads_during_swaps_are_never_a_mix(lab):
    wh, ones, twos = lab
    served = follow(wh, "mlp@champion", poll=0.01)
    answers: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller():
        try:
            while not stop.is_set():
                answers.append(_answer(served(X)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for k in range(8):
        target = twos if k % 2 == 0 else ones
        wh.models.aliases.set("mlp", "champion", target)
        wait_for(lambda: served.model_id == target.id, timeout=5)
    stop.set()
    for thread in threads:
        thread.join(10)
    served.close()
    assert not errors, errors
    assert served.swaps == 8 and answers and set(answers) <= {4.0, 8.0} and set(answers) == {4.0, 8.0}


def test_a_holder_that_cannot_load_keeps_the_old_model(lab):
    wh, ones, twos = lab
    weights = wh.models.save({"w": np.ones(2)}, "mlp")  # arrays: not callable
    with follow(wh, "mlp@champion", poll=POLL) as served:
        wh.models.aliases.set("mlp", "champion", weights)
        wait_for(lambda: served.last_error is not None, timeout=5)
        assert isinstance(served.last_error, QueryError) and "not callable" in str(served.last_error)
        assert served.model_id == ones.id and served.version == 1 and _answer(served(X)) == 4.0
        wh.models.aliases.set("mlp", "champion", twos)  # a good holder after the bad one is taken
        wait_for(lambda: served.model_id == twos.id, timeout=5)
        assert _answer(served(X)) == 8.0 and served.swaps == 1
    wh.models.aliases.set("mlp", "champion", weights)
    with pytest.raises(QueryError):  # the same holder at creation raises at once
        follow(wh, "mlp@champion")


def test_a_removed_alias_keeps_the_last_model(lab):
    wh, ones, twos = lab
    with follow(wh, "mlp@champion", poll=POLL) as served:
        wh.models.aliases.remove("mlp", "champion")
        wait_for(lambda: served.removed, timeout=5)
        assert served.model_id == ones.id and _answer(served(X)) == 4.0 and "removed" in repr(served)
        wh.models.aliases.set("mlp", "champion", twos)
        wait_for(lambda: served.model_id == twos.id, timeout=5)
        assert not served.removed and served.version == 3


def test_missing_alias_and_bad_arguments(lab):
    wh, _, _ = lab
    with pytest.raises(NotFound):
        follow(wh, "mlp@staging")
    wh.models.aliases.set("mlp", "staging", lab[1])
    wh.models.aliases.remove("mlp", "staging")
    with pytest.raises(NotFound):
        follow(wh, "mlp@staging")
    for bad in ({"poll": 0}, {"poll": "1"}, {"on_swap": 3}):
        with pytest.raises(QueryError):
            follow(wh, "mlp@champion", **bad)
    with pytest.raises(QueryError):
        follow(wh, "mlp")


def test_close_stops_the_thread_and_serves_on(lab):
    wh, ones, twos = lab
    served = follow(wh.project(), "mlp@champion", poll=POLL, preload=False)
    assert served.following and _answer(served(X)) == 4.0  # loaded at the first call
    served.close()
    assert not served.following
    wh.models.aliases.set("mlp", "champion", twos)
    time.sleep(5 * POLL)
    assert served.model_id == ones.id and _answer(served(X)) == 4.0
    assert served.refresh() and served.model_id == twos.id  # an explicit read still works


def test_a_move_by_another_process_is_seen(lab, subprocess_env):
    wh, ones, twos = lab
    with follow(wh, "mlp@champion", poll=POLL) as served:
        subprocess.run([PYTHON, "-c", f"import mlwarehouse; mlwarehouse.connect().models.aliases"
                        f".set('mlp', 'champion', {twos.id!r}, by='other process')"],
                       env=subprocess_env, check=True, timeout=60)
        wait_for(lambda: served.model_id == twos.id, timeout=5)
        assert _answer(served(X)) == 8.0


class FollowTests:
    def test_swap_on_this_backend(self, wh):
        ones = wh.models.save(_linear(1.0), "mlp")
        twos = wh.models.save(_linear(2.0), "mlp")
        wh.models.aliases.set("mlp", "champion", ones)
        with follow(wh, "mlp@champion", poll=self.poll) as served:
            time.sleep(0.3)  # the thread is waiting (on PostgreSQL: listening)
            start = time.monotonic()
            wh.models.aliases.set("mlp", "champion", twos)
            wait_for(lambda: served.model_id == twos.id, timeout=self.poll + 10)
            took = time.monotonic() - start
            assert _answer(served(X)) == 8.0 and served.swaps == 1
        assert not served.following
        print(f"swap seen after {took:.3f} s")  # noqa: T201
        assert took < self.within


class TestSQLiteAndFiles(FollowTests):
    poll, within = 0.1, 3.0

    @pytest.fixture
    def wh(self, tmp_path, monkeypatch):
        yield from sqlite_and_files(tmp_path, monkeypatch, PROJECT)


class TestPostgresAndS3(FollowTests):
    poll, within = 4.0, 3.0  # a write's NOTIFY wakes the thread well before the poll

    @pytest.fixture
    def wh(self, postgres_server, s3_server, monkeypatch):  # noqa: F811
        yield from postgres_and_s3(postgres_server, s3_server, monkeypatch, PROJECT)


class TestMongoAndGridFS(FollowTests):
    poll, within = 0.1, 3.0

    @pytest.fixture
    def wh(self, mongo_server, monkeypatch):  # noqa: F811
        yield from mongo_and_gridfs(mongo_server, monkeypatch, PROJECT)


def test_the_registry_follows_by_name_at_alias(lab):
    wh, ones, twos = lab
    with wh.models.follow("mlp@champion", poll=POLL) as served:
        assert served.model_id == ones.id and _answer(served(X)) == 4.0
        wh.models.aliases.set("mlp", "champion", twos)
        wait_for(lambda: served.model_id == twos.id, timeout=5)
        assert _answer(served(X)) == 8.0
