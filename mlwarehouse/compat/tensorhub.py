"""TensorLayer's TensorHub API on top of mlwarehouse, so existing scripts run with only the import changed.

    from mlwarehouse import TensorHub          # was: import tensorlayer as tl; tl.db.TensorHub
    db = TensorHub(project_name="tutorial")    # embedded warehouse ($MLW_URI if set); ip/port -> MongoDB

Kept from the original: method names and arguments, every keyword argument becomes a document field on save and a
filter on find/delete, ``save_*`` return True, ``find_top_*`` return False when nothing matches, models come back
with their document's fields readable as ``net._<field>`` (e.g. ``net._test_accuracy``).

Fixed: nothing is pickled (arrays and state dicts go through codecs; pass ``allow_pickle=True`` to store other
objects); deletes remove their blobs; errors raise typed exceptions instead of being printed and swallowed;
``sort=None`` means newest first, not the database's natural order; the task name is stored and honoured, tasks have
leases, bounded retries and a fresh namespace each (see :mod:`mlwarehouse.tasks.queue`); logs can be read back
(``find_training_logs`` ...).
"""

from __future__ import annotations

import logging
from typing import Any

from mlwarehouse.errors import ConfigError, NotFound

__all__ = ["TensorHub"]

log = logging.getLogger("mlwarehouse.tensorhub")


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

    # -- datasets ------------------------------------------------------------------------------------------
    def save_dataset(self, dataset: Any = None, dataset_name: str | None = None, *, allow_pickle: bool = False,
                     **kwargs) -> bool:
        """Store ``dataset`` (arrays, tuples/lists/dicts of arrays...) under ``dataset_name``; kwargs are fields."""
        if dataset_name is None:
            raise ValueError("dataset_name is required")
        version = kwargs.pop("version", None)
        description = kwargs.pop("description", None)
        self.project.datasets.save(dataset, dataset_name, version=version, description=description,
                                   allow_pickle=allow_pickle, **kwargs)
        return True

    def find_top_dataset(self, dataset_name: str | None = None, sort=None, *, allow_pickle: bool = False,
                         **kwargs) -> Any:
        """The top matching dataset's value (newest when ``sort`` is None), or False if none matches."""
        try:
            record = self.project.datasets.get(dataset_name, where=kwargs, sort=sort)
        except NotFound:
            log.info("no dataset %r matching %r in project %r", dataset_name, kwargs, self.project_name)
            return False
        return record.load(allow_pickle=allow_pickle)  # a blob gone missing is an error, not "no dataset"

    def find_datasets(self, dataset_name: str | None = None, *, allow_pickle: bool = False, **kwargs) -> list:
        """Every matching dataset's value, newest first."""
        return [r.load(allow_pickle=allow_pickle) for r in self.project.datasets.find(dataset_name, where=kwargs)]

    def delete_datasets(self, **kwargs) -> int:
        """Delete matching datasets and their blobs; returns how many were deleted."""
        return self.project.datasets.delete(where=kwargs)

    # the names used by the 1.x tutorial
    find_dataset = find_top_dataset
    find_all_datasets = find_datasets

    # -- models --------------------------------------------------------------------------------------------
    def save_model(self, network: Any = None, model_name: str = "model", *, allow_pickle: bool = False,
                   **kwargs) -> bool:
        """Store a model (a torch nn.Module or a dict of arrays) with its fields, e.g. ``accuracy=0.8``."""
        self.project.models.save(network, name=model_name, allow_pickle=allow_pickle, **kwargs)
        return True

    def find_top_model(self, sort=None, model_name: str = "model", *, allow_pickle: bool = False,
                       **kwargs) -> Any:
        """The top matching model, loaded (newest when ``sort`` is None), with ``_<field>`` attributes; or False."""
        found = self.project.models.find(where=kwargs, name=model_name, sort=sort, limit=1)
        if not found:
            log.info("no model %r matching %r in project %r", model_name, kwargs, self.project_name)
            return False
        record = found[0]
        network = record.load(allow_pickle=allow_pickle)
        if isinstance(network, dict):
            network = _Params(network)
        for key, value in record.doc.items():
            if not key.startswith("_") and not hasattr(network, f"_{key}"):  # never over the object's own
                try:
                    setattr(network, f"_{key}", value)
                except (AttributeError, TypeError):
                    break  # an object that takes no attributes still comes back
        return network

    def find_model(self, sess=None, sort=None, model_name: str = "model", **kwargs) -> Any:
        """The 1.x tutorial's name for :meth:`find_top_model` (``sess`` is TensorFlow's and ignored)."""
        return self.find_top_model(sort=sort, model_name=model_name, **kwargs)

    def delete_model(self, **kwargs) -> int:
        """Delete matching models (any name) and their blobs; returns how many were deleted."""
        return self.project.models.delete(where=kwargs)

    # -- logs ----------------------------------------------------------------------------------------------
    def save_training_log(self, **kwargs) -> bool:
        return self._save_log("train", kwargs)

    def save_validation_log(self, **kwargs) -> bool:
        return self._save_log("valid", kwargs)

    def save_testing_log(self, **kwargs) -> bool:
        return self._save_log("test", kwargs)

    def delete_training_log(self, **kwargs) -> int:
        return self.project.runs.delete_logs("train", where=kwargs)

    def delete_validation_log(self, **kwargs) -> int:
        return self.project.runs.delete_logs("valid", where=kwargs)

    def delete_testing_log(self, **kwargs) -> int:
        return self.project.runs.delete_logs("test", where=kwargs)

    def find_training_logs(self, sort=None, **kwargs) -> list[dict]:
        """Training logs matching the fields, oldest first unless ``sort`` says otherwise."""
        return self._find_logs("train", sort, kwargs)

    def find_validation_logs(self, sort=None, **kwargs) -> list[dict]:
        return self._find_logs("valid", sort, kwargs)

    def find_testing_logs(self, sort=None, **kwargs) -> list[dict]:
        return self._find_logs("test", sort, kwargs)

    def _save_log(self, kind: str, fields: dict) -> bool:
        self.project.runs.log_point(kind, **fields)
        return True

    def _find_logs(self, kind: str, sort, fields: dict) -> list[dict]:
        records = self.project.runs.find_logs(kind, where=fields, sort=sort or [("time", 1)])
        return [r.doc if hasattr(r, "doc") else r for r in records]

    # -- tasks ---------------------------------------------------------------------------------------------
    def create_task(self, task_name: str | None = None, script: str | None = None,
                    hyper_parameters: dict | None = None, saved_result_keys: list | None = None, **kwargs) -> bool:
        """Push a task (a script file + hyper-parameters + result keys to keep) for runners to pull."""
        if not task_name:
            raise ValueError("task_name is required")
        self.project.tasks.create(task_name, script, hyper_parameters=hyper_parameters or {},
                                  saved_result_keys=saved_result_keys or [], **kwargs)
        return True

    def run_top_task(self, task_name: str | None = None, sort=None, **kwargs) -> bool:
        """Claim the top pending task with this name (and fields) and run it here, in a child process.

        Returns True if a task ran (finished or failed), False if none was pending. This executes the task's
        script: call it only on a machine meant to run tasks.
        """
        from mlwarehouse.tasks.worker import Worker
        worker = Worker(self.project, task_name, concurrency=1, once=True, verbose=False)
        return worker.run_one(where=kwargs or None, sort=sort) is not None

    run_task = run_top_task

    def check_unfinished_task(self, task_name: str | None = None, **kwargs) -> bool:
        """True while tasks with this name (and fields) are pending or running."""
        return self.project.tasks.has_unfinished(task_name, where=kwargs or None)

    def delete_tasks(self, **kwargs) -> int:
        """Delete matching tasks; returns how many were deleted."""
        return self.project.tasks.delete(where=kwargs)

    def close(self) -> None:
        self.warehouse.close()

    def __repr__(self) -> str:
        return f"<TensorHub project={self.project_name!r} {self.warehouse!r}>"


class _Params(dict):
    """A dict of arrays that also carries ``_<field>`` attributes, like TensorHub's returned networks."""
