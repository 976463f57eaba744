"""``mlw import``: an archive written by :mod:`.export` read back into any warehouse (see :mod:`.tarball`).

Import checks everything before it writes anything: the archive's members and manifest (:mod:`.members`), every
document line, the counts against the manifest, duplicates inside the archive (by ``_id`` and by every unique
index of the target collection), that every referenced blob is in the archive, and that no document would collide
with one already there. Then it writes the blobs, verifying each against its name, and only then the documents
(invariant 1). Should a document write still fail (a concurrent writer, a backend error), the documents this
import wrote are removed again before the error is raised: a failed import leaves no partial project (blobs put
before the failure stay, unreferenced, for ``gc``). A process killed midway is not undone.

Users' collections (tables) are checked the same way, and more: an archive never names the table it writes. The
table is derived from the target project and the collection's name (the catalog entry's ``table`` is rewritten),
the member holding a collection's documents is derived from the source project and the name, and every catalog
entry must name its own collection's table in the source project; collection names the catalog would refuse,
and ``collections/`` files of tables, are refused. Data types and listeners are documents: nothing of their code
is imported or run on import (their import paths are resolved by readers that trust them, later).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

from mlwarehouse import schema
from mlwarehouse.archive.export import Progress, _no_progress
from mlwarehouse.archive.members import SKIPPED, Archive, documents, open_archive, table_documents, table_member
from mlwarehouse.blobs.base import check_key
from mlwarehouse.errors import DuplicateKey, IntegrityError, WarehouseError
from mlwarehouse.ids import new_id
from mlwarehouse.warehouse.tables import table_name

__all__ = ["import_project", "read_manifest"]

#: collections whose documents nothing refers to by id (their new ids are not remembered on a renaming import)
UNREFERENCED = frozenset({schema.LOGS.name})
#: collections imported first, in this order (the others follow by name; tables come last)
ORDER = (schema.DATASETS.name, schema.RUNS.name, schema.TASKS.name, schema.MODELS.name, schema.LOGS.name)
CATALOG = schema.CATALOG.name
_BATCH = 500


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of an archive (checked, with the archive's members), without reading the rest."""
    with open_archive(path) as archive:
        return archive.manifest


def import_project(warehouse, path: str | os.PathLike, *, project: str | None = None,
                   progress: Progress | None = None) -> dict:
    """Import an archive written by :func:`~mlwarehouse.archive.export.export_project`; returns a summary
    (project, source, renamed, collections, tables (counts by collection name), documents, blobs, blob_bytes).

    ``project`` imports under another name, with new ids (see :mod:`.tarball`). Raises IntegrityError for a
    damaged or crafted archive or blob, DuplicateKey when documents would collide (with each other or with the
    warehouse's), and leaves no document of the archive behind in any case.
    """
    progress = progress or _no_progress
    with open_archive(path) as archive:
        manifest, files, blobs = archive.manifest, archive.files, archive.blobs
        source = manifest["project"]
        name = source if project is None else project
        target = warehouse.project(name)  # validates the name
        renamed = name != source
        if set(files) != set(manifest["collections"]):
            raise IntegrityError(f"the archive holds collections {sorted(files)} but its manifest lists "
                                 f"{sorted(manifest['collections'])}")
        internal = sorted(set(files) & SKIPPED)
        if internal:
            raise IntegrityError(f"archive {path} holds the warehouse's internal collection(s) {internal}, which "
                                 "export never writes; nothing was imported")
        tables = _plan_tables(archive, name)

        # 1. check everything, write nothing
        ids: dict[str, str] = {}
        needed: set[str] = set()
        uniques = {c: _unique_fields(warehouse.index, c) for c in files}
        for collection in files:
            n = _check_collection(warehouse.index, archive, collection, name, uniques[collection], renamed,
                                  ids, needed)
            if n != manifest["collections"][collection]:
                raise IntegrityError(f"{path}: {collection} holds {n} documents but the manifest counts "
                                     f"{manifest['collections'][collection]}; nothing was imported")
        for collection, (stem, table, uniques_of) in tables.items():
            n = _check_table(archive, target, collection, stem, table, uniques_of, needed)
            if n != manifest["tables"][collection]:
                raise IntegrityError(f"{path}: collection {collection!r} holds {n} documents but the manifest "
                                     f"counts {manifest['tables'][collection]}; nothing was imported")
        missing = needed - blobs.keys()
        if missing:
            raise IntegrityError(f"archive {path} lacks {len(missing)} blob(s) its documents use, "
                                 f"e.g. {sorted(missing)[0]}; nothing was imported")
        _check_unique_indexes(warehouse.index, archive, name, uniques, ids)

        # 2. blobs, each verified against its name
        total = sum(blobs[k].size for k in needed)
        written = 0
        for i, key in enumerate(sorted(needed), 1):
            member = blobs[key]
            _put_verified(warehouse.blobs, key, archive.tar.extractfile(member))
            written += member.size
            progress("blobs", i, len(needed))
            progress("bytes", written, total)

        # 3. documents, now that their blobs are durable; undone if a write fails
        _prepare(warehouse, files)
        counts, table_counts = _write_documents(warehouse, archive, name, ids, renamed, progress, tables)
    return {"project": name, "source": source, "renamed": renamed, "collections": counts, "tables": table_counts,
            "documents": sum(counts.values()) + sum(table_counts.values()), "blobs": len(needed),
            "blob_bytes": total}


