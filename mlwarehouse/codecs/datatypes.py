"""Data types of documents: images, audio, already-encoded values, and users' own types named by import path.

Built in (registered as codecs, chosen automatically on insert):

- ``image``  a PIL image, stored as its encoded bytes (its own format, PNG when it has none; JPEG keeps its
  quantisation tables), decoded on read with Pillow's decompression-bomb limit
- ``audio``  :class:`Audio` (samples + sample rate), the samples as ``.npy`` without pickle

numpy arrays, torch tensors, bytes and JSON are the registry's own codecs. A user type (:class:`DataType`) is a
name with an encoder and a decoder referenced as ``"module:qualname"`` (never pickled) and optionally an
``isinstance`` test, stored in the warehouse so that every process reads the same definition; its values are
stored with the codec ``type:<name>``. A process that cannot (or may not: :mod:`mlwarehouse.codecs.imports`)
import the decoder gets a :class:`DataTypeError` naming it, or the stored bytes as :class:`Encoded` when it asks
for raw values.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlwarehouse.codecs import registry
from mlwarehouse.codecs.imports import is_trusted, resolve, split_target, target_of
from mlwarehouse.errors import CodecError, DataTypeError

__all__ = ["Audio", "Encoded", "DataType", "DataTypeError", "TYPE_PREFIX", "datatype_of_meta"]

#: the codec name of a user type's values is this prefix and the type's name
TYPE_PREFIX = "type:"


@dataclass(frozen=True)
class Audio:
    """A clip: ``samples`` (frames, or frames x channels) and ``sample_rate`` in Hz."""
    samples: np.ndarray
    sample_rate: int

    def __post_init__(self):
        if not isinstance(self.samples, np.ndarray) or self.samples.ndim not in (1, 2):
            raise CodecError("Audio samples must be a numpy array of frames (1-D) or frames x channels (2-D)")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int) or self.sample_rate <= 0:
            raise CodecError(f"Audio sample_rate must be a positive integer, not {self.sample_rate!r}")

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate

    def __eq__(self, other):
        return isinstance(other, Audio) and self.sample_rate == other.sample_rate \
            and np.array_equal(self.samples, other.samples)

    __hash__ = None


@dataclass(frozen=True)
class Encoded:
    """A value already encoded by the data type ``datatype`` (stored as these bytes, decoded on read); what a
    read returns for a user type when raw values are asked for or its decoder cannot be imported."""
    datatype: str
    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Encoded({self.datatype!r}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class DataType:
    """A user type: ``encode(value) -> bytes``, ``decode(bytes) -> value``, optionally ``instance_of`` (a class or
    ``isinstance`` predicate) so plain values are encoded without being wrapped. Each is ``"module:qualname"``."""
    name: str
    encoder: str
    decoder: str
    instance_of: str | None = None
    description: str = ""

    @classmethod
    def define(cls, name: str, encode: Any, decode: Any, instance_of: Any = None,
               description: str = "") -> "DataType":
        """From callables (or their import paths); CodecError for what another process could not import."""
        check_name(name)
        paths = [_path(encode, f"data type {name!r} encoder"), _path(decode, f"data type {name!r} decoder"),
                 None if instance_of is None else _path(instance_of, f"data type {name!r} instance test")]
        return cls(name, paths[0], paths[1], paths[2], str(description or ""))

    @classmethod
    def from_doc(cls, doc: Mapping) -> "DataType":
        try:
            return cls(doc["name"], doc["encoder"], doc["decoder"], doc.get("instance_of"),
                       str(doc.get("description") or ""))
        except (KeyError, TypeError) as exc:
            raise DataTypeError(f"a stored data type is malformed: {exc}") from None

    def to_doc(self) -> dict:
        return {"name": self.name, "encoder": self.encoder, "decoder": self.decoder,
                "instance_of": self.instance_of, "description": self.description}

    @property
    def codec(self) -> str:
        return TYPE_PREFIX + self.name

    def _load(self, which: str, *, trusted: bool) -> Callable:
        target = getattr(self, which)
        what = f"data type {self.name!r} {which}"
        try:
            found = resolve(target, what, trusted=trusted)
        except CodecError as exc:
            raise DataTypeError(str(exc)) from None
        if found is None or not callable(found):
            raise DataTypeError(f"{what} {target!r} cannot be imported in this process (install or import its "
                                f"module), or read raw values to get the stored bytes")
        return found

    def matches(self, value: Any, *, trusted: bool = False) -> bool:
        """Whether ``value`` is of this type. A test in a module not trusted here is used only when it names the
        value's own class or a base of it (that module is imported already: resolving it runs nothing new)."""
        if self.instance_of is None:
            return False
        if not trusted and not is_trusted(self.instance_of.partition(":")[0]):
            names = {f"{c.__module__}:{c.__qualname__}" for c in type(value).__mro__}
            if self.instance_of not in names:
                return False
            trusted = True
        test = self._load("instance_of", trusted=trusted)
        return isinstance(value, test) if isinstance(test, type) else bool(test(value))

    def encode(self, value: Any, *, trusted: bool = False) -> bytes:
        try:
            data = self._load("encoder", trusted=trusted)(value)
        except DataTypeError:
            raise
        except Exception as exc:
            raise DataTypeError(f"data type {self.name!r} failed to encode {type(value).__name__}: {exc}") from exc
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DataTypeError(f"data type {self.name!r} encoder returned {type(data).__name__}, not bytes")
        return bytes(data)

    def decode(self, data: Any, *, trusted: bool = False) -> Any:
        decoder = self._load("decoder", trusted=trusted)
        try:
            return decoder(bytes(data))
        except Exception as exc:
            raise DataTypeError(f"data type {self.name!r} cannot decode a stored value ({len(data)} bytes): "
                                f"{exc}") from exc


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 100 or not name.isprintable() or ":" in name:
        raise CodecError(f"a data type name must be 1 to 100 printable characters without ':', not {name!r}")
    return name


