"""Objects named by import path (``"module:qualname"``), imported only from modules the user trusts.

The warehouse stores code by name, never as pickles: a model's class, a listener's function, a data type's
encoder and decoder. Importing a module runs its code, so a name read from the store is resolved only when its
module (or a package above it) is trusted: listed in ``$MLW_TRUSTED_MODULES`` (comma-separated), passed to
:func:`trust_modules`, or the module of an object this process stored itself (:func:`target_of` trusts it). A
worker started to run tasks trusts the code its tasks name (``trusted=True``). Anything else is refused with
PickleNotAllowed before any import.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

from mlwarehouse.errors import CodecError, PickleNotAllowed

__all__ = ["TRUSTED_MODULES_ENV", "trust_modules", "trusted_modules", "is_trusted", "resolve", "target_of"]

#: the environment variable listing modules (comma-separated) whose code may be imported on load
TRUSTED_MODULES_ENV = "MLW_TRUSTED_MODULES"
MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)
_trusted: set[str] = set()  # trust_modules() and the modules of objects this process stored


def trust_modules(*names: str) -> None:
    """Let code from these modules (and their submodules) be imported on load in this process."""
    for name in names:
        if not isinstance(name, str) or not MODULE_NAME.fullmatch(name):
            raise CodecError(f"not a module name: {name!r}")
    _trusted.update(names)


def trusted_modules() -> frozenset[str]:
    """The modules trusted now: :func:`trust_modules`, stored objects' modules and ``$MLW_TRUSTED_MODULES``."""
    env = {n.strip() for n in os.environ.get(TRUSTED_MODULES_ENV, "").split(",")}
    return frozenset(_trusted | {n for n in env if MODULE_NAME.fullmatch(n)})


def is_trusted(module_name: str) -> bool:
    parts = module_name.split(".")
    allowed = trusted_modules()
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def split_target(target: Any) -> tuple[str, str] | None:
    """``("module", "qualname")`` of a well-formed ``"module:qualname"`` (no dunder parts); else None."""
    if not isinstance(target, str) or target.count(":") != 1:
        return None
    module_name, qualname = target.split(":")
    if "__" in qualname or not qualname or not MODULE_NAME.fullmatch(module_name) \
            or not all(p.isidentifier() for p in qualname.split(".")):
        return None
    return module_name, qualname


def resolve(target: Any, what: str, *, trusted: bool = False) -> Any:
    """The object ``"module:qualname"`` names, for ``what`` ("the model class", "data type 'x' decoder"...).

    PickleNotAllowed before importing a module that is not trusted; None when the module or the name does not
    exist (the caller says what it needed)."""
    parts = split_target(target)
    if parts is None:
        return None
    module_name, qualname = parts
    if not (trusted or is_trusted(module_name)):
        raise PickleNotAllowed(f"{what} {target!r} is in a module that is not trusted: importing it would run its "
                               f"code. Add {module_name!r} (or its package) to ${TRUSTED_MODULES_ENV} or "
                               "mlwarehouse.trust_modules() (or, for a model, pass allow_pickle=True: trusted data only)")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def target_of(obj: Any, what: str) -> str:
    """The ``"module:qualname"`` that imports ``obj`` back (a top-level function or class, or a method of one),
    and trust its module in this process; CodecError for lambdas, locals and ``__main__``."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    target = f"{module}:{qualname}"
    if not module or module == "__main__" or split_target(target) is None \
            or resolve(target, what, trusted=True) is not obj and not _same_function(resolve(target, what,
                                                                                               trusted=True), obj):
        raise CodecError(f"{what} {obj!r} cannot be imported by another process: define it at the top level of a "
                         f"module other than __main__ (not a lambda, a local function or a bound method)")
    _trusted.add(module)
    return target


def _same_function(found: Any, obj: Any) -> bool:
    # a staticmethod or function reached through its class is the function itself
    return getattr(found, "__func__", found) is getattr(obj, "__func__", obj)
