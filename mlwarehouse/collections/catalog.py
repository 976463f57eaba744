"""The catalog of a project's own collections and data types (``project.catalog``).

One document per collection (``schema.CATALOG``): its name, the table its documents live in, its validation
fraction and the converters (data type names) the SuperDuperDB layer attached to it. One document per data type
(``schema.DATATYPES``). Both are read fresh where correctness needs it (a type another process registered a moment
ago is found on the next read) and cached per name otherwise.
"""

from __future__ import annotations

from typing import Any

from mlwarehouse import schema
from mlwarehouse.codecs.datatypes import DataType, DataTypeError
from mlwarehouse.codecs.datatypes import check_name as check_type_name
from mlwarehouse.errors import DuplicateKey, NotFound, QueryError
from mlwarehouse.ids import utc_now
from mlwarehouse.warehouse.tables import table_name

__all__ = ["Catalog", "DEFAULT_VALID_FRACTION", "check_collection_name"]

#: SuperDuperDB's default share of documents in the validation fold
DEFAULT_VALID_FRACTION = 0.05
COLLECTIONS = schema.CATALOG.name
DATATYPES = schema.DATATYPES.name


def check_collection_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 120 or not name.isprintable() or name.startswith("$") \
            or "\x00" in name:
        raise QueryError(f"a collection name must be 1 to 120 printable characters not starting with '$', "
                         f"not {name!r}")
    return name


class Catalog:
    """Collections and data types of one project."""

    def __init__(self, project):
        self.project = project
        self._collections: dict[str, Any] = {}
        self._types: dict[str, DataType] = {}
        self._ready = False

    def _ensure(self) -> None:
        if not self._ready:
            self.project.ensure(schema.CATALOG)
            self.project.ensure(schema.DATATYPES)
            self.project.ensure(schema.LISTENERS)
            self._ready = True

    # -- collections ----------------------------------------------------------------------------------------
    def collection(self, name: str):
        from mlwarehouse.collections.collection import Collection
        check_collection_name(name)
        if name not in self._collections:
            self._collections[name] = Collection(self, name)
        return self._collections[name]

    def names(self) -> list[str]:
        """Names of this project's collections, sorted."""
        return sorted(d["name"] for d in self.project.find(COLLECTIONS, projection={"name": 1}))

    def record(self, name: str, *, create: bool = False) -> dict | None:
        """The catalog document of a collection (made on first write when ``create``)."""
        doc = self.project.find_one(COLLECTIONS, {"name": name})
        if doc is None and create:
            self._ensure()
            doc = {"name": name, "table": table_name(self.project.name, name),
                   "valid_fraction": DEFAULT_VALID_FRACTION, "converters": [], "created": utc_now()}
            try:
                self.project.insert(COLLECTIONS, doc)
            except DuplicateKey:  # another process made it first
                doc = self.project.find_one(COLLECTIONS, {"name": name})
        return doc

    def set(self, name: str, **fields: Any) -> None:
        self.record(name, create=True)
        self.project.update(COLLECTIONS, {"name": name}, {"$set": fields})

    def add_converter(self, collection: str, datatype: str) -> None:
        self.record(collection, create=True)
        self.project.update(COLLECTIONS, {"name": collection}, {"$addToSet": {"converters": datatype}})

    def forget(self, name: str) -> None:
        self.project.delete(COLLECTIONS, {"name": name})
        self._collections.pop(name, None)

    # -- data types -----------------------------------------------------------------------------------------
    def register_type(self, name: str, encode: Any, decode: Any, *, instance_of: Any = None,
                      description: str = "", replace: bool = False) -> DataType:
        """Register a data type for every process of this project (encoder and decoder by import path)."""
        datatype = DataType.define(name, encode, decode, instance_of, description)
        self._ensure()
        existing = self.project.find_one(DATATYPES, {"name": name})
        if existing is not None:
            if DataType.from_doc(existing) == datatype:
                return datatype
            if not replace:
                raise DuplicateKey(f"data type {name!r} is already registered with encoder "
                                   f"{existing.get('encoder')!r}; pass replace=True to change it")
            self.project.update(DATATYPES, {"name": name}, {"$set": datatype.to_doc()})
        else:
            try:
                self.project.insert(DATATYPES, datatype.to_doc())
            except DuplicateKey:
                return self.register_type(name, encode, decode, instance_of=instance_of,
                                          description=description, replace=replace)
        self._types[name] = datatype
        return datatype

    def datatype(self, name: str) -> DataType:
        """A registered data type (read fresh when not seen yet); DataTypeError naming the known ones if absent."""
        check_type_name(name)
        found = self._types.get(name)
        if found is None:
            doc = self.project.find_one(DATATYPES, {"name": name})
            if doc is None:
                known = ", ".join(repr(n) for n in self.type_names()) or "none"
                raise DataTypeError(f"unknown data type {name!r} in project {self.project.name!r} (registered: "
                                    f"{known})")
            found = self._types[name] = DataType.from_doc(doc)
        return found

    def datatypes(self) -> list[DataType]:
        types = [DataType.from_doc(d) for d in self.project.find(DATATYPES, sort=[("name", 1)])]
        self._types.update((t.name, t) for t in types)
        return types

    def type_names(self) -> list[str]:
        return [d["name"] for d in self.project.find(DATATYPES, sort=[("name", 1)], projection={"name": 1})]

    def delete_type(self, name: str) -> None:
        if not self.project.delete(DATATYPES, {"name": name}):
            raise NotFound(f"no data type {name!r} in project {self.project.name!r}")
        self._types.pop(name, None)
