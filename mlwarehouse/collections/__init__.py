"""Users' own documents: collections with pymongo's methods, data types, and models attached (listeners).

- :mod:`.catalog`     the project's collections and data types
- :mod:`.documents`   reserved fields, folds, input digests, data-type hooks, pymongo-shaped results
- :mod:`.collection`  the collection (insert, find, update, replace, delete, attach)
- :mod:`.listeners`   listeners: states, revisions, computing, the dependency graph
- :mod:`.models`      listeners' models: stored without pickle, loaded once, called on batches
- :mod:`.queueing`    listener work as tasks (batches of document ids)
- :mod:`.worker`      the listener worker run by ``mlw worker``
"""

from mlwarehouse.codecs.datatypes import Audio, DataType, DataTypeError, Encoded
from mlwarehouse.collections.collection import Collection, Cursor
from mlwarehouse.collections.listeners import Listener, ListenerError

__all__ = ["Collection", "Cursor", "Listener", "ListenerError", "Audio", "DataType", "DataTypeError", "Encoded"]
