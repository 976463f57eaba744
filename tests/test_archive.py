"""Export a project to a tar archive and import it back: same ids, renamed with new ids, damaged archives refused."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse.archive.tarball import export_project, import_project, read_manifest
from mlwarehouse.errors import DuplicateKey, IntegrityError, NotFound
from mlwarehouse.examples.demo import SCRIPT

torch = pytest.importorskip("torch")

COLLECTIONS = ("datasets", "models", "runs", "logs", "tasks", "lineage")


def fill(wh, name: str = "src") -> dict:
    """A small demo-like project: a dataset, a task whose run trained and saved a torch model, its logs."""
    p = wh.project(name)
    rng = np.random.default_rng(0)
    X = rng.random((40, 64), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    ds = p.datasets.save((X, y), "digits", description="random digits", tags=["images"])
    task = p.tasks.create("digits-mlp", str(SCRIPT), hyper_parameters={"n_hidden": 8, "lr": 0.01},
                          saved_result_keys=["test_accuracy"])
    claimed = p.tasks.claim("digits-mlp", "w1")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    with p.runs.start("mlp", hyper_parameters={"n_hidden": 8}, datasets=[ds], task=task.id) as run:
        p.tasks.set_run(claimed.id, "w1", run.id)
        for step in range(30):
            run.log("train", step=step, epoch=step // 10, loss=1.0 / (step + 1))
        run.log("valid", step=29, accuracy=0.5)
        model = p.models.save(net, name="digits-mlp", run=run.id, dataset=ds.id, test_accuracy=0.5,
                              example_inputs=(torch.from_numpy(X[:2]),))
    p.tasks.finish(claimed.id, "w1", {"test_accuracy": 0.5}, output=b"trained\n")
    return {"p": p, "X": X, "y": y, "net": net, "dataset": ds.id, "task": task.id, "run": run.id,
            "model": model.id}


@pytest.fixture
def source(tmp_path):
    wh = mlwarehouse.connect(home=tmp_path / "src")
    filled = fill(wh)
    path = tmp_path / "src.tar"
    summary = export_project(wh, "src", path)
    yield wh, filled, path, summary
    wh.close()


@pytest.fixture
def target(tmp_path):
    wh = mlwarehouse.connect(home=tmp_path / "dst")
    yield wh
    wh.close()


def docs(wh, project: str, collection: str) -> list[dict]:
    return wh.project(project).find(collection, sort=[("_id", 1)])


def test_export_writes_manifest_documents_and_blobs(source):
    wh, filled, path, summary = source
    manifest = read_manifest(path)
    assert manifest["project"] == "src" and manifest["format"] == "mlwarehouse-archive"
    assert manifest["collections"] == {c: len(docs(wh, "src", c)) for c in COLLECTIONS}
    assert summary["collections"]["logs"] == 2 and summary["documents"] == manifest["documents"]  # 2 blocks
    assert wh.project("src").runs.count_logs() == 31  # of 30 train points and 1 valid point
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json"
    blobs = [n for n in names if n.startswith("blobs/")]
    first_doc = min(i for i, n in enumerate(names) if n.startswith("collections/"))
    assert all(names.index(b) < first_doc for b in blobs)  # a streaming reader meets blobs first
    used = {k for c in COLLECTIONS for d in docs(wh, "src", c) for k in d.get("_blobs", ())}
    assert {b.removeprefix("blobs/") for b in blobs} == used and summary["blobs"] == len(used)


def test_import_into_a_fresh_warehouse_keeps_everything(source, target):
    wh, filled, path, _ = source
    summary = import_project(target, path)
    assert summary["project"] == "src" and not summary["renamed"]
    for collection in COLLECTIONS:
        assert docs(target, "src", collection) == docs(wh, "src", collection)
    p = target.project("src")
    net = p.models.get(filled["model"]).load()
    x = torch.from_numpy(filled["X"][:5])
    with torch.no_grad():
        assert torch.equal(net(x), filled["net"](x))
    X, y = p.datasets.load("digits")
    assert np.array_equal(X, filled["X"]) and np.array_equal(y, filled["y"])
    run = p.runs.get(filled["run"])
    assert run.history("train") == filled["p"].runs.get(filled["run"]).history("train")
    assert p.tasks.get(filled["task"]).doc == filled["p"].tasks.get(filled["task"]).doc
    assert p.tasks.output(filled["task"]) == "trained\n"
    # the imported blobs are referenced: garbage collection keeps them
    assert target.gc(grace_seconds=0).removed == []
    assert p.models.get(filled["model"]).load() is not None


def test_import_under_a_new_name_rewrites_ids_and_references(source):
    wh, filled, path, _ = source
    summary = import_project(wh, path, project="copy")
    assert summary["renamed"] and summary["documents"] == read_manifest(path)["documents"]
    p = wh.project("copy")
    old = {c: docs(wh, "src", c) for c in COLLECTIONS}
    new = {c: docs(wh, "copy", c) for c in COLLECTIONS}
    assert {c: len(v) for c, v in new.items()} == {c: len(v) for c, v in old.items()}
    old_ids = {d["_id"] for v in old.values() for d in v}
    assert not old_ids & {d["_id"] for v in new.values() for d in v}
    (ds,), (run,), (task,), (model,) = new["datasets"], new["runs"], new["tasks"], new["models"]
    assert model["run"] == run["_id"] and model["dataset"] == ds["_id"]
    assert run["task"] == task["_id"] and run["datasets"] == [ds["_id"]] and task["run"] == run["_id"]
    assert {d["run"] for d in new["logs"]} == {run["_id"]}
    assert {(e["src"], e["dst"]) for e in new["lineage"]} == {  # lineage travels, renamed with its ends
        (ds["_id"], run["_id"]), (task["_id"], run["_id"]), (run["_id"], model["_id"]), (ds["_id"], model["_id"])}
    assert run["summary"] == old["runs"][0]["summary"] and task["result"] == {"test_accuracy": 0.5}
    assert p.runs.get(run["_id"]).history("train") == filled["p"].runs.get(filled["run"]).history("train")
    x = torch.from_numpy(filled["X"][:5])
    with torch.no_grad():
        assert torch.equal(p.models.get(model["_id"]).load()(x), filled["net"](x))
    X, _ = p.datasets.load("digits")
    assert np.array_equal(X, filled["X"])
    assert p.models.best("test_accuracy").id == model["_id"]
    # deleting the copy leaves the original whole (the blobs are shared)
    for collection in COLLECTIONS:
        p.delete(collection)
    assert wh.project("src").datasets.load("digits")[0].shape == (40, 64)


def test_importing_twice_is_a_duplicate_and_writes_nothing(source):
    wh, _, path, _ = source
    before = {c: len(docs(wh, "src", c)) for c in COLLECTIONS}
    with pytest.raises(DuplicateKey, match="--project"):
        import_project(wh, path)
    assert {c: len(docs(wh, "src", c)) for c in COLLECTIONS} == before
    import_project(wh, path, project="copy")
    with pytest.raises(DuplicateKey, match="unique index"):  # new ids, but dataset digits v1 is taken
        import_project(wh, path, project="copy")
    assert len(docs(wh, "copy", "logs")) == before["logs"]


def _rewrite_archive(path, out, change):
    """Copy the tar at ``path`` to ``out``, passing each member's (name, bytes) through ``change``."""
    with tarfile.open(path) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = change(member.name, src.extractfile(member).read())
            if data is None:
                continue
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def test_a_corrupted_blob_imports_nothing(source, target, tmp_path):
    _, _, path, _ = source
    bad = tmp_path / "bad.tar"
    hit = []

    def flip(name, data):
        if name.startswith("blobs/") and not hit:
            hit.append(name)
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    _rewrite_archive(path, bad, flip)
    with pytest.raises(IntegrityError, match="does not match its hash"):
        import_project(target, bad)
    assert target.projects() == []
    assert all(target.index.count(c) == 0 for c in target.index.collections() if c != "meta")


