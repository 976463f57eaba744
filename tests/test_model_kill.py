"""A process SIGKILLed while saving models leaves no partial document and no reference to a missing blob."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import mlwarehouse

pytest.importorskip("torch")

# A zygote imports torch once, then forks one saver per round (a fresh interpreter per kill costs 3 s here).
# Nothing is opened before the fork: each saver connects on its own.
ZYGOTE = r"""
import os, sys, torch, mlwarehouse
from torch import nn
torch.set_num_threads(1)

def save_forever(seed):
    p = mlwarehouse.connect().project("kill")
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))
    epoch = 0
    while True:  # ~2.6 MB and 6 tensors per save; every tensor changes, so every save writes new blobs
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        if epoch % 2:
            p.models.save(net, "plain", epoch=epoch, loss=1.0 / (epoch + 1), arch="script")
            p.models.delete("plain", where={"epoch": {"$lt": epoch - 6}})
        else:
            p.models.checkpoint(net, run=f"R{seed}", epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)},
                                keep_last=2, keep_best=1, best_metric="loss", mode="min", arch="script")
        epoch += 1

for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            save_forever(int(line))
        finally:
            os._exit(1)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


def _check_everything_loads(home) -> int:
    with mlwarehouse.connect(home=home) as wh:
        p = wh.project("kill")
        records = p.models.find()
        for rec in records:
            for key in rec.doc.get("_blobs", []):
                assert wh.blobs.exists(key), f"model {rec.id} refers to the missing blob {key}"
            module = rec.load()  # every blob read back and verified against its hash
            assert set(module.state_dict()) == {name for name, _ in rec.weights}
            assert rec.kind == "torch" and rec.epoch is not None
        return len(records)


@pytest.mark.slow
def test_sigkill_while_saving_models(tmp_path, subprocess_env):
    rng = random.Random(1234)
    home = tmp_path / "wh"
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=subprocess_env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills = saved = 0
    try:
        for round_ in range(12):
            zygote.stdin.write(f"{round_}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline() or "0")
            assert pid > 0, zygote.stderr.read()
            time.sleep(rng.uniform(0.1, 0.8))  # somewhere inside a save, a checkpoint or a retention delete
            os.kill(pid, signal.SIGKILL)
            status = int(zygote.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the saver died on its own"
            kills += 1
            saved = _check_everything_loads(home)
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert kills == 12 and saved > 0
    with mlwarehouse.connect(home=home) as wh:  # what the kills left behind is only unreferenced blobs
        assert wh.gc(grace_seconds=0).referenced > 0
    assert _check_everything_loads(home) == saved