def _batches(docs: Iterator[dict]) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _unique_fields(index, collection: str) -> list[tuple[str, ...]]:
    """The field lists of every unique index the target collection has, or will have once it is created."""
    found = [tuple(f for f, _ in ix["keys"]) for ix in index.indexes(collection) if ix.get("unique")]
    declared = schema.COLLECTIONS.get(collection)
    if declared is not None:
        found += [tuple(f for f, _ in ix.keys) for ix in declared.indexes if ix.unique]
    return list(dict.fromkeys(found))


def _unique_key(doc: dict, fields: tuple[str, ...], project: str) -> tuple | None:
    """The values of a unique index's fields as the document will be stored; None where one is missing (SQL
    unique indexes never compare a missing value)."""
    values = tuple(project if f == "project" else _get(doc, f) for f in fields)
    return None if any(v is None for v in values) else values


class _Repeats:
    """The ``_id``s and unique keys met so far in one file of an archive: the second of any is a DuplicateKey
    (keys are kept as digests: a collection's keys may be many)."""

    def __init__(self, archive: Archive, what: str, uniques: list[tuple[str, ...]]):
        self.path, self.what, self.uniques = archive.path, what, uniques
        self.ids: set[str] = set()
        self.keys: list[set[bytes]] = [set() for _ in uniques]
        self.n = 0

    def check(self, doc: dict, key_of) -> list[tuple[tuple[str, ...], tuple]]:
        """Check the next document; returns its ``(fields, key)`` per unique index it has a key for
        (``key_of(doc, fields)`` is None where it has none)."""
        self.n += 1
        if doc["_id"] in self.ids:
            raise DuplicateKey(f"archive {self.path} holds {self.what} document {doc['_id']!r} twice "
                               f"(line {self.n}); nothing was imported")
        self.ids.add(doc["_id"])
        found = []
        for fields, taken in zip(self.uniques, self.keys):
            key = key_of(doc, fields)
            if key is None:
                continue
            digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).digest()
            if digest in taken:
                raise DuplicateKey(f"archive {self.path} holds two {self.what} documents with "
                                   f"{dict(zip(fields, key))!r:.300} (a unique index; the second at line "
                                   f"{self.n}); nothing was imported")
            taken.add(digest)
            found.append((fields, key))
        return found


def _check_collection(index, archive: Archive, collection: str, project: str, uniques: list, renamed: bool,
                      ids: dict[str, str], needed: set[str]) -> int:
    """One pass over a collection file: every line valid, no ``_id`` or unique key twice, the ids free in the
    warehouse; collects the blobs used and (renaming) the new ids. Returns how many documents it holds."""
    repeats = _Repeats(archive, collection, uniques)
    for batch in _batches(documents(archive, collection)):
        for doc in batch:
            repeats.check(doc, lambda d, fields: _unique_key(d, fields, project))
            needed.update(doc.get("_blobs") or ())
            if renamed and collection not in UNREFERENCED:
                ids[doc["_id"]] = new_id()
        if not renamed:
            _check_free(index, collection, batch)
    return repeats.n


