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
        "TaskError", "TaskFailed", "__version__",
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
    }
    for name in errors.__all__:  # the docstring's drawing names every class
        assert f" {name} " in errors.__doc__ or f"{name}\n" in errors.__doc__, name
