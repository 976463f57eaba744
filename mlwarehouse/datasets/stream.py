"""Streams of batches from an item dataset: plan from the index, prefetch whole shards, gather batches.

Only the index is read up front (the shard documents, or the matching item documents when ``where`` is given).
The epoch order is computed from ``(seed, epoch)`` alone: shards in a shuffled order, rows shuffled inside each,
then every item moved by a random offset of at most ``window`` places (a shuffle window that spans shards). So
every process computes the same order; a partition (DataLoader worker x rank) takes one contiguous slice of it,
which keeps each partition on its own shards. The position inside the epoch is the whole state: a stream resumes
mid-epoch from ``stream.state()``. A batch is the next ``batch_size`` items of the plan, handed out grouped by
shard (:func:`batch_order`). Shards are fetched by background threads ahead of use, verified, decoded and kept in
a bounded memory cache (:mod:`mlwarehouse.datasets.shardmemory`) for later epochs; ``epochs=None`` streams without
end and re-plans each epoch, picking up items appended meanwhile.

Speed: what each batch of an epoch needs (its runs of one shard, the shards to start fetching, when a shard is last
used) is worked out with numpy once per epoch (:mod:`mlwarehouse.datasets.batches`), so a batch costs one ``take``
per field and shard into a fresh array. A shard already in the memory cache is used on the consumer's thread (no
thread, no fetch); the others are fetched, checked (see Integrity) and decoded by the process's prefetch pool
(:mod:`mlwarehouse.datasets.prefetch`: threads made once, jobs run in the order the stream needs them, a consumer
that waits runs queued jobs itself), so one shard is verified while another decodes and the batches of earlier
shards are handed out; a shard's blocks decompress in parallel, in the order the shards are needed
(:func:`mlwarehouse.datasets.prefetch.run_ranked`).
An epoch that starts from the beginning and is not partitioned starts fetching its first shards as soon as their
order is drawn, while the plan still shuffles the items.

Integrity: every fetched shard is checked whole before it is decoded. Its document records, beside the content
address, the xxh3 checksum (64 bits) of the stored bytes; a blob store that trusts its own bytes (a local folder:
whoever can write it can write the index beside it, so a read there must catch damage, not forgery) checks that
instead of the sha256, and every other store (S3, GridFS, a folder made untrusted) checks the sha256. On an
MNIST-like shard (6 MB stored, 16 MB raw) the sha256 costs 3.1 ms, the xxh3 0.07 ms, the decode about 2.7 ms: with
the sha256 a cold epoch spent over a quarter of its CPU time on it. Shards written before the checksum was
recorded, and a recorded value that is not a checksum, are checked by their sha256. Decoded columns go into
recycled buffers (:mod:`mlwarehouse.datasets.recycled`), so an epoch that decodes again does not fault fresh pages
in. A trusted local folder maps a shard instead of copying it: the columns of blocks stored as they are (the
default there, see :mod:`mlwarehouse.datasets.items`) are views of the page cache on a cold read, and are copied
into buffers of their own when the memory cache serves the shard again (:meth:`Shard.in_memory`).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlwarehouse import schema
from mlwarehouse.blobs.common import read_buffer
from mlwarehouse.datasets import batches
from mlwarehouse.datasets.batches import batch_order
from mlwarehouse.datasets.prefetch import Prefetch
from mlwarehouse.datasets.recycled import RECYCLED
from mlwarehouse.datasets.shardcache import ShardCache
from mlwarehouse.datasets.shardmemory import MEMORY, DecodedShards
from mlwarehouse.datasets.shards import ShardHeader, decode_value, read_header, read_item
from mlwarehouse.datasets.wholeshard import Shard
from mlwarehouse.errors import IntegrityError, QueryError, WarehouseError

__all__ = ["ItemStream", "ShardReader", "TransformError", "Plan", "batch_order"]

ITEMS, SHARDS = schema.ITEMS.name, schema.ITEM_SHARDS.name


class TransformError(WarehouseError):
    """A stream's ``transform`` raised; ``item_id`` names the item, the original error is the ``__cause__``."""

    def __init__(self, message: str, item_id: str | None):
        super().__init__(message)
        self.item_id = item_id


