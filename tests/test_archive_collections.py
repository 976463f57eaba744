"""``mlw export`` / ``mlw import`` carry users' collections (their tables, as stored), data types and listeners:
decoded values, outputs, folds and listener progress survive, the listeners keep working, and crafted archives
cannot write into another project's table, an arbitrary table or run a data type's code."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from dataclasses import dataclass

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse import schema
from mlwarehouse.archive.tarball import export_project, import_project, read_manifest
from mlwarehouse.collections import Audio, DataTypeError, Encoded
from mlwarehouse.collections.worker import ListenerWorker
from mlwarehouse.errors import DuplicateKey, IntegrityError
from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: F401  (session fixture)
from mlwarehouse.warehouse.tables import table_name

torch = pytest.importorskip("torch")
try:
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

N = 12


@dataclass
class Point:
    x: int
    y: int


def encode_point(p: Point) -> bytes:
    return json.dumps([p.x, p.y]).encode()


def decode_point(data: bytes) -> Point:
    return Point(*json.loads(bytes(data)))


def norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x)))


def product(i: int) -> dict:
    rng = np.random.default_rng(i)
    doc = {"_id": f"sku-{i:02d}", "name": f"product {i}", "price": 10 + i,
           "vec": np.arange(4, dtype=np.float32) + i,                       # small: inline in the document
           "big": rng.random((32, 32)),                                      # a blob
           "t": torch.arange(4, dtype=torch.float32) * (i + 1),
           "sound": Audio(rng.standard_normal(1600).astype(np.float32), 8000),
           "where": Point(i, -i), "tags": ["a", "b"][: i % 3]}
    if Image is not None:
        doc["img"] = Image.new("RGB", (12, 8), (i * 20, 255 - i * 20, 7))
    return doc


def fill(wh, name: str = "src") -> dict:
    p = wh.project(name)
    c = p.collection("products")
    c.register_type("point", encode_point, decode_point, instance_of=Point, description="a 2-d point")
    c.valid_fraction = 0.3
    c.insert_many([product(i) for i in range(N)])
    c.create_index("name", unique=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    c.attach("embed", net, key="t")                      # inline, torch: a model in the registry
    c.attach("norm", norm, key="vec", compute="workers")  # pending work for a worker, as tasks
    p.collection("empty").valid_fraction = 0.5           # a catalog entry whose table holds nothing
    return {"p": p, "c": c, "net": net}


def stored(wh, project: str, name: str = "products") -> list[dict]:
    """A collection's documents as stored, without the compare-and-set token (fresh on import)."""
    table = wh.project(project).table(table_name(project, name))
    return [{k: v for k, v in d.items() if k != "_rev"} for d in table.find({}, sort=[("_id", 1)])]


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if Image is not None and isinstance(a, Image.Image):
        return isinstance(b, Image.Image) and a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
    return type(a) is type(b) and a == b


def listeners(wh, project: str) -> list[dict]:
    keep = ("collection", "name", "key", "where", "compute", "batch_size", "batched", "upstream", "status")
    return [{k: d.get(k) for k in keep} | {"kind": d["model"]["kind"]}
            for d in wh.project(project).find(schema.LISTENERS.name, sort=[("name", 1)])]


@pytest.fixture
def source(tmp_path):
    wh = mlwarehouse.connect(home=tmp_path / "src")
    filled = fill(wh)
    path = tmp_path / "src.tar"
    summary = export_project(wh, "src", path)
    yield wh, filled, path, summary
    wh.close()


@pytest.fixture(params=["sqlite", "mongo"])
def target(request, tmp_path):
    if request.param == "sqlite":
        wh = mlwarehouse.connect(home=tmp_path / "dst")
    else:
        uri = fresh_uri(request.getfixturevalue("mongo_server"))
        wh = mlwarehouse.connect(uri, blobs=uri)
    yield wh
    wh.close()


def rewrite(path, out, change, add=()) -> None:
    """Copy the tar at ``path`` to ``out`` passing each member's (name, bytes) through ``change`` (None drops
    it), then append ``add`` ((name, bytes) pairs)."""
    with tarfile.open(path) as src, tarfile.open(out, "w") as dst:
        members = [(m.name, change(m.name, src.extractfile(m).read())) for m in src.getmembers()]
        for name, data in [*members, *add]:
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def edit_lines(data: bytes, change) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in change([json.loads(x) for x in data.decode().splitlines()])).encode()


