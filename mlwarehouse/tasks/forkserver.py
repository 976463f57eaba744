"""Warm task processes: a fork server that imports the heavy modules once, then forks a fresh process per task.

A cold task process (``python -m mlwarehouse.tasks.runtime``) spends most of a short task starting Python and
importing numpy, mlwarehouse and (seconds of) torch. A worker in warm mode starts one fork server per worker
(``python -m mlwarehouse.tasks.forkserver_process FD PRELOAD``, :mod:`mlwarehouse.tasks.forkserver_process`) that
imports them once and from then on only forks: each task attempt is a new child of the server that runs the same
:func:`mlwarehouse.tasks.runtime.main` a cold process runs, so scripts, results, runs and errors are the same in
both modes. This module is the worker's side (:class:`ForkServer`).

Shared by every task, as copies made at the fork (so what a task changes dies with its process and never reaches
the next one): the interpreter, the modules the server imported (:data:`PRELOAD`) in their just-imported state,
the environment and ``sys.path`` the worker started the server with, the string hash seed, and memory pages
until a task writes them (copy-on-write).

Fresh in each task process: its pid, its own session and process group (``os.setsid`` before the worker hears
of it, so a timeout or a cancel kills the whole group), Python's default signal handlers (then the runtime's),
stdin (``/dev/null``), stdout and stderr (a new pipe that only the worker reads), the working directory (the
worker's at the request), the warehouse connection (opened in the task process, by the runtime or, ahead of
the request, by a spare; the server never opens one, so no SQLite or psycopg connection, lock or thread crosses a
fork), the random state (``random`` reseeds itself
at a fork; numpy's global generator and mlwarehouse's id sequence are reseeded here), the import caches, the
script's namespace, ``current_task()`` and ``current_run()``.

The server runs no task code and no torch operation and starts no thread of its own, so torch's and OpenMP's
thread pools are not running at a fork (OpenBLAS, loaded with numpy, stops and restarts its own around forks)
and CUDA, never initialised in the server, can be used in a child. It serves one worker over a Unix socket pair
(``SOCK_SEQPACKET``, one JSON message each): it says ``{"ready": pid}`` once imported; a ``{"spec": spec or
path, "cwd": dir}`` request carries the write end of the task's output pipe and is answered ``{"forked": pid}``
once the task process leads its session; ``{"exit": pid, "code": n}`` reports each task process's end (``n`` as
``Popen.returncode``: minus the signal's number when killed). It exits when the worker's end of the socket
closes (the worker stopped, or was killed), SIGKILLing the groups of tasks still running; the tasks also watch it
and take themselves down if it dies, as cold tasks watch their worker.

Spares (see :func:`mlwarehouse.tasks.forkserver_process.serve`): the server forks each task process before its
request, so a request is answered by a process that already leads its session, reset its signals and stdin and drew
its random state; after ``AHEAD_DELAY`` without a request (the previous task is past its start) it also opens the
warehouse, so the task starts without connecting. The task's own parts (stdout, stderr, working directory, import
caches, spec) are set when its request comes.

Limits: an environment variable that a preloaded library reads when it loads (``OMP_NUM_THREADS`` set by a
script before ``import torch``) has no effect in a warm process: set it in the worker's environment, call
``torch.set_num_threads``, or run the worker cold. Warm mode needs ``os.fork`` and file descriptors passed over
Unix sockets, which this module uses on Linux only (:func:`available`).
"""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from mlwarehouse.errors import TaskError

__all__ = ["ForkServer", "Forked", "PRELOAD", "available", "preload_for"]

#: imported once by the fork server (a missing one is skipped): what a task process needs, and what tasks import
PRELOAD = ("numpy", "torch", "mlwarehouse", "mlwarehouse.config", "mlwarehouse.warehouse", "mlwarehouse.index.sqlite",
           "mlwarehouse.blobs.files", "mlwarehouse.runs.registry", "mlwarehouse.tasks.queue",
           "mlwarehouse.tasks.runtime")


#: seconds the worker waits for the answer to one fork request before it gives the server up
REPLY_TIMEOUT = 30.0
#: the longest request (bytes of JSON) sent as one message; a longer spec is sent as the path of a file
MAX_MESSAGE = 60_000
#: seconds a spare waits for a request before it opens the warehouse ahead (past the previous task's start)
AHEAD_DELAY = 0.1
#: seconds the server waits for a spare that has not said it is ready before it forks for the request instead
SPARE_TIMEOUT = 5.0


def available() -> bool:
    """Whether warm task processes can run here (Linux: ``os.fork``, ``SOCK_SEQPACKET`` and fd passing)."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(socket, "send_fds")
            and hasattr(socket, "SOCK_SEQPACKET"))


#: the backend modules a task process imports for an index or blob URI scheme (preloaded by :func:`preload_for`)
_INDEX_MODULES = {"postgresql": "mlwarehouse.index.postgres", "postgres": "mlwarehouse.index.postgres",
                  "mongodb": "mlwarehouse.index.mongo", "mongodb+srv": "mlwarehouse.index.mongo"}
_BLOB_MODULES = {"s3": "mlwarehouse.blobs.s3", "mongodb": "mlwarehouse.blobs.gridfs",
                 "mongodb+srv": "mlwarehouse.blobs.gridfs"}


def preload_for(index_uri: str, blobs_uri: str, base: Sequence[str] | None = None) -> tuple[str, ...]:
    """``base`` (default :data:`PRELOAD`) plus the backend modules that the task processes of a warehouse at these
    URIs import."""
    base = PRELOAD if base is None else tuple(base)
    extra = []
    for uri, modules in ((index_uri, _INDEX_MODULES), (blobs_uri, _BLOB_MODULES)):
        module = modules.get(uri.partition("://")[0].lower()) if "://" in uri else None
        if module and module not in base and module not in extra:
            extra.append(module)
    return (*base, *extra)


class Forked:
    """A task process forked by the server: the part of ``subprocess.Popen`` that the worker uses.

    Its parent is the server, not the worker, so ``returncode`` is set when the server reports the exit (or to
    ``-SIGKILL`` when the server itself is gone: its children take themselves down, and the worker kills their
    process groups when it reaps them).
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self.stdout: io.BufferedReader | None = None

    def poll(self) -> int | None:
        return self.returncode


