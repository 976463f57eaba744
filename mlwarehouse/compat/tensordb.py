"""TensorLayer's older TensorDB API (1.4-1.9) on top of mlwarehouse, and its ``DBLogger`` training callback.

    from mlwarehouse.compat.tensordb import TensorDB   # was: from tensorlayer.db import TensorDB
    db = TensorDB(studyID="mnistMLP")                  # embedded warehouse ($MLW_URI if set); ip/port -> MongoDB
    f_id = db.save_params(params, {"epoch": 3, "acc": 0.9})
    params, f_id = db.find_one_params({"epoch": 3})

Kept from the original: method names and their ``args`` dicts (fields when saving, MongoDB filters when finding
or deleting), ``save_params`` returns the id of what it stored (``f_id``), ``find_one_params`` and
``load_model_architecture`` return ``(value, id)`` or ``(False, False)``, ``find_all_params`` a list, the logs and
``save_job`` an id also readable as pymongo's ``result.inserted_id``, ``find_one_job`` the job's fields or False,
``peek_job`` ``(job_id, architecture, params, dargs, epoch)`` or False. ``studyID`` (a new uuid when not given, as
the original; inside a task, the task's study) is the warehouse project: everything is scoped to it.

Mapping: params (a list of arrays, as ``get_all_params`` values, or a dict) are an ``arrays`` model named
``params``; architecture strings are a ``value`` model named ``architecture``, stored and returned as given, never
run by us; logs are run logs of the current run (inside a task, the task's) or else of the one run per process
and study that TensorHub logs use (see :mod:`mlwarehouse.compat.tensorhub`); jobs are tasks. User fields named
like the warehouse's own (``name``, ``run``, ``kind``...) are stored under ``th_<name>`` and read back under their
own name, as TensorHub's (:mod:`mlwarehouse.compat.tensorhub_fields`); ``f_id`` (params) and ``fid``
(architectures) in a filter are the id.

Jobs, two kinds as in the original:

- ``save_job(script, args)`` stores a script file with ``args`` (its hyper-parameters: the script sees them as
  globals); the same script and args again is the same job (the original upserted). ``run_job(job_id)`` runs it
  in a worker child process (a fresh namespace, output printed here, traceback on failure) and returns True if it
  finished. ``find_one_job(args)`` returns its fields, ``script`` (bytes) and ``script_name``.
- ``push_job(margs, wargs, dargs, epoch)`` queues (architecture, params, data args, epochs) for the processes that
  train; ``peek_job()`` shows the oldest pending one; ``run_job(job_id)`` claims it for this process (the
  original's "Running": now atomic, so two processes that peeked the same job cannot both take it) and keeps
  its lease alive until ``del_job(job_id)`` marks it finished. A process that dies holding a job lets its lease
  expire: the job goes back to pending (counted as an attempt) for the next ``peek_job``. Pushed jobs have no
  script, so start workers with a task name in a study that pushes jobs (a worker of every name would take them
  and fail them).

Fixed: nothing is pickled (pass ``allow_pickle=True`` for params that are not arrays); no ``args`` dict of the
caller's (nor a mutable default) is changed; deletes return how many and remove their blobs; errors raise typed
exceptions; with ``sort=None`` ``find_one_params`` and ``load_model_architecture`` return the newest, not the
database's natural order, and ``find_all_params`` lists in the order saved; ``find_one_job`` writes no
``_<script_name>`` file into the working directory unless ``write_script=True``; ``save_model_architecture`` and
``push_job`` return the id (the original returned None); ``del_job`` of a job this process does not hold cancels
it; logs can be read back (``find_train_logs`` ...) and architectures deleted (``del_model_architecture``).
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlwarehouse.compat.tensordb_logger import DBLogger  # the original's callback, kept beside its database
from mlwarehouse.compat.tensorhub import TensorHub, _echo_plain
from mlwarehouse.compat.tensorhub_fields import _LOGICAL, LOG, MODEL, PREFIX, Fields
from mlwarehouse.context import current_task
from mlwarehouse.errors import ConfigError, InvalidDocument, NotFound, QueryError, TaskError
from mlwarehouse.ids import new_id
from mlwarehouse.tasks.queue import FINISHED, PENDING
from mlwarehouse.tasks.sweeps import config_hash, normalize_config
from mlwarehouse.tasks.worker import Worker

__all__ = ["TensorDB", "DBLogger", "InsertedId", "JOB_TASK", "PUSHED_JOB_TASK"]

log = logging.getLogger("mlwarehouse.tensordb")

#: the task names of jobs saved with ``save_job`` and of jobs queued with ``push_job``
JOB_TASK = "tensordb-job"
PUSHED_JOB_TASK = "tensordb-pushed-job"
_DROPPED = frozenset({"time", "_id", "studyID"})


class InsertedId(str):
    """The id of what was written; ``.inserted_id`` too, as the original returned pymongo's InsertOneResult."""

    @property
    def inserted_id(self) -> str:
        return str(self)

    @property
    def acknowledged(self) -> bool:
        return True


