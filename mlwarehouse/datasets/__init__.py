"""Datasets: whole datasets (:mod:`.whole`), and item datasets for data that outgrows memory.

- :mod:`.whole`        a value (arrays, tuples, dicts) saved and loaded whole, versioned
- :mod:`.items`        item datasets: items packed into immutable shards, their scalar fields indexed
- :mod:`.versions`     the one version allocator both kinds share (1, 2, 3... per name; explicit ones immutable)
- :mod:`.shards`       the shard format (blocks of columns, zstd, verified)
- :mod:`.stream`       deterministic, resumable, prefetched batches of items selected by a query
- :mod:`.shardcache`   the size-bounded local disk cache of shards from remote stores
- :mod:`.shardmemory`  the process-wide memory cache of verified decoded shards
- :mod:`.torch_data`   PyTorch ``IterableDataset`` over a stream, split across workers and ranks
"""
