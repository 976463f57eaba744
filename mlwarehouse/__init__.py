"""mlwarehouse: the database for the whole machine-learning process.

    import mlwarehouse
    wh = mlwarehouse.connect()                 # ./.mlwarehouse: SQLite index + local blob folder
    wh.datasets.save((X, y), "digits", tags=["images"])
    wh.models.best("test_accuracy")           # everything is identified by a query
    wh.collection("products").attach("embed", torch.nn.Linear(1024, 64), key="x")   # models attached to data
    wh.training.fit(net, wh.collection("products"), inputs="x", target="label")       # training on a query
    wh.lineage.downstream(dataset)            # everything made from it

See the README for the concepts; :mod:`mlwarehouse.errors` for the exception tree.
"""

from mlwarehouse.errors import (
    AliasConflict,
    AliasError,
    BackendError,
    CodecError,
    ConfigError,
    DataTypeError,
    DependencyError,
    DuplicateKey,
    IntegrityError,
    InvalidDocument,
    ListenerError,
    NotFound,
    PickleNotAllowed,
    PromotionRefused,
    QueryError,
    TaskError,
    TaskFailed,
    TrainingError,
    Unavailable,
    VectorIndexError,
    WarehouseError,
)
from mlwarehouse.warehouse import GcReport, Project, Warehouse, connect

__version__ = "0.1.0"

__all__ = [
    "connect", "Warehouse", "Project", "GcReport", "TensorHub", "current_run", "current_task", "register_codec",
    "WarehouseError", "ConfigError", "QueryError", "InvalidDocument", "CodecError", "PickleNotAllowed", "NotFound",
    "DuplicateKey", "IntegrityError", "BackendError", "Unavailable", "TaskError", "TaskFailed", "__version__",
    "DataTypeError", "ListenerError", "VectorIndexError", "Audio", "Encoded", "trust_modules", "TensorDB",
    "DBLogger", "DependencyError", "TrainingError", "Folds", "EarlyStopping", "AliasError", "AliasConflict",
    "PromotionRefused",
]

_LAZY = {
    "TensorHub": ("mlwarehouse.compat.tensorhub", "TensorHub"),
    "TensorDB": ("mlwarehouse.compat.tensordb", "TensorDB"),
    "DBLogger": ("mlwarehouse.compat.tensordb", "DBLogger"),
    "Folds": ("mlwarehouse.training.folds", "Folds"),
    "EarlyStopping": ("mlwarehouse.training.fit", "EarlyStopping"),
    "current_run": ("mlwarehouse.context", "current_run"),
    "current_task": ("mlwarehouse.context", "current_task"),
    "register_codec": ("mlwarehouse.codecs", "register_codec"),
    "Audio": ("mlwarehouse.codecs.datatypes", "Audio"),
    "Encoded": ("mlwarehouse.codecs.datatypes", "Encoded"),
    "trust_modules": ("mlwarehouse.codecs.imports", "trust_modules"),
}


def __getattr__(name: str):
    # torch-free, fast import: these pull in their modules only when used
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlwarehouse' has no attribute {name!r}")