def test_damaged_archives_are_refused_before_writing(source, target, tmp_path):
    _, _, path, _ = source
    missing = tmp_path / "missing.tar"
    dropped = []
    _rewrite_archive(path, missing, lambda n, d: None if n.startswith("blobs/") and not dropped.append(n)
                     and len(dropped) == 1 else d)
    with pytest.raises(IntegrityError, match="lacks 1 blob"):
        import_project(target, missing)
    broken = tmp_path / "broken.tar"
    _rewrite_archive(path, broken, lambda n, d: d + b"{not json\n" if n == "collections/logs.jsonl" else d)
    with pytest.raises(IntegrityError, match="logs.jsonl line 3"):
        import_project(target, broken)
    foreign = tmp_path / "foreign.tar"
    _rewrite_archive(path, foreign, lambda n, d: d.replace(b'"project":"src"', b'"project":"x"', 1)
                     if n == "collections/runs.jsonl" else d)
    with pytest.raises(IntegrityError, match="belongs to project 'x'"):
        import_project(target, foreign)
    assert target.projects() == []
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"hello" * 200)
    with pytest.raises(IntegrityError, match="not an uncompressed tar"):
        import_project(target, not_tar)
    with pytest.raises(NotFound):
        import_project(target, tmp_path / "nowhere.tar")
    with pytest.raises(NotFound, match="no project 'nope'"):
        export_project(target, "nope", tmp_path / "nope.tar")
    assert not (tmp_path / "nope.tar").exists()


