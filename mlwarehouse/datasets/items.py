"""Item datasets: many small items (arrays, encoded images, bytes, scalar fields) packed into shards of a few MB.

A version is one document in the ``datasets`` collection (``kind: "items"``, shared with whole-value datasets, so
versions number 1, 2, 3... per name either way), one ``item_shards`` document per shard (it references the shard
blob, so deletes and ``gc`` account for it) and one ``items`` document per item holding its scalar fields (label,
tags...), its shard and its row, so a query selects items. Shards are written before any document that names
them (blobs first, index second). ``finish()`` makes a version immutable; ``new_version()`` reuses its shards.

Compression (``create(..., compression=)``, recorded in the version's document, kept by ``new_version()``):
``auto``, the default, stores a shard's blocks as they are in a trusted local folder and zstd compresses them
(where that saves 10%) in every other store; ``zstd`` and ``none`` choose for every store. In a local folder the
page cache, not the disk, serves the bytes, and a shard stored as it is is read mapped: its columns are views of
the page cache, checked whole, with no copy and no decode. Measured on 2 cores (``benchmarks/streaming.py``,
MNIST-like, 60,000 x 784 B, three runs): a cold epoch at 0.58x-0.64x a raw memmap gather against 0.40x-0.50x
for the same items zstd compressed, for 49 MB on disk against 17 MB. Over a network (S3, GridFS) the bytes
fetched are the cost, and an untrusted folder hashes every stored byte with sha256, so both compress. Versions
written before the choice was recorded are read and appended to as they were written (zstd).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mlwarehouse import schema
from mlwarehouse.datasets.shardwriter import COMPRESSIONS, ShardWriter
from mlwarehouse.datasets.stream import ItemStream, ShardReader
from mlwarehouse.datasets.versions import check_version, insert_version, version_filter
from mlwarehouse.errors import InvalidDocument, NotFound, QueryError
from mlwarehouse.query.fields import normalize_fields, normalize_value
from mlwarehouse.query.records import Record, check_name, find_by_id

__all__ = ["ItemDatasets", "ItemDataset", "ItemRecord", "DATASETS", "ITEMS", "SHARDS"]

DATASETS, ITEMS, SHARDS = schema.DATASETS.name, schema.ITEMS.name, schema.ITEM_SHARDS.name
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


class ItemRecord(Record):
    """One item's index document (scalar fields as attributes); ``load()`` reads its data fields (verified)."""

    __slots__ = ("_dataset",)

    def __init__(self, doc: dict, dataset: "ItemDataset"):
        super().__init__(doc)
        object.__setattr__(self, "_dataset", dataset)

    def load(self) -> dict:
        return self._dataset.reader().item(self.doc["shard"], self.doc["row"], self._dataset.field_names)


