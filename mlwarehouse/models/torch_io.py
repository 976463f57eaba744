"""PyTorch modules <-> (architecture bytes, weights) without pickle, so another process loads and runs them.

An architecture is stored apart from the weights, in the first format that works:

- ``export``: :func:`torch.export.export` with the caller's example inputs (batch dimension dynamic when it can
  be), saved as a ``.pt2`` archive. The weights inside the archive are replaced by one-element placeholders, and
  the example inputs by zeros, so the archive is small and the same for every epoch of one architecture.
- ``script``: :func:`torch.jit.script` of a zero-weight copy, saved as a TorchScript archive. ``torch.jit.load``
  reads it with TorchScript's own restricted unpickler (TorchScript types only, no Python objects).
- ``class``: an importable ``module:qualname`` of an ``nn.Module`` subclass and a JSON config (``config=``,
  ``model.config``, ``model.hparams``, or none when every constructor argument has a default). Importing a module
  runs its code, so loading imports only a *trusted* module (or a submodule of one): listed in
  ``$MLW_TRUSTED_MODULES`` (comma-separated), passed to :func:`trust_modules`, or the module of a class this
  process saved itself; ``allow_pickle=True`` trusts any (the data is trusted as a whole). Anything else is refused
  with PickleNotAllowed before any import.
- ``pickle``: a pickled zero-weight copy, only with ``allow_pickle=True``.

Weights always travel as a state dict of tensors (one blob per tensor, chosen by the caller) and are put back with
``load_state_dict(..., assign=True)``; a loaded module is in eval mode. A ``class`` module with 64 MiB of weights
or more is built on torch's ``meta`` device first, so its own initial weights are never allocated (nor randomly
filled) only to be replaced: loading holds the stored tensors and nothing beside them. (Smaller ones too once the
process has torch's meta kernels loaded; importing them costs about a second, more than initialising a small
model.) A class whose constructor cannot run on ``meta``, or that keeps tensors outside its state dict, is built
the ordinary way instead.

What ``torch.export.load`` does with the bytes (read in torch 2.13's ``torch/export/pt2_archive/_package.py`` and
``torch/_export/serde/serialize.py``): the graph is JSON and plain tensors are raw bytes, but the loader still runs
code when the archive asks it to: weights and constants whose config says ``use_pickle`` go through
``torch.load(weights_only=False)``, custom and opaque objects through ``pickle.loads``, the sample inputs through
``torch.load(weights_only=True)`` with a *fallback to* ``weights_only=False``, AOTInductor entries load shared
libraries, symbolic shape expressions are parsed by ``sympy.sympify`` (which calls ``eval``), and a node's target
``torch.<anything>`` resolves to any attribute reachable from the torch module. So it is not safe on untrusted
bytes by itself. :func:`~mlwarehouse.models.pt2_check.check_pt2` therefore inspects an archive and refuses
(unless ``allow_pickle=True``) any archive with an entry twice or files beyond graph, weights, tensor constants
and sample inputs; with pickled payloads; with sample inputs that ``weights_only=True`` cannot load; with symbolic
expressions beyond plain symbols, numbers and sympy function calls; or with call targets outside ``torch.ops``,
``operator`` and ``math``; and torch is then given the archive the check rebuilt from what it read, never the
stored bytes. TorchScript programs, like exported graphs, run only TorchScript operators, not Python code.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import torch
from torch import nn

from mlwarehouse.codecs.imports import TRUSTED_MODULES_ENV, resolve, trust_modules, trusted_modules
from mlwarehouse.errors import CodecError, PickleNotAllowed
from mlwarehouse.models.pt2_check import check_pt2
from mlwarehouse.query.fields import normalize_value

__all__ = ["FORMATS", "Architecture", "describe", "build", "check_pt2", "state_dict_of", "trust_modules",
           "trusted_modules", "TRUSTED_MODULES_ENV"]

FORMATS = ("export", "script", "class", "pickle")
#: weights from which a ``class`` module is built on the meta device (see the module notes)
META_FROM = 64 << 20


@dataclass
class Architecture:
    """How to rebuild a module: ``format``, the archive bytes (export, script, pickle) or class + config."""

    format: str
    payload: bytes | None = None
    target: str | None = None
    config: dict | None = None


def state_dict_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict, detached and on the CPU."""
    return {k: v.detach().to("cpu") for k, v in module.state_dict().items()}


# -- saving ----------------------------------------------------------------------------------------------------

