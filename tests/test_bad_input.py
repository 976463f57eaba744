"""Bad input through the public API: each a typed error with a clear message, and nothing written."""

from __future__ import annotations

import numpy as np
import pytest

from mlwarehouse import InvalidDocument, NotFound, QueryError


def _count_everything(wh) -> tuple[int, int]:
    docs = sum(wh.index.count(c, {}) for c in wh.index.collections())
    return docs, len(list(wh.blobs.list()))


@pytest.mark.parametrize("where, message", [
    ({"acc": {"$gtx": 1}}, "$gtx"),
    ({"$where": "1 == 1"}, "$where"),
    ({"acc'); DROP TABLE c_datasets; --": 1}, "DROP TABLE"),
    ({"a": {"$in": 5}}, "$in"),
    ({"$or": []}, "$or"),
])
def test_bad_filters(wh, where, message):
    wh.datasets.save(np.zeros(2), "d")
    before = _count_everything(wh)
    with pytest.raises(QueryError) as info:
        wh.datasets.find(where=where)
    assert message in str(info.value)
    assert _count_everything(wh) == before
    assert wh.datasets.load("d").shape == (2,)  # the table is still there


@pytest.mark.parametrize("sort", [
    "time", [("time", 2)], [("time",)], {"time": -1}, [("bad path!", 1)], [(1, 1)],
])
def test_malformed_sorts(wh, sort):
    with pytest.raises(QueryError):
        wh.datasets.find(sort=sort)


@pytest.mark.parametrize("fields", [
    {"when": {1, 2}}, {"x": float("nan")}, {"big": 2 ** 70}, {"arr": np.zeros(3)}, {"obj": object()},
    {"nested": {"a.b": 1}}, {"nested": {"$set": 1}},
])
def test_values_that_cannot_be_stored(wh, fields):
    wh.datasets  # opening the registry creates its collections and bookkeeping; the failed save adds nothing
    before = _count_everything(wh)
    with pytest.raises(InvalidDocument):
        wh.datasets.save(np.arange(5), "d", **fields)
    docs, _ = _count_everything(wh)
    assert docs == before[0]  # no document; at most an unreferenced blob for gc


def test_missing_things(wh):
    with pytest.raises(NotFound, match="no dataset 'nope'"):
        wh.datasets.load("nope")
    with pytest.raises(NotFound):
        wh.blobs.get("0" * 64)
    with pytest.raises(NotFound):
        wh.blobs.get("../../etc/passwd")
