"""TensorDB compatibility: the original (1.4-1.9) method names and return values, with its bugs fixed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime

import numpy as np
import pytest

from mlwarehouse import InvalidDocument, NotFound, PickleNotAllowed, QueryError, TaskError, Unavailable
from mlwarehouse.compat.tensordb import JOB_TASK, PUSHED_JOB_TASK, DBLogger, TensorDB
from mlwarehouse.testing.mongo_server import fresh_uri, mongo_server  # noqa: F401  (session fixture)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLW_HOME", str(tmp_path / "wh"))
    return tmp_path


@pytest.fixture
def db(home):
    tdb = TensorDB(studyID="mnistMLP")
    yield tdb
    tdb.close()


def _blobs(db) -> int:
    return len(list(db.warehouse.blobs.list()))


def _script(tmp_path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


# -- params --------------------------------------------------------------------------------------------------
def test_params_methods(db):
    args = {"epoch": 0, "acc": 0.5}
    f0 = db.save_params([np.zeros((2, 2)), np.arange(3)], args)
    assert isinstance(f0, str) and args == {"epoch": 0, "acc": 0.5}  # the original added studyID, f_id, time, _id
    f1 = db.save_params([np.ones((2, 2)), np.arange(3) + 1], {"epoch": 1, "acc": 0.7, "name": "mlp", "run": "r"})
    f2 = db.save_params({"W": np.full(2, 2.0)}, {"epoch": 2, "acc": 0.6})
    params, fid = db.find_one_params()
    assert fid == f2 and np.array_equal(params["W"], [2.0, 2.0])  # newest, not the natural order's oldest
    params, fid = db.find_one_params({"acc": {"$gt": 0.55}}, sort=[("acc", -1)])
    assert fid == f1 and isinstance(params, list) and np.array_equal(params[1], [1, 2, 3])
    assert db.find_one_params({"name": "mlp", "run": "r"})[1] == f1  # fields named like ours, stored as given
    assert db.find_one_params({"f_id": f0})[1] == f0
    assert db.find_one_params({"epoch": 9}) == (False, False)
    everything = db.find_all_params()
    assert len(everything) == 3 and np.array_equal(everything[0][0], np.zeros((2, 2)))  # in the order saved
    assert [len(p) for p in db.find_all_params({"epoch": {"$lt": 2}})] == [2, 2]
    assert db.find_all_params({"epoch": 9}) == []
    record = db.project.models.get(f1)
    assert (record.name, record.epoch, record.th_name, record.th_run) == ("params", 1, "mlp", "r")
    before = _blobs(db)
    assert db.del_params({"epoch": 0}) == 1 and _blobs(db) < before  # the original's del_params kept its blobs
    assert db.del_params() == 2 and _blobs(db) == 0
    assert db.find_one_params() == (False, False)


def test_empty_params_and_bad_input_raise_typed_errors(db):
    fid = db.save_params()
    assert db.find_one_params() == ([], fid)
    with pytest.raises(PickleNotAllowed):
        db.save_params([object()])  # the original pickled anything
    with pytest.raises(InvalidDocument, match="args must be a dict"):
        db.save_params([np.zeros(1)], "epoch 1")
    with pytest.raises(QueryError, match="args must be a dict"):
        db.find_one_params([("epoch", 1)])
    with pytest.raises(InvalidDocument, match="field names are strings"):
        db.train_log({1: 0.5})
    with pytest.raises(InvalidDocument, match="naive datetime"):
        db.train_log({"started": datetime(2020, 1, 1)})
    db.train_log({"loss": 0.5, "time": datetime(2020, 1, 1)})  # the original's DBLogger set a naive time: stamped


def test_the_study_scopes_everything(home):
    a, b, c = TensorDB(studyID="a"), TensorDB(studyID="b"), TensorDB()
    try:
        assert len(c.studyID) == 36 and c.studyID.count("-") == 4  # a uuid, as the original's default
        fid = a.save_params([np.zeros(1)], {"studyID": "b"})  # the original overwrote a given studyID too
        assert b.find_one_params() == (False, False) and c.find_one_params() == (False, False)
        assert a.find_one_params({"studyID": "b"})[1] == fid
        assert b.del_params() == 0 and a.find_one_params()[1] == fid
        a.train_log({"loss": 1.0})
        assert b.find_train_logs() == [] and a.find_train_logs()[0]["studyID"] == "a"
    finally:
        a.close(), b.close(), c.close()


# -- logs ----------------------------------------------------------------------------------------------------
def test_log_methods(db):
    result = db.train_log({"loss": 0.9, "acc": np.float32(0.25), "kind": "batch", "time": 0})
    assert isinstance(result, str) and result.inserted_id == result and result.acknowledged
    db.train_log({"loss": 0.5, "step": 2})
    db.valid_log({"acc": 0.5, "epoch": 0})
    db.test_log({"acc": 0.6})
    train = db.find_train_logs()
    assert [d["loss"] for d in train] == [0.9, 0.5] and train[0]["_id"] == result
    assert train[0]["kind"] == "batch" and isinstance(train[0]["time"], str)  # a user's kind; time is stamped
    assert [d["loss"] for d in db.find_train_logs({"loss": {"$lt": 0.6}})] == [0.5]
    assert [d["loss"] for d in db.find_train_logs(sort=[("loss", 1)])] == [0.5, 0.9]
    (run,) = db.project.runs.find(where={"tags": "tensorhub"})  # one run per process and study, as TensorHub's
    assert {d["run"] for d in db.project.runs.find_logs()} == {run.id}
    assert db.find_valid_logs()[0]["epoch"] == 0 and len(db.find_test_logs({"acc": 0.6})) == 1
    assert db.del_train_log({"kind": "batch"}) == 1 and len(db.find_train_logs()) == 1
    assert db.del_train_log() == 1 and db.del_valid_log() == 1 and db.del_test_log() == 1
    assert db.find_train_logs() == [] and db.find_valid_logs() == [] and db.find_test_logs() == []


def test_logs_inside_a_users_run_belong_to_it(db):
    with db.project.runs.start("mine") as run:
        db.train_log({"loss": 0.5})
        fid = db.save_params([np.zeros(1)])
    assert [d["run"] for d in db.find_train_logs()] == [run.id]
    assert db.project.models.get(fid).run == run.id  # params link to the run they came from


# -- architectures -------------------------------------------------------------------------------------------
def test_architecture_methods(db):
    source = "network = build(" + "64, " * 5000 + ")\n"
    fid = db.save_model_architecture(source, {"name": "mlp", "version": 1})
    bid = db.save_model_architecture((source + "# v2").encode(), {"name": "mlp", "version": 2})
    assert db.load_model_architecture({"name": "mlp"}) == ((source + "# v2").encode(), bid)  # newest
    assert db.load_model_architecture({"version": 1}) == (source, fid)
    assert db.load_model_architecture({"fid": fid})[1] == fid
    assert db.load_model_architecture({"name": "cnn"}) == (False, False)
    assert db.find_one_params() == (False, False)  # architectures are not params
    with pytest.raises(InvalidDocument, match="str or bytes"):
        db.save_model_architecture(12)
    before = _blobs(db)
    assert db.del_model_architecture({"version": 1}) == 1 and _blobs(db) < before
    assert db.del_model_architecture() == 1 and db.load_model_architecture() == (False, False)


# -- pushed jobs ---------------------------------------------------------------------------------------------
def test_push_peek_run_and_del_job(db, home):
    db.save_model_architecture("net = mlp()", {"name": "mlp"})
    wid = db.save_params([np.full(3, 7.0)], {"epoch": 4})
    assert db.peek_job() is False
    jid = db.push_job({"name": "mlp"}, {"epoch": 4}, {"type": "mnist", "split": "train"}, 10)
    other = db.push_job({"name": "mlp"}, {"f_id": wid}, {"type": "mnist"}, 2)
    peeked, arch, params, dargs, epoch = db.peek_job()
    assert (peeked, arch, dargs, epoch) == (jid, "net = mlp()", {"type": "mnist", "split": "train"}, 10)
    assert np.array_equal(params[0], [7.0, 7.0, 7.0])
    assert db.peek_job()[0] == jid  # peeking takes nothing
    rival = TensorDB(studyID="mnistMLP")
    try:
        assert db.run_job(jid) is True
        assert rival.run_job(jid) is False  # the original let both processes that peeked it run it
        assert rival.peek_job()[0] == other
        assert db.project.tasks.get(jid).status == "running"
        assert rival.del_job(other) is True  # not held by rival: cancelled, out of the queue
        assert rival.peek_job() is False
    finally:
        rival.close()
    assert db.del_job(jid) is True
    task = db.project.tasks.get(jid)
    assert (task.status, task.task_name, task.hyper_parameters["weight"]) == ("finished", PUSHED_JOB_TASK, wid)
    assert db.del_job(jid) is False and db.run_job(jid) is False
    with pytest.raises(NotFound, match="architecture"):
        db.push_job({"name": "cnn"}, {}, {}, 1)
    with pytest.raises(NotFound, match="params"):
        db.push_job({"name": "mlp"}, {"epoch": 99}, {}, 1)
    with pytest.raises(NotFound):
        db.run_job("no-such-job")


def test_a_held_job_stays_held_while_its_holder_lives_and_goes_back_when_it_closes(home):
    holder, other = TensorDB(studyID="s", job_lease=0.6), TensorDB(studyID="s")
    try:
        holder.save_model_architecture("a")
        holder.save_params([np.zeros(1)])
        jid = holder.push_job({}, {}, {}, 1)
        assert holder.run_job(jid) is True
        time.sleep(1.5)  # past the lease: the heartbeats renewed it
        assert other.peek_job() is False and other.project.tasks.get(jid).status == "running"
        holder.close()  # given back, the attempt not counted
        task = other.project.tasks.get(jid)
        assert (task.status, task.attempts) == ("pending", 0) and other.peek_job()[0] == jid
    finally:
        other.close()


@pytest.mark.slow
def test_a_job_whose_process_died_comes_back_on_the_next_peek(db, tmp_path):
    db.save_model_architecture("a")
    db.save_params([np.zeros(1)])
    jid = db.push_job({}, {}, {}, 1)
    script = _script(tmp_path, "claim.py", f"""
        import os
        from mlwarehouse.compat.tensordb import TensorDB
        db = TensorDB(studyID="mnistMLP", job_lease=3)
        assert db.run_job({jid!r})
        os._exit(0)  # dies holding the job: no del_job, no close
    """)
    subprocess.run([sys.executable, script], check=True, timeout=120, env=os.environ.copy())
    assert db.project.tasks.get(jid).status == "running" and db.peek_job() is False  # its lease runs
    time.sleep(3.5)
    assert db.peek_job()[0] == jid
    task = db.project.tasks.get(jid)
    assert (task.status, task.attempts) == ("pending", 1)


# -- jobs with a script --------------------------------------------------------------------------------------
JOB_SCRIPT = """
    import os
    from mlwarehouse.compat.tensordb import TensorDB
    db = TensorDB()  # inside a job: the job's study
    params, fid = db.find_one_params({"epoch": 0})
    db.save_params([params[0] * learning_rate], {"job_id": job_id})
    db.train_log({"lr": learning_rate, "pid": os.getpid()})
    print("job", job_id, "trained in", db.studyID)
