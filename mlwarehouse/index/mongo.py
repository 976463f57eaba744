"""The MongoDB index: one collection per collection name (``mlw_<name>``), documents stored as they are.

MongoDB's own query semantics differ from ours (:mod:`mlwarehouse.query`): dotted paths fan out over arrays of
objects, arrays sort by their smallest/largest element, ``limit=0`` means "no limit"; and wire-compatible servers
differ again (some treat ``true`` as ``1``, or miss array elements in range queries). So the server only narrows
the search: filters are translated to a *superset* filter (equality and ``$in`` on top-level fields, which every
server answers with at least our matches), then every document is checked with the reference matcher; sorting,
skipping, limiting and projecting are done here too, except that an ``_id``-only sort streams in the server's order.

Updates are applied in Python (:func:`mlwarehouse.query.apply_update`) and written back with a conditional
replace guarded by a hidden revision field (``_mlw_rev``, never returned): a concurrent writer makes the replace
miss, and the update is retried on the fresh document. That is what makes ``find_one_and_update`` atomic across
processes (task claims) without server transactions, and it sidesteps servers whose update operators misbehave.
``delete_many`` finds the matches, then deletes them by ``_id`` and revision (so a document changed in between is
re-checked, not deleted blindly), and returns the documents it deleted.

Collection metadata (scalar fields, indexes) lives in ``mlw__meta``. Driver errors are mapped in :func:`map_error`.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import bson
import pymongo
from pymongo import errors as perr

from mlwarehouse.drivers.mongo import Connection
from mlwarehouse.errors import DuplicateKey, InvalidDocument
from mlwarehouse.index.base import Filter, IndexBackend, Projection, Sort, Update
from mlwarehouse.query import (
    Logical,
    apply_update,
    get_path,
    matches,
    parse_filter,
    project,
    sort_key,
    split_path,
    top_fields,
    validate_document,
    validate_projection,
    validate_sort,
    validate_update,
    values_equal,
)

__all__ = ["MongoIndex", "REVISION", "pushdown"]

REVISION = "_mlw_rev"
META = "mlw__meta"  # collection names start with a letter, so no user collection maps to this


def _plain(value: Any) -> Any:
    """The value with bson.Int64 (returned for large integers) turned back into int."""
    t = type(value)
    if t is dict:
        return {k: _plain(v) for k, v in value.items()}
    if t is list:
        return [_plain(v) for v in value]
    if t is bson.int64.Int64:
        return int(value)
    return value


def _split(raw: dict) -> tuple[dict, Any]:
    rev = raw.pop(REVISION, None)
    return _plain(raw), rev


def _guard(_id: str, rev: Any) -> dict:
    return {"_id": _id, REVISION: rev if rev is not None else {"$exists": False}}


def _token() -> str:
    return os.urandom(8).hex()


def _simple(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def pushdown(node: Logical) -> dict:
    """A server filter matching a superset of ``node``: equality and ``$in`` of strings and numbers on
    top-level fields, under ``$and`` only (anything else is checked in Python afterwards)."""
    terms: list[dict] = []
    if node.op != "$and":
        return {}
    for child in node.children:
        if isinstance(child, Logical):
            sub = pushdown(child)
            if sub:
                terms.append(sub)
            continue
        if len(child.comps) != 1:
            continue
        for op, arg in child.ops:
            if op == "$eq" and _simple(arg):
                terms.append({child.path: arg})
            elif op == "$in" and arg and all(_simple(v) for v in arg):
                terms.append({child.path: {"$in": arg}})
    return {"$and": terms} if len(terms) > 1 else (terms[0] if terms else {})


class MongoIndex(IndexBackend):
    """An :class:`~mlwarehouse.index.base.Index` in a MongoDB database (or a wire-compatible server)."""

    name = "mongodb"

    def __init__(self, uri: str, *, database: str | None = None, timeout: float = 3.0, chunk_size: int = 1000):
        self.conn = Connection(uri, database=database, timeout=timeout, what="MongoDB index")
        self.uri, self.where, self.user, self.database = uri, self.conn.where, self.conn.user, self.conn.database
        self.chunk_size = chunk_size
        super().__init__()

    def _db(self):
        return self.conn.db()

    def _coll(self, collection: str):
        return self._db()[f"mlw_{collection}"]

    def _errors(self):
        return self.conn.errors()

    # -- collections and indexes ---------------------------------------------------------------------------
    def _meta(self, collection: str) -> dict | None:
        return self._db()[META].find_one({"_id": collection})

    def _change_meta(self, collection: str, change) -> dict:
        """Apply ``change(meta) -> meta`` to a collection's metadata, retried until no one else wrote it."""
        metas = self._db()[META]
        while True:
            old = metas.find_one({"_id": collection})
            new = change(dict(old) if old else {"_id": collection, "scalar_fields": [], "indexes": []})
            new["rev"] = _token()
            if old is None:
                try:
                    metas.insert_one(new)
                    return new
                except perr.DuplicateKeyError:
                    continue
            if metas.replace_one({"_id": collection, "rev": old.get("rev")}, new).matched_count:
                return new

    def _read_scalar_fields(self, collection: str) -> list[str] | None:
        with self._errors():
            meta = self._meta(collection)
        return None if meta is None else meta["scalar_fields"]

    def ensure_collection(self, collection: str, *, scalar_fields: Sequence[str] = ()) -> None:
        wanted = self._wanted(collection, scalar_fields)
        if wanted is None:
            return

        def add(meta: dict) -> dict:
            for field in sorted(wanted - set(meta["scalar_fields"])):
                comps = split_path(field)
                for raw in self._coll(collection).find({comps[0]: {"$exists": True}}, {comps[0]: 1}):
                    if isinstance(get_path(raw, comps), (dict, list)):
                        raise InvalidDocument(f"collection {collection!r}: cannot declare {field!r} scalar, "
                                              f"document {raw['_id']!r} holds an array or object there")
            meta["scalar_fields"] = sorted(set(meta["scalar_fields"]) | wanted)
            return meta

        with self._errors():
            meta = self._change_meta(collection, add)
        self._remember(collection, meta["scalar_fields"])

    def create_index(self, collection: str, keys: Sequence[tuple[str, int]], *, unique: bool = False) -> None:
        spec, name = self._index_spec(collection, keys, unique)
        self.ensure_collection(collection)
        # _id is left out of the server's index: every collection already has one on it, sorting happens here,
        # and some wire-compatible servers refuse every later insert once _id is part of a compound index.
        server_keys = [(f, d) for f, d in spec if f != "_id"]
        with self._errors():
            if server_keys:
                self._coll(collection).create_index(server_keys, name=name, unique=unique)

            def record(meta: dict) -> dict:
                if all(old["name"] != name for old in meta["indexes"]):
                    meta["indexes"] = [*meta["indexes"], {"name": name, "keys": [list(k) for k in spec],
                                                          "unique": unique}]
                return meta
            self._change_meta(collection, record)

    def indexes(self, collection: str) -> list[dict]:
        """The indexes created on a collection: ``{"name", "keys", "unique"}``."""
        with self._errors():
            meta = self._meta(collection)
        return [{**ix, "keys": [tuple(k) for k in ix["keys"]]} for ix in meta["indexes"]] if meta else []

    def collections(self) -> list[str]:
        with self._errors():
            return sorted(d["_id"] for d in self._db()[META].find({}, {"_id": 1}))

    # -- writes --------------------------------------------------------------------------------------------
    def _check(self, doc: Any, scalars: frozenset[str], collection: str) -> None:
        validate_document(doc)
        self._check_scalars(doc, scalars, collection)

    def insert_many(self, collection: str, docs: Iterable[dict], *, chunk_size: int | None = None) -> int:
        scalars = self._known(collection)
        it = iter(docs)
        total = 0
        while chunk := list(islice(it, chunk_size or self.chunk_size)):
            ids: set[str] = set()
            for doc in chunk:
                self._check(doc, scalars, collection)
                if doc["_id"] in ids:
                    raise DuplicateKey(f"collection {collection!r}: _id {doc['_id']!r} appears twice in one insert")
                ids.add(doc["_id"])
            with self._errors():
                self._insert_chunk(collection, chunk)
            total += len(chunk)
        return total

    def _insert_chunk(self, collection: str, chunk: list[dict]) -> None:
        coll = self._coll(collection)
        try:
            coll.insert_many([dict(d) for d in chunk], ordered=True)  # copies: the driver would add fields
        except perr.BulkWriteError as exc:
            details = exc.details or {}
            done = details.get("nInserted", 0)
            if done:  # keep the chunk all-or-nothing: remove what this chunk wrote before the failure
                coll.delete_many({"_id": {"$in": [d["_id"] for d in chunk[:done]]}})
            errors = details.get("writeErrors") or [{}]
            first = errors[0]
            if first.get("code") == 11000:
                _id = chunk[first.get("index", 0)]["_id"]
                msg = first.get("errmsg", "")
                if first.get("keyPattern", {"_id": 1}) == {"_id": 1} and ("_id" in msg or "keyPattern" in first):
                    raise DuplicateKey(f"collection {collection!r}: a document with _id {_id!r} already exists") \
                        from exc
                raise DuplicateKey(f"collection {collection!r}: document {_id!r} repeats a unique key ({msg})") \
                    from exc
            raise

    def _write_back(self, coll, doc: dict, rev: Any, ops, scalars, collection: str) -> dict | None:
        """Apply ``ops`` to ``doc`` and replace it if its revision is still ``rev``; None on a conflict."""
        new = apply_update(doc, ops)
        self._check(new, scalars, collection)
        if coll.replace_one(_guard(doc["_id"], rev), {**new, REVISION: _token()}).matched_count:
            return new
        return None

    def _update_by_id(self, coll, doc: dict, rev: Any, node: Logical, ops, scalars, collection: str) -> dict | None:
        """Update one matching document, re-reading it after each conflict; None once it no longer matches."""
        while True:
            new = self._write_back(coll, doc, rev, ops, scalars, collection)
            if new is not None:
                return new
            raw = coll.find_one({"_id": doc["_id"]})
            if raw is None:
                return None
            doc, rev = _split(raw)
            if not matches(doc, node):
                return None

    def update_many(self, collection: str, filter: Filter, update: Update) -> int:
        node, ops = parse_filter(filter), validate_update(update)
        scalars = self._scalar_fields(collection)
        if scalars is None:
            return 0
        with self._errors():
            coll = self._coll(collection)
            found = self._fetch(collection, node, None)
            for doc, _ in found:  # every new document is checked before the first one is written
                self._check(apply_update(doc, ops), scalars, collection)
            return sum(self._update_by_id(coll, doc, rev, node, ops, scalars, collection) is not None
                       for doc, rev in found)

    def find_one_and_update(self, collection: str, filter: Filter, update: Update, *,
                            sort: Sort | None = None) -> dict | None:
        node, ops, spec = parse_filter(filter), validate_update(update), validate_sort(sort)
        scalars = self._scalar_fields(collection)
        if scalars is None:
            return None
        fields = top_fields(node) | {f.split(".")[0] for f, _ in spec}
        with self._errors():
            coll = self._coll(collection)
            while True:
                candidates = self._ordered(self._fetch(collection, node, fields), spec, None)
                if not candidates:
                    return None
                for partial, _ in candidates:  # in sort order; one that changed meanwhile is re-checked
                    raw = coll.find_one({"_id": partial["_id"]})
                    if raw is None:
                        continue
                    doc, rev = _split(raw)
                    if matches(doc, node):
                        new = self._update_by_id(coll, doc, rev, node, ops, scalars, collection)
                        if new is not None:
                            return new

    def replace_one(self, collection: str, doc: dict, *, upsert: bool = False) -> bool:
        scalars = self._known(collection) if upsert else self._scalar_fields(collection)
        if scalars is None:
            validate_document(doc)
            return False
        self._check(doc, scalars, collection)
        with self._errors():
            result = self._coll(collection).replace_one({"_id": doc["_id"]}, dict(doc), upsert=upsert)
        return bool(result.matched_count or result.upserted_id is not None)

    def swap_many(self, collection: str, docs: Sequence[dict], expected: Sequence[Any], *,
                  field: str = "_rev") -> list[str]:
        """One read of the batch, compared here with the reference rules, then a replace of each match guarded by
        the hidden revision read with it (a write in between makes it miss)."""
        checked = self._swaps(docs, expected, field)
        scalars = self._scalar_fields(collection)
        for doc, _ in checked:  # every document is checked before the first one is written
            self._check(doc, scalars or frozenset(), collection)
        if scalars is None or not checked:
            return []
        with self._errors():
            coll = self._coll(collection)
            ids = sorted({doc["_id"] for doc, _ in checked})
            current = {raw["_id"]: (raw.get(field), raw.get(REVISION))
                       for raw in coll.find({"_id": {"$in": ids}}, {"_id": 1, field: 1, REVISION: 1})}
            done: list[str] = []
            for doc, want in checked:
                _id = doc["_id"]
                if _id in current and values_equal(_plain(current[_id][0]), want):
                    token = _token()
                    if coll.replace_one(_guard(_id, current[_id][1]), {**doc, REVISION: token}).matched_count:
                        current[_id] = (doc.get(field), token)
                        done.append(_id)
        return done

    def delete_many(self, collection: str, filter: Filter) -> list[dict]:
        node = parse_filter(filter)
        if self._scalar_fields(collection) is None:
            return []
        deleted: list[dict] = []
        with self._errors():
            coll = self._coll(collection)
            found = self._fetch(collection, node, None)
            while found:
                coll.bulk_write([pymongo.DeleteOne(_guard(d["_id"], rev)) for d, rev in found], ordered=False)
                ids = [d["_id"] for d, _ in found]
                left = {raw["_id"]: raw for raw in coll.find({"_id": {"$in": ids}})}
                deleted.extend(d for d, _ in found if d["_id"] not in left)
                # changed between our read and our delete: delete it only if it still matches
                found = [pair for pair in map(_split, left.values()) if matches(pair[0], node)]
        return deleted

    # -- reads ---------------------------------------------------------------------------------------------
    def _fetch(self, collection: str, node: Logical, fields: set[str] | None,
               id_order: int = 0, want: int | None = None) -> list[tuple[dict, Any]]:
        """``(document, revision)`` of matches; ``fields`` limits what is fetched to those top-level fields,
        ``id_order`` (1 or -1) asks the server to sort by ``_id``, ``want`` stops after that many matches."""
        projection = None if fields is None else {"_id": 1, REVISION: 1, **{f: 1 for f in fields if f != "_id"}}
        cursor = self._coll(collection).find(pushdown(node), projection,
                                             sort=[("_id", id_order)] if id_order else None)
        out = []
        for raw in cursor:
            doc, rev = _split(raw)
            if matches(doc, node):
                out.append((doc, rev))
                if want is not None and len(out) >= want:
                    cursor.close()
                    break
        return out

    @staticmethod
    def _ordered(found: list[tuple[dict, Any]], spec: list, want: int | None) -> list[tuple[dict, Any]]:
        key = lambda pair: sort_key(pair[0], spec)  # noqa: E731
        if want is not None and want < len(found):
            return heapq.nsmallest(want, found, key=key)
        return sorted(found, key=key)

    def find(self, collection: str, filter: Filter | None = None, *, sort: Sort | None = None,
             limit: int | None = None, skip: int = 0, projection: Projection | None = None) -> Iterator[dict]:
        """Matching documents; fetched at once (no cursor stays open while you iterate)."""
        node = parse_filter(filter)
        spec = validate_sort(sort)
        keep = validate_projection(projection)
        self._check_limits(limit, skip)
        self._check_name("collection", collection)
        if limit == 0:
            return iter(())
        want = None if limit is None else skip + limit
        fields = None
        if keep and any(k for p, k in keep.items() if p != "_id"):  # inclusion: fetch only what is needed
            fields = top_fields(node) | {f.split(".")[0] for f, _ in spec} | \
                {p.split(".")[0] for p, k in keep.items() if k}
        with self._errors():
            if len(spec) == 1 and spec[0][0] == "_id":  # _id is always a string: the server's order is ours
                found = self._fetch(collection, node, fields, id_order=spec[0][1], want=want)
            else:
                found = self._ordered(self._fetch(collection, node, fields), spec, want)
        docs = [d for d, _ in found[skip:want]]
        if projection:
            return iter([project(d, projection) for d in docs])
        return iter(docs)

    def count(self, collection: str, filter: Filter | None = None) -> int:
        node = parse_filter(filter)
        self._check_name("collection", collection)
        with self._errors():
            if not node.children:
                return self._coll(collection).count_documents({})
            return len(self._fetch(collection, node, top_fields(node)))

    def close(self) -> None:
        self.conn.close()

    def __repr__(self) -> str:
        return f"MongoIndex({self.where!r}, database={self.database!r})"