def nothing_written(wh) -> bool:
    return all(wh.index.count(c) == 0 for c in wh.index.collections() if c != "meta")


# -- export ------------------------------------------------------------------------------------------------------
def test_export_writes_each_collection_as_stored_with_its_catalog_types_and_listeners(source):
    wh, filled, path, summary = source
    manifest = read_manifest(path)
    assert manifest["tables"] == {"empty": 0, "products": N} == summary["tables"]
    assert manifest["indexes"] == {"products": [{"keys": [["name", 1]], "unique": True}]}
    assert manifest["collections"]["collections"] == 2 and manifest["collections"]["datatypes"] == 1
    assert manifest["collections"]["listeners"] == 2 and manifest["collections"]["models"] == 1
    assert manifest["documents"] == sum(manifest["collections"].values()) + N
    member = f"tables/{table_name('src', 'products')}.jsonl"
    with tarfile.open(path) as tar:
        names = tar.getnames()
        lines = [json.loads(x) for x in tar.extractfile(member).read().splitlines()]
    assert f"tables/{table_name('src', 'empty')}.jsonl" in names
    assert not [n for n in names if n.startswith(f"collections/{schema.TABLE_PREFIX}")]
    raw = list(wh.project("src").table(table_name("src", "products")).find({}, sort=[("_id", 1)]))
    assert lines == raw and all({"_rev", "_blobs", "_outputs", "_listeners"} <= d.keys() for d in lines)
    assert all("project" not in d for d in lines)
    used = {k for d in raw for k in d["_blobs"]}
    assert used <= {n.removeprefix("blobs/") for n in names if n.startswith("blobs/")}


# -- import ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rename", [None, "copy"])
def test_import_keeps_documents_values_outputs_folds_progress_and_types(source, target, rename):
    wh, filled, path, _ = source
    summary = import_project(target, path, project=rename)
    name = rename or "src"
    assert summary["tables"] == {"empty": 0, "products": N} and summary["renamed"] == bool(rename)
    p = target.project(name)
    assert p.catalog.names() == ["empty", "products"]
    record = p.catalog.record("products")
    assert record["table"] == table_name(name, "products") and record["valid_fraction"] == 0.3
    assert p.catalog.record("empty")["valid_fraction"] == 0.5
    # as stored: the same ids, folds, packed values, outputs and listener states (renamed: new model ids)
    old, new = stored(wh, "src"), stored(target, name)
    model_id = {"src": filled["c"].listener("embed").model["id"],
                name: p.collection("products").listener("embed").model["id"]}
    assert (model_id["src"] == model_id[name]) != bool(rename)
    for doc in old:
        doc["_listeners"]["embed"]["model"] = {"id": model_id[name]}
    assert new == old
    assert [d["_fold"] for d in new].count("valid") not in (0, N)
    # decoded: every type comes back equal, the outputs too
    c = p.collection("products")
    before, after = list(filled["c"].find()), list(c.find())
    assert len(after) == N and all(same(a, b) for a, b in zip(before, after))
    assert after[3]["where"] == Point(3, -3) and isinstance(after[3]["sound"], Audio)
    assert isinstance(c.find_one({"_id": "sku-01"}, raw=True)["where"], Encoded)
    with torch.no_grad():
        assert torch.equal(after[5]["_outputs"]["t"]["embed"], filled["net"](product(5)["t"]))
    # the data type, the listeners, their progress
    assert [t.to_doc() for t in p.catalog.datatypes()] == [t.to_doc() for t in filled["p"].catalog.datatypes()]
    assert listeners(target, name) == listeners(wh, "src")
    for listener in ("embed", "norm"):
        assert c.progress(listener) == filled["c"].progress(listener)
    assert c.progress("norm")["pending"] == N
    assert c.find({"price": {"$gte": 20}}).to_list()[0]["_id"] == "sku-10"
    with pytest.raises(DuplicateKey):  # the unique index came across
        c.insert_one({"name": "product 1"})
    # the listeners keep working: a new document gets its inline output; a worker computes the pending ones
    fresh = {"_id": "new", "name": "new", "t": torch.ones(4), "vec": np.ones(4, dtype=np.float32)}
    c.insert_one(fresh)
    with torch.no_grad():
        assert torch.equal(c.find_one({"_id": "new"})["_outputs"]["t"]["embed"], filled["net"](fresh["t"]))
    ListenerWorker(p, once=True, sweep_seconds=0).run()
    assert c.progress("norm") == {"done": N + 1, "pending": 0, "failed": 0, "skipped": 0}
    assert c.find_one({"_id": "sku-02"})["_outputs"]["vec"]["norm"] == pytest.approx(norm(product(2)["vec"]))
    # the imported blobs are referenced: gc keeps them
    target.gc(grace_seconds=0)
    assert same(c.find_one({"_id": "sku-04"})["big"], product(4)["big"])
    assert filled["c"].progress("norm")["pending"] == N  # the source is untouched


