"""``mlw search`` and ``mlw vector-indexes``: like a stored document, by a vector file, by text through a listener,
with --where, the fewer-than-n line, --json, and errors as one line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import ROOT, mlw

from mlwarehouse.testing.vector_conformance import DIMS, embed_text

TEXTS = ["red apple pie", "green apple tart", "blue sky today", "grey sky rain", "apple juice red",
         "sky blue ocean", "rain and grey clouds", "pie with red cherries"]
TRUSTED = {"MLW_TRUSTED_MODULES": "mlwarehouse.testing.vector_conformance"}
WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import mlwarehouse
    home = tmp_path_factory.mktemp("clis") / "wh"
    with mlwarehouse.connect(home=home, project="shop") as wh:
        c = wh.collection("texts")
        c.insert_many({"_id": f"t{i}", "text": t, "n": i, "v": embed_text(t)} for i, t in enumerate(TEXTS))
        c.attach("embed", embed_text, key="text")
        c.create_vector_index("by_text", listener="embed")
        c.create_vector_index("by_v", field="v", metric="l2")
        wh.collection("plain").insert_one({"_id": "x"})
    environ = {k: v for k, v in os.environ.items() if k not in ("MLW_URI", "MLW_BLOBS", "MLW_PROJECT",
                                                                 "MLW_TRUSTED_MODULES")}
    return {**environ, "PYTHONPATH": str(ROOT) + os.pathsep + environ.get("PYTHONPATH", ""),
            "MLW_HOME": str(home), "MLW_PROJECT": "shop"}


def lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_like_a_stored_document(env):
    docs = lines(mlw(env, "search", "texts", "--like", "t0", "-n", "3", "--json"))
    assert [d["_id"] for d in docs] == ["t0", "t4", "t7"]
    assert docs[0]["_score"] == pytest.approx(1.0, abs=1e-4)
    assert docs[0]["text"] == "red apple pie" and docs[0]["v"] == {"array": {"shape": [DIMS], "dtype": "float32"}}
    scores = [d["_score"] for d in docs]
    assert scores == sorted(scores, reverse=True)
    table = mlw({**env, **WIDE}, "search", "texts", "--like", "t0", "-n", "2").stdout
    assert "rank" in table and "score" in table and "1.0000" in table and "red apple pie" in table
    assert "t4" in table and "2 shown" in table
    every = mlw({**env, **WIDE}, "search", "texts", "--like", "t0", "-n", "20").stdout
    assert "8 shown: the index holds no more" in every


def test_by_a_vector_file_npy_or_json(env, tmp_path):
    query = embed_text("grey rain")
    np.save(tmp_path / "q.npy", query)
    by_npy = lines(mlw(env, "search", "texts", "--vector", str(tmp_path / "q.npy"), "--index", "by_v", "-n", "2",
                       "--json"))
    assert [d["_id"] for d in by_npy] == ["t3", "t6"]
    assert by_npy[0]["_score"] <= 0  # l2: minus the distance
    (tmp_path / "q.json").write_text(json.dumps(query.tolist()))
    by_json = lines(mlw(env, "search", "texts", "--vector", str(tmp_path / "q.json"), "-n", "2", "--json"))
    assert [d["_id"] for d in by_json] == ["t3", "t6"]  # the default index (by_text) holds the same vectors


def test_by_text_through_the_listener_model(env):
    docs = lines(mlw({**env, **TRUSTED}, "search", "texts", "--text", "red apple", "-n", "2", "--json"))
    assert {d["_id"] for d in docs} == {"t0", "t4"}
    refused = mlw(env, "search", "texts", "--text", "red apple", ok=False)  # the model's module is not trusted
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: PickleNotAllowed: ") and "MLW_TRUSTED_MODULES" in refused.stderr
    field = mlw({**env, **TRUSTED}, "search", "texts", "--text", "red", "--index", "by_v", ok=False)
    assert field.returncode == 1 and "--text needs an index over a listener" in field.stderr


def test_where_and_the_fewer_than_n_line(env):
    docs = lines(mlw({**env, **TRUSTED}, "search", "texts", "--text", "red apple", "--where",
                     '{"n": {"$gte": 2}}', "-n", "1", "--json"))
    assert [d["_id"] for d in docs] == ["t4"]
    out = mlw({**env, **WIDE}, "search", "texts", "--like", "t0", "--where", '{"n": {"$gte": 2}}', "-n", "3").stdout
    assert "6 documents match the filter" in out
    few = mlw({**env, **WIDE}, "search", "texts", "--like", "t0", "--where", '{"n": {"$in": [1, 2]}}').stdout
    assert "fewer than n=10 documents match the filter: 2 do" in few
    assert "t1" in few and "t2" in few
    none = mlw(env, "search", "texts", "--like", "t0", "--where", '{"n": 99}', "--json")
    assert none.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--like", "nope"], "error: NotFound: no document 'nope'"),
    (["--like", "t0", "--index", "nope"], "error: NotFound: no vector index 'nope'"),
    (["--like", "t0", "--where", "{bad"], "error: QueryError: --where"),
    (["--like", "t0", "--where", '{"n": {"$bogus": 1}}'], "error: QueryError: "),
    (["--like", "t0", "-n", "0"], "error: VectorIndexError: n must be"),
    ([], "error: QueryError: give one of --like ID, --vector FILE or --text TEXT"),
    (["--like", "t0", "--text", "red"], "error: QueryError: give one of"),
    (["--vector", "missing.npy"], "error: FileNotFoundError: "),
])
def test_errors_are_one_line_and_exit_1(env, args, message):
    proc = mlw(env, "search", "texts", *args, ok=False)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_vector_files_and_unknown_collections(env, tmp_path):
    (tmp_path / "short.json").write_text("[1, 2, 3]")
    short = mlw(env, "search", "texts", "--vector", str(tmp_path / "short.json"), ok=False)
    assert short.returncode == 1 and short.stderr.startswith("error: VectorIndexError: ")
    (tmp_path / "words.json").write_text('["a", "b"]')
    words = mlw(env, "search", "texts", "--vector", str(tmp_path / "words.json"), ok=False)
    assert words.returncode == 1 and "a list of numbers" in words.stderr
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled = mlw(env, "search", "texts", "--vector", str(tmp_path / "objects.npy"), ok=False)
    assert pickled.returncode == 1 and pickled.stderr.startswith("error: VectorIndexError: ")
    missing = mlw(env, "search", "nope", "--like", "t0", ok=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: NotFound: no collection 'nope'")
    unindexed = mlw(env, "search", "plain", "--like", "x", ok=False)
    assert unindexed.returncode == 1 and unindexed.stderr.startswith("error: NotFound: ")


def test_vector_indexes_lists_definitions_and_figures(env):
    rows = json.loads(mlw(env, "vector-indexes", "texts", "--json").stdout)
    assert [r["name"] for r in rows] == ["by_text", "by_v"]
    by_text, by_v = rows
    assert (by_text["listener"], by_text["metric"], by_text["dims"], by_text["vectors"]) == ("embed", "cosine",
                                                                                             DIMS, len(TEXTS))
    assert by_text["engine"] == "embedded" and by_text["input"] == "text" and by_text["error"] is None
    assert (by_v["path"], by_v["metric"], by_v["listener"], by_v["filters"]) == ("v", "l2", None, [])
    table = mlw({**env, **WIDE}, "vector-indexes", "texts").stdout
    assert "by_text" in table and "listener embed" in table and "field v" in table and "kB" in table
    assert "(none)" in mlw({**env, **WIDE}, "vector-indexes", "plain").stdout
    assert mlw(env, "vector-indexes", "nope", ok=False).returncode == 1
