"""The writer of an item dataset's append: items checked against the version's fields, buffered, and written as a
shard each time ``shard_bytes`` fill up, in the order that keeps a killed append whole: the shard blob, the
version's fields, the item documents, then the shard document (the commit point readers go by), then the totals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from mlwarehouse import schema
from mlwarehouse.datasets.shards import FieldSpec, build_shard
from mlwarehouse.errors import InvalidDocument
from mlwarehouse.ids import new_id
from mlwarehouse.query.fields import RESERVED_FIELDS, normalize_value

__all__ = ["ShardWriter", "SHARD_CODEC", "ITEM_RESERVED", "COMPRESSIONS", "compresses"]

DATASETS, ITEMS, SHARDS = schema.DATASETS.name, schema.ITEMS.name, schema.ITEM_SHARDS.name
ITEM_RESERVED = RESERVED_FIELDS | {"dataset", "version", "shard", "row"}
SHARD_CODEC = "mlw-shard"
#: how a dataset's shard blocks are stored: ``auto`` (as they are in a trusted local folder, zstd in any other
#: store), ``zstd`` (each block compressed where that saves 10%), ``none`` (as they are)
COMPRESSIONS = ("auto", "zstd", "none")


def compresses(compression: str, blobs: Any) -> bool:
    """Whether a dataset recorded with ``compression`` compresses the blocks of the shards it writes to ``blobs``
    (``auto``: not in a trusted folder of local files, whose reads map them; see
    :mod:`mlwarehouse.datasets.items`)."""
    if compression == "auto":
        return not (getattr(blobs, "local_files", False) and getattr(blobs, "trusted", False))
    return compression == "zstd"


def _kind(value: Any) -> str:
    """"array", "bytes" or "scalar" for one item value."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(value, np.ndarray):
        return "array" if value.ndim else "scalar"
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        return "array" if value.dim() else "scalar"
    return "scalar"


def _as_array(value: Any) -> np.ndarray:
    array = value.detach().cpu().numpy() if hasattr(value, "detach") else value
    if array.dtype.hasobject:
        raise InvalidDocument("arrays of Python objects cannot go into shards (they would need pickle): "
                              "use numeric arrays, bytes, or scalar fields")
    return array


