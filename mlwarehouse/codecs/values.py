"""Pack any Python value into a JSON tree whose large leaves are blob references, and back, exactly.

The tree is what a document stores; blobs hold the bytes. Dicts with str keys, lists, str, int, bool, None and
finite floats stay inline. Markers keep the rest exact:

- ``{"_tuple": [...]}``             a tuple
- ``{"_dict": [[k, v], ...]}``      a dict with non-str keys (JSON scalars only) or keys that collide with a marker
- ``{"_float": "nan"}``             NaN and infinities (not valid JSON, refused by PostgreSQL and others)
- ``{"_blob": key, "codec": ..., "size": n, ...meta}``   a leaf stored as a blob by a codec
  (:mod:`mlwarehouse.codecs`): arrays, tensors, bytes, user types, and JSON subtrees (or strings, or integers
  beyond 64 bits) whose dump exceeds ``inline_limit``; such a JSON blob holds an already packed subtree
- ``{"_bin": base64, "codec": ..., ...meta}``   a codec's payload of at most ``inline_bytes`` kept in the
  document itself (off by default; user collections keep small tensors and embeddings inline this way)

``encode(value)`` may encode a leaf before the registry is asked (``(payload, meta)`` with ``meta["codec"]``, or
None to pass), and ``decode(payload, meta)`` replaces :func:`~mlwarehouse.codecs.decode_leaf` when reading: the
hooks through which a collection's own data types are written and read.

numpy bool/integer/float scalars become Python scalars (so the index can compare them); other numpy scalars are
leaves. Subclasses of dict, list and tuple (OrderedDict, namedtuple) are stored as their base type. Anything else
goes to a registered codec, or to pickle when ``allow_pickle=True``; otherwise CodecError names the type and the
path inside the value.

Speed (a checkpoint is one ``pack``): packing runs inside a put batch (:func:`mlwarehouse.blobs.base.put_batch`),
so a store may write in the background while the next leaves are encoded, and the payloads of a list's or dict's
next few leaves are hashed in parallel; every blob is durable when ``pack`` returns. When ``get`` is a blob
store's own ``get``, ``unpack`` reads the blobs a tree refers to a few at a time on the blob pool through
``get_buffer`` (verified as read) and decodes tensors and arrays straight over the buffers read, without a copy;
a large compressed array or tensor in a local store is decompressed as it is read, straight into its own memory
(:mod:`mlwarehouse.codecs.streaming`), and returned once the whole blob is verified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlwarehouse.blobs.base import put_batch
from mlwarehouse.codecs.packing import AHEAD_BYTES, Packer
from mlwarehouse.codecs.treeformat import MARKERS, MAX_DEPTH, Decoder, Encoder, too_deep
from mlwarehouse.codecs.unpacking import MAX_JSON_BYTES, Unpacker

__all__ = ["pack", "unpack", "blob_keys", "MARKERS", "MAX_DEPTH", "MAX_JSON_BYTES", "AHEAD_BYTES", "Encoder",
           "Decoder"]


def pack(value: Any, put: Callable[[Any], str], *, allow_pickle: bool = False, inline_limit: int = 16384,
         compress_blobs: bool = True, inline_bytes: int = 0, encode: Encoder | None = None) -> Any:
    """Return a JSON tree for ``value``; every blob-worthy leaf is stored with ``put(bytes) -> key``.

    ``put`` is called once per distinct leaf object (the same array twice in ``value`` is stored once); leaves
    whose stored payload is at most ``inline_bytes`` stay in the tree as ``_bin`` markers instead.
    """
    with put_batch():
        return Packer(put, allow_pickle, inline_limit, compress_blobs, inline_bytes, encode).pack(value, "value")


def unpack(tree: Any, get: Callable[[str], bytes], *, allow_pickle: bool = False, writable: bool = False,
           decode: Decoder | None = None) -> Any:
    """Rebuild the value that :func:`pack` turned into ``tree``, reading blobs with ``get(key) -> bytes``.

    numpy arrays are zero-copy views over the blob bytes and read-only, unless ``writable=True``.
    """
    unpacker = Unpacker(get, allow_pickle, writable, decode)
    try:
        if unpacker.store is not None:
            unpacker.prefetch(tree)
        return unpacker.unpack(tree)
    except RecursionError:  # the caller's own stack was nearly full
        raise too_deep() from None
    finally:
        unpacker.close()


def blob_keys(tree: Any) -> set[str]:
    """Every blob key that a document (or any JSON tree) refers to."""
    keys: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            key = node.get("_blob")
            if isinstance(key, str):
                keys.add(key)
            else:
                stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)
    return keys
