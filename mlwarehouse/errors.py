"""The exception tree of mlwarehouse: one root, every error typed.

    WarehouseError
     ├── ConfigError            bad URI, unknown backend, missing optional dependency
     ├── QueryError             a filter, sort, projection or update that is not valid
     │    └── DependencyError   a delete refused: other things were derived from it (pass force=True)
     ├── InvalidDocument        a value that cannot be stored in the index (names the field)
     ├── CodecError             a value no codec can encode, or bytes a codec cannot decode
     │    ├── PickleNotAllowed  pickle was needed and the caller did not pass allow_pickle=True
     │    └── DataTypeError     a data type unknown here, or whose encoder/decoder cannot be imported or failed
     ├── NotFound               no document / blob matches (also a KeyError)
     ├── DuplicateKey           a document with that _id already exists
     ├── IntegrityError         stored bytes do not match their hash
     ├── BackendError           the index or blob backend failed (driver errors are mapped here)
     │    └── Unavailable       the server cannot be reached
     ├── TaskError              task queue errors
     │    └── TaskFailed        a task ended failed (carries the stored traceback)
     ├── ListenerError          a model attached to a collection failed (the traceback is in the message)
     ├── VectorIndexError       a vector index or search cannot be made as asked (names what is wrong)
     ├── AliasError             a model alias cannot be changed as asked
     │    ├── AliasConflict     compare-and-set lost: the alias is not held by the expected model (.current)
     │    └── PromotionRefused  the candidate does not beat the holder on the gate's evaluation by the margin
     └── TrainingError          a fit cannot go on: its model raised, its data is gone, its state does not fit

Backends translate their driver's errors at their boundary (``raise BackendError(...) from exc``);
nothing returns False silently.
"""

from __future__ import annotations

__all__ = [
    "WarehouseError", "ConfigError", "QueryError", "InvalidDocument", "CodecError", "PickleNotAllowed",
    "NotFound", "DuplicateKey", "IntegrityError", "BackendError", "Unavailable", "TaskError", "TaskFailed",
    "DataTypeError", "ListenerError", "VectorIndexError", "DependencyError",
    "TrainingError", "AliasError", "AliasConflict", "PromotionRefused",
]


class WarehouseError(Exception):
    """Root of every error raised by mlwarehouse."""


class ConfigError(WarehouseError):
    """A URI, setting or optional dependency is wrong or missing."""


class QueryError(WarehouseError, ValueError):
    """A filter, sort, projection or update is malformed; the message names the offending part."""


class DependencyError(QueryError):
    """A delete was refused because live things were derived from what it would delete (see
    :mod:`mlwarehouse.lineage`); ``.dependents`` lists them. ``force=True`` deletes anyway, leaving a tombstone."""

    def __init__(self, message: str, dependents: list | None = None):
        super().__init__(message)
        self.dependents = list(dependents or [])


class InvalidDocument(WarehouseError, ValueError):
    """A document holds a value that the index cannot store; the message names the field path."""


class CodecError(WarehouseError, ValueError):
    """No codec can encode a value, or stored bytes cannot be decoded."""


class PickleNotAllowed(CodecError):
    """Loading or saving needs pickle and the caller did not pass ``allow_pickle=True``."""


class DataTypeError(CodecError):
    """A value of a data type unknown here, or whose encoder or decoder cannot be imported (or raised)."""


class NotFound(WarehouseError, KeyError):
    """Nothing matches: an unknown dataset, model, run, task or blob."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "not found"


class DuplicateKey(WarehouseError):
    """A document with this ``_id`` already exists in the collection."""


class IntegrityError(WarehouseError):
    """Bytes read back do not match their recorded hash: never returned as data."""


class BackendError(WarehouseError):
    """The index or blob backend failed; the driver's exception is chained as ``__cause__``."""


class Unavailable(BackendError):
    """The backend server cannot be reached (down, wrong address, refused credentials)."""


class TaskError(WarehouseError):
    """The task queue refused an operation (unknown task, bad state transition, bad script)."""


class TaskFailed(TaskError):
    """A task ended failed; ``.task`` holds its document, including the stored traceback."""

    def __init__(self, message: str, task: dict | None = None):
        super().__init__(message)
        self.task = task or {}


class ListenerError(WarehouseError):
    """A listener's model failed (its documents are marked failed with the traceback) or cannot run here."""


class VectorIndexError(WarehouseError):
    """A vector index cannot be made or searched as asked (unknown index, wrong dimensions, no vector to search)."""


class TrainingError(WarehouseError):
    """A fit cannot go on: its model or loss raised, its documents are gone, or its stored state (a checkpoint,
    the optimizer's) does not fit the model it resumes."""



class AliasError(WarehouseError):
    """A model alias (``mlp@champion``) cannot be changed as asked (see :mod:`mlwarehouse.models.aliases`)."""


class AliasConflict(AliasError):
    """A compare-and-set of an alias lost: it is held by ``.current`` (a model id, or None when unset), not by the
    model the caller expected; nothing was changed. Read the alias again and decide anew."""

    def __init__(self, message: str, current: str | None = None, version: int = 0):
        super().__init__(message)
        self.current = current
        self.version = version


class PromotionRefused(AliasError):
    """A promotion gate refused a candidate: ``.candidate`` and ``.holder`` are the two values compared on the
    gate's evaluation (``.holder`` None when the holder has no such evaluation), ``.margin`` the margin it needed."""

    def __init__(self, message: str, candidate: float | None = None, holder: float | None = None,
                 margin: float = 0.0):
        super().__init__(message)
        self.candidate = candidate
        self.holder = holder
        self.margin = margin
