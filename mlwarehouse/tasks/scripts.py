"""What a task stores about its script, checked when the task is created (nothing here runs it).

A script is the path of a ``.py`` file, whose source is stored as a blob with its sha256 (workers need no copy of
it), or a ``"module:function"`` target that the worker imports. A missing file, a syntax error or a callable no
worker could import raises TaskError at once, not on a worker. Running scripts is the task process's job
(:mod:`mlwarehouse.tasks.runtime`), which only a worker starts (a fresh interpreter, or a fork of the worker's
fork server: :mod:`mlwarehouse.tasks.forkserver`).
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any

from mlwarehouse.errors import TaskError

__all__ = ["script_spec"]

_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def script_spec(project, script: Any) -> dict | None:
    """What a task stores about its script: a file's source (as a blob) and sha256, or a callable's target.

    Raises TaskError for a missing file or a syntax error, so bad scripts are refused when tasks are created.
    """
    if script is None:
        return None
    if callable(script) and not isinstance(script, (str, Path)):
        module, name = getattr(script, "__module__", None), getattr(script, "__qualname__", "")
        if not module or module == "__main__" or not name or "<" in name or not _names(module, name, script):
            raise TaskError(f"{script!r} cannot be imported by a worker: define it at the top level of a "
                            f"module (not a bound method or a partial), or pass the path of a script file")
        return {"kind": "callable", "target": f"{module}:{name}"}
    if isinstance(script, str) and _TARGET.match(script) and not Path(script).exists():
        return {"kind": "callable", "target": script}
    if not isinstance(script, (str, Path)):
        raise TaskError(f"script must be a file path or 'module:function', not {type(script).__name__}")
    path = Path(script).expanduser()
    if not path.is_file():
        raise TaskError(f"task script {str(path)!r} does not exist (or is not a file)")
    source = path.read_bytes()
    try:
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise TaskError(f"task script {str(path)!r} has a syntax error at line {exc.lineno}: {exc.msg}") from exc
    except ValueError as exc:  # null bytes
        raise TaskError(f"task script {str(path)!r} is not Python source: {exc}") from exc
    return {"kind": "file", "filename": path.name, "sha256": hashlib.sha256(source).hexdigest(),
            "source": project.pack(source)}


def _names(module: str, name: str, obj: Any) -> bool:
    """Whether ``module:name`` leads back to ``obj`` itself (a bound method or a partial does not)."""
    found: Any = sys.modules.get(module)
    for part in name.split("."):
        found = getattr(found, part, None)
    return found is obj
