"""Models: the registry (:mod:`.registry`), checkpoints with retention (:mod:`.checkpoints`) and PyTorch
architectures stored without pickle (:mod:`.torch_io`)."""
