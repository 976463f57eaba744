"""One API shape for every registry: datasets, item datasets, models, runs and tasks take the same arguments.

``find(name=None, *, where=None, sort=None, limit=None, skip=0)``, ``get(id)`` (whole id or unique prefix),
``load(name=None, *, id=None, where=None, sort=None)`` where loading applies, ``delete(name=None, *, where=None)``.
Before, ``wh.models.find("digits-mlp")`` raised "where must be a filter dict" while ``wh.datasets.find("digits")``
worked, and ``wh.models.load(ID)`` said "no model 'ID'".
"""

from __future__ import annotations

import inspect
import os
import secrets
import time
from urllib.parse import quote

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)


@pytest.fixture(params=["sqlite", "postgres", "mongo"])
def any_wh(request, tmp_path):
    """A warehouse on each index backend (blobs in a local folder): id prefixes are range queries on ``_id``."""
    drop = None
    if request.param == "sqlite":
        wh = mlwarehouse.connect(home=tmp_path / "wh")
    elif request.param == "postgres":
        psycopg = pytest.importorskip("psycopg")
        server = request.getfixturevalue("postgres_server")
        schema = "r_" + secrets.token_hex(6)
        with psycopg.connect(server, autocommit=True) as con:
            con.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in server else "?"
        wh = mlwarehouse.connect(f"{server}{sep}options={quote(f'-csearch_path={schema}')}",
                                 blobs=str(tmp_path / "blobs"))

        def drop():
            with psycopg.connect(server, autocommit=True) as con:
                con.execute(f"DROP SCHEMA {schema} CASCADE")
    else:
        wh = mlwarehouse.connect(fresh_uri(request.getfixturevalue("mongo_server")), blobs=str(tmp_path / "blobs"))
    yield wh
    wh.close()
    if drop is not None:
        drop()


def _dataset(p, name, score):
    return p.datasets.save(np.full(2, score), name, score=score)


def _items(p, name, score):
    return p.items.from_arrays(name, {"x": np.full((2, 2), score, np.float32)}, score=score)


def _model(p, name, score):
    return p.models.save({"w": np.full(2, score, np.float32)}, name, score=score)


def _run(p, name, score):
    return p.runs.start(name, score=score).finish()


def _task(p, name, score):
    return p.tasks.create(name, "builtins:dict", hyper_parameters={"score": score}, score=score)


#: registry attribute, how to make one entry, the name argument, whether it loads
REGISTRIES = [("datasets", _dataset, "name", True), ("items", _items, "name", True),
              ("models", _model, "name", True), ("runs", _run, "name", False), ("tasks", _task, "task_name", False)]
IDS = [r[0] for r in REGISTRIES]


def _unique_prefix(ids: list[str], i: int) -> str:
    """The shortest prefix (4 characters at least) of ``ids[i]`` that no other id starts with."""
    for size in range(4, len(ids[i]) + 1):
        if not any(other.startswith(ids[i][:size]) for j, other in enumerate(ids) if j != i):
            return ids[i][:size]
    raise AssertionError("ids are not unique")


def _params(method) -> list[tuple[str, str, object]]:
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(method).parameters.values()]


@pytest.mark.parametrize("attr, make, name_arg, loads", REGISTRIES, ids=IDS)
def test_signatures_are_the_same(wh, attr, make, name_arg, loads):
    registry = getattr(wh.project(attr), attr)
    find = _params(registry.find)
    assert find[0] == (name_arg, "POSITIONAL_OR_KEYWORD", None)
    assert all(kind == "KEYWORD_ONLY" for _, kind, _ in find[1:])
    assert {k: d for k, _, d in find} | {"where": None, "sort": None, "limit": None, "skip": 0} == \
        {k: d for k, _, d in find}
    get = _params(registry.get)
    assert get[0] == ("id", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty)
    assert all(kind == "KEYWORD_ONLY" for _, kind, _ in get[1:])
    delete = _params(registry.delete)
    assert delete[0] == (name_arg, "POSITIONAL_OR_KEYWORD", None) and ("where", "KEYWORD_ONLY", None) in delete
    assert all(kind == "KEYWORD_ONLY" for _, kind, _ in delete[1:])
    if loads:
        load = _params(registry.load)
        assert load[0] == ("name", "POSITIONAL_OR_KEYWORD", None)
        assert {("id", "KEYWORD_ONLY", None), ("where", "KEYWORD_ONLY", None), ("sort", "KEYWORD_ONLY", None)} \
            <= set(load)
    else:
        assert not hasattr(registry, "load")