"""


@pytest.mark.slow
def test_save_find_and_run_jobs_in_a_worker_child_process(db, tmp_path, monkeypatch, capsys):
    script = _script(tmp_path, "your_script.py", JOB_SCRIPT)
    db.save_params([np.full(2, 3.0)], {"epoch": 0})
    jid = db.save_job(script, {"job_id": 1, "learning_rate": 0.5, "n_units": 100})
    assert isinstance(jid, str) and jid.inserted_id == jid
    assert db.save_job(script, {"job_id": 1, "learning_rate": 0.5, "n_units": 100}) == jid  # upserted, as before
    second = db.save_job(script, {"job_id": 2, "learning_rate": 2.0})
    assert second != jid
    job = db.find_one_job({"job_id": 1})
    assert (job["_id"], job["learning_rate"], job["studyID"], job["status"]) == (jid, 0.5, "mnistMLP", "pending")
    assert job["script"] == open(script, "rb").read() and job["script_name"] == "your_script.py"
    assert db.find_one_job({"learning_rate": {"$gt": 1}})["_id"] == second
    assert db.find_one_job({"script_name": "your_script.py", "job_id": 2})["_id"] == second
    assert db.find_one_job({"job_id": 3}) is False
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "_your_script.py").exists()  # the original wrote it on every find
    db.find_one_job({"job_id": 1}, write_script=True)
    assert (tmp_path / "_your_script.py").read_bytes() == job["script"]

    assert db.run_job(jid) is True
    assert "job 1 trained in mnistMLP" in capsys.readouterr().out
    task = db.project.tasks.get(jid)
    assert task.status == "finished" and task.task_name == JOB_TASK
    (log,) = db.find_train_logs({"lr": 0.5})
    assert log["pid"] != os.getpid() and log["run"] == task.run  # in a child, in the job's own run
    params, _ = db.find_one_params({"job_id": 1})
    assert np.array_equal(params[0], [1.5, 1.5])
    assert db.run_job(jid) is False  # finished: nothing to run
    assert db.find_one_job({"job_id": 1})["status"] == "finished"


@pytest.mark.slow
def test_a_failing_job_returns_false_and_shows_its_traceback(db, tmp_path, capsys):
    script = _script(tmp_path, "bad.py", """
        print("starting", job_id)
        raise ValueError("the job crashed")
    """)
    jid = db.save_job(script, {"job_id": 7})
    assert db.run_job(jid) is False
    out, err = capsys.readouterr()
    assert "starting 7" in out and "ValueError: the job crashed" in err
    assert db.project.tasks.get(jid).status == "pending"  # attempts are left
    assert db.del_job(jid) is True and db.project.tasks.get(jid).status == "cancelled"
    assert db.run_job(db.save_job(None, {"job_id": 8})) is True  # a job without a script: claimed, like pushed ones


def test_run_job_refuses_a_scriptless_task_that_is_not_a_job(db):
    task = db.project.tasks.create("someone-elses", None)
    with pytest.raises(TaskError, match="not a TensorDB job"):
        db.run_job(task.id)


# -- DBLogger ------------------------------------------------------------------------------------------------
class _Model:
    """The TensorLabDemo's model: its parameters in ``Params``."""

    def __init__(self):
        self.Params = [np.zeros(2), np.zeros(1)]