def test_progress_reports_blobs_and_documents(source, target):
    _, _, path, summary = source
    seen: dict[str, tuple[int, int]] = {}
    import_project(target, path, progress=lambda stage, done, total: seen.__setitem__(stage, (done, total)))
    assert seen["blobs"] == (summary["blobs"], summary["blobs"])
    assert seen["documents"] == (summary["documents"], summary["documents"])
    assert json.loads(json.dumps(summary))["archive_bytes"] == path.stat().st_size


def test_forged_archives_cannot_hide_references_duplicate_ids_or_write_internals(source, target, tmp_path):
    _, _, path, _ = source

    def edit_docs(name, data, change):
        if name != "collections/datasets.jsonl":
            return data
        docs = [json.loads(line) for line in data.decode().splitlines() if line]
        return "".join(json.dumps(d) + "\n" for d in change(docs)).encode()

    hidden = tmp_path / "hidden.tar"  # a document whose _blobs omits the blobs it uses
    _rewrite_archive(path, hidden, lambda n, d: edit_docs(n, d, lambda ds: [{**x, "_blobs": []} for x in ds]))
    import_project(target, hidden)
    target.gc(grace_seconds=0)
    X, y = target.project("src").datasets.get("digits").load()  # gc saw the references anyway
    assert X.shape == (40, 64)

    twice = tmp_path / "twice.tar"
    _rewrite_archive(path, twice, lambda n, d: edit_docs(n, d, lambda ds: ds + ds[:1]))
    fresh = mlwarehouse.connect(home=tmp_path / "fresh")
    with pytest.raises(DuplicateKey, match="twice"):
        import_project(fresh, twice)
    assert fresh.projects() == []

    internal = tmp_path / "internal.tar"
    with tarfile.open(path) as src, tarfile.open(internal, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "manifest.json":  # a forger edits the manifest too
                manifest = json.loads(data)
                manifest["collections"]["meta"] = 1
                manifest["documents"] += 1
                data = json.dumps(manifest).encode()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
        line = json.dumps({"_id": "x", "project": "src", "kind": "blob_collections", "names": "runs"}) + "\n"
        info = tarfile.TarInfo("collections/meta.jsonl")
        info.size = len(line)
        dst.addfile(info, io.BytesIO(line.encode()))
    with pytest.raises(IntegrityError, match="internal collection"):
        import_project(fresh, internal)
    assert fresh.projects() == []
