"""``mlw export``: a project's documents and the blobs they use, written to a tar (see :mod:`.tarball`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlwarehouse import schema
from mlwarehouse.archive.members import FORMAT, FORMAT_VERSION, SKIPPED, table_member
from mlwarehouse.codecs.values import blob_keys
from mlwarehouse.errors import IntegrityError, NotFound
from mlwarehouse.ids import new_id, utc_now

__all__ = ["export_project", "Progress"]

_CHUNK = 1 << 22

#: ``progress(stage, done, total)``: stage is "documents", "blobs" or "bytes"; called as work advances
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# -- export ----------------------------------------------------------------------------------------------------
def export_project(warehouse, project, path: str | os.PathLike, progress: Progress | None = None) -> dict:
    """Write every document of ``project`` (a name or a Project) and every blob they use to the tar at ``path``.

    The project's own collections (users' documents, in tables: see :mod:`mlwarehouse.warehouse.tables`) are written as
    stored, one ``tables/<table>.jsonl`` member each, with their indexes in the manifest; their catalog entries,
    data types and listeners are documents of the shared collections like any other.

    The archive appears whole or not at all (written beside ``path``, then renamed). Returns a summary:
    project, path, collections (counts), tables (counts by collection name), documents, blobs, blob_bytes,
    archive_bytes.
    """
    name = project if isinstance(project, str) else project.name
    progress = progress or _no_progress
    index, store = warehouse.index, warehouse.blobs
    target = Path(path)
    # tables are read through their catalog entries below (a user's document may hold a field "project")
    collections = [c for c in sorted(index.collections())
                   if c not in SKIPPED and not c.startswith(schema.TABLE_PREFIX)]
    counts: dict[str, int] = {}
    keys: set[str] = set()
    done = 0

    def write(docs, file: Path) -> int:
        nonlocal done
        n = 0
        with open(file, "w", encoding="utf-8") as out:
            for doc in docs:
                out.write(json.dumps(doc, separators=(",", ":"), ensure_ascii=False))
                out.write("\n")
                keys.update(doc.get("_blobs") or ())
                keys.update(blob_keys(doc))
                n += 1
        done += n
        progress("documents", done, done)
        return n

    with tempfile.TemporaryDirectory(prefix="mlw-export-") as scratch:
        files: dict[str, Path] = {}
        for collection in collections:
            file = Path(scratch) / f"{collection}.jsonl"
            # the index's cursor, not Project.find's list: a project's logs need not fit in memory
            docs = index.find(collection, {"project": name}, sort=[("_id", 1)])
            if collection == schema.VECTOR_INDEXES.name:  # definitions only: an index is rebuilt where it lands
                docs = ({**d, "snapshot": None, "_blobs": []} for d in docs)
            n = write(docs, file)
            if n:
                counts[collection] = n
                files[collection] = file
        tables, indexes, table_files = _export_tables(warehouse.project(name), Path(scratch), write)
        if not counts:
            raise NotFound(f"there is no project {name!r} to export (no documents in any collection)")
        sizes = {key: store.stat(key).size for key in sorted(keys)}
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "project": name, "created": utc_now(),
                    "collections": counts, "tables": tables, "indexes": indexes,
                    "documents": sum(counts.values()) + sum(tables.values()), "blobs": len(sizes),
                    "blob_bytes": sum(sizes.values())}
        partial = target.with_name(f".{target.name}.{new_id()}.partial")
        try:
            with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
                written = 0
                for i, (key, size) in enumerate(sizes.items(), 1):
                    info = tarfile.TarInfo(f"blobs/{key}")
                    info.size = size
                    reader = _BlobReader(store, key, size)
                    tar.addfile(info, reader)
                    reader.check()
                    written += size
                    progress("blobs", i, len(sizes))
                    progress("bytes", written, manifest["blob_bytes"])
                for collection, file in files.items():
                    tar.add(file, arcname=f"collections/{collection}.jsonl", recursive=False,
                            filter=_plain_member)
                for stem, file in table_files.items():
                    tar.add(file, arcname=f"tables/{stem}.jsonl", recursive=False, filter=_plain_member)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return {"project": name, "path": str(target), "collections": counts, "tables": tables,
            "documents": manifest["documents"], "blobs": manifest["blobs"], "blob_bytes": manifest["blob_bytes"],
            "archive_bytes": target.stat().st_size}


def _export_tables(project, scratch: Path, write) -> tuple[dict[str, int], dict[str, list], dict[str, Path]]:
    """Every collection in the project's catalog: its documents as stored (``write`` counts them and collects
    their blobs), its indexes, and the file of each table by member stem (see :func:`table_member`)."""
    counts: dict[str, int] = {}
    indexes: dict[str, list] = {}
    files: dict[str, Path] = {}
    for record in project.find(schema.CATALOG.name, sort=[("name", 1)]):
        collection = record["name"]
        stem = table_member(project.name, collection)
        if record.get("table") != stem:
            raise IntegrityError(f"the catalog of project {project.name!r} places collection {collection!r} in "
                                 f"table {record.get('table')!r}, not {stem!r}; nothing was exported")
        table = project.table(stem)
        files[stem] = scratch / f"table-{stem}.jsonl"
        counts[collection] = write(table.find({}, sort=[("_id", 1)]), files[stem])
        found = [{"keys": [[f, d] for f, d in ix["keys"]], "unique": bool(ix.get("unique"))}
                 for ix in (table.indexes() if table.exists() else [])
                 if not any(f.split(".", 1)[0] in ("_rev", "_listeners", "_blobs") for f, _ in ix["keys"])]
        # (indexes on the warehouse's own fields, e.g. the vector indexes' on _rev, are made again where needed)
        if found:
            indexes[collection] = found
    return counts, indexes, files


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
        if self.offset == self.size:
            self.check()
        return data

    def check(self) -> None:
        """Raise unless every byte was read and hashes to the key: called after the copy too, since tar reads
        nothing of an empty member (a zero-length file is a common crash artefact, not the empty blob)."""
        if self.offset != self.size or self.digest.hexdigest() != self.key:
            raise IntegrityError(f"blob {self.key} does not match its hash ({self.size} bytes stored); "
                                 "nothing was exported")
