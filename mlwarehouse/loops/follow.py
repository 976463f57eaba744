"""The in-process deployer: a callable that serves whatever model holds an alias, swapping as the alias moves.

``follow(project, "mlp@champion")`` (also ``wh.models.follow``) returns a :class:`FollowedModel`; calling it runs
the model that holds the alias (an ``nn.Module`` under ``torch.no_grad``, or a callable value). A background
thread reads the alias's head change every ``poll`` seconds (on PostgreSQL a write's NOTIFY wakes it at once),
which is one indexed read: the change's ``version`` rises with every change, so "the alias moved" is exact, with
no cursor, look-back window or clock involved (a watch of the aliases collection would deliver events only to
re-read the head anyway).

Guarantees:

- **Never a mix.** The new holder is loaded fully (built, in eval mode) before one reference is replaced; a call
  reads that reference once, so it runs wholly on the model it started with, old or new, and no call waits for
  a load.
- **Never dropped.** A holder that fails to load (or is not callable) leaves the old model serving; the error is
  kept in ``last_error`` and the load is retried with a growing delay until it works or the alias moves on. An
  alias removed keeps the last model serving (``removed`` is True) until it is set again.
- ``model_id``, ``version`` and ``swaps`` describe what is served now; ``on_swap(old_id, new_id)`` runs in the
  watching thread after each swap (its errors go to ``last_error``). Thread-safe: calls may come from any thread.
- ``close()`` (or leaving a ``with`` block) stops the thread; the object then keeps serving its last model.

This module imports nothing of :mod:`mlwarehouse.models`: it reaches the registry through ``project.models``, so
the registry may import it (lazily) without an import circle.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from mlwarehouse import schema
from mlwarehouse.errors import NotFound, QueryError

__all__ = ["FollowedModel", "follow", "MAX_RETRY_SECONDS"]

log = logging.getLogger(__name__)

#: the longest wait before loading again a holder that failed to load
MAX_RETRY_SECONDS = 60.0
#: the longest single wait for a notification (close() is seen within it)
LISTEN_SLICE = 0.5


@dataclass(frozen=True)
class _Served:
    """What a call runs: one immutable triple, replaced whole (a single reference assignment)."""
    model_id: str | None
    version: int
    model: Any


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise QueryError(f"{name} must be a number of seconds > 0, not {value!r}")
    return float(value)


def _run(model: Any, args: tuple, kwargs: dict) -> Any:
    torch = sys.modules.get("torch")  # a torch model was loaded with torch: never import it here for a value
    if torch is not None and isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(*args, **kwargs)
    return model(*args, **kwargs)


class FollowedModel:
    """A callable serving the model that holds ``name@alias`` now (see the module notes); made by :func:`follow`."""

    def __init__(self, project: Any, spelling: str, *, poll: float = 0.5,
                 on_swap: Callable[[str | None, str], Any] | None = None, preload: bool = True,
                 allow_pickle: bool = False):
        if not isinstance(spelling, str) or "@" not in spelling:
            raise QueryError(f"follow takes a 'name@alias' spelling, not {spelling!r}")
        if on_swap is not None and not callable(on_swap):
            raise QueryError(f"on_swap must be callable, not {type(on_swap).__name__}")
        self.spelling = spelling
        self.poll = _check_number("poll", poll)
        self.on_swap = on_swap
        self.allow_pickle = bool(allow_pickle)
        self._models = project.models
        self._project = self._models.project
        self._aliases = self._models.aliases
        head = self._aliases.head(spelling)  # QueryError for a bad spelling
        if head is None or head.doc.get("model") is None:
            state = "was never set" if head is None else "was removed"
            raise NotFound(f"alias {spelling!r} {state}: it points at no model in project {self._project.name!r}")
        self.removed = False
        self.swaps = 0
        self.last_error: BaseException | None = None
        self._check_lock = threading.Lock()   # one check (read, load, swap) at a time
        self._first_lock = threading.Lock()   # the first load when not preloaded
        self._failed: tuple[int, int, float] | None = None  # (version, failures, when to try again)
        self._served = _Served(head.doc["model"], head.doc["version"], None)
        if preload:
            self._served = _Served(head.doc["model"], head.doc["version"], self._load(head.doc["model"]))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"mlwarehouse follow {spelling}", daemon=True)
        self._thread.start()

    # -- serving ---------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model served now on the arguments (one read of the reference: never a mix of two models)."""
        served = self._served
        if served.model is None:
            served = self._first()
        return _run(served.model, args, kwargs)

    def _first(self) -> _Served:
        with self._first_lock:
            served = self._served
            if served.model is None:  # a swap may have come first
                model = self._load(served.model_id)
                with self._check_lock:
                    now = self._served  # the thread may have confirmed a newer version of the same model
                    if now.model is None and now.model_id == served.model_id:
                        self._served = _Served(now.model_id, now.version, model)
                    served = self._served
        return served

    @property
    def model_id(self) -> str | None:
        """The id of the model served now."""
        return self._served.model_id

    @property
    def version(self) -> int:
        """The version of the alias change the served model came from (or was last confirmed by)."""
        return self._served.version

    @property
    def model(self) -> Any:
        """The model served now (loaded if it was not yet)."""
        served = self._served
        return served.model if served.model is not None else self._first().model

    def current(self, *, load: bool = True) -> tuple[str | None, int, Any]:
        """``(model_id, version, model)`` served now, read in one step: the model one call would run with the id
        and version that describe it, which a server answers with. ``load=False`` never loads (the model is None
        while a follower made with ``preload=False`` has not loaded it yet): what a status page reads."""
        served = self._served
        if served.model is None and load:
            served = self._first()
        return served.model_id, served.version, served.model

    def _load(self, model_id: str) -> Any:
        model = self._models.get(model_id).load(allow_pickle=self.allow_pickle)
        if not callable(model):
            raise QueryError(f"model {model_id!r} ({self.spelling}) loads as a {type(model).__name__}, which is "
                             f"not callable: follow serves modules and callable values")
        return model

    # -- following -------------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Read the alias now and swap if it moved (what the thread does every ``poll``); True if it swapped.
        A load failure is kept in ``last_error``, not raised."""
        with self._check_lock:
            return self._check(force=True)

    def _check(self, force: bool = False) -> bool:
        head = self._aliases.head(self.spelling)
        served = self._served
        if head is None or head.doc["version"] <= served.version:
            return False
        version, target = head.doc["version"], head.doc.get("model")
        if target is None:
            if not self.removed:
                self.removed = True
                log.warning("alias %s was removed (version %s): still serving %s", self.spelling, version,
                            served.model_id)
            return False
        if target == served.model_id:  # set again to the model served: nothing to load
            self.removed = False
            self._served = _Served(target, version, served.model)
            return False
        if self._failed is not None and self._failed[0] == version and not force \
                and time.monotonic() < self._failed[2]:
            return False
        try:
            model = self._load(target)
        except Exception as exc:  # the old model keeps serving
            failures = self._failed[1] + 1 if self._failed is not None and self._failed[0] == version else 1
            delay = min(MAX_RETRY_SECONDS, self.poll * 2 ** failures)
            self._failed = (version, failures, time.monotonic() + delay)
            self.last_error = exc
            log.warning("alias %s moved to %s (version %s), which failed to load: still serving %s (%s)",
                        self.spelling, target, version, served.model_id, exc)
            return False
        self._failed = None
        self.removed = False
        self._served = _Served(target, version, model)  # the swap: one reference
        self.swaps += 1
        if self.on_swap is not None:
            try:
                self.on_swap(served.model_id, target)
            except Exception as exc:
                self.last_error = exc
                log.warning("on_swap of %s raised: %s", self.spelling, exc)
        return True

    def _follow(self) -> None:
        failures = 0
        wakes = self._project.wakes_on_writes
        while not self._stop.is_set():
            wait = self.poll
            try:
                with self._check_lock:
                    if not self._stop.is_set():
                        self._check()
                failures = 0
            except Exception as exc:  # the store is unreachable, say: keep serving, read again later
                failures += 1
                self.last_error = exc
                wait = min(MAX_RETRY_SECONDS, self.poll * 2 ** failures)
            if wakes and not failures:
                self._listen(wait)
            else:
                self._stop.wait(wait)

    def _listen(self, wait: float) -> None:
        """Wait ``wait`` seconds or until an alias is written, in slices so that close() is seen soon."""
        deadline = time.monotonic() + wait
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            try:
                if self._project.listen(schema.ALIASES.name, min(left, LISTEN_SLICE)):
                    return
            except Exception as exc:
                self.last_error = exc
                self._stop.wait(left)
                return

    # -- life ------------------------------------------------------------------------------------------------
    @property
    def following(self) -> bool:
        """Whether the watching thread runs."""
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Stop following (the thread ends within ``poll`` seconds, or a load in progress); the last model keeps
        serving."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(self.poll + 5.0 if timeout is None else timeout)

    def __enter__(self) -> "FollowedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "" if self.following else " closed"
        removed = " (alias removed)" if self.removed else ""
        return f"<FollowedModel {self.spelling} -> {self.model_id} v{self.version}{removed}{state}>"


def follow(project: Any, spelling: str, *, poll: float = 0.5, on_swap: Callable[[str | None, str], Any] | None = None,
           preload: bool = True, allow_pickle: bool = False) -> FollowedModel:
    """A :class:`FollowedModel` serving the holder of ``spelling`` (``"mlp@champion"``) in ``project`` (a project
    or a warehouse, whose default project is used). NotFound if the alias points at no model; with ``preload``
    (the default) the holder is loaded now, so a holder that cannot load raises here rather than at the first
    call."""
    return FollowedModel(project, spelling, poll=poll, on_swap=on_swap, preload=preload, allow_pickle=allow_pickle)
