"""Archives are untrusted input: crafted ones are refused before anything is read or written, a failed import
leaves nothing behind, and export never writes a damaged blob (issue 12, items 3, 4, 5 and the archive lines of
10)."""

from __future__ import annotations

import io
import json
import tarfile
import time

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.archive.tarball import FORMAT, FORMAT_VERSION, export_project, import_project, read_manifest
from mlwarehouse.blobs.base import blob_key
from mlwarehouse.errors import BackendError, DuplicateKey, IntegrityError, WarehouseError

GiB = 1 << 30


def manifest(counts: dict[str, int], **changes) -> dict:
    out = {"format": FORMAT, "version": FORMAT_VERSION, "project": "src", "created": "2026-01-01T00:00:00Z",
           "collections": counts, "documents": sum(counts.values()), "blobs": 0, "blob_bytes": 0}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def lines(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


def write_tar(path, members: list[tuple[str, bytes]], extra: list[bytes] = ()) -> None:
    """A tar of regular members, then ``extra`` raw bytes (hand-made headers) before the end marker."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.fileobj.write(b"".join(extra))
        tar.offset += sum(len(e) for e in extra)
    path.write_bytes(buf.getvalue())


def archive_of(path, files: dict[str, list[dict]], **manifest_changes) -> None:
    counts = {c: len(d) for c, d in files.items()}
    members = [("manifest.json", json.dumps(manifest(counts, **manifest_changes)).encode())]
    members += [(f"collections/{c}.jsonl", lines(d)) for c, d in files.items()]
    write_tar(path, members)


def datasets(n: int) -> list[dict]:
    return [{"_id": f"id{i:05d}", "project": "src", "name": "d", "version": i + 1, "time": "2026-01-01T00:00:00Z"}
            for i in range(n)]


def header(name: str, type_: bytes, size: int, *, sparse: tuple[int, int, int] | None = None) -> bytes:
    """A hand-written GNU tar header block; ``sparse`` = (offset, numbytes, realsize) of an old-style GNU sparse
    member (type 'S'), whose header claims ``realsize`` bytes while ``size`` are stored."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, type_
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    if sparse is not None:
        offset, numbytes, realsize = sparse
        block[386:398] = b"%011o\0" % offset
        block[398:410] = b"%011o\0" % numbytes
        block[483:495] = b"%011o\0" % realsize
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    return bytes(block)


@pytest.fixture
def wh(tmp_path):
    w = mlwarehouse.connect(home=tmp_path / "wh")
    yield w
    w.close()


def nothing_written(w) -> bool:
    return all(w.index.count(c) == 0 for c in w.index.collections() if c != "meta")


# -- item 3: check everything first, never leave a partial project -------------------------------------------
def test_a_duplicate_unique_key_inside_the_archive_is_found_before_writing(wh, tmp_path):
    docs = datasets(600)
    docs.append({**docs[0], "_id": "other"})  # the 601st repeats the 1st's name and version
    archive_of(tmp_path / "dup.tar", {"datasets": docs})
    with pytest.raises(DuplicateKey, match="unique index"):
        import_project(wh, tmp_path / "dup.tar")
    assert nothing_written(wh)  # was: the first 500 documents stayed


def test_a_user_collections_unique_index_is_checked_inside_the_archive(wh, tmp_path):
    wh.index.ensure_collection("things")
    wh.index.create_index("things", [("project", 1), ("key", 1)], unique=True)
    docs = [{"_id": f"t{i}", "project": "src", "key": i % 700} for i in range(701)]
    archive_of(tmp_path / "things.tar", {"things": docs})
    with pytest.raises(DuplicateKey, match="unique index"):
        import_project(wh, tmp_path / "things.tar")
    assert nothing_written(wh)


@pytest.mark.parametrize("change, match", [
    ({"documents": None}, "'documents' must be a count"),
    ({"documents": "601"}, "'documents' must be a count"),
    ({"documents": 7}, "counts 7 documents in all"),
    ({"blobs": -1}, "'blobs' must be a count"),
    ({"collections": {"datasets": True}}, "'collections' must map"),
    ({"collections": {"datasets": 5}, "documents": 5}, "holds 601 documents but the manifest counts 5"),
])
def test_the_manifest_is_checked_whole_before_writing(wh, tmp_path, change, match):
    archive_of(tmp_path / "m.tar", {"datasets": datasets(601)}, **change)
    with pytest.raises(IntegrityError, match=match):
        import_project(wh, tmp_path / "m.tar")  # was: a raw KeyError after the first batch for no 'documents'
    assert nothing_written(wh)


def test_a_write_that_fails_midway_is_undone(wh, tmp_path, monkeypatch):
    archive_of(tmp_path / "ok.tar", {"datasets": datasets(600), "runs": datasets(1200)})
    real = wh.index.insert_many
    calls = []

    def failing(collection, docs, **kw):
        calls.append(collection)
        if len(calls) == 4:
            real(collection, list(docs)[:100], **kw)  # a chunk lands, then the backend fails
            raise BackendError("the server went away")
        return real(collection, docs, **kw)

    monkeypatch.setattr(wh.index, "insert_many", failing)
    with pytest.raises(BackendError, match="went away"):
        import_project(wh, tmp_path / "ok.tar")
    assert len(calls) == 4 and nothing_written(wh)
    monkeypatch.setattr(wh.index, "insert_many", real)
    assert import_project(wh, tmp_path / "ok.tar")["documents"] == 1800


# -- item 4: sparse, oversized or lying members are refused before reading -----------------------------------
def test_a_gnu_sparse_manifest_is_refused_before_reading(wh, tmp_path):
    path = tmp_path / "sparse.tar"
    data = b"{" + b" " * 511
    write_tar(path, [], [header("manifest.json", tarfile.GNUTYPE_SPARSE, 512, sparse=(3 * GiB - 512, 512, 3 * GiB)),
                         data])
    assert path.stat().st_size < 20_000
    with tarfile.open(path) as tar:  # tarfile itself would expand it to 3 GiB
        assert tar.getmember("manifest.json").size == 3 * GiB
    started = time.perf_counter()
    for call in (read_manifest, lambda p: import_project(wh, p)):
        with pytest.raises(IntegrityError, match="sparse"):
            call(path)
    assert time.perf_counter() - started < 5


def test_a_pax_sparse_blob_is_refused(wh, tmp_path):
    path = tmp_path / "pax.tar"
    key = blob_key(bytes(GiB))
    sparse_map = b"1\n0\n512\n".ljust(512, b"\0")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        m = json.dumps(manifest({})).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(m)
        tar.addfile(info, io.BytesIO(m))
        info = tarfile.TarInfo(f"blobs/{key}")
        info.size = len(sparse_map) + 512
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": f"blobs/{key}",
                            "GNU.sparse.realsize": str(GiB)}
        tar.addfile(info, io.BytesIO(sparse_map + bytes(512)))
    path.write_bytes(buf.getvalue())
    with pytest.raises(IntegrityError, match="sparse"):
        import_project(wh, path)  # was: a 1 GiB blob written from a tiny archive
    assert list(wh.blobs.list()) == []