def test_importing_twice_or_into_a_project_that_has_the_collection_writes_nothing(source):
    wh, filled, path, _ = source
    with pytest.raises(DuplicateKey):
        import_project(wh, path)
    import_project(wh, path, project="copy")
    counts = {p: len(stored(wh, p)) for p in ("src", "copy")}
    with pytest.raises(DuplicateKey, match="unique index"):  # the catalog entry (project, name) is taken
        import_project(wh, path, project="copy")
    assert {p: len(stored(wh, p)) for p in ("src", "copy")} == counts == {"src": N, "copy": N}
    # a renamed import's documents are independent of the source's
    wh.project("copy").collection("products").delete_many({})
    assert len(list(filled["c"].find())) == N and same(filled["c"].find_one({"_id": "sku-00"})["big"],
                                                      product(0)["big"])


def test_a_failed_table_write_is_undone_with_the_rest(source, tmp_path, monkeypatch):
    _, _, path, _ = source
    dst = mlwarehouse.connect(home=tmp_path / "undo")
    from mlwarehouse.warehouse.tables import Table
    real = Table.insert_many

    def failing(self, docs):
        real(self, docs[:5])  # some documents land, then the backend fails
        raise IntegrityError("the disk is full")

    monkeypatch.setattr(Table, "insert_many", failing)
    with pytest.raises(IntegrityError, match="disk is full"):
        import_project(dst, path)
    assert nothing_written(dst)
    monkeypatch.setattr(Table, "insert_many", real)
    assert import_project(dst, path)["tables"]["products"] == N
    dst.close()


# -- untrusted archives ------------------------------------------------------------------------------------------
def test_a_catalog_naming_another_projects_table_is_refused(source, tmp_path):
    _, _, path, _ = source
    dst = mlwarehouse.connect(home=tmp_path / "victim")
    victim = dst.project("victim").collection("products")
    victim.insert_one({"_id": "mine", "name": "untouched"})
    stolen = table_name("victim", "products")

    def point_elsewhere(name, data):
        if name == "collections/collections.jsonl":
            return edit_lines(data, lambda ds: [{**d, "table": stolen} if d["name"] == "products" else d
                                                for d in ds])
        return data

    crafted = tmp_path / "crafted.tar"
    rewrite(path, crafted, point_elsewhere)
    for project in (None, "victim", "other"):
        with pytest.raises(IntegrityError, match="not in its own table"):
            import_project(dst, crafted, project=project)
    assert dst.projects() == ["victim"] and [d["_id"] for d in victim.find()] == ["mine"]
    # nor as a shared collection: a table's name as a collections/ member, with the documents stamped
    moved = tmp_path / "moved.tar"

    def as_shared(name, data):
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest["collections"][stolen] = 1
            manifest["documents"] += 1
            return json.dumps(manifest).encode()
        return data

    line = json.dumps({"_id": "evil", "project": "src", "name": "injected", "_rev": "r"}).encode() + b"\n"
    rewrite(path, moved, as_shared, add=[(f"collections/{stolen}.jsonl", line)])
    with pytest.raises(IntegrityError, match="as a shared collection"):
        import_project(dst, moved, project="victim")
    assert [d["_id"] for d in victim.find()] == ["mine"]
    dst.close()


