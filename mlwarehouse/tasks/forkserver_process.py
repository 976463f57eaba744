"""The fork server's own process (``python -m mlwarehouse.tasks.forkserver_process FD PRELOAD``): it imports the
heavy modules once, then serves one worker over its socket, forking a fresh task process per request (a spare
forked ahead, see :func:`serve`) and reporting each one's exit. What a task process shares with the server and what
is fresh in it, and the worker's side: :mod:`mlwarehouse.tasks.forkserver`.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import io
import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence

from mlwarehouse.tasks.forkserver import AHEAD_DELAY, SPARE_TIMEOUT

__all__ = ["serve"]

_START_DIR: str | None = None  # the directory ``python -m`` started in (set below, in the server process)


def _send(sock: socket.socket, message: dict) -> None:
    sock.send(json.dumps(message).encode())


def _parent_death_signal(sig: int) -> None:
    """The signal this process gets when its parent thread dies (0: none). SIGKILL while importing, when the
    server cannot read the end of its socket; then 0, so that a dying worker is seen as end-of-file and the
    server kills its tasks' groups at once."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _preload(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    loaded, failed = [], {}
    for name in names:
        try:
            if importlib.util.find_spec(name.partition(".")[0]) is None:
                continue  # not installed (torch is optional)
            importlib.import_module(name)
            loaded.append(name)
        except Exception as exc:  # a broken optional install must not stop the server: the task imports it
            failed[name] = f"{type(exc).__name__}: {exc}"
    return loaded, failed


class _Spare:
    """The server's side of a spare: a task process forked ahead of its request (see :func:`serve`)."""

    def __init__(self, pid: int, ctl: socket.socket):
        self.pid = pid
        self.ctl = ctl
        self.ready = False  # it said it leads its own session and waits for a request

    def wait_ready(self, timeout: float) -> bool:
        """Read the spare's ready message (at most ``timeout`` seconds); False if it died or did not answer."""
        if not self.ready:
            self.ctl.settimeout(timeout)
            try:
                self.ready = self.ctl.recv(64) == b"ready"
            except OSError:
                self.ready = False
            finally:
                self.ctl.settimeout(None)
        return self.ready

    def discard(self, kill: bool = True) -> None:
        """Close the server's end (a waiting spare reads end-of-file and exits); ``kill``: SIGKILL it too (its
        group, once it leads one), for a spare that may hang or that the server no longer waits for."""
        self.ctl.close()
        if kill:
            for sender in (os.killpg, os.kill):
                try:
                    sender(self.pid, signal.SIGKILL)
                except OSError:
                    pass


def serve(fd: int, preload: Sequence[str]) -> None:
    """The server's loop: import, say ready, then fork on request and report exits until end-of-file.

    The server keeps one spare task process forked ahead of the next request, past the steps that do not depend
    on the task (its own session, signals, stdin, random state), waiting on a socket of its own; a request goes
    to the spare, and the server forks the next spare while that task runs, so the fork's cost (milliseconds
    with torch loaded) is off the path from claim to script. A spare that died, or does not answer, is replaced
    by a fork made for the request, as without spares.
    """
    _parent_death_signal(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    loaded, failed = _preload(preload)
    _parent_death_signal(0)
    gc.collect()
    gc.freeze()  # imported objects stay out of the children's collections: fewer pages copied on write
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # the wakeup fd turns SIGCHLD into a readable fd
    children: set[int] = set()  # task processes handed a request: their exits are reported
    inherited = (sock.fileno(), wake_r, wake_w)
    spare: _Spare | None = None
    try:
        _send(sock, {"ready": os.getpid(), "loaded": loaded, "failed": failed})
        spare = _fork_spare(inherited)
        while True:
            readable, _, _ = select.select([sock, wake_r], [], [])
            if wake_r in readable:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            reaped = _reap(sock, children)
            if spare is not None and spare.pid in reaped:
                spare.discard(kill=False)  # it died before it was used
                spare = None
            if sock in readable:
                data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
                if not data:
                    break  # the worker closed its end, or died
                try:
                    request = json.loads(data)
                    if len(fds) != 1:
                        raise ValueError(f"a fork request carries one file descriptor, not {len(fds)}")
                    pid = _hand_over(spare, data, fds[0]) if spare is not None else None
                    if spare is not None:
                        spare.discard(kill=pid is None)
                        spare = None
                    if pid is None:
                        children.add(_fork(request, fds[0], sock, inherited))
                    else:
                        children.add(pid)
                        _send(sock, {"forked": pid})  # before the server can read its exit, so before the report
                except (OSError, ValueError, KeyError) as exc:
                    _send(sock, {"forked": None, "error": f"{type(exc).__name__}: {exc}"})
                finally:
                    for extra in fds:
                        os.close(extra)
                if spare is None:
                    spare = _fork_spare(inherited)
    except (BrokenPipeError, ConnectionError):
        pass  # the worker is gone
    finally:
        if spare is not None:  # it reads end-of-file and exits (its parent watcher, if one runs, kills it too)
            spare.discard(kill=False)
        for pid in children:  # tasks of a worker that is gone: nobody would record them
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def _reap(sock: socket.socket, children: set[int]) -> set[int]:
    """Wait for every child that ended, report those that ran a task; returns the pids reaped."""
    reaped = set()
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)
        if pid in children:
            children.discard(pid)
            _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _hand_over(spare: _Spare, data: bytes, out_fd: int) -> int | None:
    """Pass a request to the spare, which leads its own session already: its pid, or None if it cannot take
    the request (the caller forks a process for it instead)."""
    if not spare.wait_ready(SPARE_TIMEOUT):
        return None
    try:
        socket.send_fds(spare.ctl, [data], [out_fd])
    except OSError:
        return None
    return spare.pid


