"""``mlw show``: one entity (run, model, dataset, task) as a field table, with its summaries, error and arrays.

A model is also named by an alias (``mlw show mlp@champion``, looked up in every project unless ``-p`` names one);
a model's page lists the aliases that point at it, their changes and its evaluations."""

from __future__ import annotations

import json

from rich.table import Table

from mlwarehouse import schema
from mlwarehouse.cli.common import cell_text, console
from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.models.aliases import split_alias
from mlwarehouse.runs import summary

__all__ = ["render", "arrays_of", "locate_alias", "model_extras"]

#: the entities whose blobs are listed as arrays
WITH_ARRAYS = (schema.MODELS.name, schema.DATASETS.name)
#: fields the field table leaves out (blobs, and what has a table or panel of its own)
_HIDDEN = {"_blobs", "weights", "value", "summary", "architecture", "script", "output", "output_blob", "traceback",
           "error", "project"}


def locate_alias(wh, spelling: str, project: str | None) -> tuple[str, dict] | None:
    """``(collection, doc)`` of the model ``name@alias`` points at, in ``project`` or the only project where the
    alias is set; None when ``spelling`` is not an alias spelling. NotFound / QueryError (several projects)."""
    if split_alias(spelling) is None:
        return None
    found = []
    for name in [project] if project is not None else wh.projects():
        ident = wh.project(name).models.aliases.resolve(spelling)
        if ident is not None:
            found.append((name, ident))
    if not found:
        where = f"project {project!r}" if project is not None else "any project"
        raise NotFound(f"alias {spelling!r} points at no model in {where}")
    if len(found) > 1:
        raise QueryError(f"alias {spelling!r} is set in projects {', '.join(n for n, _ in found)}; pick one with -p")
    name, ident = found[0]
    return schema.MODELS.name, wh.project(name).models.get(ident).doc


def model_extras(p, doc: dict) -> dict:
    """The aliases pointing at a model, the alias changes that involved it, and its evaluations."""
    aliases, evaluations = p.models.aliases, p.models.evaluations
    return {"aliases": aliases.of(doc["_id"]),
            "alias_changes": [_plain(c.doc) for c in aliases.changes(doc["_id"])],
            "evaluations": [_plain(e.doc) for e in evaluations.find(doc["_id"], sort=[("metric", 1), ("data", 1)])]}


def _plain(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("project", "_blobs")}


def render(collection: str, doc: dict, arrays: list[dict], extras: dict | None = None) -> None:
    """One entity as a field table, plus what its kind has: summaries, error tail, arrays, a model's aliases
    and evaluations."""
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
    if extras:
        _render_extras(extras)


def _render_extras(extras: dict) -> None:
    if extras.get("aliases"):
        console.print("aliases: " + ", ".join(extras["aliases"]), highlight=False)
    if extras.get("alias_changes"):
        table = Table(title="alias changes")
        for column in ("alias", "version", "changed", "model", "previous", "by", "reason"):
            table.add_column(column)
        for c in extras["alias_changes"]:
            table.add_row(f"{c['name']}@{c['alias']}", str(c["version"]), c.get("changed") or "",
                          c.get("model") or "(removed)", c.get("previous") or "", c.get("by") or "",
                          c.get("reason") or "")
        console.print(table)
    if extras.get("evaluations"):
        table = Table(title="evaluations")
        for column in ("metric", "value", "data", "run", "time"):
            table.add_column(column)
        for e in extras["evaluations"]:
            data = e.get("dataset") or e.get("query") or e["data"]
            table.add_row(e["metric"], cell_text(e.get("value")), data, e.get("run") or "", e.get("time") or "")
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
