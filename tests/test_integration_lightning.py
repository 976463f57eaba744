"""PyTorch Lightning integration: a tiny module trained for 2 epochs with the real library, its curves, checkpoints
(retention applied) and best model in the warehouse."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from mlwarehouse.integrations.common import split_metric  # noqa: E402
from mlwarehouse.integrations.lightning import WarehouseCheckpoint, WarehouseLogger  # noqa: E402

# Lightning 2.6 itself calls a torch pytree API that torch 2.13 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning",
                                        "ignore:.*LeafSpec.*is deprecated:DeprecationWarning")

BATCHES = 4  # training batches per epoch


class TinyRegressor(L.LightningModule):
    """A two-layer MLP on generated data; ``self.net`` is the plain nn.Module inside."""

    def __init__(self, hidden: int = 8, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))
        self.log("valid/mae", (self(x) - y).abs().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Boom(TinyRegressor):
    """Fails in its second epoch."""

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise RuntimeError("diverged")
        return super().training_step(batch, batch_idx)


def _loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(48, 1, generator=g)
    train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=32 // BATCHES, num_workers=0)
    valid = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=16, num_workers=0)
    return train, valid


def _trainer(logger, callbacks, epochs=2):
    return L.Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, accelerator="cpu", devices=1,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, num_sanity_val_steps=0, deterministic=True)


def test_the_kind_rule():
    assert split_metric("train_loss") == ("train", "loss")
    assert split_metric("train/loss") == ("train", "loss")
    assert split_metric("val_loss") == ("valid", "loss")
    assert split_metric("valid/acc") == ("valid", "acc")
    assert split_metric("validation-f1") == ("valid", "f1")
    assert split_metric("eval_loss") == ("valid", "loss")
    assert split_metric("test/acc.top1") == ("test", "acc_top1")
    assert split_metric("loss") == ("train", "loss")
    assert split_metric("value") == ("train", "value")  # "val" only counts before a separator
    assert split_metric("lr-SGD") == ("train", "lr-SGD")
    assert split_metric("train_step") == ("train", "step_")  # a log document's own field
    assert split_metric("val_1x") == ("valid", "m_1x")


@pytest.mark.parametrize("store, arch", [("module", "class"), ("inner", None)])
def test_two_epochs_logged_checkpointed_and_the_best_loadable(wh, store, arch):
    torch.manual_seed(0)
    model = TinyRegressor()
    logger = WarehouseLogger(wh, "tiny-lightning", tags=["test"])
    checkpoints = WarehouseCheckpoint(monitor="val_loss", mode="min", keep_last=1, keep_best=1,
                                      module="net" if store == "inner" else None, arch=arch)
    train, valid = _loaders()
    trainer = _trainer(logger, [checkpoints])
    trainer.fit(model, train, valid)
    tested = trainer.test(model, valid, verbose=False)[0]["test/loss"]  # after fit: into the same (ended) run

    run = wh.runs.get(logger.version)
    assert [p["loss"] for p in run.history("test")] == [pytest.approx(tested)]
    assert run.status == "complete" and run.name == "tiny-lightning" and run.tags == ["test"]
    assert run.hyper_parameters == {"hidden": 8, "lr": 0.05}
    train_points = run.history("train")
    assert len(train_points) == 2 * BATCHES  # one per step
    assert [p["step"] for p in train_points] == list(range(2 * BATCHES))
    assert [p["epoch"] for p in train_points] == [0] * BATCHES + [1] * BATCHES
    valid_points = run.history("valid")
    assert [(p["epoch"], p["step"]) for p in valid_points] == [(0, BATCHES - 1), (1, 2 * BATCHES - 1)]
    assert all(isinstance(p["loss"], float) and isinstance(p["mae"], float) for p in valid_points)
    assert run.summary["valid"]["loss"]["min"] == min(p["loss"] for p in valid_points)

    # retention: the newest epoch and the best by val_loss are kept, nothing else
    name = "Sequential" if store == "inner" else "TinyRegressor"  # the class of what was stored
    kept = wh.models.find(name, where={"run": run.id, "checkpoint": True}, checkpoints=True)
    losses = [p["loss"] for p in valid_points]
    best_epoch = losses.index(min(losses))
    assert sorted(c.epoch for c in kept) == sorted({1, best_epoch})
    assert all(c.val_loss == pytest.approx(losses[c.epoch]) for c in kept)

    final = wh.models.find(name, where={"run": run.id})
    assert len(final) == 1 and checkpoints.best_model.id == final[0].id
    best = final[0]
    assert best.epoch == best_epoch and best.val_loss == pytest.approx(min(losses))
    assert best.from_checkpoint in {c.id for c in kept}

    loaded = wh.models.get(best.id).load()
    x = torch.randn(5, 3)
    expected = checkpoints.best_model.load()
    with torch.no_grad():
        out = loaded(x)
        assert torch.equal(out, expected(x))
        if best_epoch == 1:  # the live module ended on the best epoch
            assert torch.equal(out, model.eval()(x))
    if store == "module":  # the importable class and its hyper-parameters rebuild the LightningModule
        assert type(loaded) is TinyRegressor and best.architecture["format"] == "class"
    else:  # a plain Sequential is stored as TorchScript, the first format that works without example inputs
        assert isinstance(loaded, torch.jit.ScriptModule) and best.architecture["format"] == "script"


def test_an_error_fails_the_run_and_a_given_run_is_left_to_its_owner(wh):
    logger = WarehouseLogger(wh)
    train, valid = _loaders()
    with pytest.raises(RuntimeError, match="diverged"):
        _trainer(logger, [WarehouseCheckpoint(arch="class")]).fit(Boom(), train, valid)
    run = wh.runs.get(logger.version)
    assert run.status == "failed" and "diverged" in run.error
    assert len(wh.models.find(where={"run": run.id}, checkpoints=True)) == 1  # epoch 0 only

    with wh.runs.start("outer", hyper_parameters={"seed": 1}) as outer:
        logger = WarehouseLogger()  # the current run, in its project
        _trainer(logger, [WarehouseCheckpoint(arch="class", keep_last=None, keep_best=None)], epochs=1) \
            .fit(TinyRegressor(), train, valid)
        assert logger.version == outer.id
        assert outer.refresh().status == "running"
        assert outer.hyper_parameters == {"seed": 1, "hidden": 8, "lr": 0.05}
    assert outer.status == "complete"
    assert len(wh.models.find(where={"run": outer.id}, checkpoints=True)) == 2  # the checkpoint and the final


def test_an_earlier_best_epoch_becomes_the_final_model_with_its_own_weights(wh):
    torch.manual_seed(0)
    model = TinyRegressor()
    checkpoints = WarehouseCheckpoint(wh, monitor="val_loss", mode="max", keep_last=1, keep_best=1, arch="class")
    train, valid = _loaders()
    _trainer(WarehouseLogger(wh, "worst-first"), [checkpoints]).fit(model, train, valid)
    best = checkpoints.best_model
    assert best.epoch == 0  # the loss fell, so "max" picks the first epoch
    kept = {c.epoch: c for c in wh.models.find("TinyRegressor", checkpoints=True, where={"checkpoint": True})}
    assert sorted(kept) == [0, 1] and best.from_checkpoint == kept[0].id
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(wh.models.get(best.id).load()(x), kept[0].load()(x))
        assert not torch.equal(wh.models.get(best.id).load()(x), model.eval()(x))
    assert wh.models.load("TinyRegressor").__class__ is TinyRegressor  # the final model, not a checkpoint