class ShardReader:
    """Reads shards for streams and random access: whole (through an optional :class:`ShardCache` on disk, and a
    :class:`DecodedShards` in memory: the process-wide one unless given another) or by range."""

    def __init__(self, blobs, cache: ShardCache | None = None, headers: int = 256,
                 memory: DecodedShards | None = None):
        self.blobs = blobs
        self.cache = cache
        self.memory = memory if memory is not None else MEMORY
        self._headers: OrderedDict[str, ShardHeader] = OrderedDict()
        self._max_headers = headers
        self._lock = threading.Lock()

    def shard(self, key: str, fields: list[str] | None = None, xxh3: str | None = None) -> Shard:
        """The shard ``key`` with ``fields`` (all when None) decoded, from memory or fetched and verified (by
        the ``xxh3`` checksum its document records where the store trusts its bytes, else by its sha256)."""
        shard = self.memory.get(key)
        if shard is None:
            shard = Shard(self.cache.get(key, self.blobs.get) if self.cache is not None
                          else read_buffer(self.blobs, key, allocate=RECYCLED.take, xxh3=xxh3, mapped=True))
        else:
            shard = shard.in_memory()  # served again: a mapped one is copied into memory of its own
        before = shard.nbytes
        shard.decode(fields)
        if shard.nbytes != before or self.memory.get(key) is not shard:
            self.memory.put(key, shard)  # new, or holding more decoded columns than when it was put
        return shard

    def cached(self, key: str, fields: list[str] | None = None) -> Shard | None:
        """The shard ``key`` from memory when it is there with ``fields`` decoded already (and not mapped: see
        :meth:`Shard.in_memory`), else None (nothing is fetched or decoded: a stream asks on its own thread before
        it hands a shard to a prefetch thread)."""
        shard = self.memory.get(key)
        return shard if shard is not None and shard.decoded(fields) and not shard.mapped else None

    def header(self, key: str) -> ShardHeader:
        with self._lock:
            if key in self._headers:
                self._headers.move_to_end(key)
                return self._headers[key]
        header = read_header(lambda start, length: self.blobs.get_range(key, start, length))
        with self._lock:
            self._headers[key] = header
            while len(self._headers) > self._max_headers:
                self._headers.popitem(last=False)
        return header

    def item(self, key: str, row: int, fields: list[str] | None = None) -> dict:
        """One item's values by range reads, each verified by its checksum (a shard of format 1, whose header has
        no checksum, is read whole instead: verified by its hash, then kept in memory like a streamed one)."""
        header = self.header(key)
        if not header.verified:
            return self._item_of_whole(key, row, fields)
        out = {}
        for name in fields or list(header.fields):
            if name not in header.fields:
                raise QueryError(f"shard {key[:12]} has no field {name!r} (it has {sorted(header.fields)})")
            layout = header.fields[name]
            raw = read_item(header, lambda s, n: self.blobs.get_range(key, s, n), name, row)
            shape = layout.shapes[row] if layout.shapes else None
            value = decode_value(layout.spec, raw, shape)
            out[name] = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
        return out

    def _item_of_whole(self, key: str, row: int, fields: list[str] | None) -> dict:
        names = fields or None
        shard = self.shard(key, [])
        for name in names or ():
            if name not in shard.header.fields:
                raise QueryError(f"shard {key[:12]} has no field {name!r} (it has {sorted(shard.header.fields)})")
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < shard.n:
            raise IntegrityError(f"row {row!r} is not in shard {key[:12]} of {shard.n} items")
        shard = self.shard(key, names)  # decoded now, and counted in the memory cache
        out = {}
        for name in names or list(shard.header.fields):
            value = shard.column(name)[row]
            if shard.header.fields[name].spec.kind == "json":
                value = copy.deepcopy(value)  # the cached column's own: the caller gets a copy
            out[name] = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
        return out


@dataclass
class Plan:
    """The items of one epoch: shard keys, and per item its shard's index and row, in stream order."""

    keys: list[str]
    checks: list[Any]  # per key, the xxh3 checksum its shard document records (None: none)
    shard: np.ndarray
    row: np.ndarray
    snapshot: str | None  # the largest document id the plan saw: a resumed plan reads no later documents


