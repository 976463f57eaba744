"""Export a project to a portable tar archive, and import it back into any warehouse (``mlw export/import``).

The archive is a plain (uncompressed) tar; blobs are mostly compressed already. Its members, in this order:

- ``manifest.json``            format, version, source project, creation time, document counts per collection
- ``blobs/<sha256>``           every blob the documents reference, once each (content-addressed)
- ``collections/<name>.jsonl`` every document of the project in that collection, one JSON object a line

Every collection that holds the project's documents is exported (datasets, models, runs, logs, tasks...), except
the internal ``meta`` collection. Blobs are streamed one at a time, never held together in memory.

Import checks everything it can before it writes anything: the manifest, every document line, that every
referenced blob is in the archive, and that no document would collide with one already there. Then it writes the
blobs, verifying each against its name (IntegrityError on a mismatch, before any document is written), and only
then the documents (invariant 1: blobs first, index second). A blob put before a failure stays for ``gc``.

Ids: documents keep their ids, so importing a project twice into one warehouse raises DuplicateKey. Importing
under another project name (``project=``) gives every document a new id instead (ids are unique per collection,
not per project) and rewrites the references between documents: any string value, anywhere in a document, equal
to an old id of the archive becomes the new id (run ids in logs, models and tasks; dataset ids in models and
runs; task ids in runs; user fields holding ids too). Ids inside JSON values stored as blobs are not rewritten.
Log documents get new ids but are never reference targets, so the id map stays small however long the logs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mlwarehouse import schema
from mlwarehouse.blobs.base import check_key
from mlwarehouse.codecs.values import blob_keys
from mlwarehouse.errors import DuplicateKey, IntegrityError, NotFound, WarehouseError
from mlwarehouse.ids import new_id, utc_now
from mlwarehouse.query.documents import validate_document

__all__ = ["export_project", "import_project", "read_manifest", "FORMAT", "FORMAT_VERSION"]

FORMAT = "mlwarehouse-archive"
FORMAT_VERSION = 1
SKIPPED = frozenset({schema.META.name})
#: collections whose documents nothing refers to by id (their new ids are not remembered on a renaming import)
UNREFERENCED = frozenset({schema.LOGS.name})
#: collections imported first, in this order (the others follow by name)
ORDER = (schema.DATASETS.name, schema.RUNS.name, schema.TASKS.name, schema.MODELS.name, schema.LOGS.name)

_CHUNK = 1 << 22
_BATCH = 500
_MEMBER = re.compile(r"^(?:manifest\.json|blobs/[0-9a-f]{64}|collections/[A-Za-z0-9_][A-Za-z0-9_.-]*\.jsonl)$")

#: ``progress(stage, done, total)``: stage is "documents", "blobs" or "bytes"; called as work advances
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# -- export ----------------------------------------------------------------------------------------------------
def export_project(warehouse, project, path: str | os.PathLike, progress: Progress | None = None) -> dict:
    """Write every document of ``project`` (a name or a Project) and every blob they use to the tar at ``path``.

    The archive appears whole or not at all (written beside ``path``, then renamed). Returns a summary:
    project, path, collections (counts), documents, blobs, blob_bytes, archive_bytes.
    """
    name = project if isinstance(project, str) else project.name
    progress = progress or _no_progress
    index, store = warehouse.index, warehouse.blobs
    target = Path(path)
    collections = [c for c in sorted(index.collections()) if c not in SKIPPED]
    counts: dict[str, int] = {}
    keys: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="mlw-export-") as scratch:
        files: dict[str, Path] = {}
        done = 0
        for collection in collections:
            file = Path(scratch) / f"{collection}.jsonl"
            n = 0
            with open(file, "w", encoding="utf-8") as out:
                # the index's cursor, not Project.find's list: a project's logs need not fit in memory
                for doc in index.find(collection, {"project": name}, sort=[("_id", 1)]):
                    out.write(json.dumps(doc, separators=(",", ":"), ensure_ascii=False))
                    out.write("\n")
                    keys.update(doc.get("_blobs") or ())
                    keys.update(blob_keys(doc))
                    n += 1
            done += n
            progress("documents", done, done)
            if n:
                counts[collection] = n
                files[collection] = file
        if not counts:
            raise NotFound(f"there is no project {name!r} to export (no documents in any collection)")
        sizes = {key: store.stat(key).size for key in sorted(keys)}
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "project": name, "created": utc_now(),
                    "collections": counts, "documents": sum(counts.values()), "blobs": len(sizes),
                    "blob_bytes": sum(sizes.values())}
        partial = target.with_name(f".{target.name}.{new_id()}.partial")
        try:
            with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
                written = 0
                for i, (key, size) in enumerate(sizes.items(), 1):
                    info = tarfile.TarInfo(f"blobs/{key}")
                    info.size = size
                    tar.addfile(info, _BlobReader(store, key, size))
                    written += size
                    progress("blobs", i, len(sizes))
                    progress("bytes", written, manifest["blob_bytes"])
                for collection, file in files.items():
                    tar.add(file, arcname=f"collections/{collection}.jsonl", recursive=False,
                            filter=_plain_member)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return {"project": name, "path": str(target), "collections": counts, "documents": manifest["documents"],
            "blobs": manifest["blobs"], "blob_bytes": manifest["blob_bytes"],
            "archive_bytes": target.stat().st_size}


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _BlobReader(io.RawIOBase):
    """A blob as a file object, read in ranges and hashed on the way: the archive never holds bytes that do not
    match their key, and never a whole large blob in memory."""

    def __init__(self, store, key: str, size: int):
        super().__init__()
        self.store, self.key, self.size = store, key, size
        self.offset = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.offset
        n = left if n is None or n < 0 else min(n, left, _CHUNK)
        if n <= 0:
            return b""
        data = self.store.get_range(self.key, self.offset, n)
        if len(data) != n:
            raise IntegrityError(f"blob {self.key} is shorter than its recorded {self.size} bytes")
        self.digest.update(data)
        self.offset += n
        if self.offset == self.size and self.digest.hexdigest() != self.key:
            raise IntegrityError(f"blob {self.key} does not match its hash; nothing was exported")
        return data


# -- import ----------------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of an archive (checked), without reading the rest."""
    with _open(path) as tar:
        return _manifest(tar)


