"""Imputation (SuperDuperDB's first built-in): learn to predict a field from another, then attach the trained
model so every document, present and future, carries its prediction.

    imputed = wh.training.impute(wh.collection("digits"), "label_guess", net, input="image", target="label",
                                 metrics=["accuracy"], epochs=10)
    doc["_outputs"]["image"]["label_guess"]      # the predicted class (or value), for every document

A classification loss (``cross_entropy``, ``nll``) makes the attached model return the predicted class (the
argmax); ``bce`` returns 0 or 1; any other loss returns the model's output as it is. The attached model is the
fit's final model wrapped in a small predictor, stored in the registry like any listener's model, with a lineage
edge from the final model to it; the fit, its runs and checkpoints stay as for any fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mlwarehouse.errors import QueryError

__all__ = ["impute", "Imputation", "Predictor"]

_CLASSIFY = ("cross_entropy", "nll")


class Predictor(torch.nn.Module):
    """A trained model followed by the decision its loss implies: argmax over classes, or a 0/1 threshold."""

    def __init__(self, model: torch.nn.Module, decision: str = "identity"):
        super().__init__()
        if decision not in ("identity", "argmax", "threshold"):
            raise QueryError(f"decision must be identity, argmax or threshold, not {decision!r}")
        self.model = model
        self.decision = decision

    def forward(self, x):
        out = self.model(x)
        if self.decision == "argmax":
            return out.argmax(dim=-1)
        if self.decision == "threshold":
            return (out > 0).to(torch.int64).squeeze(-1)
        return out


@dataclass(frozen=True)
class Imputation:
    """What :func:`impute` made: the fit (with its final model) and the listener that applies it."""
    fit: Any
    listener: Any

    @property
    def model(self):
        return self.fit.model


def impute(training, collection, name: str, model: Any, *, input: str, target: str, loss: Any = "cross_entropy",
           metrics=(), filter: dict | None = None, attach: bool = True, compute: str = "inline",
           example_inputs: Any = None, **options) -> Imputation:
    """Fit ``model`` to predict ``target`` from ``input`` on the documents ``filter`` selects, then (``attach``)
    attach it to ``collection`` as listener ``name`` on ``input``: every document gets its prediction."""
    from mlwarehouse.collections.collection import Collection
    if not isinstance(collection, Collection):
        raise QueryError(f"impute works on a collection, not {type(collection).__name__}")
    if input == target:
        raise QueryError("an imputation predicts one field from another: input and target must differ")
    fit = training.fit(model, collection, inputs=input, target=target, loss=loss, metrics=metrics, filter=filter,
                       name=options.pop("fit_name", f"{collection.name}.{name}"), **options)
    if not attach:
        return Imputation(fit, None)
    trained = fit.model.load()
    trained.eval()
    decision = "argmax" if loss in _CLASSIFY else ("threshold" if loss == "bce" else "identity")
    predictor = Predictor(trained, decision).eval()
    if example_inputs is None:
        from mlwarehouse.training.sources import collate
        # two documents: an example batch of one would fix the exported batch size at 1
        docs = list(collection.find({"_id": {"$in": fit.train_ids()[:2]}}, [input]))
        example_inputs = (collate([d[input] for d in docs] * (3 - len(docs)))[:2],)
    listener = collection.attach(name, predictor, key=input, compute=compute, example_inputs=example_inputs)
    project = training.project
    project.lineage.record(fit.model, listener.model["id"], "imputes")
    return Imputation(fit, listener)
