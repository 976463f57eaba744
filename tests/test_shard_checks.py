"""How a stream checks the shards it reads whole: against the xxh3 checksum their documents record where the blob
store trusts its bytes (a local folder), against their sha256 everywhere else; damage is an IntegrityError either
way, and a recorded checksum that is not one never weakens the check."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.datasets.items import SHARDS, ItemDatasets
from mlwarehouse.datasets.shardmemory import DecodedShards
from mlwarehouse.errors import IntegrityError
from mlwarehouse.testing.backend_sets import mongo_and_gridfs, postgres_and_s3
from mlwarehouse.testing.blob_conformance import flip_a_bit
from mlwarehouse.testing.mongo_server import mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.testing.postgres_server import postgres_server  # noqa: F401  (session fixture)

N = 1000


def _dataset(wh, name="c"):
    x = np.arange(N, dtype=np.int64).repeat(64).reshape(N, 64)
    return ItemDatasets(wh.project("p")).from_arrays(name, {"x": x, "label": np.arange(N)}, shard_bytes=1 << 16)


def _labels(ds, **options) -> list[int]:
    out = []
    for batch in ds.stream(batch_size=50, memory=DecodedShards(0), **options):  # every shard read whole again
        assert (batch["x"] == batch["label"][:, None]).all()
        out += batch["label"].tolist()
    return sorted(out)


def _docs(ds) -> list[dict]:
    return list(ds.project.find(SHARDS, ds._scope(), sort=[("_id", 1)]))


def _set_check(ds, key: str, value) -> None:
    ds.project.update(SHARDS, ds._scope({"shard": key}), {"$set": {"xxh3": value}} if value is not None
                      else {"$unset": {"xxh3": ""}})


def test_each_shard_records_the_xxh3_of_its_stored_bytes(wh):
    ds = _dataset(wh)
    docs = _docs(ds)
    assert len(docs) >= 3
    for doc in docs:
        assert doc["xxh3"] == xxhash.xxh3_64_hexdigest(wh.blobs.get(doc["shard"]))


def test_a_trusted_folder_checks_the_recorded_xxh3_and_an_untrusted_one_the_sha256(wh):
    ds = _dataset(wh)
    assert wh.blobs.trusted
    key = _docs(ds)[1]["shard"]
    _set_check(ds, key, "0" * 16)  # a checksum the bytes do not have: only the xxh3 path can notice
    with pytest.raises(IntegrityError, match="xxh3"):
        _labels(ds)
    wh.blobs.trusted = False
    assert _labels(ds) == list(range(N))  # sha256 of the very same bytes: they are whole


@pytest.mark.parametrize("trusted, says", [(True, "xxh3"), (False, "hashes to")])
def test_damaged_bytes_are_refused_whichever_check_reads_them(wh, trusted, says):
    ds = _dataset(wh)
    wh.blobs.trusted = trusted
    flip_a_bit(wh.blobs, _docs(ds)[0]["shard"])
    with pytest.raises(IntegrityError, match=says):
        _labels(ds)
    with pytest.raises(IntegrityError):
        _labels(ds, where={"label": {"$lt": 100}})  # a plan from the item documents checks the same way


@pytest.mark.parametrize("recorded", [None, 12345, "ABCDEF0123456789", "0123", "zz" * 8, ["0" * 16], True])
def test_a_recorded_value_that_is_not_a_checksum_falls_back_to_the_sha256(wh, recorded):
    ds = _dataset(wh)
    key = _docs(ds)[0]["shard"]
    _set_check(ds, key, recorded)
    assert _labels(ds) == list(range(N))
    flip_a_bit(wh.blobs, key)
    with pytest.raises(IntegrityError, match="hashes to"):
        _labels(ds)


def test_the_environment_can_take_the_trust_away(tmp_path, monkeypatch):
    assert FileBlobStore(tmp_path / "a").trusted
    monkeypatch.setenv("MLW_TRUST_LOCAL_BLOBS", "0")
    assert not FileBlobStore(tmp_path / "b").trusted
    assert FileBlobStore(tmp_path / "c", trusted=True).trusted


@pytest.fixture(params=["postgres+s3", "mongo+gridfs"])
def remote_wh(request, tmp_path, monkeypatch):
    if request.param == "postgres+s3":
        pytest.importorskip("psycopg")
        pytest.importorskip("boto3")
        s3 = request.getfixturevalue("s3_server")
        yield from postgres_and_s3(request.getfixturevalue("postgres_server"), s3, monkeypatch, "p")
    else:
        pytest.importorskip("pymongo")
        yield from mongo_and_gridfs(request.getfixturevalue("mongo_server"), monkeypatch, "p")


def test_remote_stores_check_the_sha256_whatever_the_index_records(remote_wh):
    ds = _dataset(remote_wh, "remote")
    docs = _docs(ds)
    assert all(doc["xxh3"] == xxhash.xxh3_64_hexdigest(remote_wh.blobs.get(doc["shard"])) for doc in docs)
    _set_check(ds, docs[0]["shard"], "0" * 16)  # ignored: the store checks the sha256 of what it returns
    assert _labels(ds) == list(range(N))
