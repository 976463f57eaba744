"""Item datasets: appends from arrays, dicts and image folders, shards, queries, versions and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from mlwarehouse.datasets.items import SHARDS, ItemDatasets
from mlwarehouse.datasets.shards import FieldSpec, build_shard, is_precompressed, read_header, read_item
from mlwarehouse.datasets.wholeshard import Shard
from mlwarehouse.errors import IntegrityError, InvalidDocument, NotFound
from mlwarehouse.web.arrays import to_png


@pytest.fixture
def items(wh):
    return ItemDatasets(wh.project("p"))


def test_shard_roundtrip_whole_and_by_range():
    rng = np.random.default_rng(0)
    fixed = np.zeros((50, 300, 30), np.float32)  # compressible, spans several blocks
    fixed[:, :5] = rng.random((50, 5, 30))
    ragged = [rng.integers(0, 9, (i + 1, 3)).astype(np.int16) for i in range(50)]
    blobs = [bytes([i]) * (i * 7) for i in range(50)]
    specs = {"x": FieldSpec("array", "<f4", (300, 30)), "r": FieldSpec("array", "<i2", None),
             "b": FieldSpec("bytes"), "t": FieldSpec("json")}
    data = build_shard({"x": fixed, "r": ragged, "b": blobs, "t": [["a", i] for i in range(50)]}, specs)
    assert len(data) < fixed.nbytes / 2  # blocks were compressed
    shard = Shard(data)
    np.testing.assert_array_equal(shard.column("x"), fixed)
    assert all(np.array_equal(a, b) for a, b in zip(shard.column("r"), ragged))
    assert shard.column("b") == blobs and shard.column("t")[7] == ["a", 7]
    header = read_header(lambda s, n: data[s:s + n], guess=100)
    for row in (0, 17, 49):
        item = np.frombuffer(read_item(header, lambda s, n: data[s:s + n], "x", row), np.float32)
        np.testing.assert_array_equal(item.reshape(300, 30), fixed[row])
    bad = bytearray(data)
    at = header.fields["x"].payload + 10
    bad[at] ^= 0xFF
    with pytest.raises(IntegrityError):
        read_item(header, lambda s, n: bytes(bad[s:s + n]), "x", 0)
    with pytest.raises(IntegrityError):
        Shard(b"not a shard at all")


def test_append_arrays_query_and_load(items):
    x = np.arange(200 * 480, dtype=np.float32).reshape(200, 12, 40)
    y = np.arange(200) % 10
    ds = items.from_arrays("digits", {"x": x, "label": y}, shard_bytes=1 << 16)
    assert ds.state == "finished" and ds.count() == 200 and ds.doc["shards"] > 1
    assert ds.doc["fields"]["x"] == {"kind": "array", "dtype": "<f4", "shape": [12, 40]}
    assert ds.count({"label": 3}) == 20
    rec = ds.find({"label": 7}, limit=1)[0]
    assert rec.label == 7
    np.testing.assert_array_equal(rec.load()["x"], x[7])
    assert ds.item(rec.id)["label"] == 7
    with pytest.raises(InvalidDocument, match="finished"):
        ds.append({"x": x[:1], "label": y[:1]})
    assert items.get("digits").version == 1 and items.names() == ["digits"]


def test_iterable_of_dicts_bytes_tags_and_ragged(items):
    ds = items.create("mixed")
    ds.append({"blob": bytes([i]) * i, "arr": np.ones(i + 1, np.uint8), "tags": ["odd" if i % 2 else "even"],
               "name": f"n{i}"} for i in range(30))
    ds.append([{"blob": b"x", "arr": np.ones(2, np.uint8), "tags": [], "name": "late"}])
    ds.finish()
    assert ds.count() == 31 and ds.count({"tags": "odd"}) == 15
    assert ds.doc["fields"]["arr"]["shape"] is None
    got = ds.find({"name": "n5"})[0].load()
    assert got["blob"] == bytes([5]) * 5 and got["arr"].shape == (6,) and got["tags"] == ["odd"]


def test_folder_of_images_is_stored_as_is(items, tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            png = to_png(np.full((4, 4), i * 40, np.uint8), target=4)
            (tmp_path / "imgs" / cls / f"{i}.png").write_bytes(png)
    ds = items.from_folder("pets", tmp_path / "imgs")
    assert ds.count() == 6 and ds.refresh().classes == ["cat", "dog"]
    rec = ds.find({"class": "dog", "path": "dog/2.png"})[0]
    data = rec.load()["image"]
    assert is_precompressed(data) and data == (tmp_path / "imgs" / "dog" / "2.png").read_bytes()
    assert rec.label == 1


def test_new_version_reuses_shards_and_delete_releases(items, wh):
    p = wh.project("p")
    ds = items.from_arrays("d", {"x": np.zeros((100, 200), np.float32), "label": np.arange(100) % 2},
                           shard_bytes=1 << 16)
    v2 = ds.new_version(exclude={"label": 1})
    v2.append({"x": np.ones((5, 200), np.float32), "label": np.full(5, 2)})
    v2.finish()
    assert v2.version == 2 and v2.count() == 55 and v2.count({"label": 1}) == 0
    assert sum(len(b["label"]) for b in v2.stream(batch_size=7)) == 55
    shared = {d["shard"] for d in p.find(SHARDS, {"version": 1})}
    assert shared <= {d["shard"] for d in p.find(SHARDS, {"version": 2})}
    ds.delete()
    assert all(p.blobs.exists(k) for k in shared)  # still used by version 2
    v2.delete()
    assert not any(p.blobs.exists(k) for k in shared)
    with pytest.raises(NotFound):
        items.get("d")


def test_bad_items_are_refused_with_names(items):
    ds = items.create("bad")
    with pytest.raises(InvalidDocument, match=r"item 1 lacks field\(s\) \['label'\]"):
        ds.append([{"x": np.zeros(2), "label": 1}, {"x": np.zeros(2)}])
    assert ds.count() == 0  # a refused append writes nothing
    ds.append([{"x": np.zeros(2), "label": 1}])
    with pytest.raises(InvalidDocument, match="dtype"):
        ds.append([{"x": np.zeros(2, np.int8), "label": 1}])
    with pytest.raises(InvalidDocument, match="reserved"):
        items.create("bad2").append([{"shard": 1}])
    with pytest.raises(InvalidDocument, match="different lengths"):
        items.create("bad3").append({"x": np.zeros((3, 2)), "label": [1, 2]})


def test_corrupted_shard_raises_integrity_error(items, wh):
    ds = items.from_arrays("c", {"x": np.arange(40, dtype=np.int64).reshape(20, 2), "label": np.arange(20)})
    key = wh.project("p").find(SHARDS, {})[0]["shard"]
    path = wh.blobs._path(key)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        list(ds.stream())
    with pytest.raises(IntegrityError):
        ds.find({"label": 19})[0].load()


def test_cli_import_and_show(tmp_path):
    from typer.testing import CliRunner

    from mlwarehouse.cli.items import items_app
    np.savez(tmp_path / "a.npz", x=np.zeros((30, 5), np.float32), label=np.arange(30))
    home = str(tmp_path / "wh")
    runner = CliRunner()
    result = runner.invoke(items_app, ["import", str(tmp_path / "a.npz"), "arr", "--uri", home])
    assert result.exit_code == 0, result.output
    assert "30 items in 1 shards" in result.output
    result = runner.invoke(items_app, ["show", "arr", "--uri", home, "-n", "2"])
    assert result.exit_code == 0, result.output
    assert "float32[5]" in result.output and "finished" in result.output
    result = runner.invoke(items_app, ["show", "nope", "--uri", home])
    assert result.exit_code == 1 and "no item dataset" in result.output
    result = runner.invoke(items_app, ["import", str(tmp_path / "a.npz"), "arr", "--version", "5", "--uri", home])
    assert result.exit_code == 0 and "version 5" in result.output
    assert runner.invoke(items_app, ["show", "arr", "--version", "5", "--uri", home]).exit_code == 0
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 5)), label=np.arange(4))  # columns of different lengths
    result = runner.invoke(items_app, ["import", str(tmp_path / "bad.npz"), "bad", "--uri", home])
    assert result.exit_code == 1 and "different lengths" in result.output
    result = runner.invoke(items_app, ["show", "bad", "--uri", home])
    assert result.exit_code == 1 and "no item dataset" in result.output  # the failed import left nothing
    result = runner.invoke(items_app, ["import", str(tmp_path / "missing.npz"), "m", "--uri", home])
    assert result.exit_code == 1 and "No such file" in result.output


def _append_forever(home):
    import mlwarehouse
    ds = ItemDatasets(mlwarehouse.connect(home=home).project("p")).get("k")
    ds.append({"v": np.arange(400_000, dtype=np.int64), "label": np.arange(400_000) % 10})


@pytest.mark.slow
def test_an_append_killed_at_any_moment_leaves_a_consistent_version(tmp_path):
    import multiprocessing
    import os
    import signal
    import time

    import mlwarehouse
    ctx = multiprocessing.get_context("spawn")
    for i, delay in enumerate((0.8, 1.6, 2.4, 3.2)):
        home = tmp_path / f"wh{i}"
        items = ItemDatasets(mlwarehouse.connect(home=home).project("p"))
        items.create("k", shard_bytes=1 << 20)
        proc = ctx.Process(target=_append_forever, args=(str(home),))
        proc.start()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        ds = items.get("k")
        shards = ds.project.find(SHARDS, {"dataset": "k"})
        committed = sum(d["count"] for d in shards)
        labels = [v for b in ds.stream(batch_size=50_000, shuffle=False) for v in b["label"].tolist()]
        assert ds.count() == committed == len(labels) == len(ds.find(limit=10**6))  # whole shards only
        assert len(ds.stream({"label": 3}, batch_size=10**6).plan(0).row) == ds.count({"label": 3})
        assert ds.finish().doc["count"] == committed and ds.doc["shards"] == len(shards)


def test_finished_versions_schemas_and_twin_shards(items, tmp_path):
    a = items.create("f")
    b = items.get("f")  # a second handle, opened before anything was appended
    a.append({"x": np.zeros((3, 2)), "label": [1, 2, 3]})
    assert a.doc["count"] == 3 and a.field_names == ["x", "label"]  # the handle is fresh after its append
    with pytest.raises(InvalidDocument, match="field"):  # checked again when each shard is written
        b.append([{"y": b"bytes", "label": 1}])
    assert a.refresh().doc["count"] == 3 and len(list(a.stream(batch_size=10))) == 1
    a.finish()
    (tmp_path / "cats").mkdir()
    with pytest.raises(InvalidDocument, match="finished"):
        b.append_folder(tmp_path)
    assert "classes" not in a.refresh().doc
    with pytest.raises(InvalidDocument, match="dict of columns"):
        items.create("g").append(5)
    with pytest.raises(InvalidDocument, match="Python objects"):
        items.create("h").append([{"a": np.array([None, 1])}])
    twins = items.create("twins")
    for _ in range(2):  # the same items twice: two shards, two copies
        twins.append({"x": np.arange(8).reshape(4, 2), "label": np.arange(4)})
    twins.finish()
    assert len({d["shard"] for d in items.project.find(SHARDS, {"dataset": "twins"})}) == 2
    assert twins.new_version(exclude={"_id": twins.find(limit=1)[0].id}).count() == 7