class ForkServer:
    """The worker's side of one fork server: start it, fork task processes from it, learn when they end.

    Starting returns at once; :attr:`ready` turns true once the server has imported ``preload``
    (:meth:`wait_ready` blocks for it). ``notify()`` is called (from a reader thread) when the server becomes
    ready, when a task process ends and when the server dies. Fork requests come from one thread at a time.
    """

    def __init__(self, env: dict, preload: Sequence[str] = PRELOAD, notify: Callable[[], None] | None = None):
        if not available():
            raise TaskError("warm task processes need os.fork and Unix sockets that pass file descriptors "
                            "(Linux); run the worker cold")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlwarehouse.tasks.forkserver_process", str(theirs.fileno()),
                 json.dumps(list(preload))],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                start_new_session=True)  # a Ctrl-C meant for the worker is not the server's: the worker stops it
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.loaded: list[str] = []
        self.failed: dict[str, str] = {}
        self.was_ready = False  # it said ready once (so a death is a crash, not a failed start)
        self._sock = mine
        self._notify = notify or (lambda: None)
        self._ready = threading.Event()
        self._dead = threading.Event()
        self._replies: queue.Queue = queue.Queue()
        self._live: dict[int, Forked] = {}  # touched by the reader thread only
        self._pending = False  # a fork request waits for its answer
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"mlw-forkserver-{self.pid}", daemon=True)
        self._reader.start()

    @property
    def ready(self) -> bool:
        """True once the server has imported its modules, until it dies."""
        return self._ready.is_set() and not self._dead.is_set()

    @property
    def dead(self) -> bool:
        return self._dead.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the server is ready (True) or dead or ``timeout`` passed (False)."""
        self._ready.wait(timeout)
        return self.ready

    def spawn(self, spec: dict | str, cwd: str, *, spill: str | os.PathLike | None = None) -> Forked:
        """Fork a task process running :func:`mlwarehouse.tasks.runtime.main` on ``spec`` (the spec, or the path
        of its JSON file) in ``cwd``; its output comes out of ``.stdout``. A spec goes with the request, unless it
        is too long for one message: then it is written to ``spill``, a path. Raises TaskError if the server
        cannot fork now (the worker then starts the task cold)."""
        if not self.ready:
            raise TaskError("the fork server is not ready")
        message = json.dumps({"spec": spec, "cwd": cwd}).encode()
        if len(message) > MAX_MESSAGE and isinstance(spec, dict):
            if spill is None:
                raise TaskError("this task's spec is too long to send: give spawn() a file to spill it to")
            with open(spill, "w", encoding="utf-8") as f:
                json.dump(spec, f)
            message = json.dumps({"spec": os.fspath(spill), "cwd": cwd}).encode()
        read_end, write_end = os.pipe()
        try:
            with self._lock:
                self._pending = True
                try:
                    socket.send_fds(self._sock, [message], [write_end])
                    reply = self._replies.get(timeout=REPLY_TIMEOUT)
                except (OSError, queue.Empty) as exc:
                    self.close(timeout=1.0)  # a late answer would be taken for the next request's: give it up
                    raise TaskError(f"the fork server did not answer ({type(exc).__name__}: {exc})") from None
                finally:
                    self._pending = False
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the child holds it now: the pipe ends when the task's session closes it
        if not isinstance(reply, Forked):
            os.close(read_end)
            error = reply.get("error") if isinstance(reply, dict) else "the fork server died"
            raise TaskError(f"the fork server could not fork: {error}")
        reply.stdout = os.fdopen(read_end, "rb")
        return reply

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server (it SIGKILLs the groups of tasks still running) and wait for it."""
        if not self._ready.is_set():
            self.proc.kill()  # still importing, so it forked nothing and cannot read end-of-file yet
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread; the server reads end-of-file
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout)
        self._sock.close()

    def _read(self) -> None:
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                message = json.loads(data)
                if "exit" in message:
                    handle = self._live.pop(message["exit"], None)
                    if handle is not None:
                        handle.returncode = int(message["code"])
                    elif self._pending:  # the child of the request in flight died before it could answer
                        self._replies.put({"error": f"the task process ended at once (status {message['code']})"})
                elif "forked" in message:  # sent by the child itself, so always before the server reports its exit
                    pid = message["forked"]
                    if pid:
                        self._live[pid] = handle = Forked(pid)
                    self._replies.put(handle if pid else message)
                elif "ready" in message:
                    self.loaded, self.failed = message.get("loaded", []), message.get("failed", {})
                    self.was_ready = True
                    self._ready.set()
                self._notify()
        except (OSError, ValueError):
            pass
        finally:
            self._dead.set()
            for handle in self._live.values():
                handle.returncode = -signal.SIGKILL
            self._live.clear()
            self._replies.put(None)
            self._ready.set()
            self._notify()
