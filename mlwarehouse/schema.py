"""The one owner of the warehouse's schema: collection names, their scalar fields and their indexes.

Every collection the warehouse itself writes is declared here once; domain packages name collections through
these objects (``schema.RUNS.name``) and create them through :meth:`mlwarehouse.warehouse.Project.ensure`, never
with string literals or index calls of their own. The SQL views (:mod:`mlwarehouse.index.views`) and the web
pages read the same declarations, so a field renamed here is renamed everywhere.

Scalar fields are fields that never hold an array or object (ids, names, states): backends compile equality on
them to a plain indexed comparison and refuse a write that breaks the promise. ``blobs`` marks collections whose
documents may reference blobs (deletes and ``gc`` scan only those for references).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Collection", "IndexSpec", "META", "DATASETS", "ITEMS", "ITEM_SHARDS", "MODELS", "RUNS", "LOGS", "TASKS",
           "CATALOG", "DATATYPES", "LISTENERS", "VECTOR_INDEXES", "TOMBSTONES", "FITS", "LINEAGE", "LINEAGE_DELETED",
           "EVALUATIONS", "ALIASES", "WATCHES", "LISTENER_TASK", "TABLE_PREFIX", "COLLECTIONS", "LOG_FIELDS",
           "BOOKKEEPING_FIELDS", "SUMMARY_FIELD", "REVISED", "REV_INDEX", "LOG_BLOCK_NAMES", "LOG_BLOCK_ROWS",
           "LOG_ROW_HEAD"]


@dataclass(frozen=True)
class IndexSpec:
    """An index over ``keys`` (``(field, 1 | -1)`` pairs), optionally unique."""
    keys: tuple[tuple[str, int], ...]
    unique: bool = False


@dataclass(frozen=True)
class Collection:
    """A collection of the warehouse: its name, scalar fields, indexes and whether it references blobs."""
    name: str
    scalar_fields: tuple[str, ...] = ()
    indexes: tuple[IndexSpec, ...] = ()
    blobs: bool = False

    def __str__(self) -> str:
        return self.name


def _ix(*keys: tuple[str, int], unique: bool = False) -> IndexSpec:
    return IndexSpec(tuple(keys), unique)


#: the index of the collections updated in place (see ``REVISED``): a watch reads ranges of ``_rev``
REV_INDEX = _ix(("project", 1), ("_rev", 1))


#: bookkeeping of the warehouse itself (which collections reference blobs; writers' leases and removal
#: announcements, see :mod:`mlwarehouse.warehouse`); never exported
META = Collection("meta")

#: whole datasets and the version documents of item datasets (``kind: "items"``) share one version space
DATASETS = Collection(
    "datasets", ("project", "name", "version"),
    (_ix(("project", 1), ("name", 1), ("version", 1), unique=True), _ix(("project", 1), ("name", 1), ("time", -1)),
     REV_INDEX),
    blobs=True)

#: one document per item of an item dataset: its scalar fields, and where it lies (shard, row)
ITEMS = Collection(
    "items", ("project", "dataset", "version", "shard", "row"),
    (_ix(("project", 1), ("dataset", 1), ("version", 1)), _ix(("shard", 1), ("row", 1))))

#: one document per shard of an item dataset (written last: the shard's commit point)
ITEM_SHARDS = Collection(
    "item_shards", ("project", "dataset", "version", "shard"),
    (_ix(("project", 1), ("dataset", 1), ("version", 1)),),
    blobs=True)

#: models and checkpoints (``kind``), with their metrics as fields
MODELS = Collection(
    "models", ("project", "name", "run", "dataset", "kind"),
    (_ix(("project", 1), ("name", 1), ("time", -1)), _ix(("project", 1), ("run", 1), ("name", 1))),
    blobs=True)

#: runs, with their per-metric summaries (see :mod:`mlwarehouse.runs.summary`). Every query of the warehouse scopes
#: runs by project, so each index starts with it: (project, started DESC) is the newest-first order of the runs page
#: and ``runs.find`` (the ``_id`` tie-breaker ascends, so the direction matters), (project, name, started) a name's
#: runs oldest first (the sweep view) or newest first
RUNS = Collection("runs", ("name", "status", "task", "project"),
                  (_ix(("project", 1), ("started", -1)), _ix(("project", 1), ("name", 1), ("started", 1)), REV_INDEX))

#: logged points in blocks (one document per run, kind and field set of a write; see :mod:`mlwarehouse.runs.blocks`);
#: (run, kind, last) serves a run's history, its highest step and a chart's "points after step s"
LOGS = Collection("logs", ("run", "kind", "project"), (_ix(("run", 1), ("kind", 1), ("last", 1)),))

#: the leased task queue; scripts and long outputs are blobs
TASKS = Collection(
    "tasks", ("task_name", "status", "project", "run", "worker", "config_hash"),
    (_ix(("project", 1), ("task_name", 1), ("status", 1), ("priority", -1), ("_id", 1)),
     _ix(("project", 1), ("task_name", 1), ("config_hash", 1)),
     _ix(("project", 1), ("status", 1), ("lease_until", 1)), REV_INDEX),
    blobs=True)

#: users' own collections (one document per collection of a project: its table, fold fraction, converters); each
#: collection's documents live in a table of their own (see :mod:`mlwarehouse.warehouse.tables`), so they keep
#: every field
CATALOG = Collection("collections", ("project", "name", "table"), (_ix(("project", 1), ("name", 1), unique=True),))

#: users' data types (encoder and decoder by import path), one per name and project
DATATYPES = Collection("datatypes", ("project", "name"), (_ix(("project", 1), ("name", 1), unique=True),))

#: models attached to collections (see :mod:`mlwarehouse.collections.listeners`)
LISTENERS = Collection("listeners", ("project", "collection", "name", "status"),
                       (_ix(("project", 1), ("collection", 1), ("name", 1), unique=True),))

#: vector indexes over collections (see :mod:`mlwarehouse.vectors`); ``snapshot`` refers to the persisted index
VECTOR_INDEXES = Collection("vector_indexes", ("project", "collection", "name", "engine"),
                            (_ix(("project", 1), ("collection", 1), ("name", 1), unique=True),), blobs=True)

#: fits: a training's spec, the exact ids it read (as blobs), its epochs, checkpoints, runs and final model; a
#: fit run as a task is found again by ``key`` when another worker resumes it (see :mod:`mlwarehouse.training`)
FITS = Collection("fits", ("project", "name", "key", "status", "model"),
                  (_ix(("project", 1), ("key", 1)), _ix(("project", 1), ("name", 1), ("time", -1)), REV_INDEX),
                  blobs=True)

#: one document per deleted document of a users' table (``table``, ``doc``), with a sortable ``_id``: how the
#: copies of vector indexes in other processes learn of deletes (see :mod:`mlwarehouse.vectors.mirror`)
TOMBSTONES = Collection("tombstones", ("project", "table", "doc"), (_ix(("table", 1), ("_id", 1)),))

#: lineage edges, one per (src, dst, relation): ``src`` is upstream of ``dst``; each end's kind and name as recorded
#: (see :mod:`mlwarehouse.lineage`). Traversals read one level per ``$in`` query on (project, src) or (project, dst)
LINEAGE = Collection(
    "lineage", ("project", "src", "dst", "relation", "src_kind", "dst_kind"),
    (_ix(("project", 1), ("src", 1)), _ix(("project", 1), ("dst", 1)),
     _ix(("project", 1), ("src", 1), ("dst", 1), ("relation", 1), unique=True)))

#: what a delete of a node with lineage left behind: ``_id`` is the deleted document's id; kind, name, deleted
LINEAGE_DELETED = Collection("lineage_deleted", ("project", "kind"), (_ix(("project", 1), ("kind", 1)),))

#: evaluations: one value per (model, data, fold, metric), with the run that computed it; ``data`` is a dataset
#: version id or the digest of a query spec, ``fold`` JSON text ("" for none); see :mod:`mlwarehouse.models.evaluations`
EVALUATIONS = Collection(
    "evaluations", ("project", "model", "model_name", "data", "fold", "metric", "run"),
    (_ix(("project", 1), ("model", 1), ("data", 1), ("fold", 1), ("metric", 1), unique=True),
     _ix(("project", 1), ("data", 1), ("metric", 1), ("value", -1)), REV_INDEX))

#: model aliases, append-only: one document per change of (name, alias) with its ``version``; the unique
#: (project, name, alias, version) index is the compare-and-set (see :mod:`mlwarehouse.models.aliases`)
ALIASES = Collection(
    "aliases", ("project", "name", "alias", "model", "previous"),
    (_ix(("project", 1), ("name", 1), ("alias", 1), ("version", 1), unique=True), _ix(("project", 1), ("model", 1))))

#: the positions of named watch consumers, one per (project, watched collection, consumer): the newest change
#: every earlier one of which was acknowledged (``resume``) and the acknowledged change ids after its look-back
#: floor (see :mod:`mlwarehouse.collections.watch`)
WATCHES = Collection("watches", ("project", "source", "consumer"),
                     (_ix(("project", 1), ("source", 1), ("consumer", 1), unique=True),))

#: every collection above, by name
COLLECTIONS: dict[str, Collection] = {c.name: c for c in (META, DATASETS, ITEMS, ITEM_SHARDS, MODELS, RUNS, LOGS,
                                                          TASKS, CATALOG, DATATYPES, LISTENERS, VECTOR_INDEXES,
                                                          TOMBSTONES, LINEAGE, LINEAGE_DELETED, FITS,
                                                          EVALUATIONS, ALIASES, WATCHES)}

#: the warehouse's collections whose documents are updated in place (a run ends, a task is claimed, a fit records an
#: epoch, an item dataset commits, an evaluation is replaced): each insert and each update gives a document a fresh
#: ``_rev`` (a sortable id, :meth:`mlwarehouse.warehouse.Project.update`), so a watch sees their changes as well as
#: their inserts. The others are insert-only (or bookkeeping) and are watched by ``_id``.
REVISED = frozenset({DATASETS.name, RUNS.name, TASKS.name, FITS.name, EVALUATIONS.name})

#: the task name of listener work (batches of documents whose outputs a worker computes)
LISTENER_TASK = "mlw.listener"
#: the prefix of the tables that hold users' collections
TABLE_PREFIX = "docs_"

#: fields the warehouse stamps on documents (see :meth:`mlwarehouse.warehouse.Project.stamp`; ``_rev`` only in
#: ``REVISED`` collections)
BOOKKEEPING_FIELDS = ("_id", "project", "time", "_blobs", "_rev")

#: the fields of a log point that are not metrics
LOG_FIELDS = ("_id", "project", "time", "run", "kind", "step", "epoch", "_blobs")
#: a log block's fields holding its metric names and its packed rows, and the fields at the head of each row, in
#: order (the metrics follow): the layout of :mod:`mlwarehouse.runs.blocks`, declared here for the SQL views
LOG_BLOCK_NAMES, LOG_BLOCK_ROWS = "metrics", "rows"
LOG_ROW_HEAD = ("step", "time", "epoch")

#: the field of a run document that holds its per-metric summaries (their layout: :mod:`mlwarehouse.runs.summary`)
SUMMARY_FIELD = "summary"
