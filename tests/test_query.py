"""The reference semantics: matcher, sort order, updates, projections and document validation."""

from __future__ import annotations

import json
import re

import pytest

from mlwarehouse.errors import InvalidDocument, QueryError
from mlwarehouse.query import (
    MISSING,
    apply_update,
    distinct_values,
    get_path,
    matches,
    project,
    sort_docs,
    validate_document,
    validate_filter,
    validate_projection,
    validate_sort,
    validate_update,
)

DOC = {
    "_id": "d1", "name": "mlp", "tags": ["mnist", "small"], "n": 3, "f": 2.5, "flag": True, "none": None,
    "metrics": {"loss": {"min": 0.1, "last": 0.2}}, "shape": [28, 28, 1], "pairs": [[1, 2], [3, 4]],
    "layers": [{"kind": "conv", "size": 32}, {"kind": "dense", "size": 10}], "per_class": {"0": 0.9, "1": 0.8},
    "empty": [], "obj": {"a": 1, "b": 2},
}

CASES = [
    # equality and array membership
    ({"name": "mlp"}, True), ({"name": "cnn"}, False), ({"tags": "mnist"}, True), ({"tags": "big"}, False),
    ({"tags": ["mnist", "small"]}, True), ({"tags": ["small", "mnist"]}, False), ({"pairs": [1, 2]}, True),
    ({"pairs": [2, 1]}, False), ({"n": 3.0}, True), ({"f": 2.5}, True), ({"obj": {"a": 1, "b": 2}}, True),
    ({"obj": {"b": 2, "a": 1}}, False), ({"empty": []}, True), ({"shape": 28}, True),
    # bool is not a number
    ({"flag": 1}, False), ({"flag": True}, True), ({"n": True}, False), ({"flag": {"$gt": 0}}, False),
    ({"flag": {"$gte": False}}, True),
    # null and missing
    ({"none": None}, True), ({"absent": None}, True), ({"name": None}, False), ({"absent": {"$eq": None}}, True),
    ({"absent": {"$ne": None}}, False), ({"none": {"$exists": True}}, True), ({"absent": {"$exists": False}}, True),
    ({"absent": {"$ne": 1}}, True), ({"absent": {"$nin": [1]}}, True), ({"absent": {"$gte": None}}, True),
    ({"absent": {"$gt": None}}, False), ({"none": {"$lte": None}}, True), ({"tags": {"$ne": None}}, True),
    # comparisons: type bracketing, elementwise in arrays
    ({"n": {"$gt": 2}}, True), ({"n": {"$gt": 3}}, False), ({"n": {"$gte": 3}}, True), ({"n": {"$lt": 3.5}}, True),
    ({"n": {"$gt": "a"}}, False), ({"name": {"$gt": 5}}, False), ({"name": {"$gt": "a"}}, True),
    ({"name": {"$lt": "n"}}, True), ({"shape": {"$lt": 2}}, True), ({"shape": {"$gt": 28}}, False),
    ({"shape": {"$gt": 1, "$lt": 2}}, True), ({"shape": {"$elemMatch": {"$gt": 1, "$lt": 28}}}, False),
    ({"shape": {"$elemMatch": {"$gte": 1, "$lt": 2}}}, True), ({"obj": {"$gt": {"a": 0}}}, True),
    ({"pairs": {"$gt": [1, 3]}}, True), ({"n": {"$gt": float("-inf")}}, True),
    # $in $nin $all $size
    ({"n": {"$in": [1, 3]}}, True), ({"n": {"$in": []}}, False), ({"tags": {"$in": ["x", "small"]}}, True),
    ({"n": {"$nin": [1, 3]}}, False), ({"n": {"$nin": []}}, True), ({"absent": {"$in": [None]}}, True),
    ({"tags": {"$all": ["small", "mnist"]}}, True), ({"tags": {"$all": ["small", "big"]}}, False),
    ({"tags": {"$all": []}}, False), ({"n": {"$all": [3]}}, True), ({"tags": {"$size": 2}}, True),
    ({"tags": {"$size": 1}}, False), ({"name": {"$size": 3}}, False), ({"empty": {"$size": 0}}, True),
    # $elemMatch on documents, $not, $regex
    ({"layers": {"$elemMatch": {"kind": "conv", "size": {"$gt": 16}}}}, True),
    ({"layers": {"$elemMatch": {"kind": "dense", "size": {"$gt": 16}}}}, False),
    ({"layers": {"$elemMatch": {"$or": [{"size": 10}, {"size": 99}]}}}, True),
    ({"tags": {"$elemMatch": {"$regex": "^sm"}}}, True), ({"pairs": {"$elemMatch": {"$size": 2}}}, True),
    ({"n": {"$not": {"$gt": 5}}}, True), ({"n": {"$not": {"$gt": 1}}}, False), ({"absent": {"$not": {"$gt": 1}}}, True),
    ({"name": {"$regex": "^m"}}, True), ({"name": {"$regex": "^M"}}, False),
    ({"name": {"$regex": "^M", "$options": "i"}}, True), ({"name": re.compile("L", re.I)}, True),
    ({"tags": {"$regex": "all$"}}, True), ({"n": {"$regex": "3"}}, False),
    ({"name": {"$not": re.compile("^c")}}, True), ({"absent": {"$regex": "."}}, False),
    # paths
    ({"metrics.loss.min": 0.1}, True), ({"metrics.loss.min": {"$lt": 0.05}}, False), ({"shape.0": 28}, True),
    ({"shape.2": 1}, True), ({"shape.3": {"$exists": False}}, True), ({"per_class.0": 0.9}, True),
    ({"pairs.1.0": 3}, True), ({"layers.kind": "conv"}, False), ({"layers.0.kind": "conv"}, True),
    ({"name.x": {"$exists": False}}, True), ({"shape.01": {"$exists": True}}, False),
    # logic
    ({"$and": [{"n": 3}, {"name": "mlp"}]}, True), ({"$or": [{"n": 4}, {"name": "mlp"}]}, True),
    ({"$or": [{"n": 4}, {"name": "x"}]}, False), ({"$nor": [{"n": 4}, {"name": "x"}]}, True),
    ({"$nor": [{"n": 3}]}, False), ({}, True), ({"n": 3, "name": "cnn"}, False),
]