def _plan_tables(archive: Archive, project: str) -> dict[str, tuple[str, str, list[tuple[str, ...]]]]:
    """Each of the archive's collections (users' documents): the stem of its member in the archive, the table it
    goes to in ``project`` and its unique indexes' fields. The member and the table are derived from names, never
    read from the archive; the catalog entries must agree with the manifest and name their own tables."""
    path, manifest = archive.path, archive.manifest
    source, listed = manifest["project"], manifest["tables"]
    stems = {table_member(source, c): c for c in listed}
    if len(stems) != len(listed):
        raise IntegrityError(f"{path}: two collections of the manifest share a table name; nothing was imported")
    if set(archive.tables) != set(stems):
        raise IntegrityError(f"{path}: the archive holds table files {sorted(archive.tables)!r:.300} but its "
                             f"manifest's collections need {sorted(stems)!r:.300}; nothing was imported")
    tables = [c for c in archive.files if c.startswith(schema.TABLE_PREFIX)]
    if tables:
        raise IntegrityError(f"archive {path} writes the table {tables[0]!r} as a shared collection; a "
                             f"collection's documents come only under tables/; nothing was imported")
    cataloged: set[str] = set()
    if CATALOG in archive.files:
        for n, doc in enumerate(documents(archive, CATALOG), 1):
            name = doc.get("name")
            if not isinstance(name, str) or name not in listed:
                raise IntegrityError(f"{path}: catalog entry {n} names collection {name!r:.100}, which the "
                                     f"manifest does not list under 'tables'; nothing was imported")
            if doc.get("table") != table_member(source, name):
                raise IntegrityError(f"{path}: catalog entry {n} places collection {name!r:.100} in table "
                                     f"{doc.get('table')!r:.100}, not in its own table of project {source!r} "
                                     f"({table_member(source, name)}); nothing was imported")
            cataloged.add(name)
    if cataloged != set(listed):
        raise IntegrityError(f"{path}: the manifest lists collections {sorted(set(listed) - cataloged)!r:.200} "
                             f"that the archive's catalog does not hold; nothing was imported")
    return {c: (stem, table_name(project, c), [tuple(k[0] for k in ix["keys"])
                                                for ix in manifest["indexes"].get(c, ()) if ix.get("unique")])
            for stem, c in sorted(stems.items(), key=lambda x: x[1])}


def _check_table(archive: Archive, target, collection: str, stem: str, name: str,
                 uniques: list[tuple[str, ...]], needed: set[str]) -> int:
    """One pass over a table file: every line valid, no ``_id`` or unique key twice in the archive, none taken
    in the target table (by ``_id`` or by a unique index, the target's own included); collects the blobs."""
    table = target.table(name)
    exists = table.exists()
    if exists:
        uniques = list(dict.fromkeys(uniques + [tuple(f for f, _ in ix["keys"]) for ix in table.indexes()
                                                if ix.get("unique")]))
    repeats = _Repeats(archive, f"collection {collection!r}", uniques)
    for batch in _batches(table_documents(archive, stem)):
        for doc in batch:
            for fields, values in repeats.check(doc, _table_key):
                if exists and table.count({f: v for f, v in zip(fields, values)}):
                    raise DuplicateKey(f"collection {collection!r} of project {target.name!r} already holds a "
                                       f"document with {dict(zip(fields, values))!r:.300} (a unique index); "
                                       f"nothing was imported")
            needed.update(doc.get("_blobs") or ())
        if exists:
            taken_ids = list(table.find({"_id": {"$in": [d["_id"] for d in batch]}}, limit=1,
                                        projection={"_id": 1}))
            if taken_ids:
                raise DuplicateKey(f"collection {collection!r} of project {target.name!r} already holds a "
                                   f"document with _id {taken_ids[0]['_id']!r}; import under another name with "
                                   f"--project NEW_NAME")
    return repeats.n


def _table_key(doc: dict, fields: tuple[str, ...]) -> tuple | None:
    values = tuple(_get(doc, f) for f in fields)
    return None if any(v is None for v in values) else values


def _check_free(index, collection: str, batch: list[dict]) -> None:
    taken = list(index.find(collection, {"_id": {"$in": [d["_id"] for d in batch]}}, limit=1,
                            projection={"_id": 1, "project": 1}))
    if taken:
        raise DuplicateKey(f"{collection} already holds a document with _id {taken[0]['_id']!r} (project "
                           f"{taken[0].get('project')!r}); import under another name with --project NEW_NAME")


