"""The trainer loop: rounds over a growing collection, a save every N steps carrying the whole state, an exact
resume from the newest save, pruning that spares the champion, bad input refused before anything is written."""

import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_for

from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.loops.trainer import train_forever

RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 2))


def _fill(collection, n: int, seed: int) -> None:
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 4)).astype(np.float32)
    y = (x @ W).argmax(axis=1)
    collection.insert_many({"x": x[i], "y": int(y[i])} for i in range(n))


def _initial(wh):
    """A stored starting model, so that every trainer of a test starts from the same weights."""
    torch.manual_seed(0)
    return wh.models.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), "init")


def _saves(wh, name="mlp", key=None):
    where = {"trainer.key": key} if key else None
    return sorted(wh.models.find(name, where=where), key=lambda m: m.doc["step"])


def test_a_round_saves_every_n_steps_and_at_its_end(wh):
    _fill(wh.collection("pts"), 200, 1)
    counts = train_forever(wh, _initial(wh).id, "collection:pts", inputs="x", target="y", name="mlp",
                           batch_size=16, save_every=5, max_rounds=1, metrics=["accuracy"])
    assert counts == {"steps": 13, "rounds": 1, "saved": 3, "step": 13}  # 200 / 16: 13 batches
    saves = _saves(wh)
    assert [m.doc["step"] for m in saves] == [5, 10, 13]
    assert [m.doc["trainer"]["position"] for m in saves] == [80, 160, 200]
    for m in saves:
        assert m.doc["trainer"]["round"] == 0 and m.doc["trainer"]["documents"] == 200
        assert np.isfinite(m.doc["train"]["loss"]) and 0 <= m.doc["train"]["accuracy"] <= 1
        assert isinstance(m.load(), torch.nn.Module)
    run = wh.runs.get(saves[0].doc["run"])
    assert run.doc["status"] == "complete" and run.doc["trainer"] == "trainer:mlp"
    assert [p["step"] for p in run.history("train")] == [5, 10, 13]
    assert wh.lineage.upstream(saves[-1].id)  # the collection fed the run that made it


def test_new_documents_join_the_next_round(wh):
    pts = wh.collection("pts")
    _fill(pts, 64, 1)
    stop = threading.Event()
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(train_forever(
        wh, _initial(wh).id, pts, inputs="x", target="y", name="mlp", batch_size=32, save_every=100,
        min_new=40, poll=0.05, stop=stop)))
    worker.start()
    wait_for(lambda: len(_saves(wh)) == 1, timeout=20)  # round 0: 64 documents, saved at its end
    time.sleep(0.3)
    assert len(_saves(wh)) == 1  # 0 new documents < min_new: waiting
    _fill(pts, 20, 2)
    time.sleep(0.3)
    assert len(_saves(wh)) == 1  # 20 < 40
    _fill(pts, 30, 3)
    wait_for(lambda: len(_saves(wh)) == 2, timeout=20)
    stop.set()
    worker.join(20)
    assert not worker.is_alive()
    first, second = _saves(wh)
    assert (first.doc["trainer"]["documents"], second.doc["trainer"]["documents"]) == (64, 114)
    assert second.doc["trainer"]["round"] == 1 and second.doc["step"] == 2 + 4  # ceil(114 / 32) = 4 steps
    assert out == {"steps": 6, "rounds": 2, "saved": 2, "step": 6}


def test_a_resumed_trainer_ends_where_an_uninterrupted_one_does(wh):
    _fill(wh.collection("pts"), 100, 1)
    start = _initial(wh).id
    common = dict(inputs="x", target="y", name="mlp", batch_size=10, save_every=3, min_new=0, seed=7)
    train_forever(wh, start, "collection:pts", key="straight", max_steps=14, **common)
    train_forever(wh, start, "collection:pts", key="stopped", max_steps=4, **common)  # saves at 3 and at 4
    assert [m.doc["step"] for m in _saves(wh, key="stopped")] == [3, 4]
    counts = train_forever(wh, start, "collection:pts", key="stopped", max_steps=10, **common)  # round 1 at 4
    assert counts["step"] == 14
    straight, resumed = _saves(wh, key="straight")[-1], _saves(wh, key="stopped")[-1]
    assert straight.doc["step"] == resumed.doc["step"] == 14
    assert (resumed.doc["trainer"]["round"], resumed.doc["trainer"]["position"]) == (1, 40)
    a, b = straight.load().state_dict(), resumed.load().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same order of batches, same optimizer state: same weights


def test_pruning_keeps_the_newest_and_the_champion(wh):
    _fill(wh.collection("pts"), 60, 1)
    start = _initial(wh).id
    train_forever(wh, start, "collection:pts", inputs="x", target="y", name="mlp", batch_size=10, save_every=1,
                  max_steps=2)
    champion = _saves(wh)[0]
    wh.models.aliases.set("mlp", "champion", champion)
    train_forever(wh, start, "collection:pts", inputs="x", target="y", name="mlp", batch_size=10, save_every=1,
                  max_steps=6, min_new=0, keep_last=2)
    assert [m.doc["step"] for m in _saves(wh)] == [1, 7, 8]
    assert wh.models.aliases.resolve("mlp", "champion") == champion.id


def test_item_datasets_train_on_their_newest_version(wh):
    g = np.random.default_rng(4)
    x = g.normal(size=(40, 4)).astype(np.float32)
    wh.items.from_arrays("pts-items", {"x": x, "y": (x @ W).argmax(axis=1)})
    train_forever(wh, _initial(wh).id, "items:pts-items", inputs="x", target="y", name="mlp", batch_size=8,
                  save_every=100, max_rounds=1)
    (save,) = _saves(wh)
    assert save.doc["trainer"]["documents"] == 40 and save.doc["trainer"]["source"] == "items:pts-items@1"


def test_bad_input_is_refused_before_anything_is_written(wh):
    _fill(wh.collection("pts"), 10, 1)
    start = _initial(wh).id
    runs = len(wh.runs.find())
    with pytest.raises(NotFound):
        train_forever(wh, start, "collection:missing", inputs="x", target="y", name="mlp", max_steps=1)
    with pytest.raises(QueryError, match="save_every"):
        train_forever(wh, start, "collection:pts", inputs="x", target="y", name="mlp", save_every=0)
    with pytest.raises(QueryError, match="loss"):
        train_forever(wh, start, "collection:pts", inputs="x", target="y", name="mlp", loss="no-such-loss")
    with pytest.raises(QueryError):
        train_forever(wh, start, "collection:pts", inputs=[], name="mlp")
    assert len(wh.runs.find()) == runs and not _saves(wh)


def test_mlw_train_runs_through_the_installed_command(wh, subprocess_env):
    _fill(wh.collection("pts"), 48, 1)
    start = _initial(wh).id
    mlw = str(Path(subprocess.sys.executable).with_name("mlw"))
    done = subprocess.run([mlw, "train", "--model", start, "--collection", "pts", "--inputs", "x", "--target", "y",
                           "--name", "mlp", "--batch-size", "16", "--save-every", "2", "--max-rounds", "1"],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [m.doc["step"] for m in _saves(wh)] == [2, 3]
    usage = subprocess.run([mlw, "train", "--collection", "pts"], env=subprocess_env, capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "mlw train: error" in usage.stderr
