"""Compatibility front ends for code written against the originals: TensorHub (:mod:`.tensorhub`), MLDB
(:mod:`.mldb`) and SuperDuperDB's client (:mod:`.superduperdb`)."""