@dataclass(frozen=True)
class _StudyFields(Fields):
    """TensorHub's field mapping with the study in place of the project: ``studyID`` is the project (never stored
    nor filtered on: every query is in the study), ``project_name`` is a user field, ``aliases`` name our ids."""

    aliases: dict[str, str] = field(default_factory=dict)

    def key(self, key: str, value: Any = None, *, query: bool = False) -> str:
        if key in self.aliases:
            return self.aliases[key]
        if key.split(".", 1)[0] == "project_name":
            return PREFIX + key
        return super().key(key, value, query=query)

    def to_filter(self, fields: dict | None) -> dict:
        if fields is None:
            return {}
        if not isinstance(fields, dict):
            raise QueryError(f"args must be a dict of fields, not {type(fields).__name__}")
        out: dict = {}
        for k, v in fields.items():
            if not isinstance(k, str):
                raise QueryError(f"field names are strings, not {k!r}")
            if k in _LOGICAL and isinstance(v, list):
                out[k] = [self.to_filter(x) if isinstance(x, dict) else x for x in v]
            elif k == "studyID":
                continue  # the original overwrote it with the object's own study
            elif k.startswith("$") or k == "_id":
                out[k] = v
            else:
                out[self.key(k, v, query=True)] = v
        return out

    def to_db(self, doc: dict) -> dict:
        """A stored document as TensorDB showed it: user fields under their own names, ``studyID``."""
        doc = dict(doc)
        study = doc.pop("project", None)
        out = self.to_hub(doc)
        out["studyID"] = study
        return out


