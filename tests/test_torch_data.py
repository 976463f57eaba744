"""PyTorch datasets: 4 DataLoader workers x 2 ranks see every item exactly once; map-style random access."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader  # noqa: E402

from mlwarehouse.datasets.items import ItemDatasets  # noqa: E402
from mlwarehouse.datasets.torch_data import ItemIterableDataset, ItemMapDataset  # noqa: E402

N = 600


@pytest.fixture
def ds(wh):
    x = np.arange(N, dtype=np.float32).repeat(32).reshape(N, 32)
    return ItemDatasets(wh.project("p")).from_arrays("t", {"x": x, "label": np.arange(N)}, shard_bytes=1 << 16)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_and_ranks_see_each_item_once(ds):
    seen = []
    for rank in range(2):
        data = ItemIterableDataset(ds, rank=rank, world_size=2, batch_size=16, seed=5, where={"label": {"$lt": 500}})
        for epoch in range(2):
            data.set_epoch(epoch)
            labels = []
            for batch in DataLoader(data, batch_size=None, num_workers=4):
                assert isinstance(batch["x"], torch.Tensor) and batch["x"].dtype == torch.float32
                assert torch.equal(batch["x"][:, 0].long(), batch["label"])
                labels.extend(batch["label"].tolist())
            seen.append(labels)
    epoch0 = seen[0] + seen[2]
    epoch1 = seen[1] + seen[3]
    assert sorted(epoch0) == list(range(500)) and sorted(epoch1) == list(range(500))
    assert seen[0] != seen[1]  # a new order each epoch


def test_in_process_iteration_and_map_style(ds):
    data = ItemIterableDataset(ds, batch_size=100, shuffle=False)
    batches = list(data)
    assert [len(b["label"]) for b in batches] == [100] * 6 and batches[0]["label"][0].item() == 0
    flat = ItemMapDataset(ds, where={"label": {"$gte": 590}})
    assert len(flat) == 10
    item = flat[3]
    assert item["label"] == 593 and torch.equal(item["x"], torch.full((32,), 593.0))
    loader = DataLoader(ItemMapDataset(ds), batch_size=50, shuffle=True, num_workers=0)
    assert sorted(torch.cat([b["label"] for b in loader]).tolist()) == list(range(N))
    with pytest.raises(IndexError):
        flat[10]
