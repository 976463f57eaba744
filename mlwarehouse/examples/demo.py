"""The end-to-end demo (``mlw demo``): the whole loop on the embedded warehouse, offline, in about a minute.

It stores scikit-learn's digits as a dataset, dispatches a sweep of PyTorch MLPs as tasks, starts two worker
processes, waits with a progress display, prints a leaderboard, loads the best model back (in this process, which
never defined it) and evaluates it, then says where to look next.

A re-run first removes what an earlier demo run created, and only that: the ``digits`` dataset, the tasks named
``digits-mlp``, their runs, those runs' logs and models (checkpoints included). Anything else in the project (an item
dataset imported into it, other runs, user documents) is kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from mlwarehouse import schema

PROJECT = "digits-demo"
SCRIPT = Path(__file__).with_name("digits_mlp.py")
DATASET, TASK_NAME = "digits", "digits-mlp"


def load_digits_splits(seed: int = 0):
    """scikit-learn's digits (1,797 8x8 images, shipped with the package) split 60/20/20, scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(X))
    X, y = X[order], y[order]
    a, b = int(0.6 * len(X)), int(0.8 * len(X))
    return X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:]


def clear_earlier_demo(p) -> int:
    """Delete what an earlier demo run created in project ``p`` (see the module's docstring); how many documents."""
    task_ids = [doc["_id"] for doc in p.find(schema.TASKS.name, {"task_name": TASK_NAME})]
    run_ids = [doc["_id"] for doc in p.find(schema.RUNS.name, {"task": {"$in": task_ids}})] if task_ids else []
    removed = len(p.delete(schema.TASKS.name, {"_id": {"$in": task_ids}})) if task_ids else 0
    if run_ids:
        removed += len(p.delete(schema.MODELS.name, {"run": {"$in": run_ids}}))  # final models and checkpoints
        removed += len(p.delete(schema.LOGS.name, {"run": {"$in": run_ids}}))
        removed += len(p.delete(schema.RUNS.name, {"_id": {"$in": run_ids}}))
    return removed + len(p.delete(schema.DATASETS.name, {"name": DATASET, "kind": {"$ne": "items"}}))


def run_demo(home: str | None = None, workers: int = 2, epochs: int = 15, *,
             n_hidden: tuple[int, ...] = (16, 64, 128), lr: tuple[float, ...] = (0.003, 0.01)) -> dict:
    """Run the demo; ``n_hidden`` and ``lr`` are the sweep's grid (6 tasks by default)."""
    from mlwarehouse.warehouse import connect
    console = Console(soft_wrap=True)
    wh = connect(home=home, project=PROJECT)
    p = wh.project(PROJECT)
    where = wh.settings.index_uri
    console.rule("[bold]mlwarehouse demo")
    console.print(f"warehouse: {where}  (project [cyan]{PROJECT}[/cyan])")
    removed = clear_earlier_demo(p)
    if removed:
        console.print(f"cleared {removed} documents left by an earlier demo run")

    splits = load_digits_splits()
    record = p.datasets.save(splits, name=DATASET, description="scikit-learn digits, 60/20/20 split",
                             tags=["images", "8x8"], source="sklearn.datasets.load_digits")
    console.print(f"1. saved dataset [cyan]digits[/cyan] v{record.version}: "
                  f"{len(splits[0])} train / {len(splits[2])} valid / {len(splits[4])} test items")

    grid = {"n_hidden": list(n_hidden), "lr": list(lr), "epochs": [epochs], "seed": [0]}
    tasks = p.tasks.sweep(task_name=TASK_NAME, script=str(SCRIPT), grid=grid, saved_result_keys=["test_accuracy"],
                          timeout=300)
    console.print(f"2. dispatched a sweep of {len(tasks)} tasks (grid over n_hidden x lr)")

    env = {**os.environ, "MLW_PROJECT": PROJECT, "MLW_URI": wh.settings.index_uri, "MLW_BLOBS": wh.settings.blobs_uri}
    procs = [subprocess.Popen([sys.executable, "-m", "mlwarehouse.cli", "worker", "--task-name", TASK_NAME,
                               "--once", "--project", PROJECT], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(workers)]
    console.print(f"3. started {workers} worker processes; waiting for the tasks")
    started = time.perf_counter()
    try:
        done = p.tasks.wait([t.id for t in tasks], progress=True, timeout=600)
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.terminate()
    elapsed = time.perf_counter() - started
    failed = [t for t in done if t.status != "finished"]
    console.print(f"   {len(done) - len(failed)} finished, {len(failed)} failed in {elapsed:.1f} s")
    for task in failed:
        console.print(f"[red]task {task.id} {task.status}:[/red] {str(task.get('error'))[-500:]}")

    board = p.models.find(name=TASK_NAME, sort=[("test_accuracy", -1)])
    table = Table(title="4. leaderboard: models by test accuracy")
    for column in ("rank", "model id", "n_hidden", "lr", "valid acc", "test acc", "run"):
        table.add_column(column)
    for rank, model in enumerate(board, 1):
        table.add_row(str(rank), model.id, str(model.n_hidden), str(model.lr), f"{model.valid_accuracy:.4f}",
                      f"{model.test_accuracy:.4f}", str(model.get("run")))
    console.print(table)

    best = p.models.best(metric="test_accuracy", name=TASK_NAME)
    net = best.load()
    import torch
    X_test, y_test = splits[4], splits[5]
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean())
    console.print(f"5. loaded the best model {best.id} back (architecture + weights, no pickle): "
                  f"test accuracy {accuracy:.4f} (stored {best.test_accuracy:.4f})")
    console.print("6. look further:")
    for line in (f"mlw models -p {PROJECT} --sort test_accuracy:-1",
                 f"mlw runs -p {PROJECT}", f"mlw tasks -p {PROJECT}",
                 f"mlw best test_accuracy -p {PROJECT}",
                 "mlw sql \"select run_id, kind, metric, max(value) from metrics group by 1, 2, 3\""):
        console.print(f"   [green]{line}[/green]")
    summary = {"tasks": len(done), "failed": len(failed), "best_model": best.id,
               "best_test_accuracy": best.test_accuracy, "reloaded_test_accuracy": accuracy,
               "seconds": round(elapsed, 1)}
    wh.close()
    return summary
