"""Representation training (SuperDuperDB's second built-in): train an embedding model contrastively on two views
of each document, then put it behind the listener and rebuild the vector index over its new outputs.

    wh.training.represent(wh.collection("pairs"), encoder, views=("query", "passage"), listener="embed",
                          index="search", epochs=5)

Each batch pairs every document's two views (two fields, or one field and an augmentation of it); the model
embeds both, and the loss is the symmetric InfoNCE over cosine similarities with every other document of the
batch as a negative (CLIP's, with a fixed ``temperature``). The validation fold reports the loss and the in-batch
top-1 accuracy (``match``). With ``listener``, the trained model replaces that listener's model (same name, key
and filter: every output is recomputed) and each vector index over its outputs is dropped and made again with the
same options, so ``collection.find(like=...)`` searches the new space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from mlwarehouse.errors import QueryError
from mlwarehouse.training.sources import collate

__all__ = ["represent", "Representation", "info_nce", "match"]


def info_nce(embeddings: tuple, temperature: float = 0.1) -> torch.Tensor:
    """The symmetric contrastive loss of two batches of embeddings whose rows pair up."""
    a, b = (F.normalize(e.float(), dim=-1) for e in embeddings)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def match(out, y=None) -> float:
    """In-batch top-1 retrieval: the share of first views whose nearest second view is their own."""
    a, b = (F.normalize(e.float(), dim=-1) for e in out)
    return float(((a @ b.T).argmax(dim=1) == torch.arange(len(a), device=a.device)).float().mean())


@dataclass(frozen=True)
class Representation:
    """What :func:`represent` made: the fit, the listener now computing with its model, the rebuilt indexes."""
    fit: Any
    listener: Any
    indexes: list

    @property
    def model(self):
        return self.fit.model


def represent(training, collection, model: Any, *, views: Sequence[str], listener: str | None = None,
              augment: Callable | None = None, temperature: float = 0.1, batch_size: int = 128,
              example_inputs: Any = None, **options) -> Representation:
    """Fit ``model`` contrastively on ``views`` (two keys; or one key and ``augment``, a function of a batch
    tensor giving a second view); then (``listener``) make it that listener's model and rebuild its indexes."""
    from mlwarehouse.collections.collection import Collection
    if not isinstance(collection, Collection):
        raise QueryError(f"represent works on a collection, not {type(collection).__name__}")
    views = [views] if isinstance(views, str) else list(views)
    if not (len(views) == 2 or (len(views) == 1 and augment is not None)):
        raise QueryError("representation training needs two views: two keys, or one key and augment=")
    if not temperature > 0:
        raise QueryError(f"temperature must be positive, not {temperature!r}")
    if listener is not None:
        current = collection.listener(listener)  # NotFound before any training
        if current.key not in views:
            raise QueryError(f"listener {listener!r} reads {current.key!r}, which is not one of the views {views}")

    def forward(net, batch):
        first = collate(batch[views[0]])
        second = collate(batch[views[1]]) if len(views) == 2 else augment(first)
        return (net(first), net(second)), None

    def loss(out, _):
        return info_nce(out, temperature)

    fit = training.fit(model, collection, inputs=views, target=None, loss=loss, metrics=[match],
                       forward=forward, batch_size=batch_size,
                       name=options.pop("name", f"{collection.name}.representation"), **options)
    if listener is None:
        return Representation(fit, None, [])
    return Representation(fit, *_swap(collection, listener, fit, example_inputs))


def _swap(collection, name: str, fit, example_inputs: Any) -> tuple[Any, list]:
    """Re-attach listener ``name`` with the fit's model; drop and recreate the vector indexes over it."""
    old = collection.listener(name)
    specs = [spec for spec in collection.vector_indexes() if spec.get("listener") == name]
    for spec in specs:
        collection.drop_vector_index(spec["name"])
    collection.detach(name)
    trained = fit.model.load().eval()
    if example_inputs is None:
        # two documents: an example batch of one would fix the exported batch size at 1
        docs = list(collection.find({"_id": {"$in": fit.train_ids()[:2]}}, [old.key]))
        example_inputs = (collate([d[old.key] for d in docs] * (3 - len(docs)))[:2],)
    attached = collection.attach(name, trained, key=old.key, where=old.where, compute=old.compute,
                                 batch_size=old.batch_size, example_inputs=example_inputs, batched=old.batched)
    collection.project.lineage.record(fit.model, attached.model["id"], "serves")
    if attached.compute != "inline":
        collection.catch_up(name)
    indexes = [collection.create_vector_index(spec["name"], listener=name, metric=spec["metric"],
                                              engine=spec.get("engine"), options=spec.get("options"))
               for spec in specs]
    return attached, indexes
