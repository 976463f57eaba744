"""Values to bytes and back: the codec registry and built-in codecs, and packing whole values into JSON trees.

- :mod:`.registry`  codecs by name (numpy ``.npy``, tensors, safetensors state dicts, bytes, JSON, user codecs),
  zstd compression where it pays
- :mod:`.values`    pack any Python value into a JSON tree whose large leaves are blob references, and back
- :mod:`.streaming` large arrays and tensors compressed from their own memory, decompressed straight into new ones
"""

from mlwarehouse.codecs.registry import (
    Codec,
    codec_names,
    compress,
    decode_leaf,
    decompress,
    decompress_into,
    encode_leaf,
    get_codec,
    register_codec,
    unregister_codec,
)

__all__ = ["Codec", "register_codec", "unregister_codec", "get_codec", "codec_names", "encode_leaf", "decode_leaf",
           "compress", "decompress", "decompress_into"]
from mlwarehouse.codecs import datatypes  # noqa: E402,F401  (registers the image and audio codecs)
