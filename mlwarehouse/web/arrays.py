"""Dataset values for the UI: the arrays inside a packed tree, their shapes, and image previews as PNG.

Shapes come from the ``.npy`` header at the front of a blob (a range read, decompressed on the fly when the blob
is zstd-compressed), so listing a dataset never reads its bytes. A preview loads the array through the verified
path (:meth:`Project.unpack`) and renders the first items as PNG, scaled up with nearest-neighbour so that
8x8 digits stay visible. Nothing here unpickles: pickled leaves are listed, never loaded.
"""

from __future__ import annotations

import base64
import io
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from mlwarehouse.errors import CodecError, NotFound, WarehouseError

__all__ = ["Leaf", "leaves", "describe", "image_view", "to_png", "png_data_uri", "preview_images",
           "item_image", "label_leaf", "preview_labels", "label_text", "MAX_PREVIEW_BYTES", "LABEL_NAMES"]

#: arrays larger than this (uncompressed) are described but not loaded for a preview
MAX_PREVIEW_BYTES = 256 << 20
_HEADER_BYTES = 1 << 16
_ARRAY_CODECS = ("npy", "tensor")
#: names of the arrays (or item fields) that hold labels, lower-case
LABEL_NAMES = ("label", "labels", "y", "target", "targets", "class", "classes", "category", "categories")


@dataclass
class Leaf:
    """One blob reference inside a dataset's value, with what the UI shows about it."""
    index: int
    path: str
    ref: dict
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    keys: tuple = ()  # the keys and positions that lead to it in the value (("images",), (0,))

    @property
    def codec(self) -> str:
        return str(self.ref.get("codec"))

    @property
    def nbytes(self) -> int:
        return int(self.ref.get("raw") or self.ref.get("size") or 0)

    @property
    def count(self) -> int | None:
        """Items along the first axis (the dataset's "rows")."""
        return self.shape[0] if self.shape else None


def leaves(tree: Any) -> list[Leaf]:
    """Every blob reference in a packed tree, in a stable order, with a readable path (``value[0]["x"]``)."""
    found: list[Leaf] = []

    def walk(node: Any, path: str, keys: tuple) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]", (*keys, i))
        elif isinstance(node, dict):
            if "_blob" in node:
                found.append(Leaf(len(found), path, node, keys=keys))
            elif "_tuple" in node:
                walk(node["_tuple"], path, keys)
            elif "_dict" in node:
                for pair in node["_dict"]:
                    if isinstance(pair, list) and len(pair) == 2:
                        walk(pair[1], f"{path}[{pair[0]!r}]", (*keys, pair[0]))
            else:
                for key, item in node.items():
                    walk(item, f"{path}[{key!r}]", (*keys, key))

    walk(tree, "value", ())
    return found


def describe(blobs, leaf: Leaf) -> Leaf:
    """Fill in ``shape`` and ``dtype`` from the reference (tensors) or the ``.npy`` header (a range read)."""
    ref = leaf.ref
    if leaf.codec == "tensor":
        leaf.shape = tuple(ref.get("shape") or ())
        leaf.dtype = str(ref.get("dtype"))
    elif leaf.codec == "npy" and not ref.get("scalar"):
        try:
            head = blobs.get_range(ref["_blob"], 0, _HEADER_BYTES)
            if ref.get("z") == "zstd":
                # at most _HEADER_BYTES out, whatever the frame claims: a crafted head cannot expand without bound
                reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(head), read_across_frames=False)
                head = reader.read(_HEADER_BYTES)
            stream = io.BytesIO(head)
            version = np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(stream)
            leaf.shape, leaf.dtype = tuple(shape), str(dtype)
        except (WarehouseError, ValueError, zstandard.ZstdError):
            pass  # shown without a shape; the value itself is checked when it is loaded
    return leaf


def image_view(shape: tuple[int, ...] | None, dtype: str | None) -> tuple[str, tuple[int, ...], str] | None:
    """How to show items of an array as images: ``(layout, item_shape, note)``, or None if they are not images.

    Layouts: ``hw`` (N x H x W), ``hwc`` (N x H x W x 1|3|4), ``chw`` (N x 1|3 x H x W, channels first) and
    ``flat`` (N x D with D a square: shown as sqrt(D) x sqrt(D), e.g. digits stored as N x 64).
    """
    if not shape or dtype is None or len(shape) < 2:
        return None
    kind = np.dtype(dtype).kind if _valid_dtype(dtype) else ""
    if kind not in "biuf" or shape[0] < 1:
        return None
    rest = shape[1:]
    if len(rest) == 1:
        side = math.isqrt(rest[0])
        if side * side == rest[0] and 4 <= side <= 256:
            return "flat", (side, side), f"stored as N x {rest[0]}, shown as {side}x{side} images"
        return None
    if len(rest) == 2 and min(rest) >= 2 and max(rest) <= 4096:
        return "hw", rest, ""
    if len(rest) == 3 and rest[2] in (1, 3, 4) and min(rest[:2]) >= 2:
        return "hwc", rest, ""
    if len(rest) == 3 and rest[0] in (1, 3) and min(rest[1:]) >= 4:
        return "chw", (rest[1], rest[2], rest[0]), "channels-first, shown as H x W x C"
    return None