def test_dblogger_in_a_plain_loop(db):
    model = _Model()
    logger = DBLogger(db, model)
    logger.on_train_begin()
    for epoch in range(2):
        logger.on_epoch_begin(epoch)
        for batch in range(3):
            logger.on_batch_begin(batch)
            model.Params = [p + 1 for p in model.Params]
            logger.on_batch_end(batch, {"loss": np.float64(1.0 / (batch + 1)), "acc": np.float32(0.5)})
        logger.on_epoch_end(epoch, {"acc": 0.5 + epoch / 10, "val_loss": 0.3})
    logger.on_train_end()
    train = db.find_train_logs()
    assert [(d["epoch"], d["batch"], d["step"]) for d in train] == [(e, b, e * 3 + b + 1) for e in range(2)
                                                                    for b in range(3)]
    assert all(d["step_time"] >= 0 and d["acc"] == 0.5 for d in train)
    valid = db.find_valid_logs()
    assert [d["epoch"] for d in valid] == [0, 1] and all(d["stepTime"] >= 0 for d in valid)
    params, fid = db.find_one_params({"epoch": 1})
    assert fid == valid[1]["params"] and np.array_equal(params[0], [6.0, 6.0])
    assert db.find_one_params({"f_id": valid[0]["params"]})[0][1][0] == 3.0
    sparse = DBLogger(db, batch_every=2)
    for batch in range(5):
        sparse.on_train_batch_begin(batch)
        sparse.on_train_batch_end(batch, {"loss": 0.1})
    sparse.on_epoch_end(0, {"acc": 1.0})  # no model: a validation log only
    assert len(db.find_train_logs({"loss": 0.1})) == 3 and len(db.find_all_params()) == 2