class ItemStream:
    """An iterable of batches (dicts of stacked numpy arrays; lists for bytes, strings, ragged arrays).

    Options: ``batch_size``, ``shuffle``, ``seed``, ``epochs`` (None: without end), ``epoch`` (the first one),
    ``transform`` (item dict -> item dict, run on each item), ``window`` (shuffle window in items),
    ``prefetch`` (shards fetched ahead), ``threads``, ``partition`` ((index, count): this consumer's share),
    ``drop_last``, ``fields`` (which fields to read), ``cache`` (a ShardCache or a folder), ``cache_bytes``,
    ``state`` (from :meth:`state`, to resume), ``poll`` (seconds between checks for new items when waiting),
    ``memory`` (where decoded shards are kept for later epochs: the process-wide
    :data:`mlwarehouse.datasets.shardmemory.MEMORY`, 1 GiB, unless given a :class:`DecodedShards` or a bound in bytes
    for a cache of this stream's own; 0: none), ``select`` (item id -> bool: only the items it keeps, e.g. one
    fold of a split, see :mod:`mlwarehouse.training.folds`).

    A batch holds the items of its slice of the planned order, grouped by shard (see :func:`batch_order`), as
    fresh arrays of the caller's own. The arrays a ``transform`` receives are read-only views of cached shards:
    return new arrays, never change them.
    """

    def __init__(self, dataset, where: dict | None = None, *, batch_size: int = 32, shuffle: bool = True,
                 seed: int = 0, epochs: int | None = 1, epoch: int = 0,
                 transform: Callable[[dict], Any] | None = None, window: int | None = None, prefetch: int = 4,
                 threads: int = 4, partition: tuple[int, int] = (0, 1), drop_last: bool = False,
                 fields: list[str] | None = None, cache: ShardCache | str | None = None,
                 cache_bytes: int = 10 << 30, state: dict | None = None, poll: float = 1.0,
                 memory: DecodedShards | int | None = None, select: Callable[[str], bool] | None = None):
        for name, value, least in (("batch_size", batch_size, 1), ("seed", seed, 0), ("epoch", epoch, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise QueryError(f"{name} must be an integer >= {least}, not {value!r}")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 0):
            raise QueryError(f"epochs must be None (without end) or an integer >= 0, not {epochs!r}")
        index, count = partition
        if not 0 <= index < count:
            raise QueryError(f"partition must be (index, count) with 0 <= index < count, not {partition!r}")
        self.dataset = dataset
        self.where = where
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epochs = epochs
        self.transform = transform
        self.window = window
        self.prefetch = max(1, prefetch)
        self.threads = max(1, threads)
        self.partition = (index, count)
        self.drop_last = drop_last
        known = dataset.field_names
        unknown = set(fields or ()) - set(known)
        if unknown:
            raise QueryError(f"dataset {dataset.doc['name']!r} has no field(s) {sorted(unknown)}; it has {known}")
        self.fields = list(fields) if fields else None
        if isinstance(cache, (str, bytes)) or hasattr(cache, "__fspath__"):
            cache = ShardCache(cache, cache_bytes)
        if isinstance(memory, int):
            memory = DecodedShards(memory)
        if cache is not None or memory is not None:
            self.reader = ShardReader(dataset.project.blobs, cache=cache, memory=memory)
        else:
            self.reader = dataset.reader()
        self.poll = poll
        self.select = select
        self._state = {"seed": self.seed, "epoch": epoch, "position": 0, "snapshot": None}
        if state is not None:
            if state.get("seed", self.seed) != self.seed:
                raise QueryError(f"this state was saved by a stream with seed {state['seed']}, not {self.seed}")
            self._state.update({k: state[k] for k in ("epoch", "position", "snapshot") if k in state})
        self._first_epoch = epoch  # epochs counts from here, also when resuming

    def state(self) -> dict:
        """Where the stream is: pass it as ``state=`` to a new stream to go on from the next item."""
        return dict(self._state)

    # -- planning --------------------------------------------------------------------------------------------
    def plan(self, epoch: int, snapshot: str | None = None, *,
             drawn: Callable[[list[str], list[Any], np.ndarray], None] | None = None) -> Plan:
        """The global order of ``epoch`` (before partitioning). ``drawn(keys, checks, order)``, when given, is told
        the shards' order (indices into ``keys``) as soon as it is drawn, before the items are shuffled."""
        project, ds = self.dataset.project, self.dataset
        keys: list[str] = []
        checks: list[Any] = []
        shard_of: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        newest = None
        if self.where is None and self.select is None:
            flt = ds._scope({"_id": {"$lte": snapshot}} if snapshot else None)
            for doc in project.find(SHARDS, flt, sort=[("_id", 1)],
                                    projection={"shard": 1, "count": 1, "rows": 1, "xxh3": 1}):
                r = np.arange(doc["count"]) if doc.get("rows") is None else np.asarray(doc["rows"], np.int64)
                shard_of.append(np.full(len(r), len(keys), np.int64))
                rows.append(r)
                keys.append(doc["shard"])
                checks.append(doc.get("xxh3"))
                newest = doc["_id"]
        else:
            where = self.where or {}
            flt = ds._scope(where if not snapshot else {"$and": [where, {"_id": {"$lte": snapshot}}]})
            select = self.select
            position: dict[str, int] = {}
            sh, rw = [], []
            committed = ds._checks()
            for doc in project.find(ITEMS, flt, sort=[("_id", 1)], projection={"shard": 1, "row": 1}):
                k = doc["shard"]
                if k not in committed:
                    continue  # an item of a shard an append has not committed (yet, or ever: it was killed)
                if select is not None and not select(doc["_id"]):
                    continue
                if k not in position:
                    position[k] = len(keys)
                    keys.append(k)
                    checks.append(committed[k])
                sh.append(position[k])
                rw.append(doc["row"])
                newest = doc["_id"]
            shard_of, rows = [np.asarray(sh, np.int64)], [np.asarray(rw, np.int64)]
        shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int64)
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        if self.shuffle and len(row):
            rng = np.random.default_rng([self.seed, epoch])
            rank, order = np.empty(len(keys), np.int64), rng.permutation(len(keys))
            rank[order] = np.arange(len(keys))
            if drawn is not None:
                drawn(keys, checks, order)
            idx = batches.group_shuffled(rank[shard], len(keys), rng)  # shards shuffled, rows shuffled inside
            window = self.window if self.window is not None else max(256, 2 * len(row) // len(keys))
            if window > 1:
                idx = idx[batches.window_shuffle(len(idx), window, rng)]
            shard, row = shard[idx], row[idx]
        return Plan(keys, checks, shard, row, snapshot or newest)

    def _partition(self, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        index, count = self.partition
        n = len(plan.row)
        lo, hi = index * n // count, (index + 1) * n // count
        if self.drop_last:
            hi = lo + (hi - lo) // self.batch_size * self.batch_size
        return plan.shard[lo:hi], plan.row[lo:hi]

    # -- iterating -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        epoch = self._state["epoch"]
        fetch = Prefetch(self.reader, self.fields, self.threads)
        while self.epochs is None or epoch < self._first_epoch + self.epochs:
            resumed = epoch == self._state["epoch"] and self._state["position"] > 0
            early = None if resumed or self.partition[1] > 1 else fetch.early(self.prefetch + 1)
            plan = self.plan(epoch, self._state["snapshot"] if resumed else None, drawn=early)
            shard, row = self._partition(plan)
            if not len(row) and self.epochs is None:
                if self.dataset.refresh().doc["state"] != "open":
                    return  # finished and nothing selected: nothing can ever come
                time.sleep(self.poll)
                continue
            self._state.update(epoch=epoch, snapshot=plan.snapshot)
            start = self._state["position"] if resumed else 0
            self._state["position"] = start
            try:
                yield from self._epoch(plan.keys, plan.checks, shard, row, start, fetch)
            finally:
                fetch.forget_early()
            epoch += 1
            self._state.update(epoch=epoch, position=0, snapshot=None)

    def _epoch(self, keys: list[str], checks: list[Any], shard: np.ndarray, row: np.ndarray, start: int,
               fetch: Prefetch) -> Iterator[dict]:
        """The batches of one epoch from ``start``: everything per batch that numpy can work out at once (runs of
        one shard, the shards each batch needs, when each is last used) is worked out up front, so a batch costs
        a few dictionary look-ups and one ``take`` per field and shard."""
        size = self.batch_size
        shard, row = shard[start:], row[start:]
        if self.drop_last:  # also after resuming with another batch size
            shard, row = shard[:len(row) // size * size], row[:len(row) // size * size]
        n = len(row)
        if not n:
            return
        if int(row.min()) < 0:
            raise IntegrityError(f"the index names row {int(row.min())} of a shard: rows are never negative")
        order = batch_order(shard, size)
        shard, row = shard[order], row[order]
        s = batches.Schedule(shard, row, size, len(keys))
        run_lo, run_shard, batch_runs = s.run_lo.tolist(), s.run_shard.tolist(), s.batch_runs.tolist()
        need, appearance, row_max = s.need.tolist(), s.appearance.tolist(), s.row_max.tolist()
        release: dict[int, list[int]] = {}
        for sh, last in zip(appearance, s.last_batch[s.appearance].tolist()):
            release.setdefault(last, []).append(sh)
        pending: dict[int, Any] = {}  # shard index -> Future, or the Shard itself when it was in memory
        columns: dict[int, dict[str, Any]] = {}  # shard index -> its columns, once ready
        layouts: dict[tuple[int, ...], list] = {}  # shards of a batch -> how each field gathers from them
        submitted = 0
        try:
            for i, a in enumerate(range(0, n, size)):
                b = min(a + size, n)
                while submitted < len(appearance) and submitted <= need[i] + self.prefetch:
                    sh = appearance[submitted]
                    pending[sh] = fetch.start(keys[sh], checks[sh])
                    submitted += 1
                r0, r1 = batch_runs[i], batch_runs[i + 1]
                present = run_shard[r0:r1]
                for sh in present:
                    if sh not in columns:
                        columns[sh] = self._columns(keys[sh], fetch.result(pending.pop(sh)), row_max[sh])
                rows = row[a:b]
                if self.transform is not None:
                    batch = self._transformed(keys, columns, shard[a:b], rows)
                elif r1 - r0 == 1:
                    batch = batches.take(columns[present[0]], rows)
                else:
                    key = tuple(present)
                    fields = layouts.get(key)
                    if fields is None:
                        fields = layouts[key] = batches.layout([columns[sh] for sh in present])
                    cuts = [x - a for x in run_lo[r0 + 1:r1]]
                    batch = batches.gather(fields, list(zip([0, *cuts], [*cuts, b - a])), rows)
                for sh in release.get(i, ()):
                    columns.pop(sh, None)
                self._state["position"] = start + b
                yield batch
        finally:
            for f in pending.values():
                if isinstance(f, Future):
                    f.cancel()

    def _columns(self, key: str, shard: Shard, row_max: int) -> dict[str, Any]:
        if row_max >= shard.n:
            raise IntegrityError(f"the index names row {row_max} of shard {key[:12]}, which holds {shard.n} items")
        return {name: shard.column(name) for name in (self.fields or shard.header.fields)}

    def _transformed(self, keys, columns, shard, row) -> dict:
        items = []
        for s, r in zip(shard.tolist(), row.tolist()):
            item = {}
            for name, column in columns[s].items():
                v = column[r]
                item[name] = v.item() if isinstance(v, np.generic) else batches.own(v)
            try:
                items.append(self.transform(item))
            except Exception as exc:
                item_id = self._item_id(keys[s], r)
                raise TransformError(f"transform failed on item {item_id} (shard {keys[s][:12]}, row {r}): "
                                     f"{type(exc).__name__}: {exc}", item_id) from exc
        return batches.collate(items)

    def _item_id(self, key: str, row: int) -> str | None:
        doc = self.dataset.project.find_one(ITEMS, self.dataset._scope({"shard": key, "row": row}),
                                            projection={"_id": 1})
        return doc["_id"] if doc else None
