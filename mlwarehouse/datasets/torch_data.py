"""PyTorch datasets over item datasets: a streaming IterableDataset and a map-style Dataset.

:class:`ItemIterableDataset` yields whole batches (use ``DataLoader(ds, batch_size=None, num_workers=N)``); each
DataLoader worker of each distributed rank streams one contiguous slice of the epoch's order, so every selected
item comes exactly once per epoch. Call ``set_epoch(e)`` between epochs for a new order. Worker processes open
their own connection to the warehouse (connections are never shared across a fork). Arrays become tensors with
``torch.from_numpy`` (no copy).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

__all__ = ["ItemIterableDataset", "ItemMapDataset", "to_torch"]


def to_torch(value: Any) -> Any:
    """numpy arrays (and dicts/lists of them) to tensors without copying; anything else as it is."""
    if isinstance(value, np.ndarray):
        if not value.flags.writeable:
            value = value.copy()  # torch refuses read-only memory
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: to_torch(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        return [to_torch(v) for v in value]  # a ragged field: one tensor per item
    return value


class _Reopen:
    """Holds where a dataset lives and reopens it in each process that uses it."""

    def __init__(self, dataset):
        settings = dataset.project.warehouse.settings
        self._where = (settings.index_uri, settings.blobs_uri) if settings else None
        self._project = dataset.project.name
        self._key = (dataset.doc["name"], dataset.doc["version"])
        self._pid = os.getpid()
        self._dataset = dataset

    def dataset(self):
        if self._dataset is None or self._pid != os.getpid():
            if self._where is None:
                raise RuntimeError("this warehouse has no settings to reopen it in a worker process")
            from mlwarehouse.warehouse import connect
            wh = connect(self._where[0], blobs=self._where[1])
            self._dataset = wh.project(self._project).items.get(self._key[0], version=self._key[1])
            self._pid = os.getpid()
        return self._dataset

    def __getstate__(self):
        return {**self.__dict__, "_dataset": None}


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ItemIterableDataset(IterableDataset):
    """Batches of an item dataset for ``DataLoader(ds, batch_size=None, num_workers=N)``.

    Stream options (``where``, ``batch_size``, ``shuffle``, ``seed``, ``transform``, ``fields``, ``cache``...)
    are those of :class:`mlwarehouse.datasets.stream.ItemStream`. ``rank`` and ``world_size`` default to
    ``torch.distributed``'s when it is initialised.
    """

    def __init__(self, dataset, *, rank: int | None = None, world_size: int | None = None, **stream_options):
        super().__init__()
        self._source = _Reopen(dataset)
        self.rank, self.world_size = rank, world_size
        self.options = {"epochs": 1, **stream_options}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rank, world = _rank_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        partition = (rank * workers + worker, world * workers)
        stream = self._source.dataset().stream(partition=partition, epoch=self.epoch, **self.options)
        for batch in stream:
            yield to_torch(batch)


class ItemMapDataset(Dataset):
    """Random access to the selected items: ``ds[i]`` reads item i by range reads (checksums verified)."""

    def __init__(self, dataset, *, where: dict | None = None, fields: list[str] | None = None, transform=None):
        plan = dataset.stream(where, shuffle=False).plan(0)
        self._keys = plan.keys
        self._shard, self._row = plan.shard, plan.row
        self.fields = fields
        self.transform = transform
        self._source = _Reopen(dataset)

    def __len__(self) -> int:
        return len(self._row)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} is out of range for {len(self)} items")
        reader = self._source.dataset().reader()
        item = reader.item(self._keys[self._shard[i]], int(self._row[i]), self.fields)
        if self.transform is not None:
            item = self.transform(item)
        return to_torch(item)
