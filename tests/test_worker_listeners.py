"""``mlw worker`` computes listeners' outputs beside the script tasks; a script worker never claims listener tasks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse import schema
from mlwarehouse.errors import TaskError
from mlwarehouse.tasks.worker import Worker

torch = pytest.importorskip("torch")

MLW = Path(sys.executable).parent / "mlw"
N = 12


def mlw(home: Path, *args: str) -> subprocess.CompletedProcess:
    assert MLW.exists(), f"the mlw entry point is not installed next to {sys.executable} (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLW_")}
    env["MLW_HOME"] = str(home)
    return subprocess.run([str(MLW), *args], cwd=home.parent, env=env, capture_output=True, text=True, timeout=120)


def filled(wh, batch_size: int = 5):
    """A collection with a worker listener (a Linear layer) and N documents, nothing computed yet."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    c = wh.project("w").collection("points")
    c.insert_many([{"_id": f"d{i:02d}", "x": np.full(4, i, np.float32)} for i in range(N)])
    c.attach("lin", model, key="x", compute="workers", batch_size=batch_size)
    return c, model


def test_mlw_worker_once_computes_every_listener_output_beside_script_tasks(tmp_path):
    home = tmp_path / "wh"
    script = tmp_path / "double.py"
    script.write_text(textwrap.dedent("""
        doubled = value * 2
    """))
    with mlwarehouse.connect(home=home) as wh:
        c, model = filled(wh)
        assert c.progress("lin") == {"done": 0, "failed": 0, "skipped": 0, "pending": N}
        task = wh.project("w").tasks.create("double", script, hyper_parameters={"value": 21},
                                            saved_result_keys=["doubled"])
    proc = mlw(home, "worker", "--once", "-p", "w", "--lease", "10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with mlwarehouse.connect(home=home) as wh:
        c = wh.project("w").collection("points")
        assert c.progress("lin") == {"done": N, "failed": 0, "skipped": 0, "pending": 0}
        with torch.no_grad():
            for doc in c.find({}):
                expected = model(torch.from_numpy(np.array(doc["x"])))
                assert torch.allclose(doc["_outputs"]["x"]["lin"], expected)
        done = wh.project("w").tasks.find(schema.LISTENER_TASK)
        assert done and {t.status for t in done} == {"finished"}
        assert wh.project("w").tasks.get(task.id).result == {"doubled": 42}


def test_mlw_worker_no_listeners_leaves_listener_work_pending(tmp_path):
    home = tmp_path / "wh"
    with mlwarehouse.connect(home=home) as wh:
        filled(wh)
    proc = mlw(home, "worker", "--once", "--no-listeners", "-p", "w")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with mlwarehouse.connect(home=home) as wh:
        assert wh.project("w").collection("points").progress("lin")["pending"] == N


def test_a_script_worker_of_any_task_name_leaves_listener_tasks_alone(wh):
    c, _ = filled(wh)
    p = wh.project("w")
    queued = p.tasks.find(schema.LISTENER_TASK, status="pending")
    assert len(queued) == -(-N // 5)
    assert Worker(p, None, once=True, verbose=False, lease_seconds=5).run() == 0
    assert Worker(p, None, once=True, verbose=False, lease_seconds=5, where={"priority": 1}).run() == 0
    assert Worker(p, None, verbose=False, lease_seconds=5).run_one() is None
    assert {t.status for t in p.tasks.find(schema.LISTENER_TASK)} == {"pending"}
    assert c.progress("lin")["pending"] == N
    with pytest.raises(TaskError, match="listener work"):
        Worker(p, schema.LISTENER_TASK)