@pytest.mark.parametrize("f, expected", CASES, ids=[str(c[0]) for c in CASES])
def test_matcher(f, expected):
    assert matches(DOC, f) is expected


BAD_FILTERS = [
    ({"$where": "1"}, "$where"), ({"a": {"$foo": 1}}, "$foo"), ({"a'); drop table x;--": 1}, "drop table"),
    ({"a b": 1}, "a b"), ({"a..b": 1}, "a..b"), ({"": 1}, "''"), ({"$and": []}, "$and"), ({"$or": {}}, "$or"),
    ({"a": {"$in": 5}}, "$in"), ({"a": {"$exists": 1}}, "$exists"), ({"a": {"$size": -1}}, "$size"),
    ({"a": {"$size": True}}, "$size"), ({"a": {"$regex": "("}}, "regular expression"),
    ({"a": {"$regex": "a", "$options": "u"}}, "$options"), ({"a": {"$options": "i"}}, "$options needs"),
    ({"a": {"$gt": 1, "b": 2}}, "mix"), ({"a": {"$not": 5}}, "$not"), ({"a": {"$elemMatch": {}}}, "$elemMatch"),
    ({"a": float("nan")}, "NaN"), ({"a": 2**70}, "64 bits"), ({"a": (1, 2)}, "use a list"), ({"a": {1, 2}}, "set"),
    ({"a": {"$eq": b"x"}}, "bytes"), ([("a", 1)], "dict"), ({"a": {"$elemMatch": {"$foo": 1}}}, "$foo"),
    ({"$expr": {}}, "$expr"), ({"a\\": 1}, "a\\\\"), ({'a"': 1}, 'a"'), ({"a.$b": 1}, "a.$b"),
]


@pytest.mark.parametrize("f, fragment", BAD_FILTERS, ids=[str(b[0]) for b in BAD_FILTERS])
def test_bad_filters_raise_naming_the_problem(f, fragment):
    with pytest.raises(QueryError) as info:
        validate_filter(f)
    assert fragment in str(info.value)


def test_sort_validation():
    assert validate_sort([("a", 1)]) == [("a", 1), ("_id", 1)]
    assert validate_sort([("_id", -1), ("a", 1)]) == [("_id", -1), ("a", 1)]
    assert validate_sort(None) == [("_id", 1)]
    for bad in ["a", {"a": 1}, [("a", 2)], [("a",)], [("a", True)], [("a b", 1)], [("a", 1), ("a", -1)],
                [("x'--", 1)], 5]:
        with pytest.raises(QueryError):
            validate_sort(bad)


