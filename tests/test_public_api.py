"""The public surface is pinned: what `import mlwarehouse` exports, and the exception tree."""

from __future__ import annotations

import subprocess
import sys

import mlwarehouse
from mlwarehouse import errors


def test_exported_members():
    assert sorted(mlwarehouse.__all__) == sorted([
        "connect", "Warehouse", "Project", "GcReport", "TensorHub", "current_run", "current_task",
        "register_codec", "WarehouseError", "ConfigError", "QueryError", "InvalidDocument", "CodecError",
        "PickleNotAllowed", "NotFound", "DuplicateKey", "IntegrityError", "BackendError", "Unavailable",
        "TaskError", "TaskFailed", "__version__", "DataTypeError", "ListenerError", "VectorIndexError", "Audio", "Encoded",
        "trust_modules", "TensorDB", "DBLogger", "DependencyError", "TrainingError", "Folds", "EarlyStopping",
        "AliasError", "AliasConflict", "PromotionRefused",
    ])
    for name in mlwarehouse.__all__:
        assert getattr(mlwarehouse, name) is not None, name


def test_every_error_is_a_warehouse_error():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.WarehouseError), name


def test_import_is_light():
    code = "import sys, mlwarehouse; print('torch' in sys.modules, 'sqlite3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False"  # torch is optional and only imported when a model needs it


def test_exception_tree_shape():
    """The documented tree of mlwarehouse/errors.py: each error's direct bases, and nothing more."""
    tree = {name: tuple(base.__name__ for base in getattr(errors, name).__bases__) for name in errors.__all__}
    assert tree == {
        "WarehouseError": ("Exception",),
        "ConfigError": ("WarehouseError",),
        "QueryError": ("WarehouseError", "ValueError"),
        "InvalidDocument": ("WarehouseError", "ValueError"),
        "CodecError": ("WarehouseError", "ValueError"),
        "PickleNotAllowed": ("CodecError",),
        "NotFound": ("WarehouseError", "KeyError"),
        "DuplicateKey": ("WarehouseError",),
        "IntegrityError": ("WarehouseError",),
        "BackendError": ("WarehouseError",),
        "Unavailable": ("BackendError",),
        "TaskError": ("WarehouseError",),
        "TaskFailed": ("TaskError",),
        "DataTypeError": ("CodecError",),
        "ListenerError": ("WarehouseError",),
        "VectorIndexError": ("WarehouseError",),
        "DependencyError": ("QueryError",),
        "TrainingError": ("WarehouseError",),
        "AliasError": ("WarehouseError",),
        "AliasConflict": ("AliasError",),
        "PromotionRefused": ("AliasError",),
    }
    for name in errors.__all__:  # the docstring's drawing names every class
        assert f" {name} " in errors.__doc__ or f"{name}\n" in errors.__doc__, name


def _public(cls) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_index_protocol_surface():
    """What every index backend offers (and nothing a caller could come to rely on by accident)."""
    from mlwarehouse.index.base import Index
    assert _public(Index) == {
        "name", "supports_listen",
        "ensure_collection", "create_index", "collections", "indexes",
        "insert_many", "insert_one", "update_many", "find_one_and_update", "replace_one", "swap_many", "delete_many",
        "find", "find_one", "values", "count", "distinct", "listen", "sql", "close",
    }


def test_blob_protocol_surface():
    from mlwarehouse.blobs.base import BlobStore
    assert _public(BlobStore) == {
        "name", "mtime_resolution", "local_files",
        "put", "put_file", "get", "get_buffer", "get_range", "exists", "stat", "delete", "list", "close",
    }


def test_every_backend_implements_its_protocol_and_adds_little():
    """Backends may add a few documented extras (SQL views, the read cache's size), never rename the protocol."""
    from mlwarehouse.blobs.base import BlobStore
    from mlwarehouse.blobs.cache import CachedBlobStore
    from mlwarehouse.blobs.files import FileBlobStore
    from mlwarehouse.index.base import Index
    from mlwarehouse.index.sqlite import SQLiteIndex
    assert _public(SQLiteIndex) - _public(Index) == {"create_view", "table_name", "dialect", "name_limit"}
    assert _public(FileBlobStore) - _public(BlobStore) <= {"root"}
    assert _public(CachedBlobStore) - _public(BlobStore) == {"used_bytes"}