def _path(obj: Any, what: str) -> str:
    if isinstance(obj, str):
        if split_target(obj) is None:
            raise CodecError(f"{what} {obj!r} is not a 'module:qualname' import path")
        return obj
    return target_of(obj, what)


def datatype_of_meta(meta: Mapping) -> str | None:
    """The user type whose codec wrote a leaf (None for built-in codecs)."""
    codec = meta.get("codec")
    return codec[len(TYPE_PREFIX):] if isinstance(codec, str) and codec.startswith(TYPE_PREFIX) else None


# -- built-in codecs: images and audio ---------------------------------------------------------------------------

def _is_image(value: Any) -> bool:
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


def _image_encode(image: Any) -> tuple[bytes, dict]:
    fmt = (image.format or "PNG").upper()
    out = io.BytesIO()
    params = {"quality": "keep"} if fmt == "JPEG" and getattr(image, "quantization", None) else {}
    try:
        image.save(out, format=fmt, **params)
    except (OSError, KeyError, ValueError):  # e.g. a mode the format cannot hold: PNG holds every mode
        out, fmt = io.BytesIO(), "PNG"
        image.save(out, format=fmt)
    return out.getvalue(), {"format": fmt, "width": image.width, "height": image.height, "mode": image.mode}


def _image_decode(data: memoryview, meta: dict) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataTypeError("an image is stored here: install Pillow (pip install 'mlwarehouse[images]') to "
                            "read it") from None
    image = Image.open(io.BytesIO(bytes(data)))  # Pillow refuses decompression bombs (Image.MAX_IMAGE_PIXELS)
    image.load()
    return image


def _audio_encode(audio: Audio) -> tuple[bytes, dict]:
    payload, meta = registry._npy_encode(np.ascontiguousarray(audio.samples))
    return payload, {**meta, "rate": audio.sample_rate}


def _audio_decode(data: memoryview, meta: dict) -> Audio:
    rate = meta.get("rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise CodecError(f"an audio value has a bad sample rate {rate!r}")
    samples = registry._npy_decode(data, {k: v for k, v in meta.items() if k != "rate"})
    return Audio(samples, rate)


registry.register_codec("image", _is_image, _image_encode, _image_decode, priority=25)
registry.register_codec("audio", (Audio,), _audio_encode, _audio_decode, priority=25)
registry._BUILTIN += ("audio",)