def test_sort_order_across_types():
    values = [True, False, [1], [0, 5], {"b": 1}, {"a": 2}, "b", "a", "", 2.5, -1, 2, None]
    docs = [{"_id": f"{i:02d}", "v": v} for i, v in enumerate(values)] + [{"_id": "zz"}]
    got = [d.get("v", MISSING) for d in sort_docs(docs, [("v", 1)])]
    assert got == [None, MISSING, -1, 2, 2.5, "", "a", "b", {"a": 2}, {"b": 1}, [0, 5], [1], False, True]
    desc = [d["_id"] for d in sort_docs(docs, [("v", -1)])]
    assert desc[:2] == ["00", "01"] and desc[-2:] == ["12", "zz"]  # ties broken by _id ascending


def test_distinct_values():
    docs = [{"_id": "1", "t": ["a", "b"]}, {"_id": "2", "t": "a"}, {"_id": "3", "t": 1}, {"_id": "4", "t": 1.0},
            {"_id": "5"}, {"_id": "6", "t": None}]
    assert distinct_values(docs, "t") == [None, 1, "a", "b"]


def test_get_path():
    assert get_path(DOC, "metrics.loss.min") == 0.1
    assert get_path(DOC, "shape.1") == 28
    assert get_path(DOC, "shape.9") is MISSING
    assert get_path(DOC, "layers.kind", None) is None


# -- updates ---------------------------------------------------------------------------------------------
def test_update_operators():
    doc = {"_id": "x", "n": 1, "tags": ["a"], "m": {"best": 0.5}, "s": "k"}
    new = apply_update(doc, {"$set": {"a.b.c": 1, "s": "v"}, "$inc": {"n": 2, "fresh": 1.5},
                             "$unset": {"m.best": ""}, "$push": {"tags": "b", "log": {"$each": [1, 2]}},
                             "$addToSet": {"set": {"$each": [1, 1, 2]}}})
    assert new == {"_id": "x", "n": 3, "tags": ["a", "b"], "m": {}, "s": "v", "a": {"b": {"c": 1}}, "fresh": 1.5,
                   "log": [1, 2], "set": [1, 2]}
    assert doc["tags"] == ["a"] and "a" not in doc  # the input is untouched
    assert apply_update({"_id": "x", "v": 3}, {"$min": {"v": 1}})["v"] == 1
    assert apply_update({"_id": "x", "v": 3}, {"$min": {"v": 5}})["v"] == 3
    assert apply_update({"_id": "x", "v": 3}, {"$max": {"v": 5, "w": 0}}) == {"_id": "x", "v": 5, "w": 0}
    assert apply_update({"_id": "x", "t": [1]}, {"$addToSet": {"t": 1.0}})["t"] == [1]
    assert apply_update({"_id": "x", "t": [1]}, {"$push": {"t": [2, 3]}})["t"] == [1, [2, 3]]
    assert apply_update({"_id": "x", "a": [0]}, {"$set": {"a.2": 5}})["a"] == [0, None, 5]
    assert apply_update({"_id": "x", "a": [0, 1]}, {"$unset": {"a.0": ""}})["a"] == [None, 1]
    assert apply_update({"_id": "x"}, {"$unset": {"gone.deep": ""}}) == {"_id": "x"}


@pytest.mark.parametrize("update, fragment", [
    ({"n": 1}, "not an operator"), ({}, "non-empty"), ({"$rename": {"a": "b"}}, "$rename"),
    ({"$set": {"_id": "y"}}, "_id"), ({"$unset": {"_id": ""}}, "_id"),
    ({"$set": {"a": 1}, "$inc": {"a": 1}}, "conflict"),
    ({"$set": {"a": 1, "a.b": 2}}, "conflict"), ({"$inc": {"a": "1"}}, "$inc"), ({"$inc": {"a": True}}, "$inc"),
    ({"$push": {"a": {"$each": 1}}}, "$each"), ({"$push": {"a": {"$slice": 1}}}, "$each"), ({"$set": [1]}, "dict"),
    ({"$set": {"a b": 1}}, "a b"),
])
def test_bad_updates(update, fragment):
    with pytest.raises(QueryError) as info:
        validate_update(update)
    assert fragment in str(info.value)


def test_update_errors_depending_on_data():
    with pytest.raises(QueryError, match="not a number"):
        apply_update({"_id": "x", "a": "s"}, {"$inc": {"a": 1}})
    with pytest.raises(QueryError, match="not an array"):
        apply_update({"_id": "x", "a": 1}, {"$push": {"a": 1}})
    with pytest.raises(QueryError, match="cannot create"):
        apply_update({"_id": "x", "a": 1}, {"$set": {"a.b": 1}})
    with pytest.raises(InvalidDocument):
        validate_update({"$set": {"a": float("nan")}})


