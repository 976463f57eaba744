"""The blob layer: immutable, content-addressed bytes behind one protocol (:mod:`.base`).

Backends: a local folder (:mod:`.files`, the embedded default), S3-compatible stores (:mod:`.s3`), GridFS
(:mod:`.gridfs`); a bounded local read cache that wraps any of them (:mod:`.cache`); the helpers they share, each
written once (:mod:`.common`). Blob stores know nothing of the index, and the index nothing of them.
"""
