"""Folds derived from the document id and a seed, so a split is the same on every backend and in every process.

A document is in the validation fold when ``id_fraction(id, seed) < valid`` (see :func:`mlwarehouse.ids.id_fraction`):
nothing is written to the documents, a new document never moves an old one to the other fold, and the same query
with the same :class:`Folds` gives the same two id sets anywhere. ``Folds(field="_fold")`` uses a fold stored in
the documents instead (collections stamp ``_fold`` at insert with seed 0 and the collection's valid fraction).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mlwarehouse.errors import QueryError
from mlwarehouse.ids import id_fraction

__all__ = ["Folds", "TRAIN", "VALID"]

TRAIN, VALID = "train", "valid"


@dataclass(frozen=True)
class Folds:
    """A train/valid split: ``valid`` is the validation share (0 to 1), ``seed`` picks one of many splits."""

    valid: float = 0.1
    seed: int = 0
    field: str | None = None  # a stored fold field ("train" / "valid" values) instead of the id hash

    def __post_init__(self) -> None:
        if isinstance(self.valid, bool) or not isinstance(self.valid, (int, float)) or not 0 <= self.valid < 1:
            raise QueryError(f"folds: valid must be a fraction from 0 up to (not including) 1, not {self.valid!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise QueryError(f"folds: seed must be a non-negative integer, not {self.seed!r}")
        if self.field is not None and not isinstance(self.field, str):
            raise QueryError(f"folds: field must be a field name or None, not {self.field!r}")

    def fold(self, doc_id: str, stored: object = None) -> str:
        """The fold of one document (``stored``: its value of :attr:`field`, when the split uses one)."""
        if self.field is not None:
            return VALID if stored == VALID else TRAIN
        return VALID if id_fraction(doc_id, self.seed) < self.valid else TRAIN

    def split(self, ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """``(train ids, valid ids)`` of ``ids``, each in the order given (only for id-derived folds)."""
        if self.field is not None:
            raise QueryError("a split by a stored field needs the documents' values: use fold(id, value)")
        train: list[str] = []
        valid: list[str] = []
        for doc_id in ids:
            (valid if id_fraction(doc_id, self.seed) < self.valid else train).append(doc_id)
        return train, valid

    def to_doc(self) -> dict:
        return {"valid": float(self.valid), "seed": self.seed, **({"field": self.field} if self.field else {})}

    @classmethod
    def of(cls, value: "Folds | dict | float | None") -> "Folds":
        """Folds from what users write: a Folds, ``{"valid": 0.2, "seed": 1}``, a bare fraction, or None (0.1)."""
        if value is None:
            return cls()
        if isinstance(value, Folds):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"valid", "seed", "field"}
            if unknown:
                raise QueryError(f"folds: unknown key(s) {sorted(unknown)}; use valid, seed, field")
            return cls(**value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(valid=float(value))
        raise QueryError(f"folds must be a Folds, a dict or a fraction, not {type(value).__name__}")
