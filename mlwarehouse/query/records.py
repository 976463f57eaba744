"""Record: a stored document a user holds, with its fields readable as attributes.

``rec.test_accuracy``, ``rec["test_accuracy"]``, ``rec.id`` and ``rec.doc`` (the raw dict) all work, so results
of a query read naturally in a notebook while staying plain data underneath.
"""

from __future__ import annotations

from typing import Any

from mlwarehouse.errors import InvalidDocument, QueryError
from mlwarehouse.ids import prefix_filter

__all__ = ["Record", "check_name", "check_where", "name_filter", "find_by_id"]

_CANDIDATES = 5


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


def check_where(where: Any) -> dict | None:
    """``where`` as given (a filter dict or None); anything else is a QueryError naming what was passed."""
    if where is not None and not isinstance(where, dict):
        raise QueryError(f"where must be a filter dict, not {type(where).__name__}")
    return where


def name_filter(kind: str, name: str | None, where: dict | None, field: str = "name") -> dict:
    """``where`` narrowed to ``name`` (stored in ``field``) when one is given (both hold if ``where`` names one).

    A filter dict passed as the name (the old ``find({"name": "x"})``) is a QueryError that says to use ``where=``.
    """
    if isinstance(name, dict):
        raise QueryError(f"the first argument is a {kind} name; pass a filter dict as where= (where={name!r})")
    flt = dict(check_where(where) or {})
    if name is not None:
        check_name(kind, name)
        flt = {"$and": [{field: name}, flt]} if field in flt else {**flt, field: name}
    return flt


def find_by_id(project, collection: str, ident: Any, kind: str, scope: dict | None = None) -> dict | None:
    """The document whose id is ``ident`` or starts with it (case-insensitive, at least ``ids.MIN_PREFIX``
    digits, as git takes hashes); None if none does. A prefix that several ids share is a QueryError listing them."""
    if isinstance(ident, dict):
        raise QueryError(f"get takes a {kind} id; use find(where={ident!r}) for a filter")
    if not isinstance(ident, str) or not ident:
        raise QueryError(f"a {kind} id must be a non-empty string, not {ident!r}")

    def scoped(flt: dict) -> dict:
        return {"$and": [scope, flt]} if scope else flt

    doc = project.find_one(collection, scoped({"_id": ident}))
    prefix = prefix_filter(ident)
    if doc is not None or prefix is None:
        return doc
    docs = project.find(collection, scoped(prefix), sort=[("_id", 1)], limit=_CANDIDATES + 1)
    if len(docs) > 1:
        shown = ", ".join(d["_id"] for d in docs[:_CANDIDATES]) + (", ..." if len(docs) > _CANDIDATES else "")
        raise QueryError(f"{kind} id prefix {ident!r} is ambiguous: it matches {shown}; give more of the id")
    return docs[0] if docs else None
