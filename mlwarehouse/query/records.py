"""Record: a stored document a user holds, with its fields readable as attributes.

``rec.test_accuracy``, ``rec["test_accuracy"]``, ``rec.id`` and ``rec.doc`` (the raw dict) all work, so results
of a query read naturally in a notebook while staying plain data underneath.
"""

from __future__ import annotations

from typing import Any

from mlwarehouse.errors import InvalidDocument, QueryError

__all__ = ["Record", "check_name", "name_filter"]


class Record:
    """A read-only view of one document. Subclasses add domain methods (``load()``, ``finish()``...)."""

    __slots__ = ("doc",)

    def __init__(self, doc: dict):
        object.__setattr__(self, "doc", doc)

    @property
    def id(self) -> str:
        return self.doc["_id"]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.doc[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self.doc[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.doc.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self.doc

    def fields(self) -> dict:
        """The user's fields: the document without the warehouse's bookkeeping (``_id``, ``_blobs``...)."""
        return {k: v for k, v in self.doc.items() if not k.startswith("_")}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and type(other) is type(self) and other.doc == self.doc

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.doc.items() if k not in ("_blobs", "value", "weights", "project")}
        text = ", ".join(f"{k}={v!r}" for k, v in list(shown.items())[:8])
        return f"{type(self).__name__}({text})"


def check_name(kind: str, name: Any) -> str:
    """A dataset or model name: a non-empty string of at most 200 characters."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise InvalidDocument(f"a {kind} name must be a non-empty string of at most 200 characters, not {name!r}")
    return name


def name_filter(kind: str, name: str | None, where: dict | None) -> dict:
    """``where`` narrowed to ``name`` when one is given (both must hold if ``where`` names one too)."""
    if where is not None and not isinstance(where, dict):
        raise QueryError(f"where must be a filter dict, not {type(where).__name__}")
    flt = dict(where or {})
    if name is not None:
        check_name(kind, name)
        flt = {"$and": [{"name": name}, flt]} if "name" in flt else {**flt, "name": name}
    return flt
