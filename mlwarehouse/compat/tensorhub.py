"""TensorLayer's TensorHub API on top of mlwarehouse, so existing scripts run with only the import changed.

    from mlwarehouse import TensorHub          # was: import tensorlayer as tl; tl.db.TensorHub
    db = TensorHub(project_name="tutorial")    # embedded warehouse ($MLW_URI if set); ip/port -> MongoDB

Kept from the original: method names and arguments, every keyword argument becomes a document field on save and a
filter on find/delete, ``save_*`` return True, ``find_top_*`` return False when nothing matches, ``run_top_task``
returns True only for a task that finished (False when none was pending or when it failed), models come back with
their document's fields readable as ``net._<field>`` (e.g. ``net._test_accuracy``, ``net._name``).

Field names: every keyword field is stored and queried under its own name, including names the warehouse uses
itself (``name``, ``kind``, ``run``...): those are stored as ``th_<name>`` and mapped back on every find, delete,
sort and read; ``model_name`` and ``dataset_name`` are the documents' ``name`` (see
:mod:`mlwarehouse.compat.tensorhub_fields` for the whole mapping).

Runs: logs saved with ``save_*_log`` belong to the current run (inside a task: the task's run), or else to one run
per process and project that the hub starts on the first log (named after the script, tagged ``tensorhub``) and
completes when its last hub closes or the process exits; so they show in ``mlw runs`` and the web UI.

Tasks: ``run_top_task`` runs the task in a child process (a fresh namespace each time), prints the task's output
as it comes and, when the task fails, its traceback, as the original's in-process ``exec`` would have.

Fixed: nothing is pickled (arrays and state dicts go through codecs; pass ``allow_pickle=True`` to store other
objects); deletes remove their blobs; errors raise typed exceptions instead of being printed and swallowed;
``sort=None`` means newest first, not the database's natural order; the task name is stored and honoured, tasks have
leases, bounded retries and a fresh namespace each (see :mod:`mlwarehouse.tasks.queue`); logs can be read back
(``find_training_logs`` ...).
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from mlwarehouse.compat.tensorhub_fields import DATASET, LOG, MODEL, TASK
from mlwarehouse.context import current_run
from mlwarehouse.errors import ConfigError, WarehouseError
from mlwarehouse.tasks.worker import Worker

__all__ = ["TensorHub"]

log = logging.getLogger("mlwarehouse.tensorhub")

#: the run of this process per (index, blobs, project) that logs saved outside any run belong to, and its hubs
_process_runs: dict[tuple, str] = {}
_holders: dict[tuple, set] = {}
_runs_lock = threading.Lock()
_atexit_registered = False


class TensorHub:
    """A project in a warehouse, spoken to with TensorHub's method names."""

    def __init__(self, ip: str | None = None, port: int | None = None, dbname: str | None = None,
                 username: str | None = None, password: str | None = None, project_name: str | None = None,
                 *, uri: str | None = None, blobs: str | None = None):
        from mlwarehouse.warehouse import connect
        if ip is not None or port is not None:
            # The original's server: MongoDB + GridFS, with credentials checked the right way round.
            from urllib.parse import quote_plus
            auth = f"{quote_plus(username)}:{quote_plus(password or '')}@" if username else ""
            uri = f"mongodb://{auth}{ip or 'localhost'}:{port or 27017}/{dbname or 'dbname'}"
            try:
                self.warehouse = connect(uri, blobs=blobs)
            except ConfigError as exc:
                raise ConfigError(f"TensorHub(ip=..., port=...) needs the MongoDB backend: {exc}") from exc
        else:
            self.warehouse = connect(uri, blobs=blobs)
        self.project_name = project_name or "default"
        self.project = self.warehouse.project(self.project_name)
        self._run_key: tuple | None = None

    # -- datasets ------------------------------------------------------------------------------------------
    def save_dataset(self, dataset: Any = None, dataset_name: str | None = None, *, allow_pickle: bool = False,
                     **kwargs) -> bool:
        """Store ``dataset`` (arrays, tuples/lists/dicts of arrays...) under ``dataset_name``; kwargs are fields."""
        if dataset_name is None:
            raise ValueError("dataset_name is required")
        fields = DATASET.to_store(kwargs)
        version = fields.pop("version", None)
        description = fields.pop("description", None)
        self.project.datasets.save(dataset, dataset_name, version=version, description=description,
                                   allow_pickle=allow_pickle, **fields)
        return True

    def find_top_dataset(self, dataset_name: str | None = None, sort=None, *, allow_pickle: bool = False,
                         **kwargs) -> Any:
        """The top matching dataset's value (newest when ``sort`` is None), or False if none matches."""
        found = self.project.datasets.find(where=self._where(DATASET, dataset_name, kwargs),
                                           sort=DATASET.to_sort(sort), limit=1)
        if not found:
            log.info("no dataset %r matching %r in project %r", dataset_name, kwargs, self.project_name)
            return False
        return found[0].load(allow_pickle=allow_pickle)  # a blob gone missing is an error, not "no dataset"

    def find_datasets(self, dataset_name: str | None = None, *, allow_pickle: bool = False, **kwargs) -> list:
        """Every matching dataset's value, newest first."""
        records = self.project.datasets.find(where=self._where(DATASET, dataset_name, kwargs))
        return [r.load(allow_pickle=allow_pickle) for r in records]

    def delete_datasets(self, **kwargs) -> int:
        """Delete matching datasets (``dataset_name=`` and any field) and their blobs; returns how many."""
        return self.project.datasets.delete(where=DATASET.to_filter(kwargs), force=True)

    # the names used by the 1.x tutorial
    find_dataset = find_top_dataset
    find_all_datasets = find_datasets

    # -- models --------------------------------------------------------------------------------------------
    def save_model(self, network: Any = None, model_name: str = "model", *, allow_pickle: bool = False,
                   **kwargs) -> bool:
        """Store a model (a torch nn.Module or a dict of arrays) with its fields, e.g. ``accuracy=0.8``."""
        fields = MODEL.to_store(kwargs)
        description = fields.pop("description", None)
        if isinstance(fields.get("tags"), str):
            fields["tags"] = [fields["tags"]]
        self.project.models.save(network, name=model_name, description=description, allow_pickle=allow_pickle,
                                 **fields)
        return True

    def find_top_model(self, sess: Any = None, sort=None, model_name: str | None = "model", *,
                       allow_pickle: bool = False, **kwargs) -> Any:
        """The top matching model, loaded (newest when ``sort`` is None), with ``_<field>`` attributes; or False.

        ``sess`` (TensorFlow's session in the original) is accepted and ignored; ``model_name=None`` matches any.
        """
        found = self.project.models.find(where=self._where(MODEL, model_name, kwargs), sort=MODEL.to_sort(sort),
                                         limit=1)
        if not found:
            log.info("no model %r matching %r in project %r", model_name, kwargs, self.project_name)
            return False
        record = found[0]
        network = record.load(allow_pickle=allow_pickle)
        if isinstance(network, dict):
            network = _Params(network)
        for key, value in MODEL.to_hub(record.doc).items():
            if not key.startswith("_") and not hasattr(network, f"_{key}"):  # never over the object's own
                try:
                    setattr(network, f"_{key}", value)
                except (AttributeError, TypeError):
                    break  # an object that takes no attributes still comes back
        return network

    def find_model(self, sess=None, sort=None, model_name: str | None = "model", **kwargs) -> Any:
        """The 1.x tutorial's name for :meth:`find_top_model`."""
        return self.find_top_model(sess, sort=sort, model_name=model_name, **kwargs)

    def delete_model(self, **kwargs) -> int:
        """Delete matching models (``model_name=`` and any field; all of them if none) and their blobs."""
        return self.project.models.delete(where=MODEL.to_filter(kwargs), force=True)

    # -- logs ----------------------------------------------------------------------------------------------
    def save_training_log(self, **kwargs) -> bool:
        """Store one training log point (``accuracy=0.33, loss=0.98``) in the current run (see the module)."""
        return self._save_log("train", kwargs)

    def save_validation_log(self, **kwargs) -> bool:
        return self._save_log("valid", kwargs)

    def save_testing_log(self, **kwargs) -> bool:
        return self._save_log("test", kwargs)

    def delete_training_log(self, **kwargs) -> int:
        """Delete the project's matching training logs (every run's); returns how many."""
        return self.project.runs.delete_logs("train", where=LOG.to_filter(kwargs))

    def delete_validation_log(self, **kwargs) -> int:
        return self.project.runs.delete_logs("valid", where=LOG.to_filter(kwargs))

    def delete_testing_log(self, **kwargs) -> int:
        return self.project.runs.delete_logs("test", where=LOG.to_filter(kwargs))

    def find_training_logs(self, sort=None, **kwargs) -> list[dict]:
        """The project's training logs matching the fields, oldest first unless ``sort`` says otherwise."""
        return self._find_logs("train", sort, kwargs)

    def find_validation_logs(self, sort=None, **kwargs) -> list[dict]:
        return self._find_logs("valid", sort, kwargs)

    def find_testing_logs(self, sort=None, **kwargs) -> list[dict]:
        return self._find_logs("test", sort, kwargs)

    def _save_log(self, kind: str, fields: dict) -> bool:
        self.project.runs.log_point(kind, run=self._log_run(), **LOG.to_store(fields))
        return True

    def _find_logs(self, kind: str, sort, fields: dict) -> list[dict]:
        records = self.project.runs.find_logs(kind, where=LOG.to_filter(fields),
                                              sort=LOG.to_sort(sort) or [("time", 1)])
        return [LOG.to_hub(r.doc if hasattr(r, "doc") else r) for r in records]

    def _log_run(self) -> str:
        """The run a log point belongs to: the current run (a task's, or one the user started) if it is in this
        project and warehouse, else this process's TensorHub run, started now if need be."""
        run = current_run()
        doc = getattr(run, "doc", None) or {}
        if doc.get("project") == self.project.name \
                and getattr(run, "warehouse_settings", None) == self.warehouse.settings:
            return run.id
        settings = self.warehouse.settings
        key = (settings.index_uri, settings.blobs_uri, self.project.name) if settings else \
            (id(self.warehouse), self.project.name)
        global _atexit_registered
        with _runs_lock:
            run_id = _process_runs.get(key)
            if run_id is None:
                # it holds the hub's logs; it never becomes the process's current run
                started = self.project.runs._start(_script_name(), None, (), ["tensorhub"], None, {}, current=False)
                run_id = _process_runs[key] = started.id
                if not _atexit_registered:  # after the log writer's handler: runs before it, at exit
                    atexit.register(_finish_process_runs)
                    _atexit_registered = True
            _holders.setdefault(key, set()).add(self)
            self._run_key = key
        return run_id

    def _release_run(self) -> None:
        """Complete this process's TensorHub run when its last hub lets go of it."""
        key, self._run_key = self._run_key, None
        if key is None:
            return
        with _runs_lock:
            holders = _holders.get(key, set())
            holders.discard(self)
            if holders:
                return
            _holders.pop(key, None)
            run_id = _process_runs.pop(key, None)
        if run_id is not None:
            try:
                self.project.runs.get(run_id).finish()
            except WarehouseError as exc:  # deleted meanwhile, or the store is gone: nothing left to end
                log.info("could not complete TensorHub run %s: %s", run_id, exc)

    # -- tasks ---------------------------------------------------------------------------------------------
    def create_task(self, task_name: str | None = None, script: str | None = None,
                    hyper_parameters: dict | None = None, saved_result_keys: list | None = None, **kwargs) -> bool:
        """Push a task (a script file + hyper-parameters + result keys to keep) for runners to pull."""
        if not task_name:
            raise ValueError("task_name is required")
        self.project.tasks.create(task_name, script, hyper_parameters=hyper_parameters or {},
                                  saved_result_keys=saved_result_keys or [], **TASK.to_store(kwargs))
        return True

    def run_top_task(self, task_name: str | None = None, sort=None, *, sess: Any = None, **kwargs) -> bool:
        """Claim the top pending task with this name (and fields) and run it here, in a child process.

        Prints the task's output as it comes, and its traceback if it fails. Returns True if the task finished,
        False if it failed (it goes back to pending while attempts are left) or if none was pending. This
        executes the task's script: call it only on a machine meant to run tasks.
        """
        worker = Worker(self.project, task_name, concurrency=1, once=True, verbose=False, echo=_echo_plain)
        task = worker.run_one(where=TASK.to_filter(kwargs) or None, sort=TASK.to_sort(sort))
        if task is None:
            return False
        if task.get("status") != "finished":
            print(f"[TensorHub] task {task.id} ({task.get('task_name')}) failed on attempt {task.get('attempts')} of "
                  f"{task.get('max_attempts')}, now {task.get('status')}:\n{task.get('error') or ''}".rstrip(),
                  file=sys.stderr, flush=True)
            return False
        return True

    run_task = run_top_task

    def check_unfinished_task(self, task_name: str | None = None, **kwargs) -> bool:
        """True while tasks with this name (and fields) are pending or running."""
        return self.project.tasks.has_unfinished(task_name, where=TASK.to_filter(kwargs) or None)

    def delete_tasks(self, **kwargs) -> int:
        """Delete matching tasks (``task_name=`` and any field; all of them if none); returns how many."""
        return self.project.tasks.delete(where=TASK.to_filter(kwargs) or None, force=True)

    def close(self) -> None:
        """Complete this process's TensorHub run if this was its last hub, and close the warehouse."""
        self._release_run()
        self.warehouse.close()

    def __repr__(self) -> str:
        return f"<TensorHub project={self.project_name!r} {self.warehouse!r}>"

    @staticmethod
    def _where(fields, name: str | None, kwargs: dict) -> dict:
        """The filter of a find: the name argument (when given) and the keyword fields, in our names."""
        if name is not None:
            kwargs = {fields.name_field: name, **kwargs}
        return fields.to_filter(kwargs)


class _Params(dict):
    """A dict of arrays that also carries ``_<field>`` attributes, like TensorHub's returned networks."""


def _echo_plain(task, line: str) -> None:
    """A task's output on this process's stdout as it comes, without a prefix: the original ran the script in the
    runner itself, so its prints appeared there."""
    sys.stdout.write(line)
    sys.stdout.flush()


def _script_name() -> str:
    """The name of the process's TensorHub run: the script's, as the original named projects by default."""
    stem = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] not in ("", "-c", "-") else ""
    return f"tensorhub-{stem}" if stem else "tensorhub"


def _finish_process_runs() -> None:
    """At exit: complete the TensorHub runs whose hubs were never closed."""
    with _runs_lock:
        keys = list(_holders)
    for key in keys:
        hubs = list(_holders.get(key, ()))
        for hub in hubs[1:]:
            hub._run_key = None
            _holders[key].discard(hub)
        if hubs:
            try:
                hub = hubs[0]
                hub._release_run()
            except Exception as exc:  # noqa: BLE001 - at exit the store may already be gone
                log.info("could not complete a TensorHub run at exit: %s", exc)
