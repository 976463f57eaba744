"""Blobs in a local directory: ``root/ab/cd/<sha256 hex>``, written atomically, verified on every read.

A put writes a temporary file in the destination folder, fsyncs it, renames it over the final name and fsyncs
the folder, so a reader sees either nothing or the whole blob, and many processes may put the same bytes at once
(each rename installs identical content). Inside a put batch (:func:`mlwarehouse.blobs.base.put_batch`, one per
packed value, so one per checkpoint) ``put`` returns once the bytes are hashed: the write, its fsync and the rename
run on the blob pool while the caller hashes the next tensor (the disk works while the CPU does), and the folders
that gained names are fsynced once each when the batch ends, before the document that refers to them is written.
Temporary files start with ``.tmp-``; ``list`` removes those older than an hour (left by a crashed writer).
Putting bytes that are there already compares the file with them first and writes it again if it is damaged (a
zero-length file is a common crash artefact): a put never "succeeds" over bad bytes, and a streamed put installs
its new copy over the old one. ``get_buffer`` reads a blob into memory that it hands over (tensors take it as it
is, no second copy), hashing each chunk as it arrives; ``_open_stream`` opens a blob's file for a decoder that
streams it through a :class:`~mlwarehouse.blobs.common.VerifyingReader` (large compressed arrays).

A local folder is *trusted* (``trusted=True``, the default unless ``$MLW_TRUST_LOCAL_BLOBS`` is ``0``): whoever can
write into it can write the index beside it too, so what a read must catch there is damage, not forgery. A read
given the xxh3 checksum (64 bits) that the index recorded beside the key (a dataset's shards, read whole by every
epoch of a stream; blobs of 1 MiB or more, such as a checkpoint's tensors) checks the bytes against it, about 15x
cheaper than their sha256 (0.03 against 0.5 ms per MB here); every other read, and every read of an untrusted
folder, checks the sha256. Remote stores (S3, GridFS) always check the sha256.

A trusted folder may also *map* a blob of 1 MiB or more instead of copying it (``get_buffer(..., mapped=True)``:
a stream's shards). The caller gets a read-only view of the page cache, checked whole before it is returned; an
uncompressed shard's columns are then views of it, so a cold epoch reads each byte once for the check and once
for its batch, as a memory-mapped array would. Blob files are never changed in place (a put renames a new file
over the name), so the mapped bytes stay the ones checked; a file truncated in place by hand while mapped would
crash its reader (SIGBUS), which is why an untrusted folder never maps.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from mlwarehouse.blobs.base import BlobInfo, BlobStore, blob_key, current_batch
from mlwarehouse.blobs.common import (
    CHUNK,
    READ_CHUNK,
    STALE_TMP_S,
    copy_hashed,
    fanout,
    fanout_key,
    fresh_buffer,
    is_fanout_dir,
    is_xxh3,
    verified,
)
from mlwarehouse.errors import BackendError, IntegrityError, NotFound

__all__ = ["FileBlobStore"]

_TMP = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(path: Path) -> None:
    """fsync a folder that gained a blob's name, as a BackendError if the disk refuses."""
    try:
        _fsync_dir(path)
    except OSError as exc:
        raise BackendError(f"cannot make blob folder {path} durable: {exc}") from exc