def _counter(value: Any) -> bool:
    """An epoch or step we keep as ours: an integer."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _model_fields(alias: str) -> _StudyFields:
    return _StudyFields(None, (MODEL.ours | {"tensordb", "layout"}) - {"epoch", "step"}, shared=MODEL.shared,
                        dropped=_DROPPED | {alias}, typed={**MODEL.typed, "epoch": _counter, "step": _counter},
                        aliases={alias: "_id"})


PARAMS = _model_fields("f_id")
ARCHITECTURE = _model_fields("fid")
LOGS = _StudyFields(None, LOG.ours, shared=LOG.shared, dropped=_DROPPED)


class TensorDB:
    """A study in a warehouse, spoken to with TensorDB's method names.

    ``ip``/``port`` (and ``db_name``, ``user_name``, ``password``) connect to a MongoDB server as TensorHub does;
    without them the embedded warehouse (or ``uri=``/``blobs=``, ``$MLW_URI``) is used. ``job_lease`` is how many
    seconds a pushed job claimed by :meth:`run_job` stays ours without a heartbeat (this object renews it).
    """

    def __init__(self, ip: str | None = None, port: int | None = None, db_name: str | None = None,
                 user_name: str | None = None, password: str | None = None, studyID: Any = None, *,
                 uri: str | None = None, blobs: str | None = None, job_lease: float = 60.0):
        if studyID is None:
            task = current_task()
            studyID = task.project if task is not None else str(uuid.uuid1())
        self.studyID = str(studyID)
        try:
            # TensorHub owns the connection and the per-process log run; we speak through its project
            self._hub = TensorHub(ip, port, db_name, user_name, password, self.studyID, uri=uri, blobs=blobs)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("TensorHub(", "TensorDB(", 1)) from exc
        self.warehouse = self._hub.warehouse
        self.project = self._hub.project
        if isinstance(job_lease, bool) or not isinstance(job_lease, (int, float)) or not job_lease > 0:
            raise TaskError(f"job_lease must be a positive number of seconds, not {job_lease!r}")
        self._lease = float(job_lease)
        self._worker = f"tensordb:{socket.gethostname()}:{os.getpid()}:{new_id()[-6:]}"
        self._held: dict[str, str | None] = {}  # pushed jobs this object claimed -> their lease token
        self._held_lock = threading.Lock()
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None
        log.info("TensorDB connected: study %r in %r", self.studyID, self.warehouse)

    # -- params --------------------------------------------------------------------------------------------
    def save_params(self, params: Any = None, args: dict | None = None, *, allow_pickle: bool = False) -> str:
        """Store ``params`` (a list of arrays, or a dict of them) with ``args`` as fields; returns its id (f_id)."""
        value, layout = _pack_params([] if params is None else params)
        fields, extra = self._model_args(PARAMS, args)
        record = self.project.models.save(value, name="params", run=self._hub._log_run(), allow_pickle=allow_pickle,
                                          tensordb="params", layout=layout, **extra, **fields)
        return record.id

    def find_one_params(self, args: dict | None = None, sort=None, *, allow_pickle: bool = False) -> tuple:
        """``(params, f_id)`` of the top matching params (newest when ``sort`` is None), or ``(False, False)``."""
        found = self._find(PARAMS, "params", args, sort or [("time", -1), ("_id", -1)], limit=1)
        if not found:
            log.info("no params matching %r in study %r", args, self.studyID)
            return False, False
        return _unpack_params(found[0], allow_pickle), found[0].id

    def find_all_params(self, args: dict | None = None, sort=None, *, allow_pickle: bool = False) -> list:
        """Every matching params, in the order saved unless ``sort`` says otherwise (``[]`` if none)."""
        found = self._find(PARAMS, "params", args, sort or [("time", 1), ("_id", 1)])
        return [_unpack_params(r, allow_pickle) for r in found]

    def del_params(self, args: dict | None = None) -> int:
        """Delete matching params (all of the study's if ``args`` is empty) and their blobs, as the original did even
        when something was derived from them; returns how many."""
        return self.project.models.delete(where=self._where(PARAMS, "params", args), force=True)

    # -- logs ----------------------------------------------------------------------------------------------
    def train_log(self, args: dict | None = None) -> InsertedId:
        """Store one training log point (``{"loss": 0.3, "acc": 0.9}``) in the current run; returns its id."""
        return self._log("train", args)

    def valid_log(self, args: dict | None = None) -> InsertedId:
        return self._log("valid", args)

    def test_log(self, args: dict | None = None) -> InsertedId:
        return self._log("test", args)

    def del_train_log(self, args: dict | None = None) -> int:
        """Delete the study's matching training logs (every run's); returns how many."""
        return self.project.runs.delete_logs("train", where=LOGS.to_filter(args))

    def del_valid_log(self, args: dict | None = None) -> int:
        return self.project.runs.delete_logs("valid", where=LOGS.to_filter(args))

    def del_test_log(self, args: dict | None = None) -> int:
        return self.project.runs.delete_logs("test", where=LOGS.to_filter(args))

    def find_train_logs(self, args: dict | None = None, sort=None) -> list[dict]:
        """The study's matching training logs, oldest first unless ``sort`` says otherwise."""
        return self._find_logs("train", args, sort)

    def find_valid_logs(self, args: dict | None = None, sort=None) -> list[dict]:
        return self._find_logs("valid", args, sort)

    def find_test_logs(self, args: dict | None = None, sort=None) -> list[dict]:
        return self._find_logs("test", args, sort)

    def _log(self, kind: str, args: dict | None) -> InsertedId:
        doc = self.project.runs.log_point(kind, run=self._hub._log_run(), **LOGS.to_store(_dict(args)))
        return InsertedId(doc["_id"])

    def _find_logs(self, kind: str, args: dict | None, sort) -> list[dict]:
        docs = self.project.runs.find_logs(kind, where=LOGS.to_filter(args), sort=LOGS.to_sort(sort) or [("time", 1)])
        return [LOGS.to_db(d) for d in docs]

    # -- architectures -------------------------------------------------------------------------------------
    def save_model_architecture(self, s: str | bytes, args: dict | None = None) -> str:
        """Store an architecture string (source, JSON...) as given; returns its id (fid). It is never run here."""
        if isinstance(s, bytearray):
            s = bytes(s)
        if not isinstance(s, (str, bytes)):
            raise InvalidDocument(f"a model architecture is a str or bytes, not {type(s).__name__}")
        fields, extra = self._model_args(ARCHITECTURE, args)
        return self.project.models.save(s, name="architecture", tensordb="architecture", **extra, **fields).id

    def load_model_architecture(self, args: dict | None = None, sort=None) -> tuple:
        """``(s, fid)`` of the top matching architecture (newest when ``sort`` is None), or ``(False, False)``."""
        found = self._find(ARCHITECTURE, "architecture", args, sort or [("time", -1), ("_id", -1)], limit=1)
        if not found:
            log.info("no architecture matching %r in study %r", args, self.studyID)
            return False, False
        return found[0].load(), found[0].id

    def del_model_architecture(self, args: dict | None = None) -> int:
        """Delete matching architectures and their blobs (the original had no way to); returns how many."""
        return self.project.models.delete(where=self._where(ARCHITECTURE, "architecture", args), force=True)

    # -- jobs with a script --------------------------------------------------------------------------------
    def save_job(self, script: str | None = None, args: dict | None = None) -> InsertedId:
        """Store a job: a script file (or ``"module:function"``, or None) with ``args`` as its hyper-parameters.

        The same script with the same args is the same job: its id is returned and nothing new is stored.
        """
        config = normalize_config({k: v for k, v in _dict(args).items() if k != "studyID"}, "args")
        identity = _script_identity(script)
        for task in self.project.tasks.find(JOB_TASK, where={"config_hash": config_hash(config)}):
            if _script_identity(task.doc.get("script")) == identity:
                return InsertedId(task.id)
        return InsertedId(self.project.tasks.create(JOB_TASK, script, hyper_parameters=config).id)

    def find_one_job(self, args: dict | None = None, *, write_script: bool = False) -> dict | bool:
        """The oldest matching job saved with :meth:`save_job`: its args, ``_id``, ``studyID``, ``time``,
        ``status``, ``script`` (bytes) and ``script_name``; False if none matches.

        ``write_script=True`` also writes the script to ``_<script_name>`` in the working directory, as the
        original did on every find; :meth:`run_job` runs it without that.
        """
        found = self.project.tasks.find(JOB_TASK, where=_job_filter(_dict(args)), limit=1)
        if not found:
            log.info("no job matching %r in study %r", args, self.studyID)
            return False
        doc = found[0].doc
        out = {"_id": doc["_id"], "studyID": doc.get("project"), "time": doc.get("time"),
               "status": doc.get("status"), "result": doc.get("result")}
        out.update(doc.get("hyper_parameters") or {})
        spec = doc.get("script") or {}
        if spec.get("kind") == "file":
            out["script"] = bytes(self.project.unpack(spec["source"]))
            out["script_name"] = spec.get("filename")
            if write_script:
                Path("_" + Path(spec.get("filename") or "script.py").name).write_bytes(out["script"])
        elif spec.get("kind") == "callable":
            out["script_name"] = spec.get("target")
        return out

    # -- pushed jobs ---------------------------------------------------------------------------------------
    def push_job(self, margs: dict | None, wargs: dict | None, dargs: Any = None, epoch: Any = None) -> str:
        """Queue a training job: the architecture matching ``margs``, the params matching ``wargs`` (the newest
        of each), the data args and the epochs; returns the job id. NotFound if either matches nothing."""
        arch = self._find(ARCHITECTURE, "architecture", margs, [("time", -1), ("_id", -1)], limit=1)
        weights = self._find(PARAMS, "params", wargs, [("time", -1), ("_id", -1)], limit=1)
        for what, found, args in (("architecture", arch, margs), ("params", weights, wargs)):
            if not found:
                raise NotFound(f"push_job: no {what} matching {args!r} in study {self.studyID!r}")
        config = {"model": arch[0].id, "weight": weights[0].id, "dargs": dargs, "epoch": epoch}
        return self.project.tasks.create(PUSHED_JOB_TASK, None, hyper_parameters=config).id

    def peek_job(self) -> tuple | bool:
        """``(job_id, architecture, params, dargs, epoch)`` of the oldest pending pushed job, or False.

        It stays pending: :meth:`run_job` claims it. Jobs of processes that died holding them come back first.
        """
        tasks = self.project.tasks
        tasks.requeue_expired(PUSHED_JOB_TASK)
        found = tasks.find(PUSHED_JOB_TASK, status=PENDING, sort=[("priority", -1), ("_id", 1)], limit=1)
        if not found:
            return False
        config = found[0].doc.get("hyper_parameters") or {}
        architecture = self.project.models.get(config["model"]).load()
        params = _unpack_params(self.project.models.get(config["weight"]), False)
        return found[0].id, architecture, params, config.get("dargs"), config.get("epoch")

    def run_job(self, jid: str) -> bool:
        """Start job ``jid``: a job with a script runs in a worker child process (True if it finished); a
        pushed job is claimed for this process until :meth:`del_job` (True if this process got it). False if
        the job was not pending. This runs the job's script: call it only where jobs are meant to run."""
        task = self.project.tasks.get(jid)
        if task.doc.get("script"):
            worker = Worker(self.project, None, concurrency=1, once=True, verbose=False, echo=_echo_plain)
            done = worker.run_one(where={"_id": task.id})
            if done is None:
                return False
            if done.get("status") != FINISHED:
                print(f"[TensorDB] job {done.id} failed on attempt {done.get('attempts')} of "
                      f"{done.get('max_attempts')}, now {done.get('status')}:\n{done.get('error') or ''}".rstrip(),
                      file=sys.stderr, flush=True)
                return False
            return True
        if task.doc.get("task_name") not in (PUSHED_JOB_TASK, JOB_TASK):
            raise TaskError(f"task {task.id} ({task.doc.get('task_name')}) has no script and is not a TensorDB job")
        claimed = self.project.tasks.claim(task.doc["task_name"], self._worker, self._lease, where={"_id": task.id})
        if claimed is None:
            return False
        with self._held_lock:
            self._held[claimed.id] = claimed.doc.get("lease")
            if self._beats is None:
                self._beats = threading.Thread(target=self._heartbeats, name="tensordb-heartbeats", daemon=True)
                self._beats.start()
        return True

    def del_job(self, jid: str) -> bool:
        """End job ``jid``: finished if this process holds it (after :meth:`run_job`), else cancelled if it was
        pending or running. Returns True if the job changed."""
        task = self.project.tasks.get(jid)
        with self._held_lock:
            held = task.id in self._held
            lease = self._held.pop(task.id, None)
        if held:
            return self.project.tasks.finish(task.id, self._worker, {}, lease=lease)
        return self.project.tasks.cancel(task.id) > 0

    def _heartbeats(self) -> None:
        """Renew the leases of the pushed jobs this object holds, until :meth:`close`."""
        while not self._stop.wait(self._lease / 3):
            with self._held_lock:
                held = list(self._held.items())
            for jid, lease in held:
                try:
                    mine = self.project.tasks.heartbeat(jid, self._worker, self._lease, lease=lease)
                except Exception as exc:  # noqa: BLE001 - the store is briefly unavailable: try at the next beat
                    log.info("could not renew the lease of job %s: %s", jid, exc)
                    continue
                if not mine:
                    log.warning("job %s is no longer held by this process (cancelled, deleted or taken over)", jid)
                    with self._held_lock:
                        self._held.pop(jid, None)

    # -- plumbing ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Give back the pushed jobs still held (to pending, the attempt not counted), complete this process's
        log run if this was its last user, and close the warehouse."""
        self._stop.set()
        if self._beats is not None:
            self._beats.join(timeout=10)
        with self._held_lock:
            held, self._held = self._held, {}
        for jid, lease in held.items():
            try:
                self.project.tasks.release(jid, self._worker, lease=lease)
            except Exception as exc:  # noqa: BLE001 - its lease expires instead
                log.info("could not give job %s back: %s", jid, exc)
        self._hub.close()

    def __enter__(self) -> "TensorDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TensorDB studyID={self.studyID!r} {self.warehouse!r}>"

    def _where(self, fields: _StudyFields, marker: str, args: dict | None) -> dict:
        return {**fields.to_filter(args), "tensordb": marker}  # a user's own "tensordb" field is th_tensordb

    def _find(self, fields: _StudyFields, marker: str, args: dict | None, sort, limit: int | None = None) -> list:
        return self.project.models.find(where=self._where(fields, marker, args), sort=fields.to_sort(sort),
                                        limit=limit)

    @staticmethod
    def _model_args(fields: _StudyFields, args: dict | None) -> tuple[dict, dict]:
        """(user fields, models.save keywords) of a save's ``args``."""
        stored = fields.to_store(_dict(args))
        extra = {k: stored.pop(k) for k in ("epoch", "step", "description") if k in stored}
        tags = stored.pop("tags", ())
        extra["tags"] = [tags] if isinstance(tags, str) else list(tags or ())
        return stored, extra


