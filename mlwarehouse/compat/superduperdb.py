"""SuperDuperDB's client on top of the warehouse: databases, collections, converters and models.

    from mlwarehouse.compat.superduperdb import SuperDuperClient     # was: from superduperdb.client import ...
    docs = SuperDuperClient().my_database.my_collection
    docs.create_converter('float_tensor', FloatTensor())
    docs.create_model('linear_embedding', torch.nn.Linear(1024, 64), key='x')
    docs.insert_many([{'x': {'_content': {'bytes': FloatTensor.encode(torch.randn(1024))}}} for _ in range(100)])
    docs.find_one()   # {'_id': ..., 'x': tensor([...]), '_fold': 'train', '_outputs': {'x': {'linear_embedding': ...}}}

A database is a project (``wh.project(name)``), a collection is the project's collection of the same name
(:mod:`mlwarehouse.collections`), so native code and this layer see the same documents. A converter is a data
type whose encoder and decoder are the converter class's ``encode``/``decode`` by import path (never pickled): a
process that reads its values must trust the converter's module (``$MLW_TRUSTED_MODULES``), or read with
``raw=True`` to get the bytes. ``{"_content": {"bytes": ..., "converter": name}}`` anywhere in a document, an update
or a replacement is stored as those bytes of that type (``converter`` may be left out where the collection has
exactly one). A model is a listener computed in the writing process; its outputs are stored by the warehouse's own
codecs (tensors, arrays, JSON), so ``create_model(converter=...)`` is accepted and not needed. Ids are the
warehouse's string ids (no ObjectId); pymongo is not needed unless the warehouse is on MongoDB.

Measures, semantic indexes and ``$like`` queries are in :mod:`mlwarehouse.compat.superduperdb_search`.

Not supported (a clear error): ``key="_base"`` (the whole document as a model's input), ``active=False``,
``_content`` given by URL, and models given by name only.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from mlwarehouse.codecs.datatypes import DataTypeError, Encoded
from mlwarehouse.collections.documents import InsertOneResult
from mlwarehouse.compat.superduperdb_search import SemanticSearch, like_filter
from mlwarehouse.errors import InvalidDocument, QueryError
from mlwarehouse.warehouse import connect

__all__ = ["SuperDuperClient", "Database", "Collection"]

CONTENT = "_content"
#: keyword arguments of ``create_model`` passed on to ``Collection.attach``; ``verbose`` is accepted and ignored
_ATTACH_OPTIONS = ("batch_size", "compute", "example_inputs", "batched")


class SuperDuperClient:
    """The client: the embedded warehouse (or ``$MLW_URI``), or a MongoDB server given by ``host``/``port``.

    ``host`` may be a whole ``mongodb://`` URI (as pymongo takes it); other keywords go to
    :func:`mlwarehouse.connect` (``uri``, ``blobs``, ``home``)."""

    def __init__(self, host: str | None = None, port: int | None = None, **kw: Any):
        if host is not None or port is not None:
            if kw.get("uri"):
                raise TypeError("pass either host/port or uri, not both")
            host = host or "localhost"
            kw["uri"] = host if "://" in host else f"mongodb://{host}:{port or 27017}/"
        self.warehouse = connect(**kw)

    def __getattr__(self, name: str) -> "Database":
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, name: str) -> "Database":
        return Database(self, name)

    def list_database_names(self) -> list[str]:
        return self.warehouse.projects()

    def close(self) -> None:
        self.warehouse.close()

    def __enter__(self) -> "SuperDuperClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Database:
    """A project: ``database.my_collection`` and ``database["my_collection"]`` are its collections."""

    def __init__(self, client: SuperDuperClient, name: str):
        self.client, self.name = client, name
        self.project = client.warehouse.project(name)

    def __getattr__(self, name: str) -> "Collection":
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, name: str) -> "Collection":
        return Collection(self, name)

    def list_collection_names(self) -> list[str]:
        return self.project.catalog.names()

    def __repr__(self) -> str:
        return f"<superduperdb Database {self.name!r}>"


class Collection(SemanticSearch):
    """SuperDuperDB's collection: pymongo's methods with ``_content`` values, converters, models and semantic
    indexes.

    Everything is delegated to the native collection (``self.native``), which keeps the models' outputs in step
    with every write; this layer only turns ``_content`` values into :class:`Encoded` ones and maps the names."""

    def __init__(self, database: Database, name: str):
        self.database, self.name = database, name
        self.native = database.project.collection(name)
        self.catalog = database.project.catalog

    def __repr__(self) -> str:
        return f"<superduperdb Collection {self.name!r} of database {self.database.name!r}>"

    # -- converters ---------------------------------------------------------------------------------------
    def create_converter(self, name: str, object: Any) -> None:
        """Register ``object``'s ``encode``/``decode`` (static or class methods of an importable class) as the
        data type ``name`` of the database, and make it a converter of this collection."""
        cls = object if isinstance(object, type) else type(object)
        methods = []
        for which in ("encode", "decode"):
            raw = inspect.getattr_static(cls, which, None)
            if raw is None:
                raise DataTypeError(f"converter {name!r}: {cls.__qualname__} has no {which} method")
            if not isinstance(raw, (staticmethod, classmethod)):
                raise DataTypeError(f"converter {name!r}: {cls.__qualname__}.{which} must be a staticmethod or a "
                                    f"classmethod: converters are stored by import path, not as the instance")
            methods.append(getattr(cls, which))
        self.native.register_type(name, *methods, description=f"SuperDuperDB converter {cls.__qualname__}")
        self.catalog.add_converter(self.name, name)

    def list_converters(self) -> list[str]:
        record = self.catalog.record(self.name)
        return list(record.get("converters") or []) if record else []

    # -- models -------------------------------------------------------------------------------------------
    def create_model(self, name: str, object: Any = None, filter: Mapping | None = None, converter: str | None = None,
                     active: bool = True, dependencies: Iterable[str] | None = None, key: str = "_base",
                     verbose: bool = False, semantic_index: bool = False, measure: Any = None, **kw: Any):
        """Attach ``object`` (a torch module or an importable callable) as the listener ``name`` on ``key`` of
        the documents matching ``filter``; outputs are computed now and on every write, in the writing process.

        ``converter`` is accepted and unused: outputs are stored by the warehouse's codecs. ``dependencies``
        must be the models whose output ``key`` reads (``key="_outputs.<field>.<model>"``). ``semantic_index``:
        also make the semantic index ``name`` over its outputs, by ``measure`` (default ``css``)."""
        if object is None:
            raise NotImplementedError(f"create_model({name!r}): give the model itself (object=...); models are "
                                      f"not looked up by name here")
        if key == "_base":
            raise NotImplementedError(f"create_model({name!r}, key='_base'): the whole document as a model's input "
                                      f"is not supported; name the field the model reads, e.g. key='x'")
        if not active:
            raise NotImplementedError(f"create_model({name!r}, active=False): inactive models are not supported; "
                                      f"create it when its outputs should be computed")
        unread = [d for d in dependencies or () if not (key.startswith("_outputs.") and key.split(".")[-1] == d)]
        if unread:
            raise NotImplementedError(f"create_model({name!r}): dependencies {unread!r} are not read by key "
                                      f"{key!r}; a model that reads another's output has key='_outputs.<field>."
                                      f"<model>'")
        unknown = sorted(set(kw) - set(_ATTACH_OPTIONS))
        if unknown:
            raise TypeError(f"create_model() got unsupported arguments: {', '.join(unknown)}")
        if converter is not None:
            self.catalog.datatype(converter)  # a typo is still an error
        if measure is not None and not semantic_index:
            raise TypeError(f"create_model({name!r}): measure= is the measure of its semantic index: pass "
                            f"semantic_index=True too")
        chosen = self._measure(measure or "css") if semantic_index else None  # a bad measure attaches nothing
        options = {"compute": "inline", **kw}
        listener = self.native.attach(name, object, key=key, where=filter, **options)
        if chosen is not None:
            try:
                self.create_semantic_index(name, [name], measure=chosen["name"])
            except BaseException:
                self.native.detach(name, force=True)
                raise
        return listener

    def delete_model(self, name: str, force: bool = True) -> int:
        """Remove the model and unset its outputs (``force``: models reading its outputs too), with the semantic
        indexes over its outputs; how many documents were cleaned."""
        self._drop_semantic_indexes_of(name)
        return self.native.detach(name, force=force)

    def list_models(self) -> list[str]:
        return [x.name for x in self.native.listeners()]

    def create_imputation(self, name: str, model: Any, loss: Any, target: str, metrics: Iterable[Any] | None = None,
                          filter: Mapping | None = None, *, key: str | None = None, **trainer: Any):
        """Train ``model`` to predict ``target`` and attach it as the model ``name``, so every document gets its
        prediction (``_outputs.<key>.<name>``).

        ``model`` is a torch module (with ``key=``, the field it reads) or the name of a model made by
        ``create_model`` (its module is the starting point, its key the input); ``target`` is a field or such a
        model's name (its outputs are the target). Train and validation folds are the documents' ``_fold``, as
        SuperDuperDB split them at insert. ``trainer``: ``epochs``, ``batch_size``, ``lr``, ``optimizer``... as
        :meth:`mlwarehouse.training.registry.Training.fit` takes them. Unlike the original, every epoch is a
        checkpoint and the trained model is a new model record, so the history is kept."""
        native = self.native
        if isinstance(model, str):
            listener = native.listener(model)
            if listener.model.get("kind") != "torch":
                raise QueryError(f"model {model!r} is not a torch module: only those can be trained")
            key = key or listener.key
            model = listener.model["id"]  # the stored module, loaded (and checked trainable) by the fit
        if key is None:
            raise QueryError("create_imputation needs key= (the field the model reads) for a model given as object")
        names = {x.name: x for x in native.listeners()}
        if target in names:
            target = names[target].output_path
        trainer.setdefault("folds", {"valid": 0.0, "field": "_fold"})
        return native.project.training.impute(native, name, model, input=key, target=target, loss=loss,
                                              metrics=list(metrics or ()), filter=dict(filter) if filter else None,
                                              **trainer)

    # -- _content values ----------------------------------------------------------------------------------
    def _encoder(self):
        converters: list | None = None

        def convert(value: Any) -> Any:
            nonlocal converters
            if isinstance(value, Mapping):
                if CONTENT not in value:
                    return {k: convert(v) for k, v in value.items()}
                if converters is None:
                    converters = self.list_converters()
                return _encoded(value, converters, self.catalog)
            if isinstance(value, (list, tuple)):
                return [convert(v) for v in value]
            return value
        return convert

    def _document(self, document: Mapping, convert=None) -> dict:
        if not isinstance(document, Mapping):
            raise InvalidDocument(f"a document must be a dict, not {type(document).__name__}")
        return (convert or self._encoder())(document)

    def _update(self, update: Mapping) -> dict:
        if not isinstance(update, Mapping):
            raise InvalidDocument(f"an update must be a dict of operators, not {type(update).__name__}")
        convert = self._encoder()
        return {op: convert(fields) if op != "$unset" else fields for op, fields in update.items()}

    # -- pymongo's methods --------------------------------------------------------------------------------
    def insert_one(self, document: Mapping):
        return InsertOneResult(self.insert_many([document]).inserted_ids[0])

    def insert_many(self, documents: Iterable[Mapping], **kw: Any):
        """Insert documents (``_content`` values decoded on read by their converter); returns ``inserted_ids``."""
        if isinstance(documents, Mapping):
            raise InvalidDocument("insert_many takes an iterable of documents, not one document (insert_one)")
        convert = self._encoder()
        return self._insert([self._document(d, convert) for d in documents], **kw)

    def _insert(self, docs: list[dict], **kw: Any):
        return self.native.insert_many(docs, **kw)

    def find(self, filter: Mapping | None = None, projection: Mapping | None = None, *, similar_first: bool = False,
             like: Any = None, n: int | None = None, semantic_index: str | None = None, **kw: Any):
        """Matching documents, ``_content`` values decoded by their converters (``raw=True``: as Encoded).

        With ``{"$like": {"document": {...}, "n": 10}}`` in the filter (or ``like=document, n=10``): a list of
        the most similar documents by ``semantic_index`` (default: the collection's), nearest first, each with
        ``_score``. ``similar_first=False`` (the default): the documents matching the rest of the filter, ranked
        (the ``n`` nearest of them); ``True``: the ``n`` nearest of all, then those matching the filter."""
        semantic = like_filter(filter, like, n)
        if semantic is not None:
            extra = sorted(set(kw) - {"raw"})
            if extra:
                raise QueryError(f"a $like query is ordered by similarity and takes n: not {', '.join(extra)}")
            return self._find_like(semantic, projection, similar_first=similar_first, raw=kw.get("raw", False),
                                   semantic_index=semantic_index)
        return self.native.find(filter, projection, **kw)

    def find_one(self, filter: Mapping | None = None, projection: Mapping | None = None, **kw: Any):
        if like_filter(filter, kw.get("like"), kw.get("n")) is not None:
            return next(iter(self.find(filter, projection, **kw)), None)
        return self.native.find_one(filter, projection, **kw)

    def update_one(self, filter: Mapping, update: Mapping, upsert: bool = False):
        return self.native.update_one(filter, self._update(update), upsert=upsert)

    def update_many(self, filter: Mapping, update: Mapping, upsert: bool = False):
        return self.native.update_many(filter, self._update(update), upsert=upsert)

    def replace_one(self, filter: Mapping, replacement: Mapping, upsert: bool = False):
        document = self._document(replacement)
        return self.native.replace_one(filter, document, upsert=upsert)

    def delete_one(self, filter: Mapping):
        return self.native.delete_one(filter)

    def delete_many(self, filter: Mapping):
        return self.native.delete_many(filter)

    def count_documents(self, filter: Mapping | None = None) -> int:
        return self.native.count_documents(filter)

    def distinct(self, key: str, filter: Mapping | None = None) -> list:
        return self.native.distinct(key, filter)

    def drop(self, force: bool = False) -> None:
        self.native.drop(force=force)


def _encoded(value: Mapping, converters: list[str], catalog) -> Encoded:
    """``{"_content": {"bytes": ..., "converter": name}}`` as an Encoded value of that data type."""
    content = value[CONTENT]
    if set(value) != {CONTENT} or not isinstance(content, Mapping):
        raise InvalidDocument(f"a {CONTENT!r} value is {{{CONTENT!r}: {{'bytes': ..., 'converter': name}}}} "
                              f"alone, not {sorted(value)!r} with {type(content).__name__}")
    if "bytes" not in content:
        what = "a URL (download it and pass the bytes)" if "url" in content else f"keys {sorted(content)!r}"
        raise InvalidDocument(f"a {CONTENT!r} value needs 'bytes'; it has {what}")
    data = content["bytes"]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidDocument(f"{CONTENT!r} bytes must be bytes, not {type(data).__name__}")
    name = content.get("converter")
    if name is None:
        if len(converters) != 1:
            choices = ", ".join(repr(c) for c in converters) or "none: create one with create_converter()"
            raise InvalidDocument(f"a {CONTENT!r} value without 'converter', where the collection has "
                                  f"{len(converters)} converters ({choices}): say which, "
                                  f"{{{CONTENT!r}: {{'bytes': ..., 'converter': name}}}}")
        name = converters[0]
    catalog.datatype(name)  # DataTypeError naming the registered ones if unknown
    return Encoded(name, bytes(data))
