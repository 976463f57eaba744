"""Training on the warehouse: fits from a query with reproducible folds, imputation, representation training."""

from mlwarehouse.training.fit import EarlyStopping, TrainingError
from mlwarehouse.training.folds import Folds
from mlwarehouse.training.registry import FIT_TASK, Fit, Training

__all__ = ["Training", "Fit", "Folds", "EarlyStopping", "TrainingError", "FIT_TASK"]
