"""Storage failures a user meets are typed and say what happened: a full disk, a read-only warehouse, a bad home."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse import BackendError, ConfigError
from mlwarehouse.index import sqlite as sqlite_index
from mlwarehouse.index.sqlite import SQLiteIndex


def _cap_pages(monkeypatch, extra_pages: int) -> None:
    """Every new SQLite connection may grow the file by only ``extra_pages`` pages: a full disk, simulated."""
    opened = SQLiteIndex._open

    def capped(self):
        con = opened(self)
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count = {pages + extra_pages}")
        return con

    monkeypatch.setattr(SQLiteIndex, "_open", capped)


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def test_a_full_disk_while_logging_says_the_disk_is_full(tmp_path, monkeypatch):
    wh = mlwarehouse.connect(str(tmp_path / "wh"))
    run = wh.runs.start("full")
    run.flush()
    _cap_pages(monkeypatch, 4)
    with pytest.raises(BackendError) as info:
        for step in range(20_000):
            run.log("train", step=step, loss=float(step), note="x" * 200)
        run.flush()
    with contextlib.suppress(BackendError):
        wh.close()
    message = str(info.value)
    assert "full" in message and "no transaction is active" not in message
    assert any(isinstance(e, sqlite3.OperationalError) and "full" in str(e) for e in _chain(info.value))


def test_a_full_disk_on_a_direct_write_is_a_backend_error_with_the_cause(tmp_path):
    index = SQLiteIndex(tmp_path / "index.sqlite")
    index.ensure_collection("c")
    with index._connection() as con:  # this thread's connection: the file may grow by two pages
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(BackendError, match="is full") as info:
        index.insert_many("c", [{"_id": f"{i:06d}", "x": "y" * 500} for i in range(2000)])
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert not any("cannot rollback" in str(e) for e in _chain(info.value))
    index.close()


def _saved(tmp_path):
    folder = tmp_path / "wh"
    wh = mlwarehouse.connect(str(folder))
    wh.datasets.save(np.arange(10_000, dtype=np.float32), "kept")
    wh.close()
    return folder


def test_a_read_only_index_opens_for_reads_and_refuses_writes(tmp_path):
    folder = _saved(tmp_path)
    index = SQLiteIndex(folder / "index.sqlite", read_only=True)  # the same open path as a read-only folder
    assert index.read_only
    assert [d["name"] for d in index.find("datasets", {})] == ["kept"]
    with pytest.raises(BackendError, match="read-only"):
        index.insert_many("datasets", [{"_id": "x"}])
    index.close()


def test_a_warehouse_whose_files_cannot_be_written_is_opened_read_only(tmp_path, monkeypatch):
    """What a chmod'ed folder looks like to a non-root user (root ignores the permission bits)."""
    folder = _saved(tmp_path)
    monkeypatch.setattr(sqlite_index, "_writable", lambda path: False)
    wh = mlwarehouse.connect(str(folder))
    assert wh.index.read_only
    assert wh.datasets.load("kept").sum() == np.arange(10_000, dtype=np.float32).sum()
    with pytest.raises(BackendError, match="read-only"):
        wh.index.insert_many("datasets", [{"_id": "x", "name": "new"}])
    wh.close()


def test_a_read_only_index_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        SQLiteIndex(tmp_path / "none.sqlite", read_only=True)


_READER = textwrap.dedent("""
    import sys, numpy as np, mlwarehouse
    from mlwarehouse import BackendError
    wh = mlwarehouse.connect(sys.argv[1])
    assert wh.index.read_only
    assert wh.datasets.load("kept").shape == (10_000,)
    for write in (lambda: wh.datasets.save(np.arange(3), "new"),  # refused by the blob folder (blobs first)
                  lambda: wh.index.insert_many("datasets", [{"_id": "x"}])):
        try:
            write()
        except BackendError as exc:
            print("refused:", exc)
        else:
            raise AssertionError("a write went through")
    print("read ok")
""")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_a_warehouse_on_a_read_only_mount_can_be_read(tmp_path):
    """A real read-only bind mount, made in a user and mount namespace (no root tricks on the host)."""
    folder = _saved(tmp_path)
    (tmp_path / "reader.py").write_text(_READER)
    mount = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder}"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && ! touch {folder}/probe"],
                           check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()}")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", f'{mount} && exec "$0" "$1" "$2"', sys.executable,
                          str(tmp_path / "reader.py"), str(folder)], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "read ok" in out.stdout and "is read-only" in out.stdout


@pytest.mark.parametrize("below", ["file/home", "file"])
def test_mlw_home_under_a_file_is_a_config_error_naming_it(tmp_path, monkeypatch, below):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MLW_HOME", str(tmp_path / below))
    with pytest.raises(ConfigError, match="is a file") as info:
        mlwarehouse.connect()
    assert str(tmp_path / "file") in str(info.value)


def test_a_blob_folder_under_a_file_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        mlwarehouse.connect(str(tmp_path / "wh"), blobs=str(tmp_path / "file" / "blobs"))


@pytest.mark.parametrize("conninfo", ["host=127.0.0.1 port=5432 dbname=mlw user=mlw password=s3cret",
                                      "dbname=mlw", "user=mlw  host=/run/postgresql"])
def test_a_key_value_connection_string_is_refused_not_made_a_folder(tmp_path, monkeypatch, conninfo):
    """libpq's key=value form is not a URI: it used to become a local folder (named after its password)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="postgresql://") as info:
        mlwarehouse.connect(conninfo, blobs=str(tmp_path / "blobs"))
    assert "s3cret" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_a_folder_whose_name_holds_an_equals_sign_is_still_a_folder(tmp_path):
    wh = mlwarehouse.connect(str(tmp_path / "runs=3"))
    wh.collection("c").insert_one({"_id": "a"})
    assert (tmp_path / "runs=3" / "index.sqlite").exists()
