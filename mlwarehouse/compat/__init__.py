"""Compatibility front ends for code written against the originals: TensorHub (:mod:`.tensorhub`) and MLDB
(:mod:`.mldb`)."""
