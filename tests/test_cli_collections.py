"""``mlw collections`` and ``mlw find``: listeners' progress, documents summarised, --where/--sort/--json, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import mlw

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")


def encode_tag(value) -> bytes:
    return str(value).encode()


def decode_tag(data: bytes):
    raise AssertionError("mlw find must never decode a user type")


@pytest.fixture
def shop(tmp_path, subprocess_env):
    import mlwarehouse
    from mlwarehouse.collections import Encoded
    with mlwarehouse.connect(home=tmp_path / "wh", project="shop") as wh:
        c = wh.collection("items")
        c.register_type("tag", encode_tag, decode_tag)
        c.insert_many([{"_id": f"i{i}", "price": i, "big": i >= 2, "x": torch.zeros(4), "photo": Image.new("L", (30, 20)),
                        "blob": b"\x01" * 7, "arr": np.ones((2, 3), np.int16), "tag": Encoded("tag", b"abc")}
                       for i in range(5)])
        c.attach("embed", torch.nn.Linear(4, 2), key="x", where={"big": True})
        wh.collection("empty").create_index("x")
    return subprocess_env


def test_collections_lists_counts_and_listener_progress(shop):
    rows = json.loads(mlw(shop, "collections", "-p", "shop", "--json").stdout)
    assert [r["collection"] for r in rows] == ["empty", "items"]
    items = rows[1]
    assert items["documents"] == 5
    (embed,) = items["listeners"]
    assert (embed["name"], embed["key"], embed["compute"]) == ("embed", "x", "inline")
    assert embed["progress"] == {"done": 3, "pending": 0, "failed": 0, "skipped": 2}
    table = mlw({**shop, "COLUMNS": "200"}, "collections", "-p", "shop").stdout
    assert "items" in table and "embed" in table and "inline" in table


def test_find_prints_matching_documents_summarised(shop):
    out = mlw(shop, "find", "items", "-p", "shop", "--where", '{"price": {"$gte": 1}}', "--sort", "price:-1",
              "--limit", "2", "--json").stdout
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["_id"] for d in docs] == ["i4", "i3"]
    doc = docs[0]
    assert doc["x"] == {"tensor": {"shape": [4], "dtype": "float32"}}
    assert doc["arr"] == {"array": {"shape": [2, 3], "dtype": "int16"}}
    assert doc["photo"]["image"] | {"format": None} == {"width": 30, "height": 20, "mode": "L", "format": None}
    assert doc["blob"] == {"bytes": 7}
    assert doc["tag"] == {"encoded": {"datatype": "tag", "bytes": 3}}
    assert doc["_outputs"] == {"x": {"embed": {"tensor": {"shape": [2], "dtype": "float32"}}}}
    assert "_listeners" not in doc and "_rev" not in doc
    table = mlw({**shop, "COLUMNS": "250"}, "find", "items", "-p", "shop", "-n", "1").stdout
    assert "i0" in table and "tensor float32[4]" in table and "image 30x20 L" in table and "7 bytes" in table


def test_find_errors_are_one_line(shop):
    missing = mlw(shop, "find", "nope", "-p", "shop", ok=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: NotFound: no collection 'nope' in project 'shop'; collections: empty, items"
    assert mlw(shop, "find", "items", "-p", "typo", ok=False).stderr.startswith("error: NotFound: no project 'typo'")
    bad = mlw(shop, "find", "items", "-p", "shop", "--where", "{nope", ok=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: QueryError: --where")
    assert mlw(shop, "collections", "-p", "typo", ok=False).returncode == 1
