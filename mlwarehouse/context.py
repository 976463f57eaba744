"""What this process is doing now: the current run and the current task.

A small module of its own so that datasets and models (which link what they save or load to the current run)
and the task runtime (which sets the current task) depend on it, not on each other.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["current_run", "current_task", "TaskContext", "push_run", "pop_run", "set_current_task"]

_runs: list[Any] = []
_runs_lock = threading.Lock()


def current_run() -> Any:
    """The run most recently started in this process and not yet finished (models saved meanwhile link to it)."""
    with _runs_lock:
        return _runs[-1] if _runs else None


def push_run(run: Any) -> None:
    """Make ``run`` the current run (a run does this when it starts)."""
    with _runs_lock:
        _runs.append(run)


def pop_run(run: Any = None, *, where=None) -> None:
    """Forget ``run`` (when it ends), or every run for which ``where(run)`` is true (when its registry closes)."""
    with _runs_lock:
        if where is not None:
            _runs[:] = [r for r in _runs if not where(r)]
        elif run in _runs:
            _runs.remove(run)


@dataclass(frozen=True)
class TaskContext:
    """What a running task knows about itself (``mlwarehouse.current_task()``)."""
    id: str
    task_name: str
    hyper_parameters: dict = field(default_factory=dict)
    run: str | None = None
    attempt: int = 1
    project: str = "default"
    worker: str | None = None


_task: TaskContext | None = None


def current_task() -> TaskContext | None:
    """The task this process is running (set by the worker's task runtime), or None outside a task."""
    return _task


def set_current_task(context: TaskContext | None) -> None:
    """Set by the task runtime around the task's code."""
    global _task
    _task = context
