"""``mlw show``: one entity (run, model, dataset, task) as a field table, with its summaries, error and arrays."""

from __future__ import annotations

import json

from rich.table import Table

from mlwarehouse import schema
from mlwarehouse.cli.common import cell_text, console
from mlwarehouse.runs import summary

__all__ = ["render", "arrays_of"]

#: the entities whose blobs are listed as arrays
WITH_ARRAYS = (schema.MODELS.name, schema.DATASETS.name)
#: fields the field table leaves out (blobs, and what has a table or panel of its own)
_HIDDEN = {"_blobs", "weights", "value", "summary", "architecture", "script", "output", "output_blob", "traceback",
           "error", "project"}


def render(collection: str, doc: dict, arrays: list[dict]) -> None:
    """One entity as a field table, plus what its kind has: summaries, error tail, arrays."""
    from rich.panel import Panel
    kind = collection[:-1]
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    for key, value in doc.items():
        if key not in _HIDDEN:
            fields.add_row(key, cell_text(value) if not isinstance(value, (dict, list)) else json.dumps(value))
    if collection == schema.MODELS.name and isinstance(doc.get("architecture"), dict):
        arch = doc["architecture"]
        fields.add_row("architecture", " ".join(f"{k}={arch[k]}" for k in ("format", "class", "torch") if k in arch))
    console.print(Panel(fields, title=f"{kind} {doc['_id']}", expand=False))
    if collection == schema.RUNS.name and summary.metrics(doc):
        table = Table(title="summaries")
        for column in ("kind", "metric", "last", "min", "max", "count"):
            table.add_column(column)
        for name, stats in summary.metrics(doc).items():
            kind_name, metric = summary.split_key(name)
            table.add_row(kind_name, metric, *(cell_text(stats.get(k[0])) + _step(stats, k) for k in _STEPPED),
                          cell_text(stats.get(summary.COUNT)))
        console.print(table)
    if doc.get("error"):
        tail = "\n".join(str(doc.get("traceback") or doc["error"]).splitlines()[-15:])
        console.print(Panel(tail, title="error (last lines)", border_style="red", expand=False), highlight=False)
    if arrays:
        table = Table(title="arrays (read from headers, not loaded)")
        for column in ("path", "codec", "shape", "dtype", "bytes"):
            table.add_column(column)
        for a in arrays:
            shape = "" if a["shape"] is None else "x".join(map(str, a["shape"])) or "scalar"
            table.add_row(a["path"], a["codec"], shape, a["dtype"] or "", f"{a['bytes']:,}")
        console.print(table)


#: the stats shown with the step they were seen at
_STEPPED = ((summary.LAST, summary.LAST_STEP), (summary.MIN, summary.MIN_STEP), (summary.MAX, summary.MAX_STEP))


def _step(stats: dict, stat_and_step: tuple[str, str]) -> str:
    step = stats.get(stat_and_step[1])
    return "" if step is None else f" @{step}"


def arrays_of(p, collection: str, doc: dict) -> list[dict]:
    """Path, codec, shape, dtype and size of each blob a model or dataset holds, read from headers only."""
    from mlwarehouse.web.arrays import Leaf, describe, leaves
    if collection not in WITH_ARRAYS:
        return []
    if collection == schema.MODELS.name:
        found = []
        for name, ref in doc.get("weights") or []:
            label = ".".join(map(str, name)) if isinstance(name, list) else str(name)
            found.extend(Leaf(len(found), f"{label}{leaf.path[len('value'):]}", leaf.ref) for leaf in leaves(ref))
    else:
        found = leaves(doc.get("value"))
    return [{"path": leaf.path, "codec": leaf.codec, "shape": list(leaf.shape) if leaf.shape is not None else None,
             "dtype": leaf.dtype, "bytes": leaf.nbytes} for leaf in (describe(p.blobs, x) for x in found)]