def _dict(args: Any) -> dict:
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise InvalidDocument(f"args must be a dict of fields, not {type(args).__name__}")
    for key in args:
        if not isinstance(key, str):
            raise InvalidDocument(f"field names are strings, not {key!r}")
    return args


def _pack_params(params: Any) -> tuple[Any, str]:
    """What a params model stores, and how to give it back: a list as a dict keyed by position."""
    if isinstance(params, (list, tuple)):
        return {str(i): p for i, p in enumerate(params)}, "list"
    if isinstance(params, dict):
        return params, "dict"
    return params, "value"


def _unpack_params(record, allow_pickle: bool) -> Any:
    value = record.load(allow_pickle=allow_pickle)
    if record.doc.get("layout") == "list":
        return [value[k] for k in sorted(value, key=int)]
    return value


def _script_identity(script: Any) -> tuple | None:
    """What makes two jobs' scripts the same: a file's name and contents, a callable's target."""
    if script is None:
        return None
    if isinstance(script, dict):  # a stored spec
        if script.get("kind") == "file":
            return ("file", script.get("filename"), script.get("sha256"))
        return ("callable", script.get("target"))
    path = Path(script).expanduser() if isinstance(script, (str, Path)) else None
    if path is not None and path.is_file():
        return ("file", path.name, hashlib.sha256(path.read_bytes()).hexdigest())
    return ("callable", script if isinstance(script, str) else None)


def _job_filter(args: dict) -> dict:
    """A find_one_job filter on a job's args, which are its hyper-parameters."""
    out: dict = {}
    for k, v in args.items():
        if not isinstance(k, str):
            raise QueryError(f"field names are strings, not {k!r}")
        if k in _LOGICAL and isinstance(v, list):
            out[k] = [_job_filter(x) if isinstance(x, dict) else x for x in v]
        elif k == "studyID":
            continue
        elif k == "script_name":
            out["script.filename"] = v
        elif k == "script" and isinstance(v, (str, bytes)):
            out["script.sha256"] = hashlib.sha256(v.encode() if isinstance(v, str) else v).hexdigest()
        elif k.startswith("$") or k == "_id":
            out[k] = v
        else:
            out[f"hyper_parameters.{k}"] = v
    return out
