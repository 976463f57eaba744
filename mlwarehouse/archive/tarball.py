"""Export a project to a portable tar archive, and import it back into any warehouse (``mlw export/import``).

The archive is a plain (uncompressed) tar; blobs are mostly compressed already. Its members, in this order:

- ``manifest.json``            format, version, source project, creation time, document counts per collection
- ``blobs/<sha256>``           every blob the documents reference, once each (content-addressed)
- ``collections/<name>.jsonl`` every document of the project in that collection, one JSON object a line
- ``tables/<table>.jsonl``     every document of one of the project's own collections (users' documents), as
                               stored: packed values, ``_outputs``, ``_listeners``; ``<table>`` is the
                               collection's table in the source project
                               (:func:`mlwarehouse.warehouse.tables.table_name`)

Every collection that holds the project's documents is exported (datasets, models, runs, logs, tasks, and the
catalog, data types and listeners of its own collections...), except the internal ``meta`` collection. Listener
models stored as torch modules are models like any other. The manifest lists the own collections' document counts
(``tables``) and indexes (``indexes``); their tables are never named by the archive on import but derived from
the target project and the collection's name (format version 2; version 1 archives, without tables, still
import). Blobs are streamed one at a time, never held together in memory.

Archives are untrusted: :mod:`.members` checks the members and the manifest before reading any (regular files
only, each inside the file's real size), :mod:`.restore` checks every document before writing one and removes
what it wrote if a write still fails; :mod:`.export` writes them. This module is the stable front of all three.

Ids: documents keep their ids, so importing a project twice into one warehouse raises DuplicateKey. Importing
under another project name (``project=``) gives every document a new id instead (ids are unique per collection,
not per project) and rewrites the references between documents: any string value, anywhere in a document, equal
to an old id of the archive becomes the new id (run ids in logs, models and tasks; dataset ids in models and
runs; task ids in runs; user fields holding ids too). Ids inside JSON values stored as blobs are not rewritten.
Users' documents in their own collections keep their ids and values (their tables are the new project's, so
nothing collides); only their listener states' model ids follow the models' new ids.
Log documents get new ids but are never reference targets, so the id map stays small however long the logs.
"""

from mlwarehouse.archive.export import Progress, export_project
from mlwarehouse.archive.members import FORMAT, FORMAT_VERSION, SKIPPED
from mlwarehouse.archive.restore import ORDER, UNREFERENCED, import_project, read_manifest

__all__ = ["export_project", "import_project", "read_manifest", "FORMAT", "FORMAT_VERSION", "Progress",
           "SKIPPED", "UNREFERENCED", "ORDER"]