def test_dblogger_saves_a_torch_module_each_epoch(db):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    logger = DBLogger(db, net)
    for epoch in range(2):
        logger.on_epoch_begin(epoch)
        for batch in range(2):
            logger.on_batch_begin(batch)
            loss = torch.nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            logger.on_batch_end(batch, {"loss": loss.detach()})  # a 0-d tensor, as loops pass it
        logger.on_epoch_end(epoch, {"loss": loss.item()})
    params, _ = db.find_one_params({"epoch": 1})
    assert set(params) == {"weight", "bias"}
    assert np.allclose(np.asarray(params["weight"]), net.weight.detach().numpy())
    assert len(db.find_train_logs()) == 4


# -- connecting ----------------------------------------------------------------------------------------------
def test_server_arguments_fail_clearly_when_unreachable():
    started = time.monotonic()
    with pytest.raises(Unavailable, match="127.0.0.1:1"):
        TensorDB(ip="127.0.0.1", port=1, db_name="x", user_name="u", password="p", studyID="t")
    assert time.monotonic() - started < 10


def test_tensordb_over_mongodb(mongo_server):  # noqa: F811
    from urllib.parse import urlsplit
    host = urlsplit(mongo_server)
    db_name = fresh_uri(mongo_server).rsplit("/", 1)[1]
    a = TensorDB(ip=host.hostname, port=host.port, db_name=db_name, user_name=None, password=None, studyID="1")
    b = TensorDB(host.hostname, host.port, db_name, studyID="2")
    try:
        fid = a.save_params([np.arange(4.0), np.eye(2)], {"epoch": 0, "acc": 0.8})
        a.save_params([np.zeros(1)], {"epoch": 1, "acc": 0.9})
        params, got = a.find_one_params({"acc": 0.8})
        assert got == fid and np.array_equal(params[1], np.eye(2))
        assert b.find_one_params() == (False, False)
        a.train_log({"loss": 0.5})
        assert [d["loss"] for d in a.find_train_logs()] == [0.5]
        a.save_model_architecture("net = mlp()", {"name": "mlp"})
        jid = a.push_job({"name": "mlp"}, {"epoch": 0}, {"type": "mnist"}, 5)
        assert a.peek_job()[0] == jid and a.run_job(jid) is True and a.del_job(jid) is True
        assert a.del_params() == 2 and a.del_train_log() == 1 and a.del_model_architecture() == 1
    finally:
        a.warehouse.index.conn.drop_database()
        a.close()
        b.close()
