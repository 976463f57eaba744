"""Indexes made on demand for the filters and sorts users write on a collection's open-ended fields.

Run summaries, hyper-parameters and model metrics have no fixed names, so the schema cannot declare their
indexes. A registry (runs, models) hands each query it runs to :class:`QueryIndexes` first, which derives the one
index that serves it and creates it the first time this process sees that shape:

    (prefix..., equality on declared scalar fields..., one equality on an open field, sort fields...)

for example ``project, hyper_parameters.p0, summary.valid.acc0.max DESC`` for
``runs.find(where={"hyper_parameters.p0": "3"}, sort=[("summary.valid.acc0.max", -1)])``: an index range in sort
order (the SQL backends split an equality on a field that may hold arrays so that such an index serves it, see
:mod:`mlwarehouse.index.sqlbase`). Without an equality, the sort fields alone; without an eligible sort either,
the first range (or ``$in``) field.

Cheap when it exists: the derived keys are looked up in a set kept per process (read from the collection's
stored indexes once). Bounded: at most ``limit`` indexes beyond those the schema declares are made per
collection; past that, a new shape is refused with one warning in the log and its queries run without an index
(still correct, only slower). The count is read from the store once per process, so processes starting together
may pass it by a few.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mlwarehouse.errors import BackendError
from mlwarehouse.query import PATH_RE

__all__ = ["QueryIndexes", "MAX_AUTO_INDEXES", "MAX_SORT_KEYS"]

log = logging.getLogger(__name__)

#: indexes made for queries per collection, beyond those the schema declares
MAX_AUTO_INDEXES = 24
#: sort fields an index takes (the rest of a longer sort is sorted after the index range)
MAX_SORT_KEYS = 3
_SCALAR_EQ_KEYS = 2  # equalities on declared scalar fields an index starts with
_RANGE_OPS = frozenset({"$gt", "$gte", "$lt", "$lte", "$in"})
_PLAIN = (str, int, float, bool)


def _conditions(flt: Any, out: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(path, kind)`` for each field ANDed at the top of a filter, in order: kind "eq" (with a number, string or
    boolean), "fixed" (equality with anything else), "range" (``$gt``... and ``$in``) or "other".

    Read from the dict as given, without validating it: the query itself does that and names what is wrong.
    """
    if not isinstance(flt, dict):
        return out
    for key, value in flt.items():
        if not isinstance(key, str):
            continue
        if key == "$and" and isinstance(value, list):
            for sub in value:
                _conditions(sub, out)
            continue
        if key.startswith("$") or not PATH_RE.match(key):
            continue
        if isinstance(value, dict) and value and all(isinstance(k, str) and k.startswith("$") for k in value):
            ops = set(value) - {"$options"}
            if ops == {"$eq"}:
                out.append((key, "eq" if isinstance(value["$eq"], _PLAIN) else "fixed"))
            else:
                out.append((key, "range" if ops and ops <= _RANGE_OPS else "other"))
        else:
            out.append((key, "eq" if isinstance(value, _PLAIN) else "fixed"))
    return out


