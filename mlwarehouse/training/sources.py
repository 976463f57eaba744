"""Where a fit reads its documents: a collection, or a version of an item dataset, selected by a query.

A source lists the ids its query selects (sorted, so a snapshot is a plain list) and streams the fields a fit
needs for any list of ids, a page at a time with the next page read ahead in a thread, so data larger than memory
trains without loading it all. Values come back decoded (arrays, tensors, numbers) and batches are collated to
tensors by :func:`collate`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mlwarehouse import schema
from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.query.jsonvalues import MISSING, get_path, split_path

__all__ = ["Source", "CollectionSource", "ItemSource", "source_of", "collate", "batch_length", "PAGE"]

#: documents read per query while streaming (a page is read ahead while the previous one trains)
PAGE = 512


class Source:
    """The documents a query selects: their ids, and their fields for any list of ids."""

    kind = "source"

    def __init__(self, project, filter: dict | None, keys: Sequence[str]):
        if filter is not None and not isinstance(filter, dict):
            raise QueryError(f"a fit's filter must be a dict, not {type(filter).__name__}")
        for key in keys:
            split_path(key)
        self.project = project
        self.filter = dict(filter or {})
        self.keys = list(dict.fromkeys(keys))

    @property
    def node(self) -> str:
        """The id lineage records for this source (a collection's catalog record, a dataset version)."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    @property
    def filter_text(self) -> str:
        """The filter as JSON text (a filter's "$" keys cannot be document fields)."""
        return json.dumps(self.filter, sort_keys=True, separators=(",", ":"))

    def selection(self) -> dict:
        """The user's filter, narrowed to documents that hold every key a fit reads."""
        needed = [{key: {"$exists": True}} for key in self.keys]
        return {"$and": [self.filter, *needed]} if self.filter else (
            {"$and": needed} if len(needed) > 1 else (needed[0] if needed else {}))

    def ids(self, field: str | None = None) -> list[tuple[str, Any]]:
        """``(id, value of field)`` of every selected document, sorted by id (value None without a field)."""
        raise NotImplementedError

    def batches(self, ids: Sequence[str], batch_size: int) -> Iterator[dict[str, list]]:
        """The keys' values of ``ids``, in that order, ``batch_size`` documents at a time."""
        raise NotImplementedError


class CollectionSource(Source):
    """Documents of a collection."""

    kind = "collection"

    def __init__(self, collection, filter: dict | None, keys: Sequence[str]):
        super().__init__(collection.project, filter, keys)
        self.collection = collection
        record = collection.catalog.record(collection.name)
        if record is None:
            raise NotFound(f"no collection {collection.name!r} in project {collection.project.name!r}")
        self._node = record["_id"]

    @property
    def node(self) -> str:
        return self._node

    def describe(self) -> dict:
        return {"kind": self.kind, "collection": self.collection.name, "id": self._node, "filter": self.filter_text}

    def ids(self, field: str | None = None) -> list[tuple[str, Any]]:
        fields = ["_id"] if field is None else ["_id", field]
        rows = self.collection.table.values(self.selection(), fields)
        return sorted((row[0], row[1] if field else None) for row in rows)

    def batches(self, ids: Sequence[str], batch_size: int) -> Iterator[dict[str, list]]:
        projection = {key: 1 for key in self.keys}

        def read(page: Sequence[str]) -> list[dict]:
            found = {d["_id"]: d for d in self.collection.find({"_id": {"$in": list(page)}}, projection)}
            missing = [i for i in page if i not in found]
            if missing:
                raise NotFound(f"{len(missing)} document(s) of this fit's snapshot are gone from collection "
                               f"{self.collection.name!r} (first: {missing[0]!r})")
            return [found[i] for i in page]

        yield from _paged(ids, batch_size, read, self.keys)


class ItemSource(Source):
    """Items of one version of an item dataset, read from their shards."""

    kind = "items"

    def __init__(self, dataset, filter: dict | None, keys: Sequence[str]):
        super().__init__(dataset.project, filter, keys)
        unknown = [k for k in self.keys if k not in dataset.field_names]
        if unknown:
            raise QueryError(f"item dataset {dataset.doc['name']!r} has no field(s) {unknown}; "
                             f"it has {dataset.field_names}")
        self.dataset = dataset

    @property
    def node(self) -> str:
        return self.dataset.id

    def describe(self) -> dict:
        return {"kind": self.kind, "dataset": self.dataset.doc["name"], "version": self.dataset.doc["version"],
                "id": self.dataset.id, "filter": self.filter_text}

    def selection(self) -> dict:
        return self.filter  # every item has every field of its dataset

    def ids(self, field: str | None = None) -> list[tuple[str, Any]]:
        fields = ["_id", "shard"] if field is None else ["_id", "shard", field]
        rows = self.project.values(schema.ITEMS.name, self.dataset._scope(self.filter or None), fields)
        committed = set(self.dataset._committed())  # items of a shard an append never committed are not there
        return sorted((row[0], row[2] if field else None) for row in rows if row[1] in committed)

    def batches(self, ids: Sequence[str], batch_size: int) -> Iterator[dict[str, list]]:
        wanted = set(ids)
        stream = self.dataset.stream(self.filter or None, batch_size=batch_size, shuffle=False, epochs=1,
                                     fields=self.keys, select=wanted.__contains__)
        for batch in stream:
            yield {key: batch[key] for key in self.keys}


def source_of(project, data: Any, filter: dict | None, keys: Sequence[str]) -> Source:
    """A source from what users pass: a Collection, an ItemDataset, or ``"collection:<name>"`` /
    ``"items:<name>"`` / ``"items:<name>@<version>"`` (the spelling a task's hyper-parameters carry)."""
    from mlwarehouse.collections.collection import Collection
    from mlwarehouse.datasets.items import ItemDataset
    if isinstance(data, Collection):
        return CollectionSource(data, filter, keys)
    if isinstance(data, ItemDataset):
        return ItemSource(data, filter, keys)
    if isinstance(data, str):
        kind, _, name = data.partition(":")
        if kind == "collection" and name:
            return CollectionSource(project.collection(name), filter, keys)
        if kind == "items" and name:
            name, _, version = name.partition("@")
            number = int(version) if version.isdigit() else (version or None)  # versions number 1, 2, 3...
            return ItemSource(project.items.load(name, version=number), filter, keys)
        if data and ":" not in data:
            return CollectionSource(project.collection(data), filter, keys)
    raise QueryError(f"a fit reads a Collection, an ItemDataset, or 'collection:NAME' / 'items:NAME[@VERSION]', "
                     f"not {data!r}")


def spelling(source: Source) -> str:
    """The string :func:`source_of` reads back (what a task carries)."""
    if isinstance(source, ItemSource):
        return f"items:{source.dataset.doc['name']}@{source.dataset.doc['version']}"
    return f"collection:{source.collection.name}"


def _paged(ids: Sequence[str], batch_size: int, read: Callable[[Sequence[str]], list[dict]],
           keys: list[str]) -> Iterator[dict[str, list]]:
    """Batches of documents read a page at a time, the next page read while the caller works on this one."""
    page = max(PAGE, batch_size)
    starts = range(0, len(ids), page)
    if not starts:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="mlw-fit-read") as pool:
        ahead = pool.submit(read, ids[0:page])
        for start in starts:
            docs = ahead.result()
            following = start + page
            if following < len(ids):
                ahead = pool.submit(read, ids[following:following + page])
            for lo in range(0, len(docs), batch_size):
                chunk = docs[lo:lo + batch_size]
                batch: dict[str, list] = {}
                for key in keys:
                    column = []
                    for doc in chunk:
                        value = get_path(doc, key)
                        if value is MISSING:
                            raise QueryError(f"document {doc.get('_id')!r} has no {key!r}")
                        column.append(value)
                    batch[key] = column
                yield batch


def batch_length(batch: dict) -> int:
    """How many documents a batch of columns holds."""
    first = next(iter(batch.values()))
    return int(first.shape[0]) if hasattr(first, "shape") else len(first)


def collate(values: Any) -> Any:
    """A column of values as one tensor: arrays and tensors stacked, numbers as int64/float32/bool tensors;
    strings and ragged values stay a list (for a model or transform that takes them as they are)."""
    import torch
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(values) if values.flags.writeable else values.copy())
    if not values:
        return torch.zeros(0)
    first = values[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in values):
            return torch.stack(values)
        return list(values)
    if isinstance(first, np.ndarray):
        if all(isinstance(v, np.ndarray) and v.shape == first.shape for v in values):
            return torch.from_numpy(np.stack(values))
        return list(values)
    if all(isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.float32)
    return list(values)
