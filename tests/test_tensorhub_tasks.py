"""The TensorHub tutorial (dispatch tasks, task script, run tasks) with only the import line changed."""

from __future__ import annotations

import textwrap
import threading
import time

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


# The tutorial's three scripts (examples/database/{dispatch_tasks,task_script,run_tasks}.py) with only the import
# and the connection line changed, and the TensorFlow network replaced by a dict of arrays.
TUTORIAL_TASK = textwrap.dedent("""
    import numpy as np
    from mlwarehouse import TensorHub

    db = TensorHub(project_name='tutorial')
    X_train, y_train, X_val, y_val, X_test, y_test = db.find_top_dataset('mnist')
    print("training", n_units1, n_units2)
    for epoch in range(2):
        db.save_training_log(epoch=epoch, loss=1.0 / (epoch + n_units1))
    test_accuracy = float(n_units1 + n_units2) / 2000 + float(X_test.sum()) * 0
    net_train = {"relu1": np.zeros((4, n_units1), np.float32), "relu2": np.zeros((n_units1, n_units2), np.float32)}
    db.save_model(net_train, model_name='mlp', name=str(n_units1) + '-' + str(n_units2), test_accuracy=test_accuracy)
""")


def _runner(failures: list) -> None:
    """run_tasks.py: monitor the database and pull tasks to run (until the distributor's tasks are done)."""
    db = TensorHub(project_name="tutorial")
    try:
        while db.check_unfinished_task(task_name="mnist"):
            if not db.run_top_task(task_name="mnist", sort=[("time", -1)]):
                time.sleep(0.05)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        failures.append(exc)
    finally:
        db.close()


@pytest.mark.slow
def test_the_tutorial_with_two_runners_and_fields_named_like_ours(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    monkeypatch.delenv("MLW_URI", raising=False)
    monkeypatch.delenv("MLW_BLOBS", raising=False)
    (tmp_path / "task_script.py").write_text(TUTORIAL_TASK)
    monkeypatch.chdir(tmp_path)

    # dispatch_tasks.py
    db = TensorHub(project_name="tutorial")
    db.delete_tasks()
    db.delete_model()
    db.delete_datasets()
    data = [np.zeros((4, 2), np.float32), np.zeros(4)] * 3
    db.save_dataset(tuple(data), 'mnist', description='handwriting digit')
    for n in (800, 600, 400):
        db.create_task(task_name='mnist', script='task_script.py', hyper_parameters=dict(n_units1=n, n_units2=n),
                       saved_result_keys=['test_accuracy'], description=f'{n}-{n}', name=f'task {n}')
    failures: list = []
    runners = [threading.Thread(target=_runner, args=(failures,)) for _ in range(2)]
    for runner in runners:
        runner.start()
    deadline = time.monotonic() + 120
    while db.check_unfinished_task(task_name='mnist'):
        assert time.monotonic() < deadline, "the runners did not finish the tasks"
        time.sleep(0.1)
    for runner in runners:
        runner.join(timeout=60)
    assert failures == []
    sess = None
    net = db.find_top_model(sess=sess, model_name='mlp', sort=[("test_accuracy", -1)])
    print("the best accuracy {} is from model {}".format(net._test_accuracy, net._name))

    assert (net._test_accuracy, net._name, net["relu1"].shape) == (0.8, "800-800", (4, 800))
    out = capsys.readouterr().out
    assert all(f"training {n} {n}" in out for n in (800, 600, 400)) and "is from model 800-800" in out
    tasks = db.project.tasks.find(task_name="mnist", sort=[("time", 1)])
    assert [t.status for t in tasks] == ["finished"] * 3 and [t.attempts for t in tasks] == [1, 1, 1]
    assert [t.description for t in tasks] == ["800-800", "600-600", "400-400"]
    assert [t["name"] for t in tasks] == ["task 800", "task 600", "task 400"]  # tasks have no name of ours
    assert db.check_unfinished_task(task_name='mnist', name='task 800') is False
    assert [m._name for m in (db.find_top_model(model_name='mlp', name=f'{n}-{n}') for n in (400, 600))] == \
        ["400-400", "600-600"]
    for task in tasks:  # each task's logs belong to its run, which shows in `mlw runs`
        run = db.project.runs.get(task.run)
        assert run.status == "complete" and run.summary["train"]["loss"]["count"] == 2
    assert len(db.find_training_logs()) == 6 and len(db.find_training_logs(epoch=1)) == 3
    assert db.delete_model(model_name='mlp', name='400-400') == 1
    assert db.delete_tasks(task_name='mnist', name='task 400') == 1
    db.close()
