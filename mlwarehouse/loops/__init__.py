"""Long-running loops that react to what the warehouse stores: a trainer that keeps training on new documents
(:mod:`.trainer`), an evaluator of new models (:mod:`.evaluator`), a model that follows an alias (:mod:`.follow`,
``wh.models.follow``) and its HTTP server (:mod:`.server`).

Each loop is a plain function that runs until a ``threading.Event`` is set, keeps its place in a named watch
(:mod:`mlwarehouse.collections.watch`) and makes its effects idempotent, so it may run on any machine and be
killed at any moment: restarted, it resumes with every event it had not finished.
"""

__all__ = ["evaluate_forever", "train_forever"]


def __getattr__(name: str):
    # imported on first use, so ``python -m mlwarehouse.loops.evaluator`` does not import its module twice
    if name == "evaluate_forever":
        from mlwarehouse.loops.evaluator import evaluate_forever
        return evaluate_forever
    if name == "train_forever":
        from mlwarehouse.loops.trainer import train_forever
        return train_forever
    raise AttributeError(name)
