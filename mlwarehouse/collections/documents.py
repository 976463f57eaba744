"""Users' documents as stored: reserved fields, folds, input digests, and the data-type hooks of packing.

A stored document is the user's fields (packed: see :mod:`mlwarehouse.codecs.values`) and the warehouse's:

- ``_id``         the user's string id, or a fresh sortable id
- ``_fold``       ``"train"`` or ``"valid"``, from the id and the collection's validation fraction unless given
- ``_outputs``    ``{key: {listener: output}}``, written by listeners only (SuperDuperDB's layout)
- ``_listeners``  ``{listener: {"status", "input", "model", "error", ...}}``: each listener's state for this document
- ``_rev``        a fresh id on every write: the compare-and-set token (see :mod:`mlwarehouse.warehouse.tables`)
- ``_blobs``      the blobs the document refers to

Users write ``_id`` and ``_fold``; the other four are the warehouse's (a write that names them is refused), and
reads show ``_outputs`` but not ``_listeners``, ``_rev`` and ``_blobs`` unless a projection asks for them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlwarehouse.codecs import decode_leaf, decompress
from mlwarehouse.codecs.datatypes import DataTypeError, Encoded, datatype_of_meta
from mlwarehouse.codecs.values import MARKERS
from mlwarehouse.errors import InvalidDocument
from mlwarehouse.ids import id_fraction
from mlwarehouse.query.jsonvalues import MISSING, get_path, split_path

__all__ = ["RESERVED", "HIDDEN", "fold_of", "digest", "get_path", "MISSING", "Codecs", "InsertOneResult", "InsertManyResult",
           "UpdateResult", "DeleteResult", "MAX_DOCUMENT_BYTES", "INLINE_BYTES", "INLINE_LIMIT"]

#: fields only the warehouse writes
RESERVED = frozenset({"_outputs", "_listeners", "_rev", "_blobs"})
#: fields a read leaves out unless its projection names them
HIDDEN = ("_listeners", "_rev", "_blobs")
FOLDS = ("train", "valid")
#: a stored document (its JSON, blobs apart) larger than this is refused, as MongoDB refuses 16 MiB
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
#: encoded values of at most this many bytes (e.g. an embedding of 256 floats) stay inside the document
INLINE_BYTES = 2048
#: strings and JSON subtrees up to this size stay inline, so filters and sorts reach them
INLINE_LIMIT = 1024 * 1024


def fold_of(doc_id: str, valid_fraction: float, seed: int = 0) -> str:
    """``"valid"`` for a ``valid_fraction`` share of ids, else ``"train"``: the same on every backend and run."""
    return "valid" if id_fraction(doc_id, seed) < valid_fraction else "train"


def digest(packed_value: Any) -> str | None:
    """A digest of a packed value (blob references name their content, so equal values digest alike)."""
    if packed_value is MISSING:
        return None
    text = json.dumps(packed_value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def check_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InvalidDocument(f"valid_fraction must be a number from 0 to 1, not {value!r}")
    return float(value)


def check_user_fields(doc: Any, what: str = "a document") -> dict:
    if not isinstance(doc, Mapping):
        raise InvalidDocument(f"{what} must be a dict, not {type(doc).__name__}")
    bad = sorted(k for k in doc if k in RESERVED)
    if bad:
        raise InvalidDocument(f"{what} sets {bad[0]!r}, which the warehouse writes itself (reserved: "
                              f"{', '.join(sorted(RESERVED))})")
    bad = sorted(k for k in doc if k in MARKERS or not isinstance(k, str))
    if bad:
        raise InvalidDocument(f"{what} has the field {bad[0]!r}: a document's fields are strings other than "
                              f"the markers of stored values ({', '.join(sorted(MARKERS))})")
    if "_id" in doc and (not isinstance(doc["_id"], str) or not doc["_id"]):
        raise InvalidDocument(f"_id must be a non-empty string, not {doc['_id']!r}")
    if "_fold" in doc and doc["_fold"] not in FOLDS:
        raise InvalidDocument(f"_fold must be 'train' or 'valid', not {doc['_fold']!r}")
    return dict(doc)


def check_update_paths(update: Any) -> None:
    """Refuse an update that writes a reserved field (its operators are checked by the query layer)."""
    if not isinstance(update, Mapping):
        raise InvalidDocument(f"an update must be a dict of operators, not {type(update).__name__}")
    for op, fields in update.items():
        if not isinstance(op, str) or not op.startswith("$"):
            raise InvalidDocument(f"an update is a dict of operators ($set, $inc...), not a document with the "
                                  f"field {op!r} (use replace_one to replace a document)")
        if not isinstance(fields, Mapping):
            raise InvalidDocument(f"the update {op} takes a dict of fields, not {type(fields).__name__}")
        for path in fields:
            top = str(path).split(".", 1)[0]
            if top in RESERVED or top in MARKERS or top == "_id":
                raise InvalidDocument(f"the update {op} writes {path!r}, which the warehouse writes itself")
            if isinstance(path, str):
                split_path(path, "update")


def document_size(packed: dict) -> int:
    size = len(json.dumps(packed, separators=(",", ":"), ensure_ascii=False))
    if size > MAX_DOCUMENT_BYTES:
        raise InvalidDocument(f"document {packed.get('_id')!r} is {size} bytes as stored, over the limit of "
                              f"{MAX_DOCUMENT_BYTES} (MAX_DOCUMENT_BYTES); keep large values in arrays, tensors "
                              f"or bytes, which are stored as blobs")
    return size


def strip(doc: dict, projection: Mapping | None) -> dict:
    """A read document without the hidden fields its projection did not ask for."""
    asked = {str(p).split(".", 1)[0] for p, keep in (projection or {}).items() if keep}
    for name in HIDDEN:
        if name not in asked:
            doc.pop(name, None)
    return doc


class Codecs:
    """The encode/decode hooks of one project's data types (see :mod:`mlwarehouse.codecs.datatypes`)."""

    def __init__(self, catalog, *, trusted: bool = False):
        self.catalog = catalog
        self.trusted = trusted

    def auto_types(self) -> list:
        return [t for t in self.catalog.datatypes() if t.instance_of]

    def encoder(self):
        auto = None

        def encode(value: Any):
            nonlocal auto
            if isinstance(value, Encoded):
                datatype = self.catalog.datatype(value.datatype)
                return bytes(value.data), {"codec": datatype.codec}
            if auto is None:
                auto = self.auto_types()
            for datatype in auto:
                if datatype.matches(value, trusted=self.trusted):
                    return datatype.encode(value, trusted=self.trusted), {"codec": datatype.codec}
            return None
        return encode

    def decoder(self, *, raw: bool = False, writable: bool = False):
        def decode(data: Any, meta: dict) -> Any:
            name = datatype_of_meta(meta)
            if name is None:
                return decode_leaf(data, meta, writable=writable)
            payload = bytes(decompress(data, meta) if meta.get("z") else data)
            if raw:
                return Encoded(name, payload)
            try:
                datatype = self.catalog.datatype(name)
            except DataTypeError as exc:
                raise DataTypeError(f"{exc}; read with raw=True to get the stored bytes") from None
            return datatype.decode(payload, trusted=self.trusted)
        return decode


@dataclass
class InsertOneResult:
    inserted_id: str
    acknowledged: bool = True


@dataclass
class InsertManyResult:
    inserted_ids: list[str] = field(default_factory=list)
    acknowledged: bool = True


@dataclass
class UpdateResult:
    matched_count: int = 0
    modified_count: int = 0
    upserted_id: str | None = None
    acknowledged: bool = True


@dataclass
class DeleteResult:
    deleted_count: int = 0
    acknowledged: bool = True
