"""``mlw lineage ID``: what a dataset, run, model, task, listener or vector index came from and what was made of it.

    mlw lineage 01J9Z3                upstream and downstream as two trees (kind, name, id, relation)
    mlw lineage 01J9Z3 --depth 3      at most 3 edges away
    mlw lineage 01J9Z3 --json         {"node", "upstream", "downstream"} for scripts

The id is taken whole or by a unique prefix, in any project unless ``-p`` names one; a deleted node's tombstone
is found too (lineage outlives what it describes).
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.text import Text
from rich.tree import Tree

from mlwarehouse import schema
from mlwarehouse.cli.common import BlobsOpt, UriOpt, connect, console, open_existing

__all__ = ["lineage_command", "LOOKED_IN"]

#: where an id is looked for: the entities, the collections' catalog, listeners, vector indexes, tombstones
LOOKED_IN = (schema.RUNS.name, schema.MODELS.name, schema.DATASETS.name, schema.TASKS.name, schema.CATALOG.name,
             schema.LISTENERS.name, schema.VECTOR_INDEXES.name, schema.LINEAGE_DELETED.name)


def lineage_command(entity_id: str = typer.Argument(..., metavar="ID",
                                                    help="the id of a dataset, run, model, task... or a unique "
                                                         "prefix of it"),
                    depth: int = typer.Option(10, "--depth", "-d", min=0, max=100, help="how many edges away"),
                    uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt,
                    project: Optional[str] = typer.Option(None, "--project", "-p",
                                                          help="look only in this project (default: every project)"),
                    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of trees")):
    """Show where something came from (upstream) and what was made from it (downstream)."""
    wh = connect(uri, blobs) if project is None else open_existing(uri, blobs, project).warehouse
    try:
        collection, doc = wh.locate(entity_id, LOOKED_IN, project=project)
        lineage = wh.project(doc["project"]).lineage
        node = lineage.node(doc["_id"])
        up, down = lineage.upstream(doc["_id"], depth), lineage.downstream(doc["_id"], depth)
        me = {"id": doc["_id"], "kind": node.kind if node else "unknown", "name": node.name if node else None,
              "project": doc["project"], "deleted": collection == schema.LINEAGE_DELETED.name}
        if as_json:
            print(json.dumps({"node": me, "upstream": [n.as_dict() for n in up],
                              "downstream": [n.as_dict() for n in down]}, default=str))
            return
        console.print(_label(me["kind"], me["name"], me["id"], None, me["deleted"]), highlight=False)
        console.print(_tree("upstream (came from)", me["id"], up), highlight=False)
        console.print(_tree("downstream (made from it)", me["id"], down), highlight=False)
    finally:
        wh.close()


def _label(kind: str, name, ident: str, relation, deleted: bool) -> Text:
    text = Text()
    if relation:
        text.append(f"{relation}: ", style="dim")
    text.append(f"{kind} ", style="bold")
    text.append(f"{name or ''} ")
    text.append(ident, style="cyan")
    if deleted:
        text.append(" (deleted)", style="red")
    return text


def _tree(title: str, root: str, nodes) -> Tree:
    """Each node under the node it was reached through (its ``via``), nearest first."""
    tree = Tree(Text(title, style="bold") if nodes else Text(f"{title}: none", style="dim"))
    branches = {root: tree}
    for n in nodes:
        parent = branches.get(n.via, tree)
        branches[n.id] = parent.add(_label(n.kind, n.name, n.id, n.relation, n.deleted))
    return tree