def preview_images(project, leaf: Leaf, count: int = 16) -> tuple[list[np.ndarray], str]:
    """The first ``count`` items of an image-like array leaf as uint8 images, and the note on how they are shown.

    Raises NotFound when the leaf is not an image array, CodecError when it is too large to preview.
    """
    view = image_view(leaf.shape, leaf.dtype)
    if view is None or leaf.codec not in _ARRAY_CODECS:
        raise NotFound(f"{leaf.path} is not an array of images (shape {leaf.shape}, dtype {leaf.dtype})")
    if leaf.nbytes > MAX_PREVIEW_BYTES:
        raise CodecError(f"{leaf.path} holds {leaf.nbytes} bytes, more than the preview limit "
                         f"({MAX_PREVIEW_BYTES} bytes)")
    layout, item_shape, note = view
    value = project.unpack(leaf.ref)
    arr = value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else np.asarray(value)
    return [img for img in _to_uint8(_as_images(np.asarray(arr[:count]), layout, item_shape))], note


def _as_images(items: np.ndarray, layout: str, item_shape: tuple[int, ...]) -> np.ndarray:
    if layout == "flat":
        return items.reshape(len(items), *item_shape)
    if layout == "chw":
        return np.moveaxis(items, 1, -1)
    return items


def item_image(value: Any) -> np.ndarray | None:
    """One item's array as a uint8 image (H x W, H x W x 1|3|4 or 1|3 x H x W), or None (vectors are values, not
    images, for a single item)."""
    if not isinstance(value, np.ndarray) or value.ndim < 2:
        return None
    view = image_view((1, *value.shape), str(value.dtype))
    if view is None:
        return None
    return _to_uint8(_as_images(value[None], view[0], view[1]))[0]


def label_leaf(found: list[Leaf], images: Leaf) -> Leaf | None:
    """The labels of an image array among a dataset's (described) arrays: one value per image (1-D, as long),
    named like labels (:data:`LABEL_NAMES`) or else the only other such array of integers or strings (the ``y``
    of ``(X, y)``)."""
    def fits(leaf: Leaf) -> bool:
        return (leaf is not images and leaf.codec in _ARRAY_CODECS and leaf.shape is not None and len(leaf.shape) == 1
                and leaf.shape[0] == images.count and leaf.dtype is not None and _valid_dtype(leaf.dtype))
    candidates = [leaf for leaf in found if fits(leaf)]
    named = [leaf for leaf in candidates if leaf.keys and str(leaf.keys[-1]).lower() in LABEL_NAMES
             and np.dtype(leaf.dtype).kind in "biufU"]
    if named:
        return named[0]
    plain = [leaf for leaf in candidates if np.dtype(leaf.dtype).kind in "biuU"]
    return plain[0] if len(plain) == 1 else None


def label_text(value: Any, classes: Any = None) -> str:
    """A label as shown: its class name when ``classes`` (a list) names it, floats to 4 digits."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(classes, list) and type(value) is int and 0 <= value < len(classes):
        return str(classes[value])
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def preview_labels(project, leaf: Leaf, count: int = 16, classes: Any = None) -> list[str]:
    """The first ``count`` labels of a 1-D label array, as text. Raises CodecError when it is too large."""
    if leaf.nbytes > MAX_PREVIEW_BYTES:
        raise CodecError(f"{leaf.path} holds {leaf.nbytes} bytes, more than the preview limit")
    value = project.unpack(leaf.ref)
    arr = value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else np.asarray(value)
    return [label_text(v, classes) for v in np.asarray(arr[:count]).tolist()]


def _valid_dtype(dtype: str) -> bool:
    try:
        np.dtype(dtype)
    except TypeError:
        return False
    return True


def _to_uint8(items: np.ndarray) -> np.ndarray:
    """Scale to 0-255: uint8 as is, booleans to 0/255, anything else by the min and max of the items shown."""
    if items.dtype == np.uint8:
        return items
    if items.dtype == np.bool_:
        return items.astype(np.uint8) * 255
    data = items.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(items.shape, np.uint8)
    lo, hi = data[finite].min(), data[finite].max()
    scaled = (np.where(finite, data, lo) - lo) / (hi - lo if hi > lo else 1.0)
    return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)


def to_png(image: np.ndarray, *, target: int = 96) -> bytes:
    """Encode an H x W (grey) or H x W x 1|3|4 uint8 image as PNG, scaled up by a whole factor towards ``target``
    pixels with nearest-neighbour (no blurring of small images)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    scale = max(1, target // max(image.shape[:2]))
    if scale > 1:
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    height, width = image.shape[:2]
    color = {2: 0, 3: {3: 2, 4: 6}.get(image.shape[-1], 0)}[image.ndim]
    rows = np.ascontiguousarray(image, dtype=np.uint8).reshape(height, -1)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes()  # filter byte 0 before each row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def png_data_uri(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(to_png(image)).decode("ascii")


def dataset_previews(project, found: list[Leaf], classes: Any = None, count: int = 16) -> list[dict]:
    """The previews of a dataset page: for each image-like array (described), its first ``count`` items as PNG
    data URIs, each with its label when the dataset has labels for them (:func:`label_leaf`; class names from
    ``classes``). A preview that cannot be made carries the reason in ``note``."""
    previews = []
    for leaf in found:
        if image_view(leaf.shape, leaf.dtype) is None:
            continue
        try:
            images, note = preview_images(project, leaf, count)
        except WarehouseError as exc:
            previews.append({"leaf": leaf, "images": [], "note": str(exc), "labels_from": None})
            continue
        labels_leaf = label_leaf(found, leaf)
        labels: list[str] = []
        if labels_leaf is not None:
            try:
                labels = preview_labels(project, labels_leaf, count, classes)
            except WarehouseError as exc:
                note = f"{note}; labels not shown: {exc}" if note else f"labels not shown: {exc}"
                labels_leaf = None
        previews.append({"leaf": leaf, "note": note, "labels_from": labels_leaf.path if labels_leaf else None,
                         "images": [{"src": png_data_uri(image), "index": i,
                                     "label": labels[i] if i < len(labels) else None}
                                    for i, image in enumerate(images)]})
    return previews
