"""The three continuous loops as separate processes on one embedded warehouse, each SIGKILLed at random moments
and restarted while new data arrives: no save is half-written or made twice, no model is lost by the evaluator or
evaluated twice, the champion is the best model of all, and the deployer serves it."""

import json
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_for

RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 3))
BIN = Path(sys.executable).parent


def _points(n: int, seed: int):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 4)).astype(np.float32)
    return x, (x @ W).argmax(axis=1)


class _Loop:
    """One loop's process, started again after each kill."""

    def __init__(self, name: str, argv: list[str], env: dict, logs: Path):
        self.name, self.argv, self.env = name, argv, env
        self.log = logs / f"{name}.log"  # a file, not a pipe: a chatty loop never blocks on a full pipe
        self.proc: subprocess.Popen | None = None
        self.kills = 0
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=log)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1
        self.start()

    def stop(self) -> str:
        """SIGTERM: the current step finishes, then the process exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        assert code == 0, f"{self.name} exited {code}: {self.log.read_text()[-3000:]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _version(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=2) as answer:
            return json.loads(answer.read())
    except OSError:
        return None


@pytest.mark.slow
def test_the_three_loops_killed_at_random_and_restarted_lose_nothing(wh, subprocess_env, tmp_path):
    pts = wh.collection("pts")
    x, y = _points(96, 1)
    pts.insert_many({"x": x[i], "y": int(y[i])} for i in range(len(y)))
    wh.datasets.save(_points(500, 2), "test-set")
    torch.manual_seed(0)
    start = wh.models.save(torch.nn.Sequential(torch.nn.Linear(4, 3)), "init").id
    port = _free_port()
    trainer = _Loop("trainer", [str(BIN / "mlw"), "train", "--model", start, "--collection", "pts", "--inputs", "x",
                                "--target", "y", "--name", "mlp", "--batch-size", "16", "--save-every", "4",
                                "--min-new", "0", "--lr", "0.05", "--poll", "0.05"], subprocess_env, tmp_path)
    evaluator = _Loop("evaluator", [str(BIN / "mlw"), "evaluate", "--models", '{"name": "mlp"}', "--dataset",
                                    "test-set", "--metric", "accuracy", "--alias", "champion", "--poll", "0.05"],
                      subprocess_env, tmp_path)
    loops = [trainer, evaluator]
    try:
        _exercise(wh, loops, trainer, evaluator, port, subprocess_env, tmp_path)
    finally:  # a failed assertion leaves no loop running
        for loop in loops:
            if loop.proc.poll() is None:
                loop.proc.kill()
                loop.proc.wait(10)


def _exercise(wh, loops, trainer, evaluator, port, subprocess_env, tmp_path):
    pts = wh.collection("pts")
    wait_for(lambda: wh.models.aliases.resolve("mlp", "champion") is not None, 60)
    deployer = _Loop("deployer", [str(BIN / "mlw"), "serve", "mlp@champion", "--port", str(port), "--poll", "0.05"],
                     subprocess_env, tmp_path)
    loops.append(deployer)
    rnd = random.Random(3)
    deadline = time.monotonic() + 14
    batch = 3
    while time.monotonic() < deadline:  # new data keeps arriving; one loop is killed at a random moment
        time.sleep(rnd.uniform(0.4, 1.2))
        x, y = _points(24, batch)
        pts.insert_many({"x": x[i], "y": int(y[i])} for i in range(len(y)))
        batch += 1
        rnd.choice(loops).kill()
    trainer.stop()
    saves = wh.models.find("mlp")
    evaluations = wh.models.evaluations
    wait_for(lambda: all(evaluations.find(m, metric="accuracy") for m in saves), 60)
    time.sleep(0.5)  # the promotion that follows the last evaluation
    evaluator.stop()

    # the trainer: every save whole and made once, steps rising with time, the newest documents trained on
    steps = [m.doc["step"] for m in sorted(saves, key=lambda m: m.doc["time"])]
    assert len(set(steps)) == len(steps) and steps == sorted(steps), steps
    assert all(isinstance(m.load(), torch.nn.Module) for m in saves)
    assert max(m.doc["trainer"]["documents"] for m in saves) > 96
    # the evaluator: each model evaluated once, by one complete run
    for m in saves:
        (evaluation,) = evaluations.find(m, metric="accuracy")
        assert wh.runs.get(evaluation.run).doc["status"] == "complete"
    done = [r for r in wh.runs.find(where={"evaluated": {"$exists": True}}) if r.doc["status"] == "complete"]
    assert sorted(r.doc["evaluated"] for r in done) == sorted(m.id for m in saves)
    # the gate: the champion is the best model, and its history only ever rose
    values = {m.id: evaluations.find(m, metric="accuracy")[0].value for m in saves}
    champion = wh.models.aliases.resolve("mlp", "champion")
    assert values[champion] == max(values.values())
    history = [c.doc["model"] for c in wh.models.aliases.history("mlp", "champion")]
    assert len(set(history)) == len(history)  # a redelivered promotion changes nothing
    held = [values[m] for m in history]
    assert held == sorted(held)  # margin 0: a tie may take over, a weaker model never
    # the deployer: restarted after its kills, it serves the champion
    wait_for(lambda: (_version(port) or {}).get("model") == champion, 30)
    deployer.stop()
    assert trainer.kills + evaluator.kills + deployer.kills >= 8
    assert min(loop.kills for loop in loops) >= 1
