"""The TensorHub tutorial (dispatch tasks, task script, run tasks) with only the import line changed."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from mlwarehouse import TensorHub

TASK_SCRIPT = textwrap.dedent("""
    import mlwarehouse
    db = mlwarehouse.TensorHub(project_name="tutorial")
    X, y = db.find_top_dataset("mnist")
    # n_units1 and n_units2 are free variables: the task's hyper-parameters
    test_accuracy = float(n_units1 + n_units2) / 2000 + float(X.sum()) * 0
    db.save_model({"W": np.zeros((n_units1, 2))}, model_name="mlp", test_accuracy=test_accuracy)
    print("trained", n_units1, n_units2)
""").replace("import mlwarehouse", "import mlwarehouse\nimport numpy as np")


@pytest.mark.slow
def test_tutorial_flow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    script = tmp_path / "task_script.py"
    script.write_text(TASK_SCRIPT)
    db = TensorHub(project_name="tutorial")
    db.save_dataset((np.zeros((4, 2)), np.zeros(4)), "mnist", description="handwriting digit")
    for n in (800, 600, 400):
        db.create_task(task_name="mnist", script=str(script), hyper_parameters=dict(n_units1=n, n_units2=n),
                       saved_result_keys=["test_accuracy"], description=f"{n}-{n}")
    db.create_task(task_name="other", script=str(script), hyper_parameters=dict(n_units1=1, n_units2=1),
                   saved_result_keys=["test_accuracy"])
    assert db.check_unfinished_task(task_name="mnist")

    ran = 0
    while db.run_top_task(task_name="mnist", sort=[("time", -1)]):
        ran += 1
    assert ran == 3
    assert not db.check_unfinished_task(task_name="mnist")
    assert db.check_unfinished_task(task_name="other")  # the original's runners stole this one

    tasks = db.project.tasks.find(task_name="mnist", sort=[("time", 1)])
    assert [t.status for t in tasks] == ["finished"] * 3
    assert [t.result["test_accuracy"] for t in tasks] == [0.8, 0.6, 0.4]
    assert [t.description for t in tasks] == ["800-800", "600-600", "400-400"]
    best = db.find_top_model(sort=[("test_accuracy", -1)], model_name="mlp")
    assert best._test_accuracy == 0.8 and best["W"].shape == (800, 2)
    assert best._run == tasks[0].run  # lineage: task -> run -> model
    assert db.delete_tasks(task_name="mnist") == 3
    assert db.delete_tasks() == 1
    db.close()
