"""Reading an archive that may be hostile: its members, its manifest and its document lines, each checked before
anything is read or written.

An archive is untrusted input (teammates import each other's). Before a byte of any member is read: the archive
must be a regular file; every member a plain regular file (no links, devices, sparse or continued members) with
an expected name, once; every member's data must lie inside the file (a member cannot be bigger than the file
holding it, so a tiny archive cannot claim gigabytes); the manifest is at most :data:`MAX_MANIFEST` bytes. Every
problem is an :class:`~mlwarehouse.errors.IntegrityError` that names the archive and what is wrong.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from mlwarehouse import schema
from mlwarehouse.blobs.base import check_key
from mlwarehouse.codecs.values import blob_keys
from mlwarehouse.collections.catalog import check_collection_name
from mlwarehouse.errors import IntegrityError, NotFound, WarehouseError
from mlwarehouse.query.documents import validate_document
from mlwarehouse.query.jsonvalues import split_path
from mlwarehouse.warehouse.tables import table_name

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "MAX_MANIFEST", "SKIPPED", "Archive", "open_archive",
           "documents", "table_documents", "table_member"]

FORMAT = "mlwarehouse-archive"
#: version 2 added the tables of users' collections (``tables/``, the manifest's ``tables`` and ``indexes``);
#: version 3 holds logs as blocks of points (:mod:`mlwarehouse.runs.blocks`; the one-point documents of older
#: archives still read, as blocks of one point)
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
#: collections never exported (the warehouse's own bookkeeping; tombstones only matter to the warehouse they are in)
SKIPPED = frozenset({schema.META.name, schema.TOMBSTONES.name})
#: the largest manifest read (it holds a few counts per collection)
MAX_MANIFEST = 1 << 20

_MEMBER = re.compile(r"^(?:manifest\.json|blobs/[0-9a-f]{64}"
                     r"|(?:collections|tables)/[A-Za-z0-9_][A-Za-z0-9_.-]*\.jsonl)$")
_FOLDS = ("train", "valid")
_PLAIN = (tarfile.REGTYPE, tarfile.AREGTYPE)
_TAR_ERRORS = (tarfile.TarError, EOFError, ValueError, OSError, OverflowError)


@dataclass
class Archive:
    """An opened, checked archive: the tar, its manifest, its collection files, its table files (member stem ->
    member: see :func:`table_member`) and its blobs (name -> member)."""
    tar: tarfile.TarFile
    path: str
    manifest: dict
    files: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    blobs: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    tables: dict[str, tarfile.TarInfo] = field(default_factory=dict)

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.tar.close()


def open_archive(path: str | os.PathLike) -> Archive:
    """Open ``path`` and check its members and manifest (see the module notes); nothing is extracted."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"no archive at {path}") from None
    except OSError as exc:
        raise IntegrityError(f"cannot read the archive {path}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"{path} is not a regular file; a project archive is a tar file")
    try:
        tar = tarfile.open(path, "r:")
    except _TAR_ERRORS as exc:
        raise IntegrityError(f"{path} is not an uncompressed tar archive of a project: {exc}") from None
    try:
        archive = Archive(tar, str(path), {})
        members = _members(tar, str(path), st.st_size)
        archive.manifest = _manifest(tar, str(path), members.get("manifest.json"))
        for name, member in members.items():
            if name.startswith("collections/"):
                archive.files[name.removeprefix("collections/").removesuffix(".jsonl")] = member
            elif name.startswith("tables/"):
                archive.tables[name.removeprefix("tables/").removesuffix(".jsonl")] = member
            elif name.startswith("blobs/"):
                archive.blobs[name.removeprefix("blobs/")] = member
    except BaseException:
        tar.close()
        raise
    return archive


def _members(tar: tarfile.TarFile, path: str, real_size: int) -> dict[str, tarfile.TarInfo]:
    try:
        listed = tar.getmembers()
    except _TAR_ERRORS as exc:
        raise IntegrityError(f"{path}: the tar headers are damaged ({exc})") from None
    members: dict[str, tarfile.TarInfo] = {}
    total = 0
    for member in listed:
        if member.type not in _PLAIN or member.sparse is not None:
            kind = "a sparse file" if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE \
                else f"of tar type {member.type!r}"
            raise IntegrityError(f"{path}: member {member.name!r} is {kind}; an archive holds regular files only")
        if not _MEMBER.match(member.name):
            raise IntegrityError(f"{path}: unexpected archive member {member.name!r}")
        if member.name in members:
            raise IntegrityError(f"{path}: member {member.name!r} appears twice")
        total += member.size
        if member.size < 0 or member.offset_data + member.size > real_size or total > real_size:
            raise IntegrityError(f"{path}: member {member.name!r} claims {member.size} bytes, more than the "
                                 f"{real_size}-byte archive holds")
        members[member.name] = member
    return members


def _manifest(tar: tarfile.TarFile, path: str, member: tarfile.TarInfo | None) -> dict:
    if member is None:
        raise IntegrityError(f"{path} has no manifest.json; not a project archive")
    if member.size > MAX_MANIFEST:
        raise IntegrityError(f"{path}: manifest.json holds {member.size} bytes, over the {MAX_MANIFEST} allowed")
    try:
        manifest = json.loads(tar.extractfile(member).read(MAX_MANIFEST))
    except (RecursionError, *_TAR_ERRORS) as exc:
        raise IntegrityError(f"{path} has no readable manifest.json ({exc}); not a project archive") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path} is not an mlwarehouse archive (its manifest names no {FORMAT!r} format)")
    if manifest.get("version") not in READABLE_VERSIONS or type(manifest.get("version")) is not int:
        raise IntegrityError(f"{path} has archive format version {manifest.get('version')!r}; this "
                             f"mlwarehouse reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if not isinstance(manifest.get("project"), str):
        raise IntegrityError(f"{path}: the manifest lacks the source project (a string under 'project')")
    counts = manifest.get("collections")
    if not isinstance(counts, dict) or not all(isinstance(k, str) and _count(v) for k, v in counts.items()):
        raise IntegrityError(f"{path}: the manifest's 'collections' must map each collection to its document "
                             f"count, not {counts!r:.200}")
    for key in ("documents", "blobs", "blob_bytes"):
        if not _count(manifest.get(key)):
            raise IntegrityError(f"{path}: the manifest's {key!r} must be a count (an integer >= 0), not "
                                 f"{manifest.get(key)!r:.100}")
    tables = manifest.setdefault("tables", {})
    if not isinstance(tables, dict) or not all(isinstance(k, str) and _count(v) for k, v in tables.items()):
        raise IntegrityError(f"{path}: the manifest's 'tables' must map each of the project's collections to its "
                             f"document count, not {tables!r:.200}")
    for name in tables:
        try:
            check_collection_name(name)
        except WarehouseError as exc:
            raise IntegrityError(f"{path}: the manifest names a collection the catalog refuses ({exc})"[:500]) \
                from None
    _check_indexes(path, manifest.setdefault("indexes", {}), tables)
    in_all = sum(counts.values()) + sum(tables.values())
    if manifest["documents"] != in_all:
        raise IntegrityError(f"{path}: the manifest counts {manifest['documents']} documents in all but "
                             f"{in_all} by collection")
    return manifest


def _check_indexes(path: str, indexes, tables: dict) -> None:
    """``indexes``: collection name -> ``[{"keys": [[field, 1 | -1], ...], "unique": bool}, ...]``."""
    if not isinstance(indexes, dict) or not set(indexes) <= set(tables) \
            or not all(isinstance(v, list) for v in indexes.values()):
        raise IntegrityError(f"{path}: the manifest's 'indexes' must map collections it lists under 'tables' to "
                             f"lists of indexes, not {indexes!r:.200}")
    for name, specs in indexes.items():
        for spec in specs:
            ok = isinstance(spec, dict) and set(spec) <= {"keys", "unique"} and type(spec.get("unique", False)) \
                is bool and isinstance(spec.get("keys"), list) and 0 < len(spec["keys"]) <= 32
            try:
                ok = ok and all(isinstance(k, list) and len(k) == 2 and isinstance(k[0], str) and k[1] in (1, -1)
                                and type(k[1]) is int and split_path(k[0], "index key") for k in spec["keys"])
            except WarehouseError:
                ok = False
            if not ok or any(k[0].split(".", 1)[0] in ("_listeners", "_rev", "_blobs") for k in spec["keys"]):
                raise IntegrityError(f"{path}: collection {name!r:.100} has a malformed index in the manifest: "
                                     f"{spec!r:.200}")


def table_member(source: str, collection: str) -> str:
    """The stem of the member that holds a collection's documents: its table's name in the source project,
    derived from the two names (never read from the archive)."""
    return table_name(source, collection)


def _count(value) -> bool:
    return type(value) is int and value >= 0


def documents(archive: Archive, collection: str) -> Iterator[dict]:
    """The documents of one collection file, each checked (IntegrityError naming the line of the first bad one):
    UTF-8 JSON objects that the index can store, of the archive's project, with well-formed blob lists."""
    member = archive.files[collection]
    where = f"{archive.path}: {member.name}"
    source = archive.manifest["project"]
    try:
        stream = archive.tar.extractfile(member)
        for n, raw in enumerate(stream, 1):
            yield _document(raw, where, n, source)
    except _TAR_ERRORS as exc:
        raise IntegrityError(f"{where} cannot be read ({exc})") from None


def table_documents(archive: Archive, stem: str) -> Iterator[dict]:
    """The documents of one table file, each checked (IntegrityError naming the line of the first bad one): UTF-8
    JSON objects that the index can store, with a string ``_id``, a valid ``_fold`` and the warehouse's fields in
    their shapes. ``_blobs`` is recomputed from the references; ``_rev`` is dropped (the importer writes a fresh
    one: a compare-and-set token means nothing in another warehouse)."""
    member = archive.tables[stem]
    where = f"{archive.path}: {member.name}"
    try:
        stream = archive.tar.extractfile(member)
        for n, raw in enumerate(stream, 1):
            yield _table_document(raw, where, n)
    except _TAR_ERRORS as exc:
        raise IntegrityError(f"{where} cannot be read ({exc})") from None


def _table_document(raw: bytes, where: str, n: int) -> dict:
    try:
        doc = json.loads(raw.decode("utf-8"))
        validate_document(doc)
    except (ValueError, RecursionError, WarehouseError) as exc:
        raise IntegrityError(f"{where} line {n} is not a valid document: {exc}"[:500]) from None
    problem = None
    if not isinstance(doc.get("_id"), str) or not doc["_id"]:
        problem = f"_id must be a non-empty string, not {doc.get('_id')!r:.100}"
    elif "_fold" in doc and doc["_fold"] not in _FOLDS:
        problem = f"_fold must be 'train' or 'valid', not {doc['_fold']!r:.100}"
    elif not isinstance(doc.get("_outputs", {}), dict):
        problem = "_outputs must be an object"
    elif not isinstance(doc.get("_listeners", {}), dict) \
            or not all(isinstance(v, dict) for v in doc.get("_listeners", {}).values()):
        problem = "_listeners must be an object of listener states (objects)"
    if problem:
        raise IntegrityError(f"{where} line {n} is not a valid document of a collection: {problem}")
    doc.pop("_rev", None)
    doc.pop("_blobs", None)
    keys = blob_keys(doc)
    if keys:
        doc["_blobs"] = sorted(keys)
    return doc


def _document(raw: bytes, where: str, n: int, source: str) -> dict:
    try:
        doc = json.loads(raw.decode("utf-8"))
        validate_document(doc)
    except (ValueError, RecursionError, WarehouseError) as exc:  # UnicodeDecodeError is a ValueError
        raise IntegrityError(f"{where} line {n} is not a valid document: {exc}"[:500]) from None
    if doc.get("project") != source:
        raise IntegrityError(f"{where} line {n} belongs to project {doc.get('project')!r:.100}, "
                             f"not to the archive's {source!r}")
    listed = doc.get("_blobs")
    if listed is not None:
        try:
            if not isinstance(listed, list):
                raise NotFound("not a list")
            listed = {check_key(k) for k in listed}
        except NotFound as exc:
            raise IntegrityError(f"{where} line {n}: _blobs must be a list of blob keys ({exc})") from None
    keys = blob_keys(doc)
    if keys or listed is not None:  # the archive's own list is not trusted: gc must see every reference
        doc["_blobs"] = sorted(keys | (listed or set()))
    return doc