def import_project(warehouse, path: str | os.PathLike, *, project: str | None = None,
                   progress: Progress | None = None) -> dict:
    """Import an archive written by :func:`export_project`; returns a summary (project, source, renamed,
    collections, documents, blobs, blob_bytes).

    ``project`` imports under another name, with new ids (see the module's docstring). Raises IntegrityError for
    a damaged archive or blob, DuplicateKey when documents would collide, and writes no document in either case.
    """
    progress = progress or _no_progress
    with _open(path) as tar:
        manifest = _manifest(tar)
        source = manifest["project"]
        name = source if project is None else project
        warehouse.project(name)  # validates the name
        renamed = name != source
        members = _members(tar)
        files = {m.name.removeprefix("collections/").removesuffix(".jsonl"): m
                 for m in members.values() if m.name.startswith("collections/")}
        blobs = {m.name.removeprefix("blobs/"): m for m in members.values() if m.name.startswith("blobs/")}
        _check_counts(manifest, files)
        internal = sorted(set(files) & SKIPPED)
        if internal:
            raise IntegrityError(f"archive {path} holds the warehouse's internal collection(s) {internal}, which "
                                 "export never writes; nothing was imported")

        # 1. check everything, write nothing
        ids: dict[str, str] = {}
        needed: set[str] = set()
        for collection, member in files.items():
            seen: set[str] = set()
            for batch in _batches(_docs(tar, member, source)):
                for doc in batch:
                    if doc["_id"] in seen:
                        raise DuplicateKey(f"archive {path} holds {collection} document {doc['_id']!r} twice; "
                                           "nothing was imported")
                    seen.add(doc["_id"])
                    needed.update(doc.get("_blobs") or ())
                    needed.update(blob_keys(doc))
                    if renamed and collection not in UNREFERENCED:
                        ids[doc["_id"]] = new_id()
                if not renamed:
                    _check_free(warehouse.index, collection, batch)
        missing = needed - blobs.keys()
        if missing:
            raise IntegrityError(f"archive {path} lacks {len(missing)} blob(s) its documents use, "
                                 f"e.g. {sorted(missing)[0]}; nothing was imported")
        _check_unique_indexes(warehouse.index, name, files, tar, source)

        # 2. blobs, each verified against its name
        total = sum(blobs[k].size for k in needed)
        written = 0
        for i, key in enumerate(sorted(needed), 1):
            member = blobs[key]
            _put_verified(warehouse.blobs, key, tar.extractfile(member))
            written += member.size
            progress("blobs", i, len(needed))
            progress("bytes", written, total)

        # 3. documents, now that their blobs are durable
        _prepare(warehouse, files)
        order = [c for c in ORDER if c in files] + sorted(set(files) - set(ORDER))
        done = 0
        counts: dict[str, int] = {}
        for collection in order:
            counts[collection] = 0
            for batch in _batches(_docs(tar, files[collection], source)):
                if renamed:
                    batch = [_renamed(doc, name, ids) for doc in batch]
                if any("_blobs" in doc for doc in batch):
                    warehouse.note_blob_collection(collection)
                try:
                    warehouse.index.insert_many(collection, batch)
                except DuplicateKey as exc:
                    raise DuplicateKey(f"{exc} (importing {collection} from {path}: {done} documents were "
                                       f"already written to project {name!r} and remain)") from exc
                counts[collection] += len(batch)
                done += len(batch)
                progress("documents", done, manifest["documents"])
    return {"project": name, "source": source, "renamed": renamed, "collections": counts,
            "documents": sum(counts.values()), "blobs": len(needed), "blob_bytes": total}


def _open(path: str | os.PathLike) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")
    except FileNotFoundError:
        raise NotFound(f"no archive at {path}") from None
    except (tarfile.TarError, OSError) as exc:
        raise IntegrityError(f"{path} is not an uncompressed tar archive of a project: {exc}") from None


