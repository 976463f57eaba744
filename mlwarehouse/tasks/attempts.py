"""A task attempt as its worker sees it: the process (a fork of the fork server or a new interpreter), its files
(spec, result, run id) and its output, kept to its last :data:`MAX_OUTPUT` bytes."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mlwarehouse.tasks.forkserver import Forked
from mlwarehouse.tasks.queue import Task

__all__ = ["Attempt", "AttemptFiles", "MAX_OUTPUT"]

#: at most this much of a task's output is stored (its end); the rest is dropped
MAX_OUTPUT = 64 * 1024 * 1024


@dataclass
class Attempt:
    """One task attempt's process as the worker supervises it: its output spooled by a reader thread, why the
    worker stopped it, and what it reported."""
    task: Task
    proc: subprocess.Popen | Forked
    files: AttemptFiles
    started: float
    deadline: float | None
    next_beat: float
    spool: IO[bytes] = field(default_factory=lambda: tempfile.TemporaryFile())
    reader: threading.Thread | None = None
    reason: str | None = None      # why the worker stopped it: "timeout", "lost" or "shutdown"
    kill_at: float | None = None   # when SIGTERM turns into SIGKILL
    captured: bytes | None = None  # the output, once read (recording may be retried)
    eof: bool = False              # the output pipe was closed: the process ended, or released its output

    @property
    def ended(self) -> bool:
        """The process exited, or it wrote its result and released its output (the runtime does both last, so
        the worker records it while the kernel still tears the process down; it kills the session then)."""
        return self.proc.poll() is not None or (self.eof and self.files.result.exists())

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the child leads its own session: its group has its pid
        except (ProcessLookupError, PermissionError):
            pass

    def output(self) -> bytes:
        if self.captured is None:
            size = self.spool.seek(0, os.SEEK_END)
            self.spool.seek(max(0, size - MAX_OUTPUT))
            self.captured = self.spool.read()
            self.spool.close()
        return self.captured

    def outcome(self) -> dict:
        """What the task process reported (``ok``, ``result`` or ``error``...); {} when it reported nothing."""
        try:
            return json.loads(self.files.result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def run_id(self) -> str | None:
        """The run this attempt started: the runtime writes its id next to the result as soon as it has one."""
        try:
            return self.files.run.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None


@dataclass
class AttemptFiles:
    """The files of one task attempt, in the worker's folder: its spec (cold processes read it), its result
    and the id of its run (written by the task process)."""
    spec: Path
    result: Path
    run: Path

    def remove(self) -> None:
        for path in (self.spec, self.result, self.run):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