def _check_unique_indexes(index, archive: Archive, project: str, uniques: dict, ids: dict[str, str]) -> None:
    """Free ids are not enough: a unique index (dataset name + version in a project) can collide too. Checked on
    the whole index (a unique index need not hold the project), with the values as they will be stored."""
    existing = set(index.collections())
    for collection, fields_list in uniques.items():
        if not fields_list or collection not in existing:
            continue
        for doc in documents(archive, collection):
            for fields in fields_list:
                key = _unique_key(doc, fields, project)
                if key is None:
                    continue
                flt = {f: _rewrite(v, ids) for f, v in zip(fields, key)}
                if index.count(collection, flt):
                    raise DuplicateKey(f"{collection} already holds a document with {flt!r:.300} (a unique "
                                       f"index); nothing was imported")


def _write_documents(warehouse, archive: Archive, project: str, ids: dict[str, str], renamed: bool,
                     progress: Progress, tables: dict[str, tuple]) -> tuple[dict[str, int], dict[str, int]]:
    """Insert every collection's documents in :data:`ORDER`, then the tables'; on any failure remove what was
    inserted, then raise (a DuplicateKey says that nothing was kept)."""
    files = archive.files
    order = [c for c in ORDER if c in files] + sorted(set(files) - set(ORDER))
    total = archive.manifest["documents"]
    written: dict[str, list[str]] = {}
    in_tables: dict[str, list[tuple[str, str]]] = {}
    counts: dict[str, int] = {}
    table_counts: dict[str, int] = {}
    done = 0
    target = warehouse.project(project)
    try:
        for collection in order:
            counts[collection] = 0
            for batch in _batches(documents(archive, collection)):
                if renamed:
                    batch = [_renamed(doc, project, ids) for doc in batch]
                if collection == CATALOG:  # the table is the target project's, whatever the archive said
                    for doc in batch:
                        doc["table"] = table_name(project, doc["name"])
                if any("_blobs" in doc for doc in batch):
                    warehouse.note_blob_collection(collection)
                written.setdefault(collection, []).extend(d["_id"] for d in batch)  # before: a chunk may land
                warehouse.index.insert_many(collection, batch)
                counts[collection] += len(batch)
                done += len(batch)
                progress("documents", done, total)
        for collection, (stem, name, _) in tables.items():
            table = target.table(name)
            table_counts[collection] = 0
            table.ensure()
            for spec in archive.manifest["indexes"].get(collection, ()):
                table.create_index([tuple(k) for k in spec["keys"]], unique=spec.get("unique", False))
            for batch in _batches(table_documents(archive, stem)):
                for doc in batch:
                    doc["_rev"] = new_id()  # fresh: the undo removes only what this import wrote
                    if renamed:
                        _renamed_states(doc, ids)
                in_tables.setdefault(name, []).extend((d["_id"], d["_rev"]) for d in batch)
                table.insert_many(batch)
                table_counts[collection] += len(batch)
                done += len(batch)
                progress("documents", done, total)
    except BaseException as exc:
        _undo(warehouse.index, project, written, exc, target, in_tables)
        if isinstance(exc, DuplicateKey):
            raise DuplicateKey(f"{exc} (importing {archive.path} into project {project!r}; the documents "
                               f"already written were removed again)") from exc
        raise
    return counts, table_counts


def _undo(index, project: str, written: dict[str, list[str]], cause: BaseException, target=None,
          in_tables: dict[str, list[tuple[str, str]]] | None = None) -> None:
    """Delete the documents a failed import inserted (only the project's: an id that collided stays; in a
    table, only the revisions this import wrote)."""
    try:
        for name, pairs in reversed(list((in_tables or {}).items())):
            for i in range(0, len(pairs), _BATCH):
                chunk = pairs[i:i + _BATCH]
                target.table(name).delete({"_id": {"$in": [d for d, _ in chunk]},
                                           "_rev": {"$in": [r for _, r in chunk]}}, tombstones=False)
        for collection in reversed(list(written)):
            chunk = written[collection]
            for i in range(0, len(chunk), _BATCH):
                index.delete_many(collection, {"_id": {"$in": chunk[i:i + _BATCH]}, "project": project})
    except WarehouseError as exc:
        raise WarehouseError(f"an import into project {project!r} failed ({cause}) and removing the documents "
                             f"it had written failed too ({exc}); delete the project's documents by hand") \
            from cause


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


def _renamed_states(doc: dict, ids: dict[str, str]) -> None:
    """A table document of a renamed import: its listener states name the new model ids (nothing else of a
    user's document is rewritten: its ids and values are the user's)."""
    for state in (doc.get("_listeners") or {}).values():
        if isinstance(state.get("model"), dict):
            state["model"] = _rewrite(state["model"], ids)


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
