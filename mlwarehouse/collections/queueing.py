"""Queueing listener work: tasks (``schema.LISTENER_TASK``) naming a listener and a batch of document ids."""

from __future__ import annotations

from collections.abc import Sequence

from mlwarehouse import schema
from mlwarehouse.ids import new_id

__all__ = ["enqueue", "enqueue_pending", "TASK"]

TASK = schema.LISTENER_TASK
#: how many pending documents one sweep looks at per listener
SWEEP_LIMIT = 100_000
#: a backfill's tasks hold up to this many documents (several model batches): each task costs a claim, a read
#: of its documents and a finish, which for a cheap model cost as much as computing the documents of a batch
BACKFILL_TASK_IDS = 512
#: ... but are at least this many, where the documents are enough, so that every worker gets a share
BACKFILL_SPREAD = 8


def enqueue(collection, attached: Sequence, ids: list[str], *, backfill: bool = False) -> int:
    """Queue the documents ``ids`` for every worker listener of ``attached`` (``backfill``: in tasks of up to
    :data:`BACKFILL_TASK_IDS` documents, else of one model batch each); returns tasks created."""
    created = 0
    for listener in attached:
        if listener.compute != "workers" or not ids:
            continue
        size = listener.batch_size
        if backfill:  # whole model batches, no fewer tasks than BACKFILL_SPREAD
            size = max(size, min(BACKFILL_TASK_IDS, len(ids) // BACKFILL_SPREAD) // size * size)
        configs = [{"collection": collection.name, "listener": listener.name, "ids": ids[i:i + size],
                    "batch": new_id()} for i in range(0, len(ids), size)]
        created += len(collection.project.tasks.sweep(TASK, configs=configs, max_attempts=3, priority=1))
    return created


def enqueue_pending(collection, listener) -> int:
    """Queue the listener's pending documents that no unfinished task covers yet."""
    tasks = collection.project.tasks
    queued: set[str] = set()
    for task in tasks.find(TASK, where={"hyper_parameters.collection": collection.name,
                                        "hyper_parameters.listener": listener.name,
                                        "status": {"$in": ["pending", "running"]}}):
        queued.update(task.doc.get("hyper_parameters", {}).get("ids") or ())
    ids = [d["_id"] for d in collection.table.find(listener.pending, sort=[("_id", 1)], limit=SWEEP_LIMIT,
                                                  projection={"_id": 1}) if d["_id"] not in queued]
    return enqueue(collection, [listener], ids, backfill=True)
