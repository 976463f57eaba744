"""Hugging Face Transformers integration: a tiny BERT built from a config (no download) trained for 2 epochs with
the real Trainer, its curves, checkpoints (retention applied) and best model in the warehouse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from mlwarehouse.errors import CodecError, InvalidDocument, PickleNotAllowed  # noqa: E402
from mlwarehouse.integrations.transformers import (  # noqa: E402
    PretrainedModule,
    WarehouseCallback,
    build_pretrained,
    storable,
)

LOAD = """
import json, sys, torch, mlwarehouse
wh = mlwarehouse.connect()
try:
    model = wh.models.get(sys.argv[1]).load()
except mlwarehouse.PickleNotAllowed:
    print("refused"); raise SystemExit
with torch.no_grad():
    print(json.dumps(model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))
"""
STEPS = 4  # optimizer steps per epoch: 32 examples, batches of 8


class Pairs(torch.utils.data.Dataset):
    """Random token sequences labelled by whether token 7 occurs in them."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 12), generator=g)
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.labels[i]}


def _model():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _train(tmp_path, callback, *, save_strategy="no", **extra):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=5e-3, eval_strategy="epoch", save_strategy=save_strategy,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, **extra)
    model = _model()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Pairs(32, 0), eval_dataset=Pairs(16, 1),
                                   callbacks=[callback])
    trainer.train()
    return model


@pytest.mark.parametrize("save_strategy", ["no", "epoch"])
def test_two_epochs_logged_checkpointed_and_the_best_loadable(wh, tmp_path, save_strategy):
    callback = WarehouseCallback(wh, run_name="tiny-bert", keep_last=1, keep_best=1, tags=["test"])
    model = _train(tmp_path, callback, save_strategy=save_strategy)

    run = wh.runs.get(callback.run.id)
    assert run.status == "complete" and run.name == "tiny-bert" and run.tags == ["test"]
    hp = run.hyper_parameters
    assert hp["learning_rate"] == 5e-3 and hp["num_train_epochs"] == 2 and hp["per_device_train_batch_size"] == 8
    assert run.train_runtime > 0 and isinstance(run.train_loss, float)  # the trainer's closing summary

    train_points = run.history("train")
    assert [p["step"] for p in train_points] == list(range(1, 2 * STEPS + 1))  # one per optimizer step
    assert [p["epoch"] for p in train_points] == [0] * STEPS + [1] * STEPS
    assert all({"loss", "learning_rate", "grad_norm"} <= p.keys() for p in train_points)
    valid_points = run.history("valid")
    assert [(p["epoch"], p["step"]) for p in valid_points] == [(0, STEPS), (1, 2 * STEPS)]
    losses = [p["loss"] for p in valid_points]
    assert run.summary["valid"]["loss"]["min"] == min(losses)

    name = "BertForSequenceClassification"
    kept = wh.models.find(name, where={"run": run.id, "checkpoint": True}, checkpoints=True)
    best_epoch = losses.index(min(losses))
    assert sorted(c.epoch for c in kept) == sorted({1, best_epoch})
    assert all(c.eval_loss == pytest.approx(losses[c.epoch]) for c in kept)
    assert {c.architecture["format"] for c in kept} == {"class"}

    final = wh.models.find(name, where={"run": run.id})
    assert [m.id for m in final] == [callback.best_model.id]
    best = final[0]
    assert best.epoch == best_epoch and best.eval_loss == pytest.approx(min(losses))
    assert best.from_checkpoint in {c.id for c in kept}

    loaded = wh.models.get(best.id).load()
    assert type(loaded) is transformers.BertForSequenceClassification and not loaded.training
    batch = {"input_ids": Pairs(4, 2).ids, "attention_mask": torch.ones(4, 12).long()}
    with torch.no_grad():
        out = loaded(**batch).logits
        assert torch.equal(out, wh.models.get(best.from_checkpoint).load()(**batch).logits)
        if best_epoch == 1:  # the live model ended on the best epoch
            assert torch.allclose(out, model.eval()(**batch).logits, atol=1e-6)


@pytest.mark.slow
def test_another_process_loads_the_model_once_it_trusts_the_integration(wh, tmp_path, subprocess_env):
    callback = WarehouseCallback(wh, keep_last=1, keep_best=None)
    model = _train(tmp_path, callback).eval()
    ids = Pairs(3, 5).ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    command = [sys.executable, "-c", LOAD, callback.best_model.id, json.dumps(ids.tolist())]
    refused = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert refused.stdout.strip() == "refused", refused.stderr
    subprocess_env["MLW_TRUSTED_MODULES"] = "mlwarehouse.integrations.transformers"
    loaded = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert torch.allclose(torch.tensor(json.loads(loaded.stdout)), expected, atol=1e-6)


def test_the_current_run_is_reused_and_the_best_metric_follows_the_arguments(wh, tmp_path):
    with wh.runs.start("outer", hyper_parameters={"data": "pairs", "seed": 1}) as outer:
        callback = WarehouseCallback(keep_last=None, keep_best=None)  # keep all; the current run's project
        _train(tmp_path, callback, metric_for_best_model="loss", greater_is_better=True)
        assert callback.run is outer and outer.refresh().status == "running"
        assert callback.best_metric == "eval_loss" and callback.mode == "max"
    assert outer.status == "complete" and outer.hyper_parameters["data"] == "pairs"
    assert outer.hyper_parameters["seed"] == 0  # what the trainer ran with wins over what the run said
    checkpoints = wh.models.find(where={"run": outer.id, "checkpoint": True}, sort=[("epoch", 1)])
    assert [c.epoch for c in checkpoints] == [0, 1]
    worst = max(checkpoints, key=lambda c: c.eval_loss)
    assert callback.best_model.from_checkpoint == worst.id and callback.best_model.epoch == worst.epoch


def test_a_stored_model_builds_only_transformers_classes_or_trusted_ones():
    model = _model()
    view = storable(model)
    assert view.state_dict().keys() == model.state_dict().keys()
    rebuilt = PretrainedModule(**view.config)
    assert type(rebuilt) is type(model)
    with pytest.raises(CodecError):
        build_pretrained("torch.nn:Linear", view.config["config"])
    with pytest.raises(PickleNotAllowed):
        build_pretrained("some_untrusted_package.models:Model", view.config["config"])
    with pytest.raises(InvalidDocument):
        storable(torch.nn.Linear(2, 2))