# -- projections -----------------------------------------------------------------------------------------
def test_projection():
    assert project(DOC, {"name": 1, "metrics.loss.min": 1}) == {"_id": "d1", "name": "mlp",
                                                                "metrics": {"loss": {"min": 0.1}}}
    assert project(DOC, {"name": 1, "_id": 0}) == {"name": "mlp"}
    assert project(DOC, {"_id": 1}) == {"_id": "d1"}
    out = project(DOC, {"metrics": 0, "tags": 0, "obj.a": 0})
    assert "metrics" not in out and "tags" not in out and out["obj"] == {"b": 2} and DOC["obj"] == {"a": 1, "b": 2}
    assert project(DOC, {"absent.x": 1}) == {"_id": "d1"}
    for bad in [{"a": 1, "b": 0}, {"a": 2}, {"a": 1, "a.b": 1}, {"a b": 1}, ["a"]]:
        with pytest.raises(QueryError):
            validate_projection(bad)


# -- documents -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc, fragment", [
    ({"_id": "x", "a": {1, 2}}, "a: a set"), ({"_id": "x", "a": b"raw"}, "a: a bytes"),
    ({"_id": "x", "m": {"loss": float("nan")}}, "m.loss"), ({"_id": "x", "a": [1, float("inf")]}, "a.1"),
    ({"_id": "x", "big": 2**70}, "big"), ({"_id": "x", "a": {"b.c": 1}}, "'b.c' contains '.'"),
    ({"_id": "x", "$set": 1}, "'$set'"), ({"_id": "x", "a": {"k\0": 1}}, "NUL"), ({"_id": "x", 5: 1}, "not a string"),
    ({"_id": "", "a": 1}, "_id"), ({"_id": 5}, "_id"), ({"a": 1}, "_id"), ({"_id": "x", "t": (1, 2)}, "tuple"),
    ({"_id": "x", "s": "\ud800"}, "surrogate"), ("not a dict", "dict"),
])
def test_invalid_documents(doc, fragment):
    with pytest.raises(InvalidDocument) as info:
        validate_document(doc)
    assert fragment in str(info.value)


def test_valid_document():
    validate_document(DOC)
    validate_document({"_id": "x", "i": 2**63 - 1, "j": -(2**63), "s": "é\U0001f600", "deep": [[{"a": [None]}]]})
    with pytest.raises(InvalidDocument, match="NUL"):  # SQLite's JSON functions would cut the string there
        validate_document({"_id": "x", "deep": [{"s": "a\0b"}]})


def test_corners_found_in_review_are_refused_with_query_errors(tmp_path):
    from mlwarehouse.index.sqlite import SQLiteIndex
    from mlwarehouse.query import parse_filter
    from mlwarehouse.query.updates import validate_update
    for bad in ({"a\n": 1}, {"a.0\n": 1}, {"a": {"$size": 2**64}}, {"a": [float("inf")]},
                {"a": {"$gt": {"k": float("-inf")}}}):
        with pytest.raises(QueryError):
            parse_filter(bad)
    assert parse_filter({"a": {"$lt": float("inf")}})  # a plain infinite bound stays allowed
    with pytest.raises(QueryError, match="conflict"):
        validate_update({"$set": {"a.b": 1, "a-x": 1, "a": 5}})  # "a-x" sorts between "a" and "a.b"
    ix = SQLiteIndex(tmp_path / "i.sqlite")
    with pytest.raises(QueryError):
        ix.insert_one("docs\n", {"_id": "x"})
    with pytest.raises(InvalidDocument, match="NUL"):
        ix.insert_one("docs", {"_id": "x", "s": "a\0b"})  # the fast path of bulk writes checks it too
    assert ix.count("docs") == 0
    ix.close()


def test_stored_json_reads_as_the_standard_library_reads_it():
    from mlwarehouse.query import json_value

    for text in ('{"a": [1, 2.5, -0.0, 1e-300, "x\\u00e9\\ud83d\\ude00"], "b": {"c": null, "d": true}}',
                 '"\\ud800"', '[9223372036854775807, -9223372036854775808]'):
        got, want = json_value(text), json.loads(text)
        assert got == want and json.dumps(got) == json.dumps(want), text  # the fallback reads what orjson refuses
        assert json_value(text.encode()) == want
    with pytest.raises(ValueError):
        json_value("{not json")
