"""A fit run as a task: its worker is SIGKILLed in the middle of an epoch, another worker takes the task over when
the lease expires, resumes from the last checkpoint, and the fit ends with every epoch logged exactly once.

Both workers are fresh interpreters (``mlw worker``-like scripts), the model is an importable class the task names,
and the loss sleeps a little per batch so an epoch takes long enough to be killed inside.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import alive, wait_for

import mlwarehouse

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

EPOCHS = 6
LEASE = 2.0

MODELS = textwrap.dedent("""
    import time

    import torch


    class MLP(torch.nn.Module):
        def __init__(self, inputs=64, hidden=32, classes=10):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
                                              torch.nn.Linear(hidden, classes))

        def forward(self, x):
            return self.layers(x)


    def slow_cross_entropy(out, y):
        time.sleep(0.01)  # about 0.25 s per epoch of 23 batches
        return torch.nn.functional.cross_entropy(out, y)
""")

WORKER = textwrap.dedent("""
    import sys
    import mlwarehouse
    from mlwarehouse.tasks.worker import Worker
    Worker(mlwarehouse.connect().project("fits"), "mlw.fit", lease_seconds=float(sys.argv[1]), poll_interval=0.05,
           heartbeat_seconds=0.3).run()
""")


def _worker(env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(LEASE)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_killed_fit_task_resumes_on_another_worker(tmp_path, subprocess_env, monkeypatch):
    from sklearn.datasets import load_digits
    (tmp_path / "fitmodels.py").write_text(MODELS)
    env = {**subprocess_env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{subprocess_env['PYTHONPATH']}",
           "MLW_TRUSTED_MODULES": "fitmodels"}
    X, y = load_digits(return_X_y=True)
    wh = mlwarehouse.connect(home=tmp_path / "wh", project="fits")
    try:
        digits = wh.collection("digits")
        digits.insert_many({"image": (X[i] / 16).astype(np.float32), "label": int(y[i])} for i in range(len(y)))
        task = wh.training.submit("fitmodels:MLP", digits, inputs="image", target="label", epochs=EPOCHS,
                                  batch_size=64, lr=3e-3, loss="fitmodels:slow_cross_entropy", metrics=["accuracy"],
                                  name="mlp", max_attempts=3)
        first = _worker(env)
        try:
            # kill it inside the third epoch: two epochs are committed, the third is half done
            wait_for(lambda: (wh.training.find("mlp") or [None])[0] is not None
                     and wh.training.find("mlp")[0].epochs_done >= 2, timeout=60)
            time.sleep(0.12)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
        killed_at = wh.training.find("mlp")[0].epochs_done
        assert killed_at < EPOCHS
        second = _worker(env)
        try:
            wait_for(lambda: wh.tasks.get(task.id).status in ("finished", "failed"), timeout=90)
        finally:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(20)
        done = wh.tasks.get(task.id)
        assert done.status == "finished", done.error
        assert done.attempts == 2
        fit = wh.training.get(done.result["fit"])
        assert fit.status == "complete" and fit.epochs_done == EPOCHS and len(fit.runs) == 2
        assert fit.key == f"task:{task.id}" and fit.model.id == done.result["model"]
        for kind in ("train", "valid"):
            epochs = [p["epoch"] for run in fit.runs for p in wh.runs.get(run).history(kind)]
            assert sorted(epochs) == list(range(EPOCHS)), (kind, epochs)
        # the resumed attempt started at the last committed epoch, in the second run
        second_run = [p["epoch"] for p in wh.runs.get(fit.runs[1]).history("valid")]
        assert second_run[0] >= 2 and second_run == list(range(second_run[0], EPOCHS))
        assert [h["epoch"] for h in fit.history] == list(range(EPOCHS))
        assert fit.model.valid["accuracy"] > 0.8
        assert not alive(first.pid)
        # the same fit in this process, never killed, ends with the same weights: resuming restored the
        # checkpoint, the optimizer's state and the shuffle of every later epoch exactly
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("MLW_TRUSTED_MODULES", "fitmodels")
        whole = wh.training.fit("fitmodels:MLP", digits, inputs="image", target="label", epochs=EPOCHS,
                                batch_size=64, lr=3e-3, loss="fitmodels:slow_cross_entropy", metrics=["accuracy"],
                                name="mlp-whole")
        assert whole.train_ids() == fit.train_ids()
        resumed, straight = fit.model.load().state_dict(), whole.model.load().state_dict()
        for name in straight:
            assert torch.allclose(resumed[name], straight[name], atol=1e-6), name
        assert whole.model.valid["accuracy"] == pytest.approx(fit.model.valid["accuracy"])
    finally:
        wh.close()
