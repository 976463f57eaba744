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
from mlwarehouse.errors import IntegrityError, NotFound, WarehouseError
from mlwarehouse.query.documents import validate_document

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_MANIFEST", "SKIPPED", "Archive", "open_archive", "documents"]

FORMAT = "mlwarehouse-archive"
FORMAT_VERSION = 1
#: collections never exported (the warehouse's own bookkeeping)
SKIPPED = frozenset({schema.META.name})
#: the largest manifest read (it holds a few counts per collection)
MAX_MANIFEST = 1 << 20

_MEMBER = re.compile(r"^(?:manifest\.json|blobs/[0-9a-f]{64}|collections/[A-Za-z0-9_][A-Za-z0-9_.-]*\.jsonl)$")
_PLAIN = (tarfile.REGTYPE, tarfile.AREGTYPE)
_TAR_ERRORS = (tarfile.TarError, EOFError, ValueError, OSError, OverflowError)


@dataclass
class Archive:
    """An opened, checked archive: the tar, its manifest, its collection files and its blobs (name -> member)."""
    tar: tarfile.TarFile
    path: str
    manifest: dict
    files: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    blobs: dict[str, tarfile.TarInfo] = field(default_factory=dict)

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
    if manifest.get("version") != FORMAT_VERSION:
        raise IntegrityError(f"{path} has archive format version {manifest.get('version')!r}; this "
                             f"mlwarehouse reads version {FORMAT_VERSION}")
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
    if manifest["documents"] != sum(counts.values()):
        raise IntegrityError(f"{path}: the manifest counts {manifest['documents']} documents in all but "
                             f"{sum(counts.values())} by collection")
    return manifest


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