class FileBlobStore(BlobStore):
    """Content-addressed blobs under ``root``. ``fsync=False`` trades durability for speed (tests, caches)."""

    name = "files"
    local_files = True

    def __init__(self, root: str | os.PathLike, *, fsync: bool = True, trusted: bool | None = None):
        self.root = Path(root)
        self.fsync = fsync
        self.trusted = os.environ.get("MLW_TRUST_LOCAL_BLOBS", "1").strip() != "0" if trusted is None else trusted
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create the blob folder {self.root}: {exc}") from exc

    def __repr__(self) -> str:
        return f"FileBlobStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / fanout(key)

    @contextmanager
    def _errors(self, key: str, path: Path, doing: str):
        """OS errors of one blob file, translated: a missing file is NotFound, anything else BackendError."""
        try:
            yield
        except FileNotFoundError:
            raise NotFound(f"blob {key} not found in {self.root}") from None
        except OSError as exc:
            raise BackendError(f"cannot {doing} blob file {path}: {exc}") from exc

    def _tmp_name(self) -> str:
        return f"{_TMP}{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(6)}"

    # -- writing ---------------------------------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview) -> str:
        key = blob_key(data)
        batch = current_batch()
        if batch is None:
            return self._put_keyed(key, data)
        if batch.claim(self, key):
            batch.defer(self._write, key, data, True, size=memoryview(data).nbytes)
        return key

    def _put_keyed(self, key: str, data: bytes | bytearray | memoryview) -> str:
        """``put`` of bytes whose key the caller has just computed (a read cache keeps verified bytes unhashed)."""
        self._write(key, data, False)
        return key

    def _write(self, key: str, data: bytes | bytearray | memoryview, batched: bool) -> list[tuple]:
        """Write ``data`` under ``key`` unless it is there intact: temporary file, fsync, rename. The folder's
        fsync is done here, or returned as work for the batch's end when ``batched`` (one per folder, not per
        blob)."""
        path = self._path(key)
        if self._intact(path, data):
            return []
        folder = self._make_folder(path.parent)
        tmp = folder / self._tmp_name()
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            self._discard(tmp)
            raise BackendError(f"cannot write blob {key} to {path}: {exc}") from exc
        if not self.fsync:
            return []
        if batched:
            return [(_sync_folder, path.parent)]
        _sync_folder(path.parent)
        return []

    def _put_stream(self, source: BinaryIO) -> tuple[str, int]:
        """Stream a file object into the store, hashing it on the way; returns ``(key, size)``.

        The bytes are hashed while they are copied to a temporary file, so blobs of any size never sit in memory.
        """
        tmp = self.root / self._tmp_name()
        try:
            with open(tmp, "xb") as out:
                key, size = copy_hashed(source, out)
                if self.fsync:
                    os.fsync(out.fileno())
            path = self._path(key)
            self._make_folder(path.parent)
            self._install(tmp, path)  # over an existing file too: the bytes are written already, and this
            # repairs a damaged copy and refreshes the mtime in one rename
        except OSError as exc:
            self._discard(tmp)
            raise BackendError(f"cannot store a file in {self.root}: {exc}") from exc
        return key, size

    def _intact(self, path: Path, data: bytes | bytearray | memoryview) -> bool:
        """Whether ``path`` already holds exactly ``data``; if so its mtime is refreshed (gc's grace period).

        False for a missing file and for a damaged one (truncated, zero-length after a crash, other bytes): the
        put then writes it again, so putting the same bytes repairs a blob instead of trusting its name.
        Comparing is a read of a file that is usually cached, cheaper than the write and fsync it saves.
        """
        view = memoryview(data).cast("B")
        try:
            with open(path, "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != len(view):
                    return False
                buf = bytearray(min(CHUNK, len(view)))
                offset = 0
                while offset < len(view):
                    n = f.readinto(buf)
                    # a bytearray against any buffer is one memcmp (a memoryview against one goes item by item)
                    if not n or (buf if n == len(buf) else buf[:n]) != view[offset:offset + n]:
                        return False
                    offset += n
            os.utime(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise BackendError(f"cannot check blob file {path}: {exc}") from exc

    def _make_folder(self, folder: Path) -> Path:
        if not folder.is_dir():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if self.fsync:  # make the new fan-out folders themselves durable
                    _fsync_dir(folder.parent)
                    _fsync_dir(self.root)
            except OSError as exc:
                raise BackendError(f"cannot create blob folder {folder}: {exc}") from exc
        return folder

    def _install(self, tmp: Path, path: Path) -> None:
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(path.parent)

    @staticmethod
    def _discard(tmp: Path) -> None:
        try:
            tmp.unlink()
        except OSError:
            pass

    # -- reading ---------------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors(key, path, "read"), open(path, "rb") as f:
            data = f.read()
        return verified(key, data, f"its file {path}")

    def get_buffer(self, key: str, size: int | None = None, *, allocate: Callable[[int], Any] | None = None,
                   xxh3: str | None = None, mapped: bool = False) -> memoryview:
        """The blob read into a fresh writable buffer that the caller owns (from ``allocate(length)`` when given),
        each chunk hashed as it arrives (while it is still in the CPU's cache); its size is checked against
        ``size`` before anything is allocated. A trusted store checks the ``xxh3`` recorded beside the key
        instead of the sha256, when one is given; with ``mapped``, it maps a file of 1 MiB or more read-only
        instead of copying it (see the module), and checks the mapped bytes."""
        path = self._path(key)
        with self._errors(key, path, "read"), open(path, "rb", buffering=0) as f:
            length = os.fstat(f.fileno()).st_size
            if size is not None and length != size:
                raise IntegrityError(f"blob {key} holds {length} bytes, its reference says {size}")
            by_xxh3 = self.trusted and is_xxh3(xxh3)
            digest = xxhash.xxh3_64() if by_xxh3 else hashlib.sha256()
            if mapped and self.trusted and length >= READ_CHUNK:
                view = _map(f, length)
                digest.update(view)
                got, extra = length, b""
            else:
                view = memoryview(allocate(length)).cast("B") if allocate else fresh_buffer(length)  # all read over
                got = 0
                while got < length:
                    n = f.readinto(view[got:got + READ_CHUNK])
                    if not n:
                        break
                    digest.update(view[got:got + n])
                    got += n
                extra = f.read(1) if got == length else b""
        if got != length or extra:
            raise IntegrityError(f"blob {key} is corrupted: its file {path} changed size while read "
                                 f"({got} of {length} bytes)")
        if digest.hexdigest() != (xxh3 if by_xxh3 else key):
            what = f"has xxh3 {digest.hexdigest()}, its index records {xxh3}" if by_xxh3 \
                else f"hashes to {digest.hexdigest()}"
            raise IntegrityError(f"blob {key} is corrupted: its file {path} {what}")
        return view

    def _open_stream(self, key: str, size: int) -> tuple[BinaryIO, str]:
        """The blob's file, open for a :class:`~mlwarehouse.blobs.common.VerifyingReader` (which hashes what it
        reads), after checking its size against ``size``; and where it is, for error messages."""
        path = self._path(key)
        with self._errors(key, path, "read"):
            f = open(path, "rb", buffering=0)
            try:
                length = os.fstat(f.fileno()).st_size
            except BaseException:
                f.close()
                raise
        if length != size:
            f.close()
            raise IntegrityError(f"blob {key} holds {length} bytes, its reference says {size}")
        return f, f"its file {path}"

    def _read_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        with self._errors(key, path, "read"), open(path, "rb") as f:
            return os.pread(f.fileno(), length, start) if length else b""

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except NotFound:  # not a key: nothing can be stored under it
            return False

    def stat(self, key: str) -> BlobInfo:
        path = self._path(key)
        with self._errors(key, path, "stat"):
            st = path.stat()
        return BlobInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            with self._errors(key, path, "delete"):
                path.unlink()
        except NotFound:
            return False
        return True

    def list(self) -> Iterator[BlobInfo]:
        """Every blob, walking the fan-out folders; removes temporary files older than an hour on the way."""
        stale_before = time.time() - STALE_TMP_S
        self._clean_tmp(self.root, stale_before)
        for top in self._subdirs(self.root):
            for sub in self._subdirs(top):
                for entry in self._scan(sub):
                    if entry.name.startswith(_TMP):
                        self._remove_if_stale(entry, stale_before)
                    elif key := fanout_key(top.name, sub.name, entry.name):
                        try:
                            st = entry.stat()
                        except FileNotFoundError:  # deleted while we walked
                            continue
                        yield BlobInfo(key, st.st_size, st.st_mtime)

    def _clean_tmp(self, folder: Path, stale_before: float) -> None:
        for entry in self._scan(folder):
            if entry.name.startswith(_TMP):
                self._remove_if_stale(entry, stale_before)

    @staticmethod
    def _remove_if_stale(entry: os.DirEntry, stale_before: float) -> None:
        try:
            if entry.stat().st_mtime < stale_before:
                os.unlink(entry.path)
        except OSError:
            pass

    def _subdirs(self, folder: Path) -> list[Path]:
        return sorted(Path(e.path) for e in self._scan(folder) if is_fanout_dir(e.name) and e.is_dir())

    @staticmethod
    def _scan(folder: Path) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                return list(it)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise BackendError(f"cannot list blob folder {folder}: {exc}") from exc


def _map(f: BinaryIO, length: int) -> memoryview:
    """A read-only view of the first ``length`` bytes of the open file ``f``, mapped (its pages read in at once
    where the system can: one fault per mapping, not per page)."""
    if hasattr(mmap, "MAP_POPULATE"):
        return memoryview(mmap.mmap(f.fileno(), length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                    prot=mmap.PROT_READ))
    return memoryview(mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ))
