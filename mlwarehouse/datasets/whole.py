"""Datasets: whole values (arrays, tuples and dicts of arrays, anything a codec handles) with a name and version.

A dataset document holds the user's fields (description, tags, anything) and the packed value: the JSON tree whose
leaves are blob references. Versions default to 1, 2, 3... per name; a (project, name, version) is unique and
immutable once saved. ``load`` with no sort takes the newest version, never the natural order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlwarehouse import schema
from mlwarehouse.context import current_run
from mlwarehouse.datasets.versions import check_version, insert_version, version_filter
from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.query.fields import normalize_fields, normalize_value
from mlwarehouse.query.records import Record, check_name, find_by_id

__all__ = ["Datasets", "DatasetRecord"]

COLLECTION = schema.DATASETS.name
NEWEST = [("time", -1)]


class DatasetRecord(Record):
    """One saved dataset version; ``load()`` reads its value back (verified)."""

    __slots__ = ("_datasets",)

    def __init__(self, doc: dict, datasets: "Datasets"):
        super().__init__(doc)
        object.__setattr__(self, "_datasets", datasets)

    def load(self, *, allow_pickle: bool = False, writable: bool = False) -> Any:
        """The value (arrays read-only and zero-copy unless ``writable``); for an item dataset (``kind:
        "items"``) its :class:`~mlwarehouse.datasets.items.ItemDataset`, whose items are read lazily."""
        if self.doc.get("kind") == "items":
            return self._datasets.project.items.get(self.doc["name"], version=self.doc["version"])
        return self._datasets.project.unpack(self.doc["value"], allow_pickle=allow_pickle, writable=writable)


class Datasets:
    """The datasets of one project."""

    def __init__(self, project):
        self.project = project
        project.ensure(schema.DATASETS)

    # -- writing -------------------------------------------------------------------------------------------
    def save(self, value: Any, name: str, *, version: str | int | None = None, description: str | None = None,
             tags: Sequence[str] = (), allow_pickle: bool = False, **fields) -> DatasetRecord:
        """Store ``value`` as a new version of dataset ``name`` and return its record.

        The blobs are written (and durable) before the document, so a crash never leaves a dataset whose bytes
        are missing. ``version`` defaults to one more than the highest integer version of this name.
        """
        check_name("dataset", name)
        check_version(version)
        extra = normalize_fields(fields)
        for reserved in ("name", "version", "value", "description", "tags"):
            extra.pop(reserved, None)
        tags = [tags] if isinstance(tags, str) else list(tags)  # one tag as a plain string, as runs take it
        doc = {"name": name, "description": description, "tags": normalize_value(tags, "tags"), **extra}

        def pack(doc: dict) -> None:
            doc["value"] = self.project.pack(value, allow_pickle=allow_pickle)

        return DatasetRecord(insert_version(self.project, doc, version, prepare=pack, racing="saves"), self)

    def delete(self, name: str | None = None, *, where: dict | None = None,
               version: str | int | None = None, force: bool = False) -> int:
        """Delete matching dataset versions and the blobs only they used; returns how many were deleted.

        A version that runs read or models were trained on (and that are still stored) is refused with
        DependencyError unless ``force``; lineage keeps a tombstone of each deleted version that has edges."""
        flt = version_filter(name, where, version)
        what = f"dataset {name!r}" if name else "these datasets"
        return len(self.project.lineage.delete(COLLECTION, flt, what, force=force))

    # -- reading -------------------------------------------------------------------------------------------
    def find(self, name: str | None = None, *, where: dict | None = None, version: str | int | None = None,
             sort=None, limit: int | None = None, skip: int = 0) -> list[DatasetRecord]:
        """Every matching version (newest first unless ``sort`` says otherwise)."""
        docs = self.project.find(COLLECTION, version_filter(name, where, version), sort=sort or NEWEST,
                                 limit=limit, skip=skip)
        return [DatasetRecord(doc, self) for doc in docs]

    def get(self, id: str, *, version: str | int | None = None, where: dict | None = None,
            sort=None) -> DatasetRecord:
        """The version with this id (whole or a unique prefix); NotFound if there is none.

        A dataset name is taken too (the newest version of it, narrowed by ``version``/``where``/``sort``), as
        earlier releases took only names: ``find(name, limit=1)`` is the form to prefer for names.
        """
        if version is None and where is None and sort is None:
            doc = find_by_id(self.project, COLLECTION, id, "dataset")
            if doc is not None:
                return DatasetRecord(doc, self)
        return self._top(id, version, where, sort)

    def _top(self, name, version, where, sort) -> DatasetRecord:
        doc = self.project.find_one(COLLECTION, version_filter(name, where, version), sort=sort or NEWEST)
        if doc is None:
            what = f"dataset {name!r}" if name else f"a dataset matching {where!r}"
            if version is not None:
                what += f" version {version!r}"
            raise NotFound(f"no {what} in project {self.project.name!r}")
        return DatasetRecord(doc, self)

    def load(self, name: str | None = None, *, id: str | None = None, version: str | int | None = None,
             where: dict | None = None, sort=None, allow_pickle: bool = False, writable: bool = False) -> Any:
        """The value of the top matching version (newest unless ``sort`` says otherwise), or of the version
        ``id``. A ``name`` that no dataset has but that is an id (or a unique id prefix) loads that version.
        Arrays are read-only views of the verified bytes; ``writable=True`` gives arrays that own writable memory
        (one copy), which ``torch.from_numpy`` takes without a warning.

        Inside a run of this project (``mlwarehouse.current_run()``), the version loaded is recorded on the run,
        so "which data trained this model" is answered by the run's ``datasets``.
        """
        record = self._record(name, id=id, version=version, where=where, sort=sort)
        value = record.load(allow_pickle=allow_pickle, writable=writable)
        run = current_run()
        if run is not None and run.project == self.project.name \
                and run.warehouse_settings == self.project.warehouse.settings:
            run.use_datasets(record.id)
        return value

    def _record(self, name: str | None = None, *, id: str | None = None, version: str | int | None = None,
               where: dict | None = None, sort=None) -> DatasetRecord:
        """The record :meth:`load` would load (same arguments), without reading the value."""
        if id is not None:
            if name is not None:
                raise QueryError("give a dataset name or id=, not both")
            doc = find_by_id(self.project, COLLECTION, id, "dataset", version_filter(None, where, version) or None)
            if doc is None:
                raise NotFound(f"no dataset with id {id!r} in project {self.project.name!r}")
            return DatasetRecord(doc, self)
        try:
            return self._top(name, version, where, sort)
        except NotFound:
            doc = find_by_id(self.project, COLLECTION, name, "dataset") if isinstance(name, str) else None
            if doc is None or version is not None or where is not None:
                raise
            return DatasetRecord(doc, self)

    def names(self) -> list[str]:
        return self.project.distinct(COLLECTION, "name")
