"""Listeners' models: stored without pickle (torch modules in the model registry, callables by import path),
loaded once per process, called on batches of decoded inputs."""

from __future__ import annotations

import sys
import threading
from typing import Any

from mlwarehouse.codecs.imports import resolve, target_of
from mlwarehouse.errors import CodecError, ListenerError, QueryError

__all__ = ["store_model", "model_ref", "Runner"]


def store_model(collection, name: str, model: Any, example_inputs: Any) -> dict:
    """Where a listener's model is kept: a torch module saved in the model registry, or a callable's import path."""
    if isinstance(model, str):
        if resolve(model, f"listener {name!r} model", trusted=True) is None:
            raise QueryError(f"listener model {model!r} cannot be imported")
        return {"kind": "callable", "target": model}
    if _is_module(model):
        record = collection.project.models.save(
            model, f"{collection.name}.{name}", tags=["listener"],
            example_inputs=example_inputs, description=f"listener {name!r} of collection {collection.name!r}")
        return {"kind": "torch", "id": record.id, "name": record.name}
    if callable(model):
        try:
            return {"kind": "callable", "target": target_of(model, f"listener {name!r} model")}
        except CodecError as exc:
            raise QueryError(str(exc)) from None
    raise QueryError(f"a listener model is a torch module or an importable callable, not {type(model).__name__}")


def _is_module(model: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch module can only exist where torch was imported
    return torch is not None and isinstance(model, torch.nn.Module)


def model_ref(listener) -> dict:
    """What a listener's state records of the model that computed it."""
    ref = listener.model
    return {"id": ref["id"]} if ref.get("kind") == "torch" else {"target": ref.get("target")}


class Runner:
    """A listener's model, loaded once per process, called on a batch of decoded inputs."""

    _cache: dict[tuple, "Runner"] = {}
    _lock = threading.Lock()

    def __init__(self, fn: Any, batched: bool, torch_module: bool):
        self.fn, self.batched, self.torch_module = fn, batched, torch_module

    @classmethod
    def get(cls, collection, listener, *, trusted: bool) -> "Runner":
        ref = listener.model
        key = (collection.project.warehouse.settings and collection.project.warehouse.settings.index_uri,
               ref.get("id") or ref.get("target"), trusted)
        with cls._lock:
            found = cls._cache.get(key)
        if found is not None:
            return found
        if ref.get("kind") == "torch":
            module = collection.project.models.get(ref["id"]).load()
            runner = cls(module, listener.batched is not False, True)
        else:
            fn = resolve(ref.get("target"), f"listener {listener.name!r} model", trusted=trusted)
            if fn is None or not callable(fn):
                raise ListenerError(f"listener {listener.name!r} model {ref.get('target')!r} cannot be imported here")
            runner = cls(fn, bool(listener.batched), False)
        with cls._lock:
            if len(cls._cache) > 16:
                cls._cache.clear()
            cls._cache[key] = runner
        return runner

    def __call__(self, inputs: list) -> list:
        if not inputs:
            return []
        if self.torch_module:
            return _torch_call(self.fn, inputs, self.batched)
        if self.batched:
            out = list(self.fn(inputs))
            if len(out) != len(inputs):
                raise ListenerError(f"a batched model returned {len(out)} outputs for {len(inputs)} inputs")
            return out
        return [self.fn(x) for x in inputs]


def _torch_call(module: Any, inputs: list, batched: bool) -> list:
    import numpy as np
    import torch
    tensors = [torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x for x in inputs]
    with torch.no_grad():
        if batched and all(isinstance(t, torch.Tensor) for t in tensors) \
                and len({(tuple(t.shape), t.dtype) for t in tensors}) == 1:
            out = module(torch.stack(tensors))
            if isinstance(out, torch.Tensor) and out.shape[:1] == (len(tensors),):
                return [row.clone() for row in out.unbind(0)]
        return [module(t) for t in tensors]