def _manifest(tar: tarfile.TarFile) -> dict:
    try:
        member = tar.getmember("manifest.json")
        manifest = json.loads(tar.extractfile(member).read())
    except (KeyError, AttributeError, ValueError, tarfile.TarError) as exc:
        raise IntegrityError(f"{tar.name} has no readable manifest.json ({exc}); not a project archive") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{tar.name} is not an mlwarehouse archive (its manifest names no {FORMAT!r} format)")
    if manifest.get("version") != FORMAT_VERSION:
        raise IntegrityError(f"{tar.name} has archive format version {manifest.get('version')!r}; this "
                             f"mlwarehouse reads version {FORMAT_VERSION}")
    if not isinstance(manifest.get("project"), str) or not isinstance(manifest.get("collections"), dict):
        raise IntegrityError(f"{tar.name}: the manifest lacks the source project or the collection counts")
    return manifest


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        if not member.isfile() or not _MEMBER.match(member.name):
            raise IntegrityError(f"{tar.name}: unexpected archive member {member.name!r}")
        if member.name in members:
            raise IntegrityError(f"{tar.name}: member {member.name!r} appears twice")
        members[member.name] = member
    return members


def _check_counts(manifest: dict, files: dict[str, tarfile.TarInfo]) -> None:
    if set(files) != set(manifest["collections"]):
        raise IntegrityError(f"the archive holds collections {sorted(files)} but its manifest lists "
                             f"{sorted(manifest['collections'])}")


def _docs(tar: tarfile.TarFile, member: tarfile.TarInfo, source: str) -> Iterator[dict]:
    where = member.name
    stream = io.TextIOWrapper(tar.extractfile(member), encoding="utf-8")
    for n, line in enumerate(stream, 1):
        try:
            doc = json.loads(line)
            validate_document(doc)
        except (ValueError, WarehouseError) as exc:
            raise IntegrityError(f"{where} line {n} is not a valid document: {exc}") from None
        if doc.get("project") != source:
            raise IntegrityError(f"{where} line {n} belongs to project {doc.get('project')!r}, "
                                 f"not to the archive's {source!r}")
        keys = blob_keys(doc)
        if keys or "_blobs" in doc:  # the archive's own list is not trusted: gc must see every reference
            doc["_blobs"] = sorted(keys | set(doc.get("_blobs") or ()))
        yield doc


def _batches(docs: Iterator[dict]) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_free(index, collection: str, batch: list[dict]) -> None:
    taken = list(index.find(collection, {"_id": {"$in": [d["_id"] for d in batch]}}, limit=1,
                            projection={"_id": 1, "project": 1}))
    if taken:
        raise DuplicateKey(f"{collection} already holds a document with _id {taken[0]['_id']!r} (project "
                           f"{taken[0].get('project')!r}); import under another name with --project NEW_NAME")


def _check_unique_indexes(index, project: str, files: dict, tar: tarfile.TarFile, source: str) -> None:
    """Free ids are not enough: a unique index (dataset name + version in a project) can collide too. Checked on
    the whole index: a unique index need not hold the project."""
    for collection, member in files.items():
        uniques = [[f for f, _ in ix["keys"]] for ix in index.indexes(collection) if ix.get("unique")]
        if not uniques:
            continue
        for doc in _docs(tar, member, source):
            for fields in uniques:
                flt = {f: project if f == "project" else _get(doc, f) for f in fields}
                if index.count(collection, flt):
                    raise DuplicateKey(f"{collection} already holds a document with {flt} (a unique index); "
                                       f"nothing was imported")


def _get(doc: dict, path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _put_verified(store, key: str, source: BinaryIO) -> None:
    """Stream an archive blob into the store, which files the bytes under their true hash: a damaged blob lands
    under another key (unreferenced, for ``gc``) and raises here, before any document is written."""
    got, _ = store.put_file(source)
    if got != check_key(key):
        raise IntegrityError(f"archive blob {key} does not match its hash (its bytes hash to {got}); "
                             f"no document was imported")


def _prepare(warehouse, files: dict) -> None:
    """Create the collections before writing into them: the declared ones with their scalar fields and indexes
    (:mod:`mlwarehouse.schema`), any other as a plain collection."""
    for collection in files:
        declared = schema.COLLECTIONS.get(collection)
        if declared is not None:
            warehouse.ensure(declared)
        else:
            warehouse.index.ensure_collection(collection)


def _renamed(doc: dict, project: str, ids: dict[str, str]) -> dict:
    out = _rewrite(doc, ids)
    out["_id"] = ids.get(doc["_id"]) or new_id()
    out["project"] = project
    return out


def _rewrite(node: Any, ids: dict[str, str]) -> Any:
    if type(node) is str:
        return ids.get(node, node)
    if type(node) is dict:
        if "_blob" in node:
            return node
        return {k: _rewrite(v, ids) for k, v in node.items()}
    if type(node) is list:
        return [_rewrite(v, ids) for v in node]
    return node