def _size(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return len(value) if isinstance(value, (bytes, bytearray, memoryview)) else 8


class ShardWriter:
    """Buffers items of one append to ``dataset`` (an open :class:`~mlwarehouse.datasets.items.ItemDataset`) and
    writes a shard (then its documents) each time ``shard_bytes`` fill up."""

    def __init__(self, dataset: Any, progress: Callable[[int], None] | None):
        self.ds = dataset
        self.progress = progress
        self.specs: dict[str, dict] = {k: dict(v) for k, v in dataset.doc["fields"].items()}
        self.known = bool(self.specs)
        self.pending: list[dict] = []
        self.pending_bytes = 0
        self.added = 0
        self.limit = dataset.doc.get("shard_bytes", 16 << 20)
        # versions made before the choice was recorded compressed every block that shrank by 10%
        self.compress = compresses(dataset.doc.get("compression", "zstd"), dataset.project.blobs)

    def _check(self, item: dict, position: int) -> dict:
        if not isinstance(item, dict):
            raise InvalidDocument(f"item {position} is a {type(item).__name__}, not a dict of fields")
        if not self.known:
            for name, value in item.items():
                if not isinstance(name, str) or name in ITEM_RESERVED or name.startswith("_"):
                    raise InvalidDocument(f"item field {name!r} is reserved or not a string")
                kind = _kind(value)
                spec: dict = {"kind": kind}
                if kind == "array":
                    arr = _as_array(value)
                    spec.update(dtype=arr.dtype.str, shape=list(arr.shape))
                self.specs[name] = spec
            self.known = True
        missing = self.specs.keys() - item.keys()
        extra = item.keys() - self.specs.keys()
        if missing or extra:
            what = (f"lacks field(s) {sorted(missing)}" if missing else "") + \
                   (" and " if missing and extra else "") + (f"has unknown field(s) {sorted(extra)}" if extra else "")
            raise InvalidDocument(f"item {position} {what}: every item of dataset {self.ds.doc['name']!r} has "
                                  f"the fields {sorted(self.specs)}")
        out = {}
        for name, spec in self.specs.items():
            value, kind = item[name], _kind(item[name])
            if kind != spec["kind"]:
                raise InvalidDocument(f"item {position}: field {name!r} is {kind}, other items have {spec['kind']}")
            if kind == "array":
                value = _as_array(value)
                if value.dtype.str != spec["dtype"]:
                    raise InvalidDocument(f"item {position}: field {name!r} has dtype {value.dtype}, other items "
                                          f"have {np.dtype(spec['dtype'])}")
                if spec["shape"] is not None and list(value.shape) != spec["shape"]:
                    spec["shape"] = None  # shapes vary: stored per item
            elif kind == "scalar":
                value = normalize_value(value, f"item {position}: {name}")
            out[name] = value
        return out

    def _merged_fields(self) -> dict:
        """This writer's fields, checked against what another writer may have stored meanwhile."""
        stored = (self.ds.project.find_one(DATASETS, {"_id": self.ds.id}, projection={"fields": 1}) or {})
        stored = stored.get("fields") or {}
        if stored:
            if set(stored) != set(self.specs) or any(
                    (stored[n]["kind"], stored[n].get("dtype")) != (s["kind"], s.get("dtype"))
                    for n, s in self.specs.items()):
                raise InvalidDocument(f"another append gave dataset {self.ds.doc['name']!r} the fields "
                                      f"{ {n: s.get('dtype') or s['kind'] for n, s in stored.items()} }, which "
                                      f"these items do not have")
            for name, spec in self.specs.items():
                if spec.get("shape") != stored[name].get("shape"):
                    spec["shape"] = None  # shapes differ between writers: stored per item
        return self.specs

    def add(self, item: dict) -> None:
        item = self._check(item, self.added + len(self.pending))
        self.pending.append(item)
        self.pending_bytes += sum(_size(v) for v in item.values())
        if self.pending_bytes >= self.limit:
            self.flush()

    def add_columns(self, columns: dict[str, Any]) -> None:
        lengths = {name: len(col) for name, col in columns.items()}
        if len(set(lengths.values())) > 1:
            raise InvalidDocument(f"columns have different lengths: {lengths}")
        n = next(iter(lengths.values()), 0)
        for i in range(n):
            self.add({name: col[i] for name, col in columns.items()})

    def flush(self) -> None:
        if not self.pending:
            return
        items, self.pending, self.pending_bytes = self.pending, [], 0
        columns, specs = {}, {}
        for name, spec in self.specs.items():
            values = [it[name] for it in items]
            if spec["kind"] == "array":
                shapes = {v.shape for v in values}
                fixed = len(shapes) == 1
                columns[name] = np.stack(values) if fixed else values
                specs[name] = FieldSpec("array", spec["dtype"], shapes.pop() if fixed else None)
            elif spec["kind"] == "bytes":
                columns[name], specs[name] = values, FieldSpec("bytes")
            else:
                arr = np.asarray(values) if all(type(v) in (int, float, bool) for v in values) else None
                if arr is not None and arr.ndim == 1 and arr.dtype.kind in "biuf":
                    columns[name], specs[name] = arr, FieldSpec("array", arr.dtype.str, ())
                else:
                    columns[name], specs[name] = values, FieldSpec("json")
        # tagged: equal items appended twice are two shards
        data = build_shard(columns, specs, tag=new_id(), compress_blocks=self.compress)
        project, doc = self.ds.project, self.ds.doc
        key = project.blobs.put(data)  # blobs first, index second
        raw = sum(int(v.nbytes) if isinstance(v, np.ndarray) else sum(map(_size, v)) for v in columns.values())
        meta = {"dataset": doc["name"], "version": doc["version"]}
        counts = {"count": len(items), "shards": 1, "bytes": raw}
        # 1. the fields, only while the version is open (a finish() from elsewhere wins)
        if not project.update(DATASETS, {"_id": self.ds.id, "state": "open"},
                              {"$set": {"fields": self._merged_fields()}}):
            raise InvalidDocument(f"dataset {doc['name']!r} version {doc['version']!r} was finished during this "
                                  f"append; {self.added} items had been added")
        try:
            # 2. the item documents, then 3. the shard document: the commit point readers go by
            scalars = [n for n, s in self.specs.items() if s["kind"] == "scalar"]
            project.insert_many(ITEMS, ({**meta, "shard": key, "row": i, **{n: it[n] for n in scalars}}
                                        for i, it in enumerate(items)))
            project.insert(SHARDS, {**meta, "shard": key, "count": len(items), "bytes": raw, "rows": None,
                                    "blob": {"_blob": key, "codec": SHARD_CODEC, "size": len(data)},
                                    "xxh3": xxhash.xxh3_64_hexdigest(data)})  # what a trusted local store checks
        except BaseException:
            project.delete(ITEMS, {**meta, "shard": key})
            raise
        # 4. the totals (killed before this, they lag until finish() recounts them from the shards)
        project.update(DATASETS, {"_id": self.ds.id}, {"$inc": counts})
        self.added += len(items)
        if self.progress is not None:
            self.progress(len(items))
