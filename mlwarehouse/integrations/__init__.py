"""Training-library integrations: log every step and epoch into a run, and keep checkpoints in the warehouse.

- :mod:`.lightning`: ``WarehouseLogger`` (a PyTorch Lightning logger) and ``WarehouseCheckpoint`` (a callback
  that checkpoints the module every epoch, with retention, and saves the best one as a final model).
- :mod:`.transformers`: ``WarehouseCallback`` (a Hugging Face ``TrainerCallback`` doing the same for ``Trainer``).

Each needs its library (the ``lightning`` and ``transformers`` extras); this package imports neither, so
``import mlwarehouse.integrations`` works without them. How metric names become log kinds is in :mod:`.common`.
"""
