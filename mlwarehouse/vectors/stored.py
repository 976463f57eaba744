"""Arrays of a stored vector index snapshot, taken only when of the expected type (the bytes come from the store)."""

from __future__ import annotations

import numpy as np

from mlwarehouse.errors import IntegrityError

__all__ = ["stored_array"]


def stored_array(arrays: dict, name: str, dtype, ndim: int) -> np.ndarray:
    """The array ``name`` of a snapshot, refused unless of ``dtype`` and ``ndim`` dimensions."""
    value = arrays.get(name)
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != ndim:
        raise IntegrityError(f"a stored vector index lacks a valid {name!r} array ({np.dtype(dtype).name}, "
                             f"{ndim} dimensions)")
    return value
