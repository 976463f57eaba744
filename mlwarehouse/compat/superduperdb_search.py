"""SuperDuperDB's measures, semantic indexes and ``$like`` queries, on the warehouse's vector indexes.

    docs.create_semantic_index('by_x', ['linear_embedding'], measure='css')  # or create_model(semantic_index=True)
    docs.find({'$like': {'document': {'x': tensor}, 'n': 10}, '_fold': 'valid'})  # nearest first, with '_score'

A semantic index is the vector index of the same name over its first model's outputs
(``_outputs.<key>.<model>``); the first model also encodes the ``$like`` document. Its record (models, keys,
measure) and the collection's default semantic index are kept in the collection's catalog document, so every
process sees the same. A measure is ``measure(x, y)`` -> the similarity matrix of the rows of ``x`` (queries) and
``y`` (candidates), higher is closer, stored by import path (never pickled). The built-in ``css``/``cosine``,
``dot`` and ``l2`` (minus the Euclidean distance) are the indexes' own metrics. Any other measure is honoured by
reranking: the index is searched with the closest built-in metric (``create_measure(metric=...)``, cosine unless
said) for :data:`RERANK` times ``n`` candidates, which the measure then scores and orders; so a measure far from
every built-in metric can miss documents that the whole collection scored by it would rank higher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mlwarehouse.codecs.datatypes import Encoded
from mlwarehouse.codecs.imports import resolve, split_target, target_of
from mlwarehouse.collections.catalog import COLLECTIONS
from mlwarehouse.collections.documents import strip
from mlwarehouse.errors import CodecError, DuplicateKey, NotFound, QueryError, VectorIndexError
from mlwarehouse.ids import new_id
from mlwarehouse.query.jsonvalues import get_path
from mlwarehouse.vectors.spec import check_metric
from mlwarehouse.vectors.tracking import vector_of

__all__ = ["SemanticSearch", "css", "dot", "l2", "BUILTIN_MEASURES", "RERANK"]

#: a custom measure reranks this many times ``n`` candidates of the index's own metric
RERANK = 4
#: SuperDuperDB's measure names and the metric of the vector index each one is
BUILTIN_MEASURES = {"css": "cosine", "cosine": "cosine", "dot": "ip", "ip": "ip", "l2": "l2"}
_TRAINING = ("metrics", "loss", "splitter", "validation_sets")


def _rows(x: Any) -> np.ndarray:
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else x
    x = np.asarray(x, dtype=np.float32)
    return x[None, :] if x.ndim == 1 else x


def css(x: Any, y: Any) -> np.ndarray:
    """Cosine similarity of every row of ``x`` with every row of ``y``."""
    x, y = _rows(x), _rows(y)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return x @ y.T


def dot(x: Any, y: Any) -> np.ndarray:
    """Inner products of every row of ``x`` with every row of ``y``."""
    return _rows(x) @ _rows(y).T


def l2(x: Any, y: Any) -> np.ndarray:
    """Minus the Euclidean distance of every row of ``x`` to every row of ``y`` (higher is closer)."""
    x, y = _rows(x), _rows(y)
    return -np.sqrt(np.maximum(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1), 0.0))


_BUILTIN_FUNCTIONS = {css: "cosine", dot: "ip", l2: "l2"}
_BUILTIN_PATHS = {f"{__name__}:{f.__name__}": metric for f, metric in _BUILTIN_FUNCTIONS.items()}


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 100 or not name.isprintable() or "." in name \
            or name.startswith("$"):
        raise VectorIndexError(f"a {what} name is 1 to 100 printable characters without '.', not starting with "
                               f"'$', not {name!r}")
    return name


class SemanticSearch:
    """The semantic-index half of the SuperDuperDB collection (mixed into it; uses ``native`` and ``catalog``)."""

    # -- records in the collection's catalog document -----------------------------------------------------
    def _record(self) -> dict:
        return self.catalog.record(self.name) or {}

    def _set_record(self, update: Mapping) -> None:
        self.catalog.record(self.name, create=True)
        self.catalog.project.update(COLLECTIONS, {"name": self.name}, dict(update))

    # -- measures -------------------------------------------------------------------------------------------
    def create_measure(self, name: str, object: Any = None, *, metric: str | None = None) -> dict:
        """Register the measure ``name``: a built-in one (``object`` None or one of :data:`BUILTIN_MEASURES`, or
        :func:`css`/:func:`dot`/:func:`l2`), or an importable ``measure(x, y)`` (or its ``"module:qualname"``),
        which searches rerank; ``metric`` is the index metric it is closest to (default: by name, else cosine).
        CodecError for a measure another process could not import (a lambda, a local function, ``__main__``)."""
        _check_name(name, "measure")
        function = None
        if object is None or (isinstance(object, str) and object in BUILTIN_MEASURES):
            key = object or name
            if key not in BUILTIN_MEASURES:
                raise VectorIndexError(f"{key!r} is not a built-in measure ({', '.join(BUILTIN_MEASURES)}); give "
                                       f"the measure function as object=")
            builtin = BUILTIN_MEASURES[key]
        elif isinstance(object, str) and object in _BUILTIN_PATHS:
            builtin = _BUILTIN_PATHS[object]
        elif isinstance(object, str):
            if split_target(object) is None:
                raise CodecError(f"measure {name!r}: {object!r} is neither a built-in measure nor a "
                                 f"'module:qualname' import path")
            builtin, function = None, object
        elif callable(object) and object in _BUILTIN_FUNCTIONS:
            builtin = _BUILTIN_FUNCTIONS[object]
        elif callable(object):
            builtin, function = None, target_of(object, f"measure {name!r}")
        else:
            raise CodecError(f"measure {name!r} must be callable, not {type(object).__name__}")
        record = {"name": name, "function": function,
                  "metric": check_metric(metric) if metric else builtin or BUILTIN_MEASURES.get(name, "cosine")}
        existing = (self._record().get("measures") or {}).get(name)
        if existing is not None and existing != record:
            raise DuplicateKey(f"collection {self.name!r} already has a measure {name!r} ({existing})")
        self._set_record({"$set": {f"measures.{name}": record}})
        return record

    def list_measures(self) -> list[str]:
        return list(self._record().get("measures") or {})

    def _measure(self, measure: Any) -> dict:
        """A measure's record: registered by name, a built-in name, or a callable (registered by its name)."""
        if isinstance(measure, str):
            found = (self._record().get("measures") or {}).get(measure)
            if found is not None:
                return found
            if measure in BUILTIN_MEASURES:
                return {"name": measure, "function": None, "metric": BUILTIN_MEASURES[measure]}
            raise NotFound(f"no measure {measure!r} on collection {self.name!r} (measures: "
                           f"{', '.join(repr(m) for m in self.list_measures()) or 'none'}; built-in: "
                           f"{', '.join(BUILTIN_MEASURES)}); create it with create_measure()")
        if callable(measure):
            return self.create_measure(getattr(measure, "__name__", ""), measure)
        raise VectorIndexError(f"a measure is a name or a function, not {type(measure).__name__}")

    # -- semantic indexes -----------------------------------------------------------------------------------
    def create_semantic_index(self, name: str, models: str | Sequence[str], keys: str | Sequence[str] | None = None,
                              measure: Any = "css", *, engine: str | None = None, options: Mapping | None = None,
                              **training: Any) -> dict:
        """A semantic index over the outputs of ``models[0]`` (a model made with ``create_model``), which also
        encodes the ``$like`` documents; the first one made is the collection's default. ``keys`` (optional)
        are the models' input fields, checked. Training (``metrics``, ``loss``, ``splitter``,
        ``validation_sets``) is not supported. ``engine``/``options``: those of the vector index."""
        _check_name(name, "semantic index")
        unknown = sorted(set(training) - set(_TRAINING))
        if unknown:
            raise TypeError(f"create_semantic_index() got unsupported arguments: {', '.join(unknown)}")
        if any(training.get(k) for k in _TRAINING):
            raise NotImplementedError(f"create_semantic_index({name!r}): training a semantic index (metrics, loss, "
                                      f"splitter, validation_sets) is not supported; train the model elsewhere")
        models = [models] if isinstance(models, str) else list(models)
        if not models:
            raise VectorIndexError(f"semantic index {name!r} needs at least one model")
        listeners = [self.native.listener(m) for m in models]  # NotFound names the attached ones
        if keys is not None:
            keys = [keys] if isinstance(keys, str) else list(keys)
            if keys != [x.key for x in listeners]:
                raise VectorIndexError(f"semantic index {name!r}: keys {keys!r} are not the models' inputs "
                                       f"{[x.key for x in listeners]!r}")
        if name in self.list_semantic_indexes():
            raise DuplicateKey(f"collection {self.name!r} already has a semantic index {name!r}")
        chosen = self._measure(measure)
        self.native.create_vector_index(name, listener=models[0], metric=chosen["metric"], engine=engine,
                                        options=options)
        entry = {"name": name, "models": models, "keys": [x.key for x in listeners], "measure": chosen["name"],
                 "order": new_id()}
        self._set_record({"$set": {f"semantic_indexes.{name}": entry}})
        return entry

    def _semantic_entries(self, record: Mapping | None = None) -> list[dict]:
        """The records of the semantic indexes (one field each, so concurrent writers never undo each other),
        oldest first."""
        entries = (self._record() if record is None else record).get("semantic_indexes") or {}
        return sorted(entries.values(), key=lambda e: e.get("order", ""))

    def list_semantic_indexes(self) -> list[str]:
        """The collection's semantic indexes, oldest first."""
        return [e["name"] for e in self._semantic_entries()]

    def _semantic_entry(self, name: str) -> dict:
        for entry in self._semantic_entries():
            if entry["name"] == name:
                return entry
        raise NotFound(f"no semantic index {name!r} on collection {self.name!r} (semantic indexes: "
                       f"{', '.join(repr(n) for n in self.list_semantic_indexes()) or 'none'})")

    def delete_semantic_index(self, name: str) -> None:
        """Delete a semantic index and its vector index (the default falls back to the oldest left)."""
        self._semantic_entry(name)
        try:
            self.native.drop_vector_index(name)
        except NotFound:
            pass  # dropped natively already
        unset = {f"semantic_indexes.{name}": ""}
        if self._record().get("semantic_index") == name:
            unset["semantic_index"] = ""
        self._set_record({"$unset": unset})

    @property
    def semantic_index(self) -> str | None:
        """The default semantic index of ``$like`` queries: the one assigned here (by any process), else the
        first created; None without any."""
        record = self._record()
        names = [e["name"] for e in self._semantic_entries(record)]
        chosen = record.get("semantic_index")
        return chosen if chosen in names else (names[0] if names else None)

    @semantic_index.setter
    def semantic_index(self, name: str | None) -> None:
        if name is None:
            self._set_record({"$unset": {"semantic_index": ""}})
            return
        self._semantic_entry(name)
        self._set_record({"$set": {"semantic_index": name}})

    def _drop_semantic_indexes_of(self, model: str) -> None:
        for entry in self._semantic_entries():
            if entry["models"][0] == model:
                self.delete_semantic_index(entry["name"])

    # -- $like queries --------------------------------------------------------------------------------------
    def _find_like(self, filter: Mapping, projection: Mapping | None, *, similar_first: bool, raw: bool,
                   semantic_index: str | None) -> list[dict]:
        """The ``n`` documents most similar to ``$like``'s document, nearest first, each with ``_score``.

        ``similar_first=False`` (SuperDuperDB's default, "matches then similar"): the documents matching the
        rest of the filter, the ``n`` nearest of them (fewer only when fewer match). ``similar_first=True``
        ("similar then matches"): the ``n`` nearest documents of the whole index, then those of them matching
        the filter (so usually fewer than ``n``)."""
        like = filter["$like"]
        rest = {k: v for k, v in filter.items() if k != "$like"}
        if not isinstance(like, Mapping) or "document" not in like or set(like) - {"document", "n"}:
            raise QueryError(f"$like is {{'document': {{...}}, 'n': 10}}, not {like!r}")
        n = like.get("n", 10)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise QueryError(f"$like's n must be a positive integer, not {n!r}")
        name = semantic_index or self.semantic_index
        if name is None:
            raise NotFound(f"collection {self.name!r} has no semantic index (create_semantic_index first)")
        entry = self._semantic_entry(name)
        measure = self._measure(entry["measure"])
        function = self._measure_function(measure)
        index = self.native.vector_index(name)
        query = index.query_vector(like=self._decoded(self._document(like["document"])))
        wanted = n * RERANK if function is not None else n
        hits = list(index.find(None if similar_first else rest, None, vector=query, n=wanted, raw=raw))
        if function is not None:
            hits = self._reranked(hits, query, function, index.spec.path, measure["name"])[:n]
        if similar_first and rest and hits:
            scope = {"$and": [{"_id": {"$in": [h["_id"] for h in hits]}}, rest]}
            keep = {d["_id"] for d in self.native.find(scope, {"_id": 1})}
            hits = [h for h in hits if h["_id"] in keep]
        if projection:
            scores = {h["_id"]: h["_score"] for h in hits}
            read = {d["_id"]: d for d in self.native.find({"_id": {"$in": list(scores)}}, projection, raw=raw)}
            hits = [{**read[i], "_score": s} for i, s in scores.items() if i in read]
        return [strip(h, projection) for h in hits]

    def _measure_function(self, measure: dict):
        """The measure's function when it reranks (None for a built-in one)."""
        target = measure.get("function")
        if target is None:
            return None
        found = resolve(target, f"measure {measure['name']!r}")  # PickleNotAllowed if its module is not trusted
        if found is None or not callable(found):
            raise VectorIndexError(f"measure {measure['name']!r} ({target!r}) cannot be imported in this process")
        return found

    def _reranked(self, hits: list[dict], query: np.ndarray, function, path: str, name: str) -> list[dict]:
        vectors = [vector_of(self.native, get_path(h, path), query.size) for h in hits]
        hits = [h for h, v in zip(hits, vectors) if v is not None]
        if not hits:
            return []
        x, y = query[None, :], np.stack([v for v in vectors if v is not None])
        try:
            import torch
            x, y = torch.from_numpy(x), torch.from_numpy(y)
        except ImportError:
            pass
        scores = _rows(function(x, y)).reshape(-1)
        if scores.size != len(hits):
            raise VectorIndexError(f"measure {name!r} returned {scores.size} scores for 1 query and {len(hits)} "
                                   f"candidates: it must return the (1, {len(hits)}) similarity matrix")
        for h, s in zip(hits, scores):
            h["_score"] = float(s)
        return sorted(hits, key=lambda h: -h["_score"])

    def _decoded(self, value: Any) -> Any:
        """A ``$like`` document with its ``_content`` values decoded by their converters (for the model)."""
        if isinstance(value, Encoded):
            return self.catalog.datatype(value.datatype).decode(value.data)
        if isinstance(value, Mapping):
            return {k: self._decoded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._decoded(v) for v in value]
        return value


def like_filter(filter: Mapping | None, like: Any, n: int | None) -> dict | None:
    """``find(like=document, n=...)`` as the ``$like`` filter it means (None when neither is given)."""
    filter = dict(filter or {})
    if like is None:
        if n is not None:
            raise QueryError("n is the number of neighbours of a $like query: pass like= too")
        return filter if "$like" in filter else None
    if "$like" in filter:
        raise QueryError("pass either like= or a $like filter, not both")
    return {**filter, "$like": {"document": like, "n": 10 if n is None else n}}