# module -> (signature, Architecture): a checkpoint every epoch re-exports nothing while the structure is the same
_cache: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, Architecture]]" = weakref.WeakKeyDictionary()


def describe(module: nn.Module, *, example_inputs: Any = None, config: dict | None = None,
             formats: Sequence[str] | None = None, allow_pickle: bool = False) -> Architecture:
    """The first architecture format in ``formats`` (default: export, script, class, pickle) that works.

    CodecError (PickleNotAllowed if only pickle would do) lists why each format failed.
    """
    if formats is None:
        formats = FORMATS
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise CodecError(f"unknown architecture format(s) {unknown}; choose from {list(FORMATS)}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    signature = _signature(module, example_inputs, config, tuple(formats), allow_pickle)
    cached = _cache.get(module)
    if cached is not None and cached[0] == signature:
        return cached[1]
    reasons: list[str] = []
    makers: dict[str, Callable[[], Architecture]] = {
        "export": lambda: _export(module, example_inputs),
        "script": lambda: Architecture("script", _script(module)),
        "class": lambda: _class(module, config),
        "pickle": lambda: _pickle(module, allow_pickle),
    }
    for name in formats:
        if name == "export" and example_inputs is None:
            reasons.append("export: needs example_inputs")
            continue
        try:
            arch = makers[name]()
        except PickleNotAllowed as exc:
            reasons.append(f"pickle: {exc}")
            continue
        except Exception as exc:  # each exporter fails in its own way; the next format is tried
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            reasons.append(f"{name}: {type(exc).__name__}: {first_line}")
            continue
        _cache[module] = (signature, arch)
        return arch
    kind = PickleNotAllowed if "pickle" in formats and not allow_pickle else CodecError
    raise kind(f"cannot store the architecture of {type(module).__qualname__} without pickle; tried "
               + "; ".join(reasons) + ". Pass example_inputs= (torch.export), make it scriptable, give an "
               "importable class a config=, or pass allow_pickle=True (trusted data only)")


def _signature(module: nn.Module, example_inputs: Any, config: Any, formats: tuple, allow_pickle: bool) -> Any:
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items())
    inputs = torch.utils._pytree.tree_map(
        lambda a: (tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else repr(a), example_inputs)
    return (type(module), repr(module), shapes, repr(inputs), json.dumps(config, sort_keys=True, default=repr),
            formats, allow_pickle)


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ``t``'s shape and dtype backed by one element: what the archive holds instead of weights."""
    z = torch.zeros((), dtype=t.dtype).expand(t.shape)
    return nn.Parameter(z, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else z


def _export(module: nn.Module, example_inputs: tuple) -> Architecture:
    dims = torch.utils._pytree.tree_map(
        lambda a: {0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None,
        example_inputs)
    was_training = module.training
    module.eval()  # the loaded module runs as in eval mode: export that graph
    try:
        try:
            program = torch.export.export(module, example_inputs, dynamic_shapes=dims)
        except Exception:
            program = torch.export.export(module, example_inputs)
    finally:
        module.train(was_training)
    for key in list(program.state_dict):
        program.state_dict[key] = _placeholder(program.state_dict[key])
    program.example_inputs = torch.utils._pytree.tree_map(
        lambda a: torch.zeros((), dtype=a.dtype).expand(a.shape) if isinstance(a, torch.Tensor) else a,
        program.example_inputs)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(program, buf)
    return Architecture("export", buf.getvalue())


def _zero_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are zeros (the real weights are never copied)."""
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        z = torch.zeros_like(t, device="cpu")
        memo[id(t)] = nn.Parameter(z, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else z
    return copy.deepcopy(module, memo)


def _script(module: nn.Module) -> bytes:
    skeleton = _zero_copy(module).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # deprecated in favour of export, still the way when no inputs are given
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(skeleton), buf)
    return buf.getvalue()


def _class(module: nn.Module, config: dict | None) -> Architecture:
    cls = type(module)
    target = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise CodecError(f"{target} cannot be imported by another process")
    if _resolve_class(target, trusted=True) is not cls:
        raise CodecError(f"{target} does not import back to the same class")
    trust_modules(cls.__module__)  # the caller's own class: loading it back in this process imports nothing new
    if config is None:
        for attr in ("config", "hparams"):
            value = getattr(module, attr, None)
            if value is not None and not callable(value):
                config = value
                break
    if config is not None and is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    elif config is not None and not isinstance(config, dict):
        config = dict(config)  # argparse.Namespace-like mappings, OmegaConf containers...
    if config is None:
        required = [p.name for p in inspect.signature(cls).parameters.values()
                    if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if required:
            raise CodecError(f"{target} needs {required}: pass config= or give the model a .config dict")
        config = {}
    return Architecture("class", target=target, config=normalize_value(config, "config"))


def _pickle(module: nn.Module, allow_pickle: bool) -> Architecture:
    if not allow_pickle:
        raise PickleNotAllowed("pickling the module needs allow_pickle=True")
    buf = io.BytesIO()
    torch.save(_zero_copy(module), buf)
    return Architecture("pickle", buf.getvalue())


# -- loading ---------------------------------------------------------------------------------------------------

def build(arch: Architecture, weights: dict[str, torch.Tensor], *, allow_pickle: bool = False) -> nn.Module:
    """Rebuild the module, put ``weights`` in it, and return it in eval mode."""
    if arch.format == "export":
        checked = check_pt2(arch.payload, allow_pickle=allow_pickle)  # torch reads only the checked copy
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = torch.export.load(io.BytesIO(checked)).module()
        except Exception as exc:  # torch's own errors on a malformed (already checked) archive
            raise CodecError(f"cannot read the exported program: {type(exc).__name__}: {exc}") from exc
        _assign(module, weights)
        for sub in module.modules():  # exported modules refuse .eval(); their graph already is the eval graph
            sub.training = False
        return module
    if arch.format == "script":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(io.BytesIO(arch.payload), map_location="cpu")
        except Exception as exc:
            raise CodecError(f"cannot read the TorchScript archive: {exc}") from exc
        _copy_into(module, weights)
        return module.eval()
    if arch.format == "class":
        cls = _resolve_class(arch.target, trusted=allow_pickle)
        if cls is None:
            raise CodecError(f"the model class {arch.target!r} is not importable in this process")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise CodecError(f"{arch.target!r} is not an nn.Module subclass; refusing to call it")
        module = _construct(cls, arch.config or {}, weights)
        return module.eval()
    if arch.format == "pickle":
        if not allow_pickle:
            raise PickleNotAllowed("this model's architecture is pickled: pass allow_pickle=True (trusted data only)")
        module = torch.load(io.BytesIO(arch.payload), weights_only=False)
        _assign(module, weights)
        return module.eval()
    raise CodecError(f"unknown architecture format {arch.format!r}")


def _construct(cls: type, config: dict, weights: dict[str, torch.Tensor]) -> nn.Module:
    """``cls(**config)`` holding ``weights``: built on the meta device and given the weights when every tensor it
    keeps is in the state dict (nothing is allocated twice), else built on the CPU and assigned."""
    module = None
    if "torch._meta_registrations" in sys.modules or \
            sum(t.numel() * t.element_size() for t in weights.values()) >= META_FROM:
        try:
            with torch.device("meta"):
                module = cls(**config)
        except Exception:  # a constructor that computes with data, or fetches something: the ordinary way
            module = None
    if module is not None:
        _assign(module, weights)
        if not _holds_meta(module):
            return module
    module = cls(**config)
    _assign(module, weights)
    return module


def _holds_meta(module: nn.Module) -> bool:
    """Whether a tensor of ``module`` is still on the meta device: a non-persistent buffer, or a plain tensor
    attribute, which ``load_state_dict`` does not reach."""
    for sub in module.modules():
        for value in list(sub.__dict__.values()) + list(sub._parameters.values()) + list(sub._buffers.values()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                return True
            if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) and v.is_meta for v in value):
                return True
    return False


def _assign(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    try:
        module.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        raise CodecError(f"stored weights do not fit the architecture: {exc}") from exc


def _copy_into(module: torch.jit.ScriptModule, weights: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    if own.keys() != weights.keys():
        raise CodecError(f"stored weights do not fit the TorchScript architecture: missing "
                         f"{sorted(own.keys() - weights.keys())}, unexpected {sorted(weights.keys() - own.keys())}")
    with torch.no_grad():
        for key, target in own.items():
            if target.shape != weights[key].shape:
                raise CodecError(f"weight {key!r} has shape {tuple(weights[key].shape)}, the architecture "
                                 f"wants {tuple(target.shape)}")
            target.copy_(weights[key])


def _resolve_class(target: str | None, *, trusted: bool = False) -> Any:
    """The object ``module:qualname`` names; PickleNotAllowed before importing a module that is not trusted."""
    return resolve(target, "the model class", trusted=trusted)
