"""What every local test server shares: free ports, a child process in its own session, readiness, stop by pid.

A server is one child process started in its own session, with a temporary data folder and its output in a log
there (:func:`launch`). It is stopped by its process id, never by name, with a ladder of signals, and only when
that pid still runs a command line naming its data folder (a pid the kernel reused is left alone); then its
folder is removed (:func:`stop`). :func:`session_server` is the body of the session fixtures: the server the
environment names, else one started for the session and stopped after it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HOST", "Server", "ServerError", "in_ci", "free_port", "free_ports", "port_open", "launch", "stop",
           "alive", "session_server"]

HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """A test server could not be started (the message holds the end of its log)."""


@dataclass
class Server:
    """A running server: how to reach it (``env`` holds the variables clients read) and how to stop it."""

    name: str
    pid: int
    data_dir: str
    uri: str
    env: dict[str, str] = field(default_factory=dict)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen, log: Path, ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with code {proc.returncode} while starting:\n{_log_tail(log)}")
        try:
            if ready():
                return
        except Exception:  # not up yet: any client error means "try again"
            pass
        time.sleep(0.2)
    raise ServerError(f"{what} was not ready after {timeout:g} s:\n{_log_tail(log)}")


def launch(server: Server, cmd: Sequence[str], log: Path, ready: Callable[[], bool], *, timeout: float, what: str,
           stopper: Callable[[Server], None] | None = None, **popen: Any) -> Server:
    """Run ``cmd`` in its own session with its output in ``log``, set ``server.pid`` (0 until then), and wait
    until ``ready()`` holds; a server that exits or is not ready in ``timeout`` seconds is stopped (``stopper``,
    default :func:`stop`) and raises ServerError. ``popen``: more arguments for :class:`subprocess.Popen`."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **popen)
    server.pid = proc.pid
    try:
        _wait_ready(proc, log, ready, timeout, f"{what} ({' '.join(cmd)})")
    except BaseException:
        (stopper or stop)(server)
        raise
    return server


#: SIGTERM, then SIGKILL: how most servers are stopped (each signal, and the share of ``grace`` to wait after it)
TERMINATE = ((signal.SIGTERM, 1.0), (signal.SIGKILL, 1.0))


def stop(server: Server, *, grace: float = 10.0, ladder: Sequence[tuple[int, float]] = TERMINATE) -> None:
    """Stop a server by its process id and remove its data folder: each signal of ``ladder`` in turn, waiting
    up to its factor of ``grace`` seconds for the process to end (SIGTERM, then SIGKILL by default)."""
    if _is_ours(server):
        for sig, factor in ladder:
            try:
                os.kill(server.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace * factor
            while time.monotonic() < deadline and alive(server.pid):
                time.sleep(0.05)
            if not alive(server.pid):
                break
    shutil.rmtree(server.data_dir, ignore_errors=True)


def _is_ours(server: Server) -> bool:
    """False when the pid now belongs to another program (the server died and the pid was reused), or was never
    set (0 would signal our own process group)."""
    if server.pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and alive(server.pid)  # no /proc (macOS): trust the pid
    except OSError:
        return True
    return server.data_dir.encode() in cmdline


def alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child so that it does not linger as a zombie
        if done == pid:
            return False
    except ChildProcessError:  # not our child (started by scripts/test-servers): ask the kernel
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def session_server(given: Any, start: Callable[[], Server], *, stopper: Callable[[Server], None] = stop,
                   value: Callable[[Server], Any] = lambda server: server.uri) -> Iterator[Any]:
    """The body of a session fixture: yield ``given`` (a server named by the environment: one started
    beforehand, or a real one) when it is not None, else start a server, yield ``value(server)``, and stop it
    after the session. ``start`` may skip the tests where no server can be started."""
    if given is not None:
        yield given
        return
    server = start()
    try:
        yield value(server)
    finally:
        stopper(server)
