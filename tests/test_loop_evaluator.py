"""The evaluator loop: evaluations recorded once per model and metric, the promotion gate applied in order, and a
process SIGKILLed at random moments and restarted that loses no event and evaluates no model twice."""

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_for

from mlwarehouse.loops.evaluator import evaluate_forever

torch.manual_seed(0)
RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 2)).astype(np.float32)


def _classifier(sign: float, noise: float, seed: int) -> torch.nn.Linear:
    """A linear classifier: the true weights (``sign`` -1: reversed, always wrong) plus noise."""
    g = np.random.default_rng(seed)
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy((sign * W + noise * g.normal(size=W.shape)).T.astype(np.float32)))
    return layer


def _test_set(wh):
    x = RNG.normal(size=(400, 4)).astype(np.float32)
    y = (x @ W).argmax(axis=1).astype(np.int64)
    return wh.datasets.save((x, y), "test-set")


def test_evaluates_each_model_and_promotes_through_the_gate(wh):
    data = _test_set(wh)
    saved = [wh.models.save(_classifier(sign, noise, 1), "mlp") for sign, noise in ((-1, 0), (1, 0), (1, 1))]
    counts = evaluate_forever(wh, models={"name": "mlp"}, data="test-set", metrics=["accuracy"],
                              gate=("accuracy", 0.02, "max"), max_models=3, poll=0.05)
    assert counts["evaluated"] == 3 and counts["failed"] == 0
    values = [wh.models.evaluations.get(m, data, "accuracy").value for m in saved]
    assert values[1] > values[0] + 0.02 and values[2] < values[1]
    assert wh.models.aliases.resolve("mlp", "champion") == saved[1].id
    assert [c.doc["model"] for c in wh.models.aliases.history("mlp", "champion")] == [saved[0].id, saved[1].id]
    assert counts["promoted"] == 2 and counts["refused"] == 1
    for model in saved:  # one run per evaluated model, named by its evaluation
        (evaluation,) = wh.models.evaluations.find(model, data, "accuracy")
        assert wh.runs.get(evaluation.run).doc["status"] == "complete"

    # a weaker later model is refused; a restart of the consumer re-evaluates nothing
    weak = wh.models.save(_classifier(1, 2.0, 9), "mlp")
    wh.models.save(_classifier(1, 0, 0), "other")  # not matching the filter
    counts = evaluate_forever(wh, data=data, metrics=["accuracy"], alias="champion",
                              gate=("accuracy", 0.02, "max"), max_models=1, poll=0.05)
    assert counts == {"evaluated": 1, "skipped": 0, "failed": 0, "promoted": 0, "refused": 1}
    assert wh.models.aliases.resolve("mlp", "champion") == saved[1].id
    assert len(wh.models.evaluations.find(weak)) == 1
    assert len(wh.models.evaluations.find(data=data, metric="accuracy")) == 4


def test_a_stop_event_ends_an_idle_loop(wh):
    _test_set(wh)
    stop = threading.Event()
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(evaluate_forever(wh, data="test-set", alias=None,
                                                                         stop=stop, poll=0.05)))
    worker.start()
    time.sleep(0.3)
    stop.set()
    worker.join(5)
    assert not worker.is_alive() and out["evaluated"] == 0


def test_mlw_evaluate_runs_the_loop_through_the_installed_command(wh, tmp_path, subprocess_env):
    import shutil
    data = _test_set(wh)
    saved = [wh.models.save(_classifier(sign, 0, 1), "mlp") for sign in (-1, 1)]
    mlw = shutil.which("mlw", path=str(Path(sys.executable).parent))
    usage = subprocess.run([mlw, "evaluate"], env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "mlw evaluate: error: give one of --dataset and --collection" in usage.stderr
    proc = subprocess.run([mlw, "evaluate", "--dataset", "test-set", "--metric", "accuracy", "--alias", "champion",
                           "--max-models", "2", "--poll", "0.05"], env=subprocess_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert wh.models.aliases.resolve("mlp", "champion") == saved[1].id
    assert all(len(wh.models.evaluations.find(m, data, "accuracy")) == 1 for m in saved)


SAVER = """
import sys, time
import numpy as np, torch
import mlwarehouse
wh = mlwarehouse.connect()
w = np.array([[1.0], [-2.0], [0.5], [3.0]], dtype=np.float32)
for i in range(int(sys.argv[1])):
    g = np.random.default_rng(i)
    layer = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy((w + g.uniform(0.05, 1.5) * g.normal(size=w.shape)).T.astype(np.float32)))
    wh.models.save(layer, "mlp", index=i)
    time.sleep(0.3)
"""

MODELS = 12
MARGIN = 0.05


def _evaluator(env):
    return subprocess.Popen([sys.executable, "-m", "mlwarehouse.loops.evaluator", "--models", '{"name": "mlp"}',
                             "--dataset", "test-set", "--metric", "mse", "--metric", "mae", "--margin", str(MARGIN),
                             "--alias", "champion", "--poll", "0.05",
                             "--batch-size", "4"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.slow
def test_an_evaluator_killed_at_random_and_restarted_loses_nothing(wh, subprocess_env):
    x = RNG.normal(size=(3000, 4)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype=np.float32)
    data = wh.datasets.save((x, y), "test-set")
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(MODELS)], env=subprocess_env)
    done = lambda: len(wh.models.evaluations.find(data=data))  # noqa: E731
    rnd = random.Random(1)
    try:
        for _ in range(3):  # kill it once it has evaluated something new, at a random moment after
            evaluator = _evaluator(subprocess_env)
            before = done()
            wait_for(lambda: done() > before or done() == 2 * MODELS or evaluator.poll() is not None, 20)
            assert evaluator.poll() is None, evaluator.stderr.read().decode()
            time.sleep(rnd.uniform(0, 0.08))  # mid-model, as a backlog is worked through
            evaluator.send_signal(signal.SIGKILL)
            evaluator.wait(10)
        evaluator = _evaluator(subprocess_env)
        assert saver.wait(30) == 0
        wait_for(lambda: done() == 2 * MODELS, 20)
        time.sleep(0.3)  # the last promotion, after the last evaluation
        evaluator.send_signal(signal.SIGTERM)  # finishes the current model, then exits cleanly
        assert evaluator.wait(10) == 0
    finally:
        for proc in (saver, evaluator):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    models = sorted(wh.models.find("mlp"), key=lambda m: m.id)  # the saver's order: the watch's order
    assert [m.doc["index"] for m in models] == list(range(MODELS))
    mse = {}
    for model in models:
        found = wh.models.evaluations.find(model, data)
        assert sorted(e.metric for e in found) == ["mae", "mse"]  # none missing, none twice
        mse[model.id] = next(e.value for e in found if e.metric == "mse")
    # the alias history is the gate applied to every model in order: each promotion beat its holder by the margin
    expected, holder = [], None
    for model in models:
        if holder is None or mse[holder] - mse[model.id] >= MARGIN:
            holder = model.id
            expected.append(holder)
    history = [c.doc["model"] for c in wh.models.aliases.history("mlp", "champion")]
    assert history == expected and len(history) >= 2
    for previous, change in zip(history, history[1:]):
        assert mse[previous] - mse[change] >= MARGIN