@pytest.mark.parametrize("attr, make, name_arg, loads", REGISTRIES, ids=IDS)
def test_find_get_delete_behave_the_same(any_wh, attr, make, name_arg, loads):
    p = any_wh.project(attr)
    registry = getattr(p, attr)
    made = []
    for name, score in (("a", 1), ("b", 2), ("a", 3)):
        made.append(make(p, name, score))
        time.sleep(0.003)  # ids of another millisecond: a short prefix tells them apart
    ids = [m.id for m in made]

    def scores(records):
        return [r.doc["score"] for r in records]

    assert sorted(scores(registry.find("a"))) == [1, 3]
    assert sorted(scores(registry.find(**{name_arg: "b"}))) == [2]
    assert sorted(scores(registry.find(where={"score": {"$gte": 2}}))) == [2, 3]
    assert scores(registry.find("a", where={"score": {"$gte": 2}})) == [3]
    assert scores(registry.find(sort=[("score", -1)])) == [3, 2, 1]
    assert scores(registry.find(sort=[("score", -1)], limit=2)) == [3, 2]
    assert scores(registry.find(sort=[("score", -1)], skip=1)) == [2, 1]
    with pytest.raises(QueryError, match="where="):
        registry.find({"score": 1})  # the old positional filter

    assert registry.get(ids[1]).doc["score"] == 2
    assert len(_unique_prefix(ids, 1)) < 20 and registry.get(_unique_prefix(ids, 1)).id == ids[1]  # as git
    assert registry.get(ids[1].lower()).id == ids[1]  # ids are case-insensitive, as base32 is
    common = os.path.commonprefix(ids)
    if len(common) >= 4:
        with pytest.raises(QueryError, match="ambiguous"):
            registry.get(common)
    with pytest.raises(NotFound, match="ZZZZZZZZZZ"):
        registry.get("ZZZZZZZZZZ")

    assert registry.delete(where={"score": 3}) == 1
    assert registry.delete("a") == 1
    with pytest.raises(QueryError, match="where="):
        registry.delete({"score": 2})
    assert scores(registry.find()) == [2]


LOADING = [(r[0], r[1]) for r in REGISTRIES if r[3]]


@pytest.mark.parametrize("attr, make", LOADING, ids=[r[0] for r in LOADING])
def test_load_by_name_id_or_id_as_the_name(wh, attr, make):
    p = wh.project(attr)
    registry = getattr(p, attr)
    old, new, other = make(p, "a", 1), make(p, "a", 3), make(p, "b", 2)

    def score(value):
        return float(value.doc["score"] if attr == "items" else (value["w"] if attr == "models" else value)[0])

    assert score(registry.load("a")) == 3  # the newest
    assert score(registry.load("a", sort=[("score", 1)])) == 1
    assert score(registry.load(where={"score": 2})) == 2
    assert score(registry.load(id=old.id)) == 1
    assert score(registry.load(old.id)) == 1  # no entry has that name: it is taken as an id
    assert score(registry.load(_unique_prefix([old.id, new.id, other.id], 2))) == 2  # or a unique id prefix
    with pytest.raises(QueryError):
        registry.load("a", id=old.id)
    with pytest.raises(NotFound, match="'nope'"):
        registry.load("nope")
    assert new.id != old.id


def test_models_listings_best_and_load_show_final_models_unless_asked(wh):
    """``mlw models --sort test_accuracy:-1`` showed 14 checkpoints among 20 rows."""
    models = wh.models
    final = models.save({"w": np.zeros(2)}, "mlp", test_accuracy=0.8)
    ckpts = [models.checkpoint({"w": np.full(2, e, np.float64)}, run="R", epoch=e, name="mlp",
                               metrics={"test_accuracy": 0.9 + e / 100}) for e in range(3)]
    assert [m.id for m in models.find()] == [final.id]
    assert [m.id for m in models.find("mlp", sort=[("test_accuracy", -1)])] == [final.id]
    assert len(models.find("mlp", checkpoints=True)) == 4
    assert [m.epoch for m in models.find(where={"checkpoint": True}, sort=[("epoch", 1)])] == [0, 1, 2]
    assert models.best("test_accuracy").id == final.id
    assert models.best("test_accuracy", checkpoints=True).id == ckpts[2].id
    assert models.load("mlp")["w"][0] == 0.0
    assert models.load("mlp", checkpoints=True, sort=[("epoch", -1)])["w"][0] == 2.0
    assert models.get(ckpts[0].id).checkpoint is True  # by id, whatever it is
    assert models.load(ckpts[1].id)["w"][0] == 1.0
    with pytest.raises(NotFound, match="checkpoints=True"):
        models.best("test_accuracy", where={"test_accuracy": {"$gt": 0.85}})
    assert models.delete("mlp") == 4  # delete takes checkpoints too