class QueryIndexes:
    """The indexes made for the queries one registry runs on ``collection`` (see the module notes).

    ``eligible(path)`` says which fields are open-ended (worth an index of their own); ``scalar_fields`` are the
    collection's declared ones, whose equalities lead the index; ``prefix`` fields lead every index (``project``).
    """

    def __init__(self, project, collection: Any, *, eligible: Callable[[str], bool],
                 scalar_fields: Iterable[str] = (), prefix: Sequence[str] = ("project",),
                 declared: int = 0, limit: int = MAX_AUTO_INDEXES):
        self.project = project
        self.collection = str(collection)
        self.eligible = eligible
        self.scalar_fields = frozenset(scalar_fields)
        self.prefix = tuple(prefix)
        self.declared = declared
        self.limit = limit
        self._seen: set[tuple] = set()  # shapes made or found by this process
        self._refused: set[tuple] = set()  # shapes past the bound, or that could not be made
        self._derived: dict[tuple, list[tuple[str, int]] | None] = {}  # (conditions, sort) -> keys
        self._stored: set[tuple] | None = None
        self._lock = threading.Lock()

    def keys_for(self, flt: dict | None, sort: Sequence[tuple[str, int]] | None) -> list[tuple[str, int]] | None:
        """The index keys that serve ``find(flt, sort=sort)``, or None when no open-ended field is involved."""
        conditions = tuple(_conditions(flt, []))
        try:
            memo: tuple | None = (conditions, tuple(map(tuple, sort or ())))
            hash(memo)
        except TypeError:  # a sort that is not pairs of plain values: the query says what is wrong
            memo = None
        if memo is not None and memo in self._derived:
            return self._derived[memo]
        keys = self._derive(conditions, sort)
        if memo is not None:
            if len(self._derived) >= 1024:
                self._derived.clear()
            self._derived[memo] = keys
        return keys

    def _derive(self, conditions: tuple[tuple[str, str], ...], sort) -> list[tuple[str, int]] | None:
        fixed = [p for p, kind in conditions if kind in ("eq", "fixed") and p in self.scalar_fields
                 and p not in self.prefix]
        open_eq = next((p for p, kind in conditions if kind == "eq" and p not in self.scalar_fields
                        and p != "_id" and self.eligible(p)), None)
        sort_keys: list[tuple[str, int]] = []
        for item in sort or ():
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                return None  # the query names what is wrong with it
            field, direction = item
            if field == "_id" or not isinstance(field, str) or not PATH_RE.match(field) or direction not in (1, -1):
                break  # every index ends with the _id tie-breaker
            if len(sort_keys) == MAX_SORT_KEYS:
                break
            sort_keys.append((field, direction))
        head = [(p, 1) for p in self.prefix] + [(p, 1) for p in dict.fromkeys(fixed)][:_SCALAR_EQ_KEYS]
        if open_eq is not None:
            tail = [(open_eq, 1)] + [k for k in sort_keys if k[0] != open_eq]
        elif any(self.eligible(f) for f, _ in sort_keys):
            tail = sort_keys
        else:
            ranged = next((p for p, kind in conditions if kind == "range" and p not in self.scalar_fields
                           and p != "_id" and self.eligible(p)), None)
            if ranged is None:
                return None
            tail = [(ranged, 1)]
        keys, used = [], set()
        for field, direction in head + tail:
            if field not in used:
                used.add(field)
                keys.append((field, direction))
        return keys

    def ensure(self, flt: dict | None, sort: Sequence[tuple[str, int]] | None) -> list[tuple[str, int]] | None:
        """Make the index that serves ``find(flt, sort=sort)`` unless it exists (or the bound is reached); returns
        its keys, or None when the query needs none of its own."""
        keys = self.keys_for(flt, sort)
        if keys is not None:
            self.ensure_keys(keys)
        return keys

    def ensure_keys(self, keys: Sequence[tuple[str, int]]) -> bool:
        """Make an index over ``keys`` unless it exists; False if refused (the bound) or it could not be made."""
        shape = tuple((f, d) for f, d in keys)
        if shape in self._seen:
            return True
        if shape in self._refused:
            return False
        with self._lock:
            if shape in self._seen or shape in self._refused:
                return shape in self._seen
            if self._stored is None:
                self._stored = {tuple((f, d) for f, d in ix["keys"])
                                for ix in self.project.index.indexes(self.collection)}
            if shape not in self._stored:
                made = len(self._stored) - self.declared
                if made >= self.limit:
                    log.warning("not indexing %s on %s: %d indexes were made for queries already (the limit); "
                                "queries of that shape read without an index", [f for f, _ in shape],
                                self.collection, made)
                    self._refused.add(shape)
                    return False
                try:
                    self.project.create_index(self.collection, list(shape))
                except BackendError as exc:  # a read-only store, or a user without the right: read without it
                    log.warning("cannot index %s on %s: %s", [f for f, _ in shape], self.collection, exc)
                    self._refused.add(shape)
                    return False
                self._stored.add(shape)
            self._seen.add(shape)
        return True
