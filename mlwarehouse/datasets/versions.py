"""Dataset versions: one allocator for whole datasets and item datasets, which share one version space.

A new version of a name is one more than the highest integer version of that name in the project, whatever its
kind; the unique index on (project, name, version) settles two writers that picked the same number, and the
loser picks again. An explicit version is immutable: taking one that exists raises DuplicateKey.
"""

from __future__ import annotations

from collections.abc import Callable

from mlwarehouse import schema
from mlwarehouse.errors import DuplicateKey, InvalidDocument
from mlwarehouse.query.records import name_filter

__all__ = ["check_version", "version_filter", "next_version", "insert_version"]

COLLECTION = schema.DATASETS.name
#: how many numbers a writer tries before it gives up (each loss means another writer just took one)
ATTEMPTS = 20


def check_version(version) -> None:
    """An explicit version is a string or an integer (None: allocate the next integer)."""
    if version is not None and (not isinstance(version, (str, int)) or isinstance(version, bool)):
        raise InvalidDocument(f"version must be a string or an integer, not {version!r}")


def version_filter(name: str | None, where: dict | None, version: str | int | None) -> dict:
    """The versions of dataset ``name`` (any name when None) that match ``where``, narrowed to ``version``."""
    flt = name_filter("dataset", name, where)
    if version is not None:
        flt = {"$and": [flt, {"version": version}]} if flt else {"version": version}
    return flt


def next_version(project, name: str) -> int:
    """One more than the highest integer version of ``name`` in ``project`` (1 for a new name)."""
    top = project.find_one(COLLECTION, {"name": name, "version": {"$gte": 0}}, sort=[("version", -1)],
                           projection={"version": 1})
    return int(top["version"]) + 1 if top else 1


def insert_version(project, doc: dict, version: str | int | None, *, prepare: Callable[[dict], None] | None = None,
                   racing: str = "writes") -> dict:
    """Insert the version document ``doc`` (of dataset ``doc["name"]``) as ``version``, or as the next free
    integer version when None; returns the stored document.

    ``prepare(doc)`` runs before every attempt: a refused insert releases the blobs its document referenced, so
    values are packed again each time. ``racing`` names the writes that can crowd out an allocation.
    """
    name = doc["name"]
    for _ in range(ATTEMPTS):
        if prepare is not None:
            prepare(doc)
        doc["version"] = next_version(project, name) if version is None else version
        doc.pop("_id", None)
        doc.pop("_blobs", None)
        try:
            return project.insert(COLLECTION, doc)
        except DuplicateKey:
            if version is not None:
                raise DuplicateKey(f"dataset {name!r} version {version!r} already exists in project "
                                   f"{project.name!r}; versions are immutable") from None
    raise DuplicateKey(f"could not allocate a version for dataset {name!r} (too many concurrent {racing})")
