"""The format of a packed value's JSON tree, shared by packing and unpacking: the markers, the type sets that stay
inline, the bounds a stored tree is held to, and the errors both sides raise. See :mod:`mlwarehouse.codecs.values`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from mlwarehouse.errors import CodecError

MARKERS = frozenset({"_blob", "_bin", "_tuple", "_dict", "_float"})
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
NUMBERS = frozenset({int, float, bool})
KEY_TYPES = (str, int, float, bool, type(None), np.bool_, np.integer, np.floating)
CONTAINERS = frozenset({list, dict})
STORED_KEYS = frozenset({str, int, float, bool, type(None)})
SPECIAL_FLOATS = frozenset({"nan", "inf", "infinity"})
INLINE = frozenset({str, int, float, bool, type(None)})
#: containers nested deeper than this are refused by pack and unpack (a crafted document cannot exhaust the stack)
MAX_DEPTH = 200
#: zstd output per input byte is below this (an RLE block: 4 bytes for 128 KiB), so a larger claim is a lie
ZSTD_MAX_RATIO = 1 << 16
#: blobs of this size or more carry their xxh3 checksum in their reference (``"xxh3"``), which a store that trusts
#: its bytes (a local folder) checks on load instead of the sha256 (0.03 against 0.5 s per GiB)
CHECKSUM_FROM = 1 << 20
#: the fields of a blob reference that are not its codec's: what the unpacker hands a decoder leaves them out
REFERENCE_FIELDS = ("_blob", "size", "xxh3")


def is_leaf(v: Any) -> bool:
    """Whether ``pack`` stores ``v`` through a codec (rather than as JSON or a container)."""
    return type(v) not in INLINE and not isinstance(v, (dict, list, tuple, np.generic))


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


Encoder = Callable[[Any], "tuple[Any, dict] | None"]
Decoder = Callable[[Any, dict], Any]


def too_deep() -> CodecError:
    return CodecError(f"a stored value is nested deeper than {MAX_DEPTH} levels")


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
