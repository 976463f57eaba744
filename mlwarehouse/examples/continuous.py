"""The continuous demo (``mlw demo --continuous``): a trainer, an evaluator and a deployer as three processes on the
embedded warehouse while new data arrives, the champion improving and the server answering with each new one.

1. scikit-learn's digits: the test fifth is saved as the dataset ``digits-test``; the rest arrives as documents of
   the collection ``digits-stream``, a first 150 and then 40 more every half second until all are in.
2. ``mlw train`` keeps training one MLP on the collection, a round per 100 new documents, saving every 10 steps;
   ``mlw evaluate`` evaluates every save on ``digits-test`` and promotes the better ones to ``digits-mlp@champion``
   (a gain of 0.5 point at least); ``mlw serve digits-mlp@champion`` answers predictions over HTTP on 127.0.0.1.
3. This process feeds the data and asks the server about 32 test images every second, printing who the champion
   is (its step and accuracy) beside the model that answered and how many answers were right.

Each run goes in a project of its own (``continuous-1``, ``continuous-2``...), so runs never mix.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from rich.console import Console

from mlwarehouse.examples.demo import load_digits_splits

NAME, ALIAS = "digits-mlp", "champion"
COLLECTION, TEST_SET = "digits-stream", "digits-test"
FIRST, EVERY = 150, 0.5
#: how long past ``seconds`` the demo waits for a slow start (processes importing torch on a busy machine)
LATE = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, inputs: np.ndarray) -> dict | None:
    body = json.dumps({"inputs": inputs.tolist()}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.loads(answer.read())
    except OSError:  # not listening yet, or no champion yet
        return None


def _project_name(wh) -> str:
    taken = {name for name in wh.projects() if name.startswith("continuous-")}
    n = 1
    while f"continuous-{n}" in taken:
        n += 1
    return f"continuous-{n}"


def run_continuous_demo(home: str | None = None, seconds: float = 30.0, batch: int = 40) -> dict:
    """Run the demo for about ``seconds`` (at least until every document arrived); returns a summary."""
    import torch

    from mlwarehouse.warehouse import connect
    console = Console(soft_wrap=True)
    wh = connect(home=home)
    project = _project_name(wh)
    p = wh.project(project)
    console.rule("[bold]mlwarehouse continuous demo")
    console.print(f"warehouse: {wh.settings.index_uri}  (project [cyan]{project}[/cyan])")
    X_train, y_train, X_valid, y_valid, X_test, y_test = load_digits_splits()
    stream_x, stream_y = np.concatenate([X_train, X_valid]), np.concatenate([y_train, y_valid])
    p.datasets.save((X_test, y_test), TEST_SET, description="digits: the test fifth")
    stream = p.collection(COLLECTION)
    stream.insert_many({"image": stream_x[i], "label": int(stream_y[i])} for i in range(FIRST))
    torch.manual_seed(0)
    start = p.models.save(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)),
                          "digits-init", description="the untrained MLP the trainer starts from")
    console.print(f"1. saved {TEST_SET} ({len(y_test)} images) and the first {FIRST} of {len(stream_y)} "
                  f"documents of {COLLECTION}")

    port = _free_port()
    env = {**os.environ, "MLW_PROJECT": project, "MLW_URI": wh.settings.index_uri, "MLW_BLOBS": wh.settings.blobs_uri}
    mlw = [sys.executable, "-m", "mlwarehouse.cli"]
    commands = {
        "trainer": mlw + ["train", "--model", start.id, "--collection", COLLECTION, "--inputs", "image", "--target",
                          "label", "--name", NAME, "--batch-size", "32", "--save-every", "10", "--min-new", "100",
                          "--lr", "0.003", "--metric", "accuracy"],
        "evaluator": mlw + ["evaluate", "--models", json.dumps({"name": NAME}), "--dataset", TEST_SET, "--metric",
                            "accuracy", "--alias", ALIAS, "--margin", "0.005"],
        "deployer": mlw + ["serve", f"{NAME}@{ALIAS}", "--port", str(port), "--poll", "0.2"],
    }
    logs = Path(tempfile.mkdtemp(prefix="mlw-continuous-"))
    procs: dict[str, subprocess.Popen] = {}

    def launch(role: str) -> None:
        with open(logs / f"{role}.log", "wb") as log:
            procs[role] = subprocess.Popen(commands[role], env=env, stdout=subprocess.DEVNULL, stderr=log)

    launch("trainer")
    launch("evaluator")
    console.print(f"2. started the trainer and the evaluator; the deployer (http://127.0.0.1:{port}) starts with "
                  f"the first champion; their logs: {logs}")
    waited = time.monotonic()
    while not p.models.find(NAME, limit=1):  # processes take seconds to start (torch): stream once one trains
        if procs["trainer"].poll() is not None or time.monotonic() - waited > 180:
            raise RuntimeError(f"the trainer did not save a model; see {logs / 'trainer.log'}")
        time.sleep(0.2)
    console.print(f"   the trainer saved its first model after {time.monotonic() - waited:.1f} s; now the data "
                  f"streams in, {batch} documents every {EVERY} s")
    console.print("3.   time  documents  saves  champion (step, test accuracy)      server answer (right of 32)")
    sent, started, last_ask, asked = FIRST, time.monotonic(), 0.0, 0
    answers: list[tuple[str, int]] = []
    try:
        def going() -> bool:  # the time asked for, every document sent, and the server answering from the champion
            caught_up = bool(answers) and answers[-1][0] == p.models.aliases.resolve(NAME, ALIAS)
            late = time.monotonic() - started > seconds + LATE
            return not late and (time.monotonic() - started < seconds or sent < len(stream_y) or not caught_up)

        while going():
            time.sleep(EVERY)
            if sent < len(stream_y):
                stop = min(sent + batch, len(stream_y))
                stream.insert_many({"image": stream_x[i], "label": int(stream_y[i])} for i in range(sent, stop))
                sent = stop
            if time.monotonic() - last_ask < 1.0:
                continue
            last_ask = time.monotonic()
            for role, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"the {role} exited ({proc.returncode}); see {logs / (role + '.log')}")
            pick = np.random.default_rng(asked).choice(len(y_test), 32, replace=False)
            asked += 1
            answer = _post(port, X_test[pick])
            holder = p.models.aliases.resolve(NAME, ALIAS)
            if holder and "deployer" not in procs:
                launch("deployer")
            saves = len(p.models.find(NAME))
            champion = "-"
            if holder:
                record = p.models.get(holder)
                (value,) = [e.value for e in p.models.evaluations.find(record, metric="accuracy")][:1] or [None]
                champion = f"{holder[-8:]} (step {record.doc.get('step')}, {value:.3f})" if value else holder[-8:]
            said = "no champion yet"
            if answer is not None:
                right = int((np.asarray(answer["outputs"]).argmax(1) == y_test[pick]).sum())
                answers.append((answer["model"], right))
                said = f"{answer['model'][-8:]} {right}/32"
            console.print(f"   {time.monotonic() - started:5.1f}s {sent:10d} {saves:6d}  {champion:<34} {said}")
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    history = p.models.aliases.history(NAME, ALIAS)
    values = {}
    for change in history:
        found = p.models.evaluations.find(change.doc["model"], metric="accuracy")
        values[change.doc["model"]] = found[0].value if found else None
    console.print(f"4. the champion changed {len(history)} times: " + " -> ".join(
        f"{values[c.doc['model']]:.3f}" for c in history if values.get(c.doc["model"]) is not None))
    served = sorted({model for model, _ in answers})
    console.print(f"   the server answered {len(answers)} times, from {len(served)} different champions")
    console.print("5. look further:")
    holder = p.models.aliases.resolve(NAME, ALIAS)
    for line in (f"mlw models -p {project} --sort step:-1", f"mlw show {NAME}@{ALIAS} -p {project}",
                 *([f"mlw lineage {holder} -p {project}"] if holder else []), "mlw ui"):
        console.print(f"   [green]{line}[/green]")
    summary = {"project": project, "documents": sent, "models": len(p.models.find(NAME)),
               "champions": len(history), "accuracies": [values[c.doc["model"]] for c in history],
               "answers": len(answers), "served": len(served)}
    wh.close()
    return summary
