"""The worker: pull tasks of one task name from the warehouse and run each in its own process.

Starting a worker is the explicit permission to execute task scripts stored in the warehouse (``mlw worker`` or
``Worker(...).run()``); nothing else in mlwarehouse runs them. Each attempt runs in a fresh process
(:mod:`mlwarehouse.tasks.runtime`) in its own session, so no global leaks from one task to the next and a killed
task takes its own subprocesses with it. That process is started one of two ways:

- warm: forked from the worker's fork server (:mod:`mlwarehouse.tasks.forkserver`), a process that imported
  numpy, torch (if installed) and mlwarehouse once; a fork costs milliseconds where a new interpreter costs a
  fraction of a second (seconds with torch). What the forked processes share and what is fresh in each is listed
  in that module;
- cold: a new interpreter (``python -m mlwarehouse.tasks.runtime``), as on every platform without ``os.fork``.

``warm=None`` (the default; ``MLW_WORKER_MODE`` = ``auto``, ``warm`` or ``cold`` overrides it) is auto: on Linux
the worker starts its fork server with its first task and starts tasks cold until the server is ready, so a
worker that runs one task is no slower than a cold one; ``warm=True`` waits for the server before claiming;
``warm=False`` is always cold. The guarantees are the same in both modes. The worker:

- claims up to ``concurrency`` tasks (one atomic update each), polling cheaply while idle; never listener
  tasks (``schema.LISTENER_TASK``): they are not scripts, the listener worker computes them;
- renews each task's lease every ``heartbeat_seconds``; if a renewal matches nothing (the task was cancelled,
  deleted or taken over) it kills that task's process and records nothing;
- kills a task that runs past its ``timeout`` (SIGTERM, then SIGKILL after ``kill_grace`` seconds);
- records the outcome in one update: finished with the result, or failed / back to pending with the error, as
  soon as the task process has written its result and closed its output (it SIGKILLs the task's session then,
  while the kernel still tears the process down), or when the process exited;
- requeues tasks whose lease expired (workers that died), every ``lease_seconds / 2``;
- on SIGTERM or Ctrl-C stops claiming, terminates its task processes and puts their tasks back to pending
  without counting the attempt, then returns.

Leases compare wall clocks (epoch seconds): machines sharing a warehouse need synchronised clocks (NTP).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlwarehouse import schema
from mlwarehouse.errors import BackendError, TaskError
from mlwarehouse.ids import new_id
from mlwarehouse.tasks import forkserver
from mlwarehouse.tasks.attempts import Attempt, AttemptFiles
from mlwarehouse.tasks.forkserver import Forked, ForkServer
from mlwarehouse.tasks.queue import Task

__all__ = ["Worker"]

#: how task processes start when ``warm`` is not given (``auto``, ``warm`` or ``cold``; default ``auto``)
MODE_VARIABLE = "MLW_WORKER_MODE"
#: seconds a fork server may take to import its modules before the worker gives it up and starts tasks cold
SERVER_START_TIMEOUT = 120.0


class Worker:
    """Runs the tasks named ``task_name`` (any name if None) of a project, ``concurrency`` at a time.

    ``echo(task, line)`` receives each line a task prints (decoded, with its newline), one call at a time; by
    default, when ``verbose``, the line goes to stdout after the task's name and id. ``warm`` chooses how task
    processes start (see the module's docstring); ``preload`` names the modules a warm worker's fork server
    imports (default :data:`mlwarehouse.tasks.forkserver.PRELOAD`).
    """

    def __init__(self, target: Any, task_name: str | None = None, *, concurrency: int = 1,
                 lease_seconds: float = 30.0, heartbeat_seconds: float | None = None, poll_interval: float = 0.1,
                 once: bool = False, verbose: bool = True, kill_grace: float = 5.0, where: dict | None = None,
                 echo: Callable[[Task, str], None] | None = None, warm: bool | None = None,
                 preload: Sequence[str] | None = None):
        from mlwarehouse.warehouse import Warehouse
        self.project = target.project() if isinstance(target, Warehouse) else target
        settings = self.project.warehouse.settings
        if settings is None:
            raise TaskError("a worker needs a warehouse opened with mlwarehouse.connect() (its URIs are passed "
                            "to the task processes)")
        if task_name == schema.LISTENER_TASK:
            raise TaskError(f"{task_name!r} tasks are listener work, not scripts: run them with "
                            f"mlwarehouse.collections.worker.ListenerWorker (mlw worker runs one)")
        if concurrency < 1 or lease_seconds <= 0:
            raise TaskError(f"concurrency must be >= 1 and lease_seconds > 0 (got {concurrency}, {lease_seconds})")
        self.tasks = self.project.tasks
        self.task_name = task_name
        self.concurrency = concurrency
        self.lease_seconds = float(lease_seconds)
        self.heartbeat_seconds = float(heartbeat_seconds or lease_seconds / 3)
        self.poll_interval = poll_interval
        self.once = once
        self.verbose = verbose
        self.kill_grace = kill_grace
        self.where = where
        self.echo = echo if echo is not None else (_echo_prefixed if verbose else None)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{new_id()[-6:]}"
        self.processed = 0
        self._children: list[Attempt] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._echo_lock = threading.Lock()
        self._env = {**os.environ, "MLW_URI": settings.index_uri, "MLW_BLOBS": settings.blobs_uri,
                     "MLW_PROJECT": self.project.name, "PYTHONUNBUFFERED": "1"}
        self.mode = _mode(warm)
        self.preload = (forkserver.preload_for(settings.index_uri, settings.blobs_uri) if preload is None
                        else tuple(preload))
        self.forked = 0  # task processes forked from the fork server
        self.cold = 0    # task processes started as a fresh interpreter
        self._server: ForkServer | None = None
        self._server_started = 0.0
        self._server_closer: weakref.finalize | None = None
        self._server_gave_up = False
        self._folder: Path | None = None  # where the task attempts' files are (made with the first task)
        self._attempts = 0                # task processes started, to name their files
        self._exiting: list[subprocess.Popen] = []  # cold processes recorded before they exited

    # -- public --------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Work until stopped (or, with ``once``, until no pending task is left); returns tasks processed."""
        self._say(f"worker {self.id} on project {self.project.name!r}, task name {self.task_name!r}, "
                  f"concurrency {self.concurrency}, {self.mode} task processes")
        with self._signals():
            try:
                self._loop(None, self.where, None)
            finally:
                self.close()
        self._say(f"worker {self.id} stopped after {self.processed} tasks")
        return self.processed

    def run_one(self, where: dict | None = None, sort=None) -> Task | None:
        """Claim one task (matching ``where``, in ``sort`` order) and run it to its end; None if none was pending."""
        before = self.processed
        with self._signals():
            last = self._loop(1, where or self.where, sort)
        return self.tasks.get(last) if last and self.processed > before else None

    def warm_up(self, timeout: float = SERVER_START_TIMEOUT) -> bool:
        """Start the fork server now and wait until it is ready: True if the next tasks will be forked from it
        (False for a cold worker, or when the server could not start)."""
        server = self._fork_server()
        return server is not None and server.wait_ready(timeout)

    @property
    def fork_server_pid(self) -> int | None:
        """The pid of the running fork server (None: none runs now, or the worker is cold)."""
        return self._server.pid if self._server is not None and not self._server.dead else None

    def close(self) -> None:
        """Stop the fork server, if one runs, and remove the folder of the task attempts' files (:meth:`run` does
        this when it returns; a later task starts another). Call it after :meth:`run_one` calls, or let the
        worker's garbage collection or exit do it."""
        closer, self._server, self._server_closer = self._server_closer, None, None
        if closer is not None:
            closer()
        if self._folder is not None and not self._children:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def stop(self) -> None:
        """Ask the worker to stop claiming, terminate its tasks, release them and return (thread-safe)."""
        self._stop.set()
        self._wake.set()

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called (or a signal asked the worker to stop)."""
        return self._stop.is_set()

    def _scope(self, where: dict | None) -> dict | None:
        """The claim filter: a worker of any task name never takes listener tasks (they are not scripts: the
        listener worker computes them, :mod:`mlwarehouse.collections.worker`), nor tasks without a script (jobs
        that their own consumer claims, as TensorDB's pushed jobs)."""
        if self.task_name is not None:
            return where
        exclude = {"task_name": {"$ne": schema.LISTENER_TASK}, "script": {"$ne": None}}
        return {"$and": [dict(where), exclude]} if where else exclude

    # -- the loop ------------------------------------------------------------------------------------------
    def _loop(self, max_tasks: int | None, where: dict | None, sort) -> str | None:
        started, last_id, next_requeue, idle = 0, None, 0.0, False
        where = self._scope(where)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                try:
                    if now >= next_requeue:
                        self.tasks.requeue_expired(self.task_name)
                        next_requeue = now + self.lease_seconds / 2
                    self._reap()
                    self._supervise(now)
                    while (len(self._children) < self.concurrency and not self._stop.is_set()
                           and (max_tasks is None or started < max_tasks) and self._may_start()):
                        if idle and not self.tasks.has_pending(self.task_name, where):
                            break
                        task = self.tasks.claim(self.task_name, self.id, self.lease_seconds, where=where, sort=sort)
                        idle = task is None
                        if task is None:
                            break
                        started, last_id = started + 1, task.id
                        self._start(task)
                except BackendError as exc:  # the store is busy or unreachable: keep the tasks, try again
                    self._say(f"warehouse error, retrying: {exc}")
                    idle = False
                if not self._children and (
                        (self.once and idle) or (max_tasks is not None and (started >= max_tasks or idle))):
                    break
                if idle and not self._children and self.project.wakes_on_writes:
                    self.project.listen(schema.TASKS, min(1.0, self.lease_seconds / 3))  # wakes on a new task
                else:
                    self._wake.wait(self.poll_interval)
                self._wake.clear()
        finally:
            self._shutdown()
        return last_id

    def _files(self) -> AttemptFiles:
        """Names for the next task attempt's files (one folder per worker: no folder made and removed per task)."""
        if self._folder is None or not self._folder.is_dir():
            self._folder = Path(tempfile.mkdtemp(prefix="mlw-worker-"))
            weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        self._attempts += 1
        base = self._folder / str(self._attempts)
        return AttemptFiles(base.with_suffix(".spec.json"), base.with_suffix(".result.json"),
                            base.with_suffix(".run.id"))

    def _start(self, task: Task) -> None:
        files = self._files()
        doc = task.doc
        spec = {"task": {k: doc.get(k) for k in ("_id", "task_name", "hyper_parameters", "script",
                                                 "saved_result_keys", "attempts")},
                "project": self.project.name, "worker": self.id, "result_path": str(files.result),
                "run_path": str(files.run), "parent_pid": os.getpid()}
        proc: subprocess.Popen | Forked | None = None
        server = self._fork_server()
        if server is not None and server.ready:
            try:
                proc = server.spawn({**spec, "parent_pid": server.pid}, os.getcwd(), spill=files.spec)
                self.forked += 1
            except (TaskError, OSError) as exc:
                self._say(f"task {task.id}: {exc}; starting it cold")
        if proc is None:
            files.spec.write_text(json.dumps(spec), encoding="utf-8")
            proc = subprocess.Popen([sys.executable, "-m", "mlwarehouse.tasks.runtime", str(files.spec)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=self._env, start_new_session=True)
            self.cold += 1
        now = time.monotonic()
        timeout = doc.get("timeout")
        child = Attempt(task, proc, files, now, now + timeout if timeout else None, now + self.heartbeat_seconds)
        child.reader = threading.Thread(target=self._pump, args=(child,), name=f"mlw-output-{task.id}", daemon=True)
        child.reader.start()
        self._children.append(child)
        self._say(f"task {task.id} ({task.task_name}) started, attempt {doc.get('attempts')}: "
                  f"{doc.get('hyper_parameters')}")

    def _may_start(self) -> bool:
        """Whether a task may start now: a warm worker waits for its fork server (unless it gave the server up)."""
        if self.mode != "warm":
            return True
        server = self._fork_server()
        return server is None or server.ready

    def _fork_server(self) -> ForkServer | None:
        """The running fork server, started (not awaited) if there is none; None for a cold worker, or once the
        worker gave up on servers (one died or hung while importing: its tasks start cold from then on)."""
        if self.mode == "cold" or self._server_gave_up:
            return None
        server = self._server
        if server is not None and not server.ready:
            if server.dead and server.was_ready:
                self._say(f"the fork server (pid {server.pid}) died: starting another")
                self.close()
            elif server.dead or time.monotonic() - self._server_started > SERVER_START_TIMEOUT:
                self._say(f"the fork server (pid {server.pid}) did not start (see its errors above): "
                          f"task processes start cold from now on")
                self._server_gave_up = True
                self.close()
                return None
        if self._server is None:
            try:
                server = ForkServer(self._env, self.preload, notify=self._wake.set)
            except (OSError, TaskError) as exc:
                self._say(f"no fork server ({exc}): task processes start cold")
                self._server_gave_up = True
                return None
            self._server, self._server_started = server, time.monotonic()
            self._server_closer = weakref.finalize(self, server.close)
        return self._server

    def _pump(self, child: Attempt) -> None:
        """Copy the child's output to its spool file (and to ``echo``, if any) until it closes."""
        for line in iter(lambda: child.proc.stdout.readline(65536), b""):
            child.spool.write(line)
            if self.echo is not None:
                with self._echo_lock:
                    self.echo(child.task, line.decode("utf-8", "replace"))
        child.proc.stdout.close()
        child.eof = True
        self._wake.set()

    def _supervise(self, now: float) -> None:
        for child in self._children:
            if child.proc.poll() is not None:
                continue
            if child.kill_at is not None:
                if now >= child.kill_at:
                    child.signal(signal.SIGKILL)
                continue
            if child.deadline is not None and now >= child.deadline:
                self._terminate(child, "timeout", now)
            elif now >= child.next_beat:
                child.next_beat = now + self.heartbeat_seconds
                if not self.tasks.heartbeat(child.task.id, self.id, self.lease_seconds,
                                            lease=child.task.get("lease")):
                    self._say(f"task {child.task.id} is no longer ours (cancelled, deleted or taken over): "
                              f"stopping it")
                    self._terminate(child, "lost", now)

    def _terminate(self, child: Attempt, reason: str, now: float) -> None:
        child.reason = reason
        child.kill_at = now + self.kill_grace
        child.signal(signal.SIGTERM)

    def _reap(self) -> None:
        self._exiting = [proc for proc in self._exiting if proc.poll() is None]
        for child in list(self._children):
            if not child.ended:
                continue
            child.signal(signal.SIGKILL)  # anything the task left running in its session
            child.reader.join(timeout=5)
            self._children.remove(child)
            if isinstance(child.proc, subprocess.Popen) and child.proc.poll() is None:
                self._exiting.append(child.proc)  # reaped by a later pass, once the kernel has torn it down
            try:
                self._record_retrying(child)
            finally:
                child.files.remove()

    def _record_retrying(self, child: Attempt, tries: int = 6) -> None:
        """Record what a finished child did; a warehouse that is briefly unavailable (a server restarting) is
        retried for about 15 s, so a finished task is not run again only because its result could not be saved."""
        for attempt in range(tries):
            try:
                return self._record(child)
            except BackendError as exc:
                if attempt == tries - 1:
                    raise
                self._say(f"could not record task {child.task.id} ({type(exc).__name__}: {exc}); retrying")
                time.sleep(min(8.0, 0.5 * 2 ** attempt))

    def _record(self, child: Attempt) -> None:
        task, tasks = child.task, self.tasks
        lease = task.get("lease")
        output = child.output()
        outcome = child.outcome()
        run = outcome.get("run") or child.run_id()  # this attempt's run, never a later owner's
        elapsed = time.monotonic() - child.started
        if outcome.get("ok") and child.reason != "lost":
            pass  # the script succeeded before a timeout or shutdown caught up with it: its result stands
        elif child.reason in ("shutdown", "lost"):
            if child.reason == "shutdown":
                tasks.release(task.id, self.id, lease=lease)
                error = "the worker was stopped; the task went back to pending"
            else:
                error = "the task was cancelled or taken over; its process was killed"
            tasks.end_run(run, "failed", error)
            return
        if child.reason == "timeout" and not outcome.get("ok"):
            error = f"timed out after {task.get('timeout')} s (attempt {task.get('attempts')}); killed"
            status = tasks.fail(task.id, self.id, error, output=output, lease=lease)
            tasks.end_run(run, "failed", error)
            self._say(f"task {task.id} {error}: now {status}")
        elif outcome.get("ok"):
            if tasks.finish(task.id, self.id, outcome.get("result"), output=output, lease=lease):
                self._say(f"task {task.id} finished in {elapsed:.2f} s: {outcome.get('result')}")
            else:
                self._say(f"task {task.id} finished but was no longer ours: result not recorded")
        else:
            error = outcome.get("error") or (
                f"the task process exited with status {child.proc.returncode} without reporting a result "
                f"(killed, out of memory, or a crash in native code); see its output")
            status = tasks.fail(task.id, self.id, error, retry=outcome.get("retry", True), output=output,
                                lease=lease)
            tasks.end_run(run, "failed", error)  # a no-op when the runtime already ended it
            self._say(f"task {task.id} failed after {elapsed:.2f} s, now {status}: {error.strip()[-300:]}")
        self.processed += 1

    def _shutdown(self) -> None:
        """Terminate every task process still running, wait for them, and give their tasks back."""
        if self._children:
            now = time.monotonic()
            for child in self._children:
                if not child.ended and child.reason is None:
                    self._terminate(child, "shutdown", now)
            deadline = now + self.kill_grace
            while not all(c.ended for c in self._children):
                if time.monotonic() >= deadline:
                    for child in self._children:
                        child.signal(signal.SIGKILL)
                time.sleep(0.02)
            self._reap()
        for proc in self._exiting:
            proc.wait()  # SIGKILLed with its session: the kernel is tearing it down
        self._exiting.clear()

    # -- plumbing ------------------------------------------------------------------------------------------
    @contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, lambda signum, frame: self.stop())
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _say(self, message: str) -> None:
        if self.verbose:
            with self._echo_lock:
                print(f"[mlw worker] {message}", flush=True)


def _mode(warm: bool | None) -> str:
    """``warm``, ``cold`` or ``auto`` (warm once the fork server is ready), from ``warm`` or MLW_WORKER_MODE."""
    if warm is None:
        mode = os.environ.get(MODE_VARIABLE, "").strip().lower() or "auto"
        if mode not in ("auto", "warm", "cold"):
            raise TaskError(f"{MODE_VARIABLE} must be auto, warm or cold, not {mode!r}")
    else:
        mode = "warm" if warm else "cold"
    if mode != "cold" and not forkserver.available():
        if mode == "warm":
            raise TaskError("warm task processes need os.fork and Unix sockets that pass file descriptors "
                            "(Linux): run the worker cold")
        mode = "cold"
    return mode


def _echo_prefixed(task: Task, line: str) -> None:
    """The default echo: a task's line on stdout after its task name and the end of its id."""
    text = line.rstrip("\n")
    sys.stdout.write(f"[{task.task_name} {task.id[-6:]}] {text}\n")
    sys.stdout.flush()