class ItemDatasets:
    """The item datasets of one project: ``ItemDatasets(project).create("mnist")``."""

    def __init__(self, project):
        self.project = project
        for collection in (schema.DATASETS, schema.ITEMS, schema.ITEM_SHARDS):
            project.ensure(collection)

    def create(self, name: str, *, version: str | int | None = None, description: str | None = None,
               tags: Iterable[str] = (), shard_bytes: int = 16 << 20, compression: str = "auto",
               **fields) -> "ItemDataset":
        """A new, open version of item dataset ``name`` (version: one more than the highest integer one), whose
        shards' blocks are stored by ``compression`` (``auto``, ``zstd`` or ``none``: see the module)."""
        check_name("dataset", name)
        check_version(version)
        if type(shard_bytes) is not int or not 1 << 16 <= shard_bytes <= 1 << 30:
            raise InvalidDocument(f"shard_bytes must be between 64 KiB and 1 GiB, not {shard_bytes}")
        if compression not in COMPRESSIONS:
            raise InvalidDocument(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
        extra = normalize_fields(fields)
        doc = {**extra, "name": name, "kind": "items", "state": "open", "description": description,
               "tags": normalize_value(list(tags), "tags"), "fields": {}, "count": 0, "shards": 0, "bytes": 0,
               "shard_bytes": shard_bytes, "compression": compression}
        return ItemDataset(insert_version(self.project, doc, version, racing="creates"), self)

    def _filter(self, name, where, version) -> dict:
        flt = version_filter(name, where, version)
        return {"$and": [{"kind": "items"}, flt]} if flt else {"kind": "items"}

    def find(self, name: str | None = None, *, where: dict | None = None, version: str | int | None = None,
             sort=None, limit: int | None = None, skip: int = 0) -> list["ItemDataset"]:
        """Matching item dataset versions, newest first unless ``sort`` says otherwise."""
        docs = self.project.find(DATASETS, self._filter(name, where, version), sort=sort or [("time", -1)],
                                 limit=limit, skip=skip)
        return [ItemDataset(doc, self) for doc in docs]

    def get(self, id: str, *, version: str | int | None = None) -> "ItemDataset":
        """The version with this id (whole or a unique prefix); NotFound if there is none.

        A name is taken too, as earlier releases took only names: the given ``version`` of it, else its newest.
        """
        if version is None:
            doc = find_by_id(self.project, DATASETS, id, "item dataset", {"kind": "items"})
            if doc is not None:
                return ItemDataset(doc, self)
        return self.load(id, version=version)

    def load(self, name: str | None = None, *, id: str | None = None, version: str | int | None = None,
             where: dict | None = None, sort=None) -> "ItemDataset":
        """The top matching version (newest unless ``sort`` says otherwise), or the one with ``id``; its items
        are read lazily. A ``name`` that no item dataset has but that is an id (or unique prefix) opens that one."""
        if id is not None:
            if name is not None:
                raise QueryError("give an item dataset name or id=, not both")
            doc = find_by_id(self.project, DATASETS, id, "item dataset", self._filter(None, where, version))
            if doc is None:
                raise NotFound(f"no item dataset with id {id!r} in project {self.project.name!r}")
            return ItemDataset(doc, self)
        found = self.find(name, where=where, version=version, sort=sort, limit=1)
        if not found and isinstance(name, str) and version is None and where is None:
            doc = find_by_id(self.project, DATASETS, name, "item dataset", {"kind": "items"})
            found = [ItemDataset(doc, self)] if doc is not None else []
        if not found:
            what = f"item dataset {name!r}" if name else "item dataset"
            what += f" version {version!r}" if version is not None else ""
            raise NotFound(f"no {what}{f' matching {where!r}' if where else ''} in project {self.project.name!r}")
        return found[0]

    def delete(self, name: str | None = None, *, where: dict | None = None,
               version: str | int | None = None, force: bool = False) -> int:
        """Delete matching versions (their items, and the shards no other version shares); returns how many
        versions were deleted. Versions that live things were derived from are refused (DependencyError), all
        of them before any is deleted, unless ``force``."""
        doomed = self.find(name, where=where, version=version)
        if not force:
            self.project.lineage.check_delete([ds.id for ds in doomed],
                                              f"item dataset {name!r}" if name else "these item datasets")
        for ds in doomed:
            ds.delete(force=True)
        return len(doomed)

    def versions(self, name: str) -> list["ItemDataset"]:
        """Every item version of ``name``, newest first."""
        return self.find(check_name("dataset", name))

    def names(self) -> list[str]:
        return self.project.distinct(DATASETS, "name", {"kind": "items"})

    def from_arrays(self, name: str, columns: dict[str, Any], **options) -> "ItemDataset":
        """A finished version made of equal-length columns, e.g. ``{"image": X, "label": y}``."""
        with self.create(name, **options) as ds:
            ds.append(columns)
        return ds

    def from_folder(self, name: str, folder: str | os.PathLike, *, progress: Callable[[int], None] | None = None,
                    **options) -> "ItemDataset":
        """A finished version of the images under ``folder`` (one class per subfolder), stored as they are."""
        with self.create(name, **options) as ds:
            ds.append_folder(folder, progress=progress)
        return ds


class ItemDataset(Record):
    """One version of an item dataset: append items, query them, stream them."""

    __slots__ = ("_datasets", "_reader")

    def __init__(self, doc: dict, datasets: ItemDatasets):
        super().__init__(doc)
        object.__setattr__(self, "_datasets", datasets)
        object.__setattr__(self, "_reader", None)

    @property
    def project(self):
        return self._datasets.project

    @property
    def field_names(self) -> list[str]:
        return list(self.doc["fields"])

    def _scope(self, where: dict | None = None) -> dict:
        base = {"dataset": self.doc["name"], "version": self.doc["version"]}
        if where is None:
            return base
        if not isinstance(where, dict):
            raise QueryError(f"where must be a filter dict, not {type(where).__name__}")
        return {"$and": [base, where]} if set(where) & set(base) else {**base, **where}

    def refresh(self) -> "ItemDataset":
        """Re-read this version's document (counts and state change as items are appended)."""
        doc = self.project.find_one(DATASETS, {"_id": self.id})
        if doc is None:
            raise NotFound(f"item dataset {self.doc['name']!r} version {self.doc['version']!r} was deleted")
        object.__setattr__(self, "doc", doc)
        return self

    # -- writing ---------------------------------------------------------------------------------------------
    def append(self, data: dict[str, Any] | Iterable[dict], *, progress: Callable[[int], None] | None = None) -> int:
        """Append items: a dict of equal-length columns (arrays, lists) or an iterable of item dicts.

        Array and bytes values go to shards; scalar values (numbers, strings, lists of tags) are also indexed so
        queries select items. Every item must have the same fields as the others. Returns how many were added.
        """
        self._require_open()
        if not isinstance(data, dict) and (isinstance(data, (str, bytes)) or not hasattr(data, "__iter__")):
            raise InvalidDocument(f"append takes a dict of columns or an iterable of item dicts, "
                                  f"not {type(data).__name__}")
        writer = ShardWriter(self, progress)
        try:
            if isinstance(data, dict):
                writer.add_columns(data)
            else:
                for item in data:
                    writer.add(item)
            writer.flush()
        finally:
            self.refresh()
        return writer.added

    def _require_open(self) -> None:
        self.refresh()
        if self.doc["state"] != "open":
            raise InvalidDocument(f"dataset {self.doc['name']!r} version {self.doc['version']!r} is finished "
                                  f"and immutable; use new_version() to change it")

    def _committed(self) -> list[str]:
        """Keys of the shards whose documents are written: a shard's document is the last thing an append
        writes, so item documents of a shard without one (an append killed half-way) are not items yet."""
        return sorted(self._checks())

    def _checks(self) -> dict[str, Any]:
        """The committed shards' keys, each with the xxh3 checksum its document records (None in older ones)."""
        return {d["shard"]: d.get("xxh3")
                for d in self.project.find(SHARDS, self._scope(), projection={"shard": 1, "xxh3": 1})}

    def _visible(self, where: dict | None) -> dict:
        return self._scope({"$and": [where, {"shard": {"$in": self._committed()}}]} if where
                           else {"shard": {"$in": self._committed()}})

    def append_folder(self, folder: str | os.PathLike, *, field: str = "image",
                      progress: Callable[[int], None] | None = None) -> int:
        """Append the image files under ``folder``; with subfolders, each is a class (``label``, ``class``)."""
        root = Path(folder)
        if not root.is_dir():
            raise NotFound(f"no folder {str(root)!r}")
        self._require_open()
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes:
            self.project.update(DATASETS, {"_id": self.id, "state": "open"}, {"$set": {"classes": classes}})

        def items() -> Iterator[dict]:
            for label, sub in enumerate(classes or [None]):
                base = root / sub if sub else root
                for path in sorted(base.rglob("*") if sub else base.iterdir()):
                    if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                        item = {field: path.read_bytes(), "path": path.relative_to(root).as_posix()}
                        if sub:
                            item.update(label=label, **{"class": sub})
                        yield item
        return self.append(items(), progress=progress)

    def finish(self) -> "ItemDataset":
        """Make this version immutable (appends are refused from now on). Its totals are recounted from the
        shards, and item documents of shards never committed (an append killed half-way) are removed."""
        self.project.update(DATASETS, {"_id": self.id}, {"$set": {"state": "finished"}})
        shards = list(self.project.find(SHARDS, self._scope(), projection={"shard": 1, "count": 1, "rows": 1,
                                                                          "bytes": 1}))
        keys = sorted({d["shard"] for d in shards})
        self.project.delete(ITEMS, self._scope({"shard": {"$nin": keys}}))
        self.project.update(DATASETS, {"_id": self.id}, {"$set": {
            "count": sum(_rows(d) for d in shards), "shards": len(shards),
            "bytes": sum(_share(d) for d in shards)}})
        return self.refresh()

    def __enter__(self) -> "ItemDataset":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.finish()

    def new_version(self, *, exclude: dict | None = None, version: str | int | None = None,
                    description: str | None = None) -> "ItemDataset":
        """An open new version holding this one's items (minus those matching ``exclude``), sharing its shards."""
        src = self.doc
        new = self._datasets.create(src["name"], version=version, shard_bytes=src.get("shard_bytes", 16 << 20),
                                    compression=src.get("compression", "zstd"),
                                    description=description if description is not None else src.get("description"),
                                    tags=src.get("tags") or ())
        drop: set[tuple[str, int]] = set()
        if exclude:
            for doc in self.project.find(ITEMS, self._visible(exclude), projection={"shard": 1, "row": 1}):
                drop.add((doc["shard"], doc["row"]))
        meta = {"dataset": src["name"], "version": new.doc["version"]}
        shard_docs = []
        for doc in self.project.find(SHARDS, self._scope(), sort=[("_id", 1)]):
            rows = doc.get("rows")
            rows = list(range(doc["count"])) if rows is None else rows
            kept = [r for r in rows if (doc["shard"], r) not in drop]
            if kept:
                shard_docs.append({**_copy(doc), **meta, "rows": None if len(kept) == doc["count"] else kept})
        for doc in shard_docs:
            doc["bytes"] = _share(doc)
        self.project.insert_many(SHARDS, shard_docs)
        items = ({**_copy(doc), **meta} for doc in self.project.find(ITEMS, self._visible(None), sort=[("_id", 1)])
                 if (doc["shard"], doc["row"]) not in drop)
        count = self.project.insert_many(ITEMS, items)
        self.project.update(DATASETS, {"_id": new.id}, {"$set": {
            "fields": src["fields"], "count": count, "shards": len(shard_docs), "derived_from": src["version"],
            "bytes": sum(d["bytes"] for d in shard_docs), **({"classes": src["classes"]} if "classes" in src else {})}})
        return new.refresh()

    def delete(self, *, force: bool = False) -> int:
        """Delete this version: its documents, and the shards no other version shares. Returns items deleted.

        Refused (DependencyError) while runs or models derived from it are stored, unless ``force``; lineage
        keeps a tombstone of the version."""
        lineage = self.project.lineage
        lineage.check_delete([self.id], f"item dataset {self.doc.get('name')!r} version "
                                        f"{self.doc.get('version')!r}", force=force)
        items = self.project.delete(ITEMS, self._scope())
        self.project.delete(SHARDS, self._scope())
        lineage.deleted(DATASETS, self.project.delete(DATASETS, {"_id": self.id}))
        return len(items)

    # -- reading ---------------------------------------------------------------------------------------------
    def count(self, where: dict | None = None) -> int:
        return self.project.count(ITEMS, self._visible(where))

    def find(self, where: dict | None = None, *, sort=None, limit: int | None = None,
             skip: int = 0) -> list[ItemRecord]:
        """Index documents of the matching items (insertion order unless ``sort`` says otherwise)."""
        docs = self.project.find(ITEMS, self._visible(where), sort=sort, limit=limit, skip=skip)
        return [ItemRecord(doc, self) for doc in docs]

    def item(self, item_id: str) -> dict:
        """One item's fields by its id (data read by range and verified)."""
        doc = self.project.find_one(ITEMS, self._scope({"_id": item_id}))
        if doc is None:
            raise NotFound(f"no item {item_id!r} in dataset {self.doc['name']!r} version {self.doc['version']!r}")
        return ItemRecord(doc, self).load()

    def reader(self, cache=None):
        """A :class:`~mlwarehouse.datasets.stream.ShardReader` for this dataset's shards (whole or by range): this
        dataset's own, or a new one reading through the disk ``cache``."""
        if cache is not None:
            return ShardReader(self.project.blobs, cache=cache)
        if self._reader is None:
            object.__setattr__(self, "_reader", ShardReader(self.project.blobs))
        return self._reader

    def stream(self, where: dict | None = None, **options):
        """Batches of the selected items: see :class:`mlwarehouse.datasets.stream.ItemStream` for the options."""
        return ItemStream(self, where, **options)

    def __repr__(self) -> str:
        d = self.doc
        return (f"ItemDataset(name={d['name']!r}, version={d['version']!r}, state={d['state']!r}, "
                f"count={d['count']}, fields={list(d['fields'])})")


def _rows(shard_doc: dict) -> int:
    rows = shard_doc.get("rows")
    return shard_doc["count"] if rows is None else len(rows)


def _share(shard_doc: dict) -> int:
    """Bytes of the rows a shard document holds (all, or its share when it keeps a subset)."""
    return shard_doc["bytes"] * _rows(shard_doc) // max(1, shard_doc["count"])


def _copy(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("_id", "time", "project", "_blobs")}
