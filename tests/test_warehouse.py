"""Warehouse-level invariants: stamping, projects, garbage collection, blob release, connect settings."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse import ConfigError, IntegrityError, QueryError


def test_every_write_is_stamped(wh):
    doc = wh.project("p").insert("things", {"a": 1})
    assert doc["project"] == "p" and doc["time"].endswith("Z") and len(doc["_id"]) == 26
    assert wh.project("p").find("things") == [doc]
    assert wh.project("q").find("things") == []


def test_scope_cannot_be_escaped_by_a_project_field(wh):
    wh.project("p").insert("things", {"a": 1})
    assert wh.project("q").find("things", {"project": "p"}) == []


def test_gc_removes_only_unreferenced_old_blobs(wh):
    wh.datasets.save(np.arange(100), "kept")
    orphan = wh.blobs.put(b"orphan bytes from a crashed writer")
    report = wh.gc(grace_seconds=3600, dry_run=True)
    assert report.removed == [] and report.kept_recent == 1
    old = time.time() - 7200
    os.utime(_blob_file(wh, orphan), (old, old))
    report = wh.gc(grace_seconds=3600, dry_run=True)
    assert report.removed == [orphan] and wh.blobs.exists(orphan)
    report = wh.gc(grace_seconds=3600)
    assert report.removed == [orphan] and not wh.blobs.exists(orphan)
    assert report.referenced == 1 and wh.datasets.load("kept")[99] == 99


def _blob_file(wh, key):
    for root, _, files in os.walk(wh.blobs.root):
        if key in files:
            return os.path.join(root, key)
    raise AssertionError("blob file not found")


def test_corrupted_blob_raises_integrity_error(wh):
    wh.datasets.save(np.arange(10_000, dtype=np.int64), "d")
    (key,) = wh.datasets.get("d").doc["_blobs"]
    path = _blob_file(wh, key)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match=key[:12]):
        wh.datasets.load("d")


def test_connect_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with mlwarehouse.connect() as wh:
        assert wh.settings.index_uri.endswith(".mlwarehouse")
        assert wh.default_project == "default"
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("MLW_PROJECT", "proj")
    with mlwarehouse.connect() as wh:
        wh.datasets.save(np.zeros(1), "z")
        assert wh.projects() == ["proj"]
    assert (tmp_path / "elsewhere" / "index.sqlite").exists()
    with mlwarehouse.connect(f"sqlite:///{tmp_path}/x/idx.sqlite", blobs=str(tmp_path / "b")) as wh:
        wh.datasets.save(np.zeros(1), "z")
    assert (tmp_path / "x" / "idx.sqlite").exists() and any((tmp_path / "b").rglob("*"))
    with pytest.raises(ConfigError, match="blob store"):
        mlwarehouse.connect("postgresql://localhost/db")
    with pytest.raises(ConfigError, match="ftp"):
        mlwarehouse.connect(str(tmp_path / "y"), blobs="ftp://host/path")
    with pytest.raises(QueryError):
        mlwarehouse.connect(home=tmp_path / "z").project("")


def test_default_project_attributes(wh):
    assert wh.datasets is wh.project("default").datasets
    with pytest.raises(AttributeError):
        wh.no_such_thing


def _leases(wh, kind="lease:"):
    return [d["_id"] for d in wh.index.find("meta", {"_id": {"$gte": kind, "$lt": kind[:-1] + ";"}})]


def test_a_delete_beside_a_writer_in_flight_leaves_its_blobs_to_gc(wh):
    wh.index.insert_one("meta", {"_id": "lease:other", "until": time.time() + 60})  # another writer, mid-save
    wh.models.save({"w": np.arange(5.0)}, name="m")
    assert _leases(wh) == ["lease:other"]  # the save's own lease ended with its insert
    assert wh.models.delete("m") == 1 and len(list(wh.blobs.list())) == 1
    assert len(wh.gc(grace_seconds=0).removed) == 1
    wh.index.update_many("meta", {"_id": "lease:other"}, {"$set": {"until": time.time() - 1}})  # it crashed
    wh.models.save({"w": np.arange(5.0)}, name="m")
    assert wh.models.delete("m") == 1 and list(wh.blobs.list()) == [] and _leases(wh) == []


def test_a_new_writer_waits_for_an_announced_removal(wh):
    wh.index.insert_one("meta", {"_id": "removing:other", "until": time.time() + 0.3})
    start = time.monotonic()
    wh.models.save({"w": np.arange(5.0)}, name="m")  # its puts come after that removal
    assert time.monotonic() - start >= 0.25 and _leases(wh, "removing:") == []


def test_a_delete_keeps_what_its_own_thread_packed_and_has_not_stored(wh):
    p = wh.project()
    p.insert("things", {"v": p.pack(np.arange(5.0))})
    tree = p.pack(np.arange(5.0))  # the same bytes, about to be stored again
    p.delete("things")
    assert wh.blobs.exists(tree["_blob"]) and len(_leases(wh)) == 1
    p.insert("things", {"v": tree})
    assert _leases(wh) == [] and p.unpack(p.find_one("things")["v"])[4] == 4.0
    with wh.writing():  # a writer outside pack (an import) holds the lease the same way
        key = wh.blobs.put(b"imported bytes")
        assert len(_leases(wh)) == 1
        p.insert("things", {"raw": {"_blob": key, "codec": "bytes", "size": 14}})
    assert _leases(wh) == []
