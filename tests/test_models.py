"""Models: save/load of torch modules and dicts of arrays, queries, delete, checkpoints and retention."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mlwarehouse.errors import CodecError, InvalidDocument, NotFound, PickleNotAllowed, QueryError
from mlwarehouse.models.registry import Retention

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _blob_count(wh) -> int:
    return sum(1 for _ in wh.blobs.list())


def test_save_and_load_a_torch_module(wh):
    p = wh.project("m")
    net = _mlp()
    rec = p.models.save(net, "mlp", epoch=3, tags=["baseline"], description="first", test_accuracy=np.float32(0.9),
                        example_inputs=(torch.randn(2, 8),))
    assert rec.kind == "torch" and rec.architecture["format"] == "export"
    assert rec.epoch == 3 and rec.tags == ["baseline"] and rec.test_accuracy == pytest.approx(0.9)
    assert len(rec.weights) == 6 and rec.weights[0][0] == "0.weight"
    loaded = p.models.load("mlp")
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), net(x))
    assert p.models.get(rec.id) == rec


def test_dict_of_arrays_without_torch(wh, subprocess_env):
    code = (
        "import sys, numpy as np, mlwarehouse\n"
        "p = mlwarehouse.connect().project('np')\n"
        "w = {'layer.1': {'w': np.arange(6.0).reshape(2, 3), 'b': np.zeros(3, np.float32)}, 'scale': 2.5,\n"
        "     'empty': {}}\n"
        "rec = p.models.save(w, 'linear', accuracy=0.5)\n"
        "back = p.models.best('accuracy').load()\n"
        "assert back.keys() == w.keys() and back['empty'] == {} and back['scale'] == 2.5\n"
        "assert np.array_equal(back['layer.1']['w'], w['layer.1']['w'])\n"
        "assert back['layer.1']['b'].dtype == np.float32\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(rec.kind)\n")
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "arrays"


def test_other_values_need_a_codec_or_pickle(wh):
    p = wh.project("v")

    class Opaque:
        pass

    with pytest.raises(PickleNotAllowed):
        p.models.save(Opaque(), "opaque")
    assert p.models.find() == []
    rec = p.models.save(np.ones(3), "vector")  # a single array is a value every codec handles
    assert rec.kind == "value" and np.array_equal(rec.load(), np.ones(3))
    with pytest.raises(CodecError, match="apply to torch modules"):
        p.models.save({"w": np.ones(2)}, "x", example_inputs=(1,))
    with pytest.raises(CodecError, match="keys must be strings"):
        p.models.save({1: np.ones(2)}, "x")


def test_fields_are_checked(wh):
    p = wh.project("f")
    with pytest.raises(InvalidDocument, match="weights"):
        p.models.save({"w": np.ones(2)}, "x", weights=3)
    with pytest.raises(InvalidDocument, match="reserved"):
        p.models.save({"w": np.ones(2)}, "x", _secret=1)
    with pytest.raises(InvalidDocument, match="epoch"):
        p.models.save({"w": np.ones(2)}, "x", epoch=1.5)
    with pytest.raises(InvalidDocument, match="name"):
        p.models.save({"w": np.ones(2)}, "")
    dataset = wh.project("f").datasets.save(np.ones(3), "d")
    rec = p.models.save({"w": np.ones(2)}, "x", dataset=dataset, run="RUN1", loss=float("nan"))
    assert rec.dataset == dataset.id and rec.run == "RUN1" and rec.loss is None


def test_find_best_get_delete(wh):
    p = wh.project("q")
    for i, acc in enumerate([0.7, 0.9, 0.8]):
        p.models.save({"w": np.full(4, i)}, "mlp", test_accuracy=acc, lr=10.0 ** -i)
    p.models.save({"w": np.zeros(4)}, "mlp", test_accuracy="n/a")  # strings never win a numeric ranking
    p.models.save({"w": np.zeros(4)}, "other", test_accuracy=0.99)
    wh.project("elsewhere").models.save({"w": np.zeros(4)}, "mlp", test_accuracy=1.0)

    assert p.models.best("test_accuracy", name="mlp").test_accuracy == 0.9
    assert p.models.best("test_accuracy").test_accuracy == 0.99
    assert p.models.best("test_accuracy", mode="min", name="mlp").test_accuracy == 0.7
    assert p.models.best("test_accuracy", where={"name": "mlp", "lr": {"$lt": 0.5}}).test_accuracy == 0.9
    with pytest.raises(NotFound, match="no model 'mlp' with a numeric 'f1'"):
        p.models.best("f1", name="mlp")
    with pytest.raises(QueryError):
        p.models.best("test_accuracy", mode="largest")

    newest = p.models.find(name="mlp")
    assert [r.get("test_accuracy") for r in newest] == ["n/a", 0.8, 0.9, 0.7]  # newest first by default
    board = p.models.find(where={"test_accuracy": {"$gt": 0.75}}, sort=[("test_accuracy", -1)])
    assert [r.test_accuracy for r in board] == [0.99, 0.9, 0.8]
    assert np.array_equal(p.models.load(where={"name": "mlp"}, sort=[("test_accuracy", 1)])["w"], np.zeros(4))
    keys = [ix["keys"] for ix in wh.index.indexes("models")]
    assert [["project", 1], ["name", 1], ["test_accuracy", -1]] in keys
    with pytest.raises(NotFound):
        p.models.get("nope")
    with pytest.raises(NotFound):
        p.models.load("missing")

    blobs = _blob_count(wh)
    assert p.models.delete("mlp", where={"test_accuracy": {"$lt": 0.85}}) == 2
    assert len(p.models.find(name="mlp")) == 2
    assert _blob_count(wh) == blobs - 2  # the arrays full of 0 and 2 only; zeros are still used
    assert p.models.delete() == 3
    assert len(wh.project("elsewhere").models.find()) == 1


def test_checkpoint_retention_keeps_best_and_last(wh):
    p = wh.project("ckpt")
    net = _mlp()
    accuracies = [0.5, 0.9, 0.6, 0.7, 0.65, 0.55]
    for epoch, acc in enumerate(accuracies):
        with torch.no_grad():
            net[4].bias.add_(1.0)
        p.models.checkpoint(net, run="R1", epoch=epoch, metrics={"valid_accuracy": acc}, name="mlp-ckpt",
                            keep_last=2, keep_best=1, best_metric="valid_accuracy")
    p.models.checkpoint(net, run="R2", epoch=0, metrics={"valid_accuracy": 0.1}, name="mlp-ckpt", keep_last=1)
    kept = p.models.find(where={"run": "R1"}, sort=[("epoch", 1)], checkpoints=True)
    assert [r.epoch for r in kept] == [1, 4, 5]
    assert all(r.checkpoint for r in kept)
    assert len(p.models.find(where={"run": "R2"}, checkpoints=True)) == 1
    # blobs: the four unchanged tensors once, one last-layer bias per kept checkpoint (R2's equals epoch 5's),
    # and the architecture archive once
    assert _blob_count(wh) == 5 + 3 + 1
    assert p.models.best("valid_accuracy", where={"run": "R1"}, checkpoints=True).epoch == 1
    assert all(r.load() is not None for r in kept)


def test_unchanged_tensors_are_stored_once(wh):
    p = wh.project("frozen")
    net = _mlp()
    for param in net[0].parameters():
        param.requires_grad_(False)  # a frozen first layer
    optimizer = torch.optim.SGD([q for q in net.parameters() if q.requires_grad], lr=0.1)
    records = []
    for epoch in range(2):
        optimizer.zero_grad()
        net(torch.randn(16, 8)).pow(2).mean().backward()
        optimizer.step()
        records.append(p.models.checkpoint(net, run="R", epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)}))
    first, second = ({name: ref["_blob"] for name, ref in r.weights} for r in records)
    assert first["0.weight"] == second["0.weight"] and first["0.bias"] == second["0.bias"]
    assert all(first[k] != second[k] for k in first if not k.startswith("0."))
    assert records[0].architecture == records[1].architecture
    assert _blob_count(wh) == 2 + 2 * 4 + 1  # frozen layer once, trained tensors twice, one architecture


def test_retention_policy_rules():
    docs = [{"_id": str(i), "epoch": i, "time": str(i), "acc": a} for i, a in enumerate([0.3, None, 0.9, "x", 0.1])]
    assert Retention().doomed(docs) == []
    assert Retention(keep_last=2).doomed(docs) == ["0", "1", "2"]
    assert Retention(keep_best=2, metric="acc").doomed(docs) == ["1", "3", "4"]
    assert Retention(keep_best=1, metric="acc", mode="min").doomed(docs) == ["0", "1", "2", "3"]
    assert Retention(keep_last=1, keep_best=1, metric="acc").doomed(docs) == ["0", "1", "3"]
    for bad in (dict(keep_last=-1), dict(keep_best=1), dict(keep_last=0), dict(keep_last=1, mode="up")):
        with pytest.raises(QueryError):
            Retention(**bad)


def test_run_defaults_to_the_current_run(wh):
    p = wh.project("r")
    with p.runs.start("training") as run:
        rec = p.models.save({"w": np.ones(1)}, "x")
    assert rec.run == run.id
    assert p.models.save({"w": np.ones(1)}, "y").run is None  # the run ended: nothing is current


def test_a_dict_of_many_plain_numbers_keeps_every_name(wh):
    weights = {f"w{i}": float(i) for i in range(3000)}
    rec = wh.models.save(weights, name="scalars")
    assert wh.models.get(rec.id).load() == weights


def test_retention_by_a_nested_metric_keeps_the_best(wh):
    p = wh.project("nested")
    for epoch, acc in enumerate([0.5, 0.9, 0.6, 0.3]):
        p.models.checkpoint({"w": np.full(3, epoch, np.float32)}, run="R", epoch=epoch, name="n",
                            metrics={"val": {"acc": acc}}, keep_last=1, keep_best=1, best_metric="val.acc")
    assert [r.epoch for r in p.models.find(where={"run": "R"}, sort=[("epoch", 1)], checkpoints=True)] == [1, 3]
