"""The index layer: JSON documents in named collections behind one protocol (:mod:`.base`).

- :mod:`.base`      the protocol every backend implements, and IndexBackend: the checks they all share
- :mod:`.sqlbase`   SQLIndex, everything the SQL backends share (each supplies only its hooks)
- :mod:`.sqlite`    the embedded default (one SQLite file)
- :mod:`.postgres`  a shared PostgreSQL server
- :mod:`.mongo`     a MongoDB server (or anything that speaks its wire protocol)
- :mod:`.sql`       the filter/sort compiler to SQL and its dialects
- :mod:`.views`     the documented SQL views that ``wh.sql()`` reads

Backends know nothing of datasets, models or runs; domain code never imports a backend.
"""