def test_members_bigger_than_the_archive_and_non_regular_members_are_refused(wh, tmp_path):
    m = json.dumps(manifest({})).encode()
    lying = tmp_path / "lying.tar"
    write_tar(lying, [("manifest.json", m)], [header("collections/runs.jsonl", tarfile.REGTYPE, 3 * GiB)])
    with pytest.raises(IntegrityError):
        import_project(wh, lying)
    for type_ in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE):
        odd = tmp_path / "odd.tar"
        write_tar(odd, [("manifest.json", m)], [header("blobs/" + "a" * 64, type_, 0)])
        with pytest.raises(IntegrityError, match="regular files only"):
            import_project(wh, odd)
    big = tmp_path / "big.tar"
    write_tar(big, [("manifest.json", b" " * (2 << 20) + m)])
    with pytest.raises(IntegrityError, match="over the"):
        read_manifest(big)
    with pytest.raises(IntegrityError, match="not a regular file"):
        read_manifest(tmp_path)
    assert nothing_written(wh)


# -- item 10 (archive lines): every bad line is a WarehouseError naming it -----------------------------------
@pytest.mark.parametrize("line", [b"\xff\xfe{}", b"[1, 2]", b"42", b"\"text\"", b"[" * 100_000,
                                  b'{"_id": 5, "project": "src"}',
                                  b'{"_id": "a", "project": "src", "_blobs": 7}',
                                  b'{"_id": "a", "project": "src", "_blobs": ["../x"]}'])
def test_bad_document_lines_raise_an_integrity_error_naming_the_line(wh, tmp_path, line):
    good = lines(datasets(2))
    counts = {"datasets": 3}
    write_tar(tmp_path / "bad.tar", [("manifest.json", json.dumps(manifest(counts)).encode()),
                                     ("collections/datasets.jsonl", good + line + b"\n")])
    with pytest.raises(IntegrityError, match="line 3") as err:
        import_project(wh, tmp_path / "bad.tar")
    assert isinstance(err.value, WarehouseError)
    assert nothing_written(wh)


# -- item 5: export verifies zero-length blobs like any other ------------------------------------------------
def test_export_refuses_a_zero_length_blob_file(wh, tmp_path):
    p = wh.project("src")
    p.datasets.save(np.arange(100_000, dtype=np.float32), "big")
    keys = [info.key for info in wh.blobs.list()]
    assert keys
    for key in keys:
        (wh.blobs.root / key[:2] / key[2:4] / key).write_bytes(b"")  # a crash artefact
    with pytest.raises(IntegrityError, match="does not match its hash"):
        export_project(wh, "src", tmp_path / "out.tar")  # was: a "backup" holding empty blobs
    assert not (tmp_path / "out.tar").exists() and not list(tmp_path.glob(".out.tar*"))