@pytest.mark.parametrize("bad", ["$where", "a\x00b", "x" * 121])
def test_a_collection_name_the_catalog_refuses_is_refused(source, tmp_path, bad):
    _, _, path, _ = source
    dst = mlwarehouse.connect(home=tmp_path / "dst")
    old, new = table_name("src", "products"), table_name("src", bad)

    def rename(name, data):
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest["tables"][bad] = manifest["tables"].pop("products")
            manifest["indexes"] = {}
            return json.dumps(manifest).encode()
        if name == "collections/collections.jsonl":
            return edit_lines(data, lambda ds: [{**d, "name": bad, "table": new} if d["name"] == "products" else d
                                                for d in ds])
        return data

    crafted = tmp_path / "bad.tar"
    with tarfile.open(path) as src:
        members = {m.name: src.extractfile(m).read() for m in src.getmembers()}
    rewrite(path, crafted, lambda n, d: None if n == f"tables/{old}.jsonl" else rename(n, d),
            add=[(f"tables/{new}.jsonl", members[f"tables/{old}.jsonl"])])
    with pytest.raises(IntegrityError, match="catalog refuses"):
        import_project(dst, crafted)
    assert nothing_written(dst)
    dst.close()


def test_table_documents_are_checked_before_writing(source, tmp_path):
    _, _, path, _ = source
    dst = mlwarehouse.connect(home=tmp_path / "dst")
    member = f"tables/{table_name('src', 'products')}.jsonl"
    ghost = "0" * 64

    def case(change):
        out = tmp_path / "case.tar"
        rewrite(path, out, lambda n, d: edit_lines(d, change) if n == member else d)
        return out

    cases = [
        (lambda ds: ds + ds[:1], DuplicateKey, "twice"),
        (lambda ds: ds[:-1] + [{**ds[-1], "_id": "dup", "name": ds[0]["name"]}], DuplicateKey, "unique index"),
        (lambda ds: [{**ds[0], "extra": {"_blob": ghost, "codec": "raw", "size": 3}}] + ds[1:], IntegrityError,
         "lacks 1 blob"),
        (lambda ds: [{**ds[0], "_fold": "test"}] + ds[1:], IntegrityError, "_fold must be"),
        (lambda ds: [{**ds[0], "_id": 7}] + ds[1:], IntegrityError, "_id must be"),
        (lambda ds: ds[1:], IntegrityError, "holds 11 documents but the manifest counts 12"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            import_project(dst, case(change))
        assert nothing_written(dst)
    # a table file that its manifest does not name, or one missing
    extra = tmp_path / "extra.tar"
    rewrite(path, extra, lambda n, d: d, add=[(f"tables/{table_name('src', 'other')}.jsonl", b"")])
    with pytest.raises(IntegrityError, match="table files"):
        import_project(dst, extra)
    assert nothing_written(dst)
    dst.close()


def test_import_never_runs_a_data_types_code(source, tmp_path, monkeypatch):
    _, _, path, _ = source
    marker = tmp_path / "ran"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "mlw_archive_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\ndef decode(data):\n    return 'pwned'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))

    def evil(name, data):
        if name == "collections/datatypes.jsonl":
            return edit_lines(data, lambda ds: [{**d, "encoder": "mlw_archive_evil:decode",
                                                 "decoder": "mlw_archive_evil:decode"} for d in ds])
        if name == "collections/listeners.jsonl":
            return edit_lines(data, lambda ds: [{**d, "model": {"kind": "callable", "target":
                                                                "mlw_archive_evil:decode"}}
                                                if d["name"] == "norm" else d for d in ds])
        return data

    crafted = tmp_path / "evil.tar"
    rewrite(path, crafted, evil)
    dst = mlwarehouse.connect(home=tmp_path / "dst")
    import_project(dst, crafted)
    assert not marker.exists() and "mlw_archive_evil" not in sys.modules
    c = dst.project("src").collection("products")
    assert isinstance(c.find_one({"_id": "sku-00"}, raw=True)["where"], Encoded)
    with pytest.raises(DataTypeError, match="not trusted"):  # a reader resolves it only when it trusts the module
        c.find_one({"_id": "sku-00"})
    assert not marker.exists() and "mlw_archive_evil" not in sys.modules
    dst.close()
