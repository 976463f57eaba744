"""Batches of a stream, worked out with numpy: the order a batch hands items out in, what each batch needs
from which shard (:class:`Schedule`), the gather of a batch from its shards' columns, and the shuffles a plan is
made of. Pure functions of arrays: :mod:`mlwarehouse.datasets.stream` plans and fetches, this module cuts."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from mlwarehouse.errors import CodecError, InvalidDocument

__all__ = ["batch_order", "Schedule", "take", "layout", "gather", "own", "group_shuffled", "window_shuffle",
           "collate"]


def batch_order(shard: np.ndarray, batch_size: int) -> np.ndarray:
    """The order a stream hands out planned items in: each batch (``batch_size`` consecutive items of the plan)
    grouped by shard, in plan order inside each group. A batch is the same set of items as its slice of the plan;
    the grouping lets one contiguous gather per shard fill it (a scatter of interleaved items costs 3x more)."""
    n = len(shard)
    if not n:
        return np.arange(0)
    key = np.arange(n) // batch_size * (int(shard.max()) + 1) + shard
    if int(key.max()) < 1 << 16:
        key = key.astype(np.uint16)  # a linear-time radix sort
    return np.argsort(key, kind="stable")


class Schedule:
    """What an epoch's batches need, worked out with numpy: the runs of one shard inside one batch (``run_lo``,
    ``run_shard``; batch i holds runs ``batch_runs[i]:batch_runs[i + 1]``), the shards in order of first use
    (``appearance``), how far down that order each batch reaches (``need``), each shard's last batch and the
    largest row the index names in it (checked against the shard once it is read)."""

    def __init__(self, shard: np.ndarray, row: np.ndarray, size: int, shards: int):
        n = len(row)
        cuts = np.union1d(np.flatnonzero(shard[1:] != shard[:-1]) + 1, np.arange(size, n, size))
        self.run_lo = np.concatenate([[0], cuts]).astype(np.int64)
        self.run_shard = shard[self.run_lo]
        self.batch_runs = np.append(np.searchsorted(self.run_lo, np.arange(0, n, size)), len(self.run_lo))
        seen, first = np.unique(self.run_shard, return_index=True)
        self.appearance = seen[np.argsort(first, kind="stable")]
        ordinal = np.zeros(shards, np.int64)
        ordinal[self.appearance] = np.arange(len(self.appearance))
        self.need = np.maximum.reduceat(ordinal[self.run_shard], self.batch_runs[:-1])
        self.last_batch = np.zeros(shards, np.int64)
        np.maximum.at(self.last_batch, self.run_shard, self.run_lo // size)
        self.row_max = np.full(shards, -1, np.int64)
        np.maximum.at(self.row_max, self.run_shard, np.maximum.reduceat(row, self.run_lo))


def take(columns: dict[str, Any], row: np.ndarray) -> dict:
    """A batch from one shard: one ``take`` per fixed-shape field into a fresh array (rows were checked against
    the shard's size, so ``mode="clip"`` never clips; it spares numpy's buffered copy)."""
    return {name: col.take(row, axis=0, mode="clip") if type(col) is np.ndarray
            else [own(col[r]) for r in row.tolist()] for name, col in columns.items()}


def layout(columns: list[dict[str, Any]]) -> list[tuple]:
    """How each field of a batch gathers from the columns of its shards: ``(name, columns, dtype, shape)`` with
    the batch's dtype and per-item shape for fixed-shape arrays (None for lists of values)."""
    out = []
    for name in columns[0]:
        if any(name not in c for c in columns):
            raise CodecError(f"the shards of one batch have different fields ({name!r} is not in every one)")
        cols = [c[name] for c in columns]
        if all(type(c) is np.ndarray for c in cols) and len({c.shape[1:] for c in cols}) == 1:
            out.append((name, cols, np.result_type(*cols), cols[0].shape[1:]))
        else:
            out.append((name, cols, None, None))
    return out


def gather(fields: list[tuple], runs: list[tuple[int, int]], row: np.ndarray) -> dict:
    """Each field's values for a batch of items grouped by shard: the ``i``-th run ``(lo, hi)`` holds the items
    at ``lo:hi`` of the batch, at rows ``row[lo:hi]`` of the ``i``-th shard (see :func:`layout`). Fixed-shape
    arrays: one ``take`` per run into one fresh array."""
    batch = {}
    parts = [row[lo:hi] for lo, hi in runs]
    for name, cols, dtype, shape in fields:
        if dtype is not None:
            out = np.empty((len(row), *shape), dtype)
            for col, rows, (lo, hi) in zip(cols, parts, runs):
                if col.dtype == dtype:
                    col.take(rows, axis=0, out=out[lo:hi], mode="clip")
                else:  # appends that guessed another dtype (int64 and float64 labels): converted
                    out[lo:hi] = col.take(rows, axis=0, mode="clip")
            batch[name] = out
        else:
            values = []
            for col, rows in zip(cols, parts):
                values += [own(col[r]) for r in rows.tolist()]
            batch[name] = values
    return batch


def own(value: Any) -> Any:
    """A value the caller may change: JSON lists and dicts are copied (the cached shard keeps the originals);
    arrays are read-only views, bytes and scalars immutable."""
    return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


def group_shuffled(group: np.ndarray, groups: int, rng: np.random.Generator) -> np.ndarray:
    """Positions sorted by ``group``, in random order inside each group: a stable sort of a random permutation
    (a linear-time radix sort while there are fewer than 65,536 groups)."""
    perm = rng.permutation(len(group))
    keys = group[perm]
    if groups <= 1 << 16:
        keys = keys.astype(np.uint16)
    return perm[np.argsort(keys, kind="stable")]


def window_shuffle(n: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """An order of ``n`` positions where each moves by less than about two windows: position i goes to bucket
    ``(i + U[0, window)) // step`` and the buckets are shuffled inside, so neighbouring shards mix."""
    step = max(1, window // 2, -(-n // (1 << 16)))
    bucket = (np.arange(n) + rng.integers(0, window, n)) // step
    return group_shuffled(bucket, int(bucket.max()) + 1 if n else 0, rng)


def collate(items: list) -> Any:
    """Stack a list of items (dicts of arrays or numbers) into one batch; lists where values cannot stack."""
    if not items:
        return {}
    if not all(isinstance(it, dict) for it in items):
        try:
            return np.stack([np.asarray(it) for it in items])
        except ValueError:
            return items
    keys = list(items[0])
    if any(list(it) != keys for it in items):
        raise InvalidDocument(f"transform returned items with different keys: {keys} and others")
    batch = {}
    for k in keys:
        values = [it[k] for it in items]
        if all(isinstance(v, (np.ndarray, np.generic, int, float, bool)) for v in values):
            try:
                batch[k] = np.stack([np.asarray(v) for v in values])
                continue
            except ValueError:
                pass
        batch[k] = values
    return batch