def _fork_spare(inherited: tuple[int, ...]) -> _Spare | None:
    """Fork the next spare task process (None if the fork failed: requests are then forked as they come)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError:
        mine.close()
        theirs.close()
        return None
    if pid == 0:  # the spare: never returns into the server's loop
        mine.close()
        _live_and_exit(lambda: _spare(theirs, inherited))
    theirs.close()
    return _Spare(pid, mine)


def _spare(ctl: socket.socket, inherited: tuple[int, ...]) -> int:
    """A spare's life: get ready, wait for a request (end-of-file: the server dropped it, or died), run it."""
    os.setsid()
    _fresh_process(inherited)
    from mlwarehouse.tasks.runtime import Ahead, watch_parent
    try:
        ctl.send(b"ready")
        ahead = None
        # the warehouse is opened while the previous task runs, once that task is past its own start (which
        # writes too), unless a request comes first; a request that comes meanwhile waits in the socket
        if not select.select([ctl], [], [], AHEAD_DELAY)[0]:
            watch_parent(os.getppid())  # the server: its death takes this process down (the spec names it too)
            ahead = Ahead.open()
        data, fds, _, _ = socket.recv_fds(ctl, 65536, 4)
    except OSError:  # the server closed its end, or died
        return 0
    finally:
        ctl.close()
    if not data or len(fds) != 1:  # dropped, or the server stopped: no task for this spare
        for fd in fds:
            os.close(fd)
        if ahead is not None:
            ahead.warehouse.close()
        return 0
    return _run(json.loads(data), fds[0], ahead)


def _fork(request: dict, out_fd: int, sock: socket.socket, inherited: tuple[int, ...]) -> int:
    """Fork a task process for a request (when no spare could take it)."""
    pid = os.fork()
    if pid == 0:  # the task process: never returns into the server's loop
        def life() -> int:
            os.setsid()
            # it leads its own session now, so the worker may signal its group: the child answers the request
            # itself (before it can exit, so before the server can report its exit), and the server forks on
            _send(sock, {"forked": os.getpid()})
            _fresh_process(inherited)
            return _run(request, out_fd)
        _live_and_exit(life)
    return pid


def _live_and_exit(life: Callable[[], int]) -> None:
    """A forked child's whole life: run ``life`` and exit with its code (1 on an error, whose traceback goes to
    stderr), flushing the output first and never returning into the server's loop."""
    code = 1
    try:
        code = life()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _fresh_process(inherited: tuple[int, ...]) -> None:
    """What a fresh fork resets before it knows its task: signals, the server's descriptors, stdin, random state."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for fd in inherited:
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(open(0, "rb", closefd=False), encoding=sys.stdin.encoding,
                                                 errors=sys.stdin.errors)
    _reseed()


def _run(request: dict, out_fd: int, ahead=None) -> int:
    """Turn the prepared fork into the request's task process (see the module's docstring) and run the task,
    in the warehouse a spare opened ahead (``ahead``, a :class:`mlwarehouse.tasks.runtime.Ahead`) if it fits."""
    cwd = str(request["cwd"])
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True,
                                                   encoding=sys.stdout.encoding, errors=sys.stdout.errors)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True,
                                                   encoding=sys.stderr.encoding, errors="backslashreplace")
    if sys.path and sys.path[0] == _START_DIR:
        sys.path[0] = cwd  # as ``python -m`` in ``cwd`` would have it
    os.chdir(cwd)
    importlib.invalidate_caches()  # modules written since the server started are found
    from mlwarehouse.tasks import runtime
    warehouse = ahead.take(cwd) if ahead is not None else None
    if isinstance(request["spec"], dict):  # the spec itself, sent with the request
        sys.argv = [runtime.__file__]
        return runtime.main([], spec=request["spec"], warehouse=warehouse)
    spec = str(request["spec"])
    sys.argv = [runtime.__file__, spec]
    return runtime.main([spec], warehouse=warehouse)


def _reseed() -> None:
    """Random state the fork copied: each task draws its own (``random`` reseeds itself at a fork)."""
    mtrand = sys.modules.get("numpy.random.mtrand")
    if mtrand is not None:
        mtrand.seed()  # numpy's legacy global generator (np.random.rand...), from fresh entropy
    ids = sys.modules.get("mlwarehouse.ids")
    if ids is not None:
        with ids._lock:
            ids._last_ms = -1  # the next id draws new random bits, not the server's sequence plus one


if __name__ == "__main__":
    _START_DIR = sys.path[0] if sys.path else None  # ``python -m`` put the directory it started in first
    serve(int(sys.argv[1]), json.loads(sys.argv[2]))
