"""Retention of checkpoints: keep the top k by a metric and the last n epochs of a run, drop the rest.

The policy is pure: :meth:`Retention.doomed` looks at the checkpoint documents of one run (name) and says which
to delete; :meth:`mlwarehouse.models.registry.Models.checkpoint` applies it after each save, deleting through the
project so their blobs are released (tensors shared with a kept checkpoint stay, content addressing counts them
once).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from mlwarehouse.errors import QueryError
from mlwarehouse.query.jsonvalues import get_path

__all__ = ["Retention"]


@dataclass(frozen=True)
class Retention:
    """Which checkpoints of a run to keep: the ``keep_last`` newest epochs ∪ the ``keep_best`` best by ``metric``.

    ``None`` for both keeps everything. A checkpoint without a numeric ``metric`` never counts as one of the best.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: str = "max"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise QueryError(f"{name} must be a non-negative integer or None, not {value!r}")
        if self.mode not in ("max", "min"):
            raise QueryError(f"mode must be 'max' or 'min', not {self.mode!r}")
        if self.keep_best and not self.metric:
            raise QueryError("keep_best needs best_metric= (the metric that ranks checkpoints)")
        if self.active and not (self.keep_last or self.keep_best):
            raise QueryError("this retention policy keeps no checkpoint: give keep_last or keep_best at least 1")

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_best is not None

    def doomed(self, docs: Iterable[dict]) -> list[str]:
        """Ids of the checkpoints (documents with ``_id``, ``epoch``, ``time`` and the metric) to delete."""
        docs = list(docs)
        if not self.active:
            return []
        keep: set[str] = set()
        if self.keep_last:
            newest = sorted(docs, key=lambda d: (_epoch(d), d.get("time") or "", d["_id"]), reverse=True)
            keep.update(d["_id"] for d in newest[:self.keep_last])
        if self.keep_best:
            scored = [d for d in docs if _number(get_path(d, self.metric, None)) is not None]
            sign = -1 if self.mode == "max" else 1
            # ties: the later epoch wins, so the checkpoint kept is the one training went on from
            scored.sort(key=lambda d: (sign * _number(get_path(d, self.metric, None)), -_epoch(d),
                                       d.get("time") or ""))
            keep.update(d["_id"] for d in scored[:self.keep_best])
        return [d["_id"] for d in docs if d["_id"] not in keep]


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _epoch(doc: dict) -> float:
    value = _number(doc.get("epoch"))
    return -math.inf if value is None else value
