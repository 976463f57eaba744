"""Hyper-parameter sweeps: expand a grid or a list of configs, and hash each config canonically.

A config's hash is the sha256 of its canonical JSON (normalised values, sorted keys, compact separators), so
``{"lr": 0.1, "n": 2}`` and ``{"n": 2, "lr": np.float64(0.1)}`` are the same config. A sweep skips configs whose
``(task_name, config_hash)`` already exists, which makes dispatching a sweep twice harmless.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from typing import Any

from mlwarehouse.errors import InvalidDocument, TaskError
from mlwarehouse.query.fields import normalize_value

__all__ = ["normalize_config", "config_hash", "expand"]


def normalize_config(config: Mapping[str, Any] | None, path: str = "hyper_parameters") -> dict:
    """Hyper-parameters as plain JSON values with string keys, or InvalidDocument naming the bad one."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise InvalidDocument(f"{path} must be a dict of name -> value, not {type(config).__name__}")
    for key in config:
        if not isinstance(key, str) or not key or key.startswith("_") or "." in key or "$" in key:
            raise InvalidDocument(
                f"{path}: name {key!r} cannot be stored (non-empty strings without '.', '$' or a leading '_')")
    return normalize_value(dict(config), path)


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a normalised config."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def expand(grid: Mapping[str, Iterable] | None = None, configs: Iterable[Mapping] | None = None,
           base: Mapping[str, Any] | None = None) -> list[dict]:
    """The configs of a sweep: the cartesian product of ``grid`` (in key order) or the list ``configs``.

    ``base`` holds values shared by every config (a config's own value wins). Duplicates are dropped, keeping
    the first occurrence, so the result has one entry per distinct config hash.
    """
    if (grid is None) == (configs is None):
        raise TaskError("a sweep needs exactly one of grid= (a dict of lists) or configs= (a list of dicts)")
    if grid is not None:
        if not isinstance(grid, Mapping):
            raise TaskError(f"grid must be a dict of name -> list of values, not {type(grid).__name__}")
        names = list(grid)
        choices = []
        for name in names:
            values = grid[name]
            if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
                raise TaskError(f"grid[{name!r}] must be a list of values, not {type(values).__name__}")
            choices.append(list(values))
        raw = [dict(zip(names, combo)) for combo in itertools.product(*choices)]
    else:
        raw = list(configs)
    out: list[dict] = []
    seen: set[str] = set()
    for i, config in enumerate(raw):
        merged = {**(base or {}), **normalize_config(config, f"configs[{i}]")}
        merged = normalize_config(merged, f"configs[{i}]")
        digest = config_hash(merged)
        if digest not in seen:
            seen.add(digest)
            out.append(merged)
    return out
