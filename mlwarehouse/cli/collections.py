"""``mlw collections`` and ``mlw find``: users' collections, their listeners' progress, and their documents.

    mlw collections                                   documents and listeners of each collection
    mlw find products --where '{"price": {"$lt": 10}}' --sort price:-1 --limit 5
    mlw find products --json                          one JSON document per line

Documents are read raw (users' types are never decoded: ``Encoded(datatype, n bytes)``); arrays and tensors show
as shape and dtype, images as size and mode, audio as rate and length, bytes as length.
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from mlwarehouse.cli.common import BlobsOpt, ProjectOpt, UriOpt, console, open_existing
from mlwarehouse.errors import NotFound
from mlwarehouse.query.text import parse_filter_text, parse_sort_text

__all__ = ["collections_command", "find_command", "open_collection"]

PROGRESS = ("done", "pending", "failed", "skipped")
MAX_COLUMNS = 8


def open_collection(uri, blobs, project: str, name: str):
    """The collection, or NotFound naming the project's collections."""
    p = open_existing(uri, blobs, project)
    if p.catalog.record(name) is None:
        names = p.catalog.names()
        raise NotFound(f"no collection {name!r} in project {project!r}; collections: "
                       f"{', '.join(names) or '(none yet)'}")
    return p.collection(name)


def collections_command(uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
                        as_json: bool = typer.Option(False, "--json", help="print one JSON document (a list of "
                                                     "collections) instead of a table")):
    """List the project's collections: documents, and each listener's progress (done/pending/failed/skipped)."""
    from mlwarehouse.web.documents import collections
    rows = collections(open_existing(uri, blobs, project))
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table(title=f"collections in {project}")
    for column in ("collection", "documents", "listener", "key", "compute", *PROGRESS):
        table.add_column(column)
    for row in rows:
        first = [row["collection"], str(row["documents"])]
        if not row["listeners"]:
            table.add_row(*first, *[""] * (3 + len(PROGRESS)))
        for i, x in enumerate(row["listeners"]):
            table.add_row(*(first if i == 0 else ["", ""]), x["name"], x["key"], x["compute"],
                          *(str(x["progress"].get(k, 0)) for k in PROGRESS))
    console.print(table)


def find_command(collection: str = typer.Argument(..., metavar="COLLECTION", help="the collection's name"),
                 where: Optional[str] = typer.Option(None, "--where", "-w",
                                                     help='a filter as JSON, e.g. \'{"price": {"$lt": 10}}\''),
                 sort: Optional[str] = typer.Option(None, "--sort", "-s",
                                                    help="field:1 or field:-1, comma separated (default: _id)"),
                 limit: int = typer.Option(20, "--limit", "-n", help="how many documents"),
                 skip: int = typer.Option(0, "--skip", help="leave out the first N"),
                 uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
                 as_json: bool = typer.Option(False, "--json", help="print one JSON document per line")):
    """Print a collection's matching documents (arrays by shape and dtype, images by size, bytes by length)."""
    from mlwarehouse.web.documents import cell_text, read, summary
    flt, order = parse_filter_text(where, "--where") or {}, parse_sort_text(sort, "--sort")
    c = open_collection(uri, blobs, project, collection)
    docs = read(c, flt, sort=order, limit=limit or None, skip=skip)
    if as_json:
        for doc in docs:
            print(json.dumps(summary(doc), default=str))
        return
    columns: dict[str, None] = {"_id": None}
    for doc in docs:
        columns.update(dict.fromkeys(k for k in doc if k not in ("_fold", "_outputs")))
    columns = list(columns)[:MAX_COLUMNS] + (["_outputs"] if any("_outputs" in d for d in docs) else [])
    table = Table(title=f"{collection} in {project} ({len(docs)} of {c.count_documents(flt)})")
    for column in columns:
        table.add_column(column, no_wrap=column == "_id")
    for doc in docs:
        table.add_row(*(cell_text(doc.get(k)) if k in doc else "" for k in columns))
    console.print(table)
