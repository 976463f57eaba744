"""``mlw search`` and ``mlw vector-indexes``: a collection's nearest documents, and its vector indexes' figures.

    mlw search products --like p0042 -n 5                   like a stored document (its own vector)
    mlw search products --text "red apple" --where '{"price": {"$lt": 10}}'
    mlw search products --vector query.npy --index by_v --json
    mlw vector-indexes products                             engine, vectors, dims, metric of each index

``--text`` goes through the index's listener model, which is imported only from trusted modules
(``$MLW_TRUSTED_MODULES``). Documents are shown as ``mlw find`` shows them (read raw, summarised).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mlwarehouse.cli.collections import open_collection
from mlwarehouse.cli.common import BlobsOpt, ProjectOpt, UriOpt, console
from mlwarehouse.errors import QueryError, VectorIndexError
from mlwarehouse.query.text import parse_filter_text

__all__ = ["read_vector", "search_command", "vector_indexes_command"]

#: user fields shown beside rank, _id and score
FIELDS = 4
CollectionArg = typer.Argument(..., metavar="COLLECTION", help="the collection's name")


def read_vector(path: str):
    """A query vector from a ``.npy`` file (no pickles) or a file holding a JSON list of numbers."""
    import numpy as np
    data = Path(path).read_bytes()
    if data.startswith(b"\x93NUMPY"):
        try:
            return np.load(Path(path), allow_pickle=False)
        except ValueError as exc:
            raise VectorIndexError(f"--vector {path}: {exc}") from None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VectorIndexError(f"--vector {path}: neither a .npy file nor a JSON list ({exc})") from None
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              for x in value):
        raise VectorIndexError(f"--vector {path}: the JSON must be a list of numbers")
    return np.asarray(value, dtype=np.float32)


def search_command(collection: str = CollectionArg,
                   like: Optional[str] = typer.Option(None, "--like", metavar="ID",
                                                      help="search like this stored document"),
                   vector: Optional[str] = typer.Option(None, "--vector", metavar="FILE",
                                                        help="a query vector: a .npy file or a JSON list"),
                   text: Optional[str] = typer.Option(None, "--text", metavar="TEXT",
                                                      help="a value passed through the index's listener model"),
                   where: Optional[str] = typer.Option(None, "--where", "-w",
                                                       help='only documents matching this filter (JSON)'),
                   n: int = typer.Option(10, "-n", "--neighbours", help="how many neighbours"),
                   index: Optional[str] = typer.Option(None, "--index", "-i",
                                                       help="the vector index (default: the first created)"),
                   uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
                   as_json: bool = typer.Option(False, "--json", help="print one JSON document per line")):
    """Print the documents nearest a query (--like ID, --vector FILE or --text TEXT), nearest first, with scores."""
    from mlwarehouse.web.documents import cell_text, summary
    from mlwarehouse.web.search import neighbours
    given = [name for name, value in (("--like", like), ("--vector", vector), ("--text", text)) if value is not None]
    if len(given) != 1:
        raise QueryError(f"give one of --like ID, --vector FILE or --text TEXT, not {' and '.join(given) or 'none'}")
    flt = parse_filter_text(where, "--where") or {}
    query = read_vector(vector) if vector is not None else None
    c = open_collection(uri, blobs, project, collection)
    if text is not None and not c.vector_index(index).spec.listener:
        raise VectorIndexError(f"vector index {c.vector_index(index).name!r} reads a stored field, not a listener's "
                               "outputs: --text needs an index over a listener (use --like or --vector)")
    found = neighbours(c, like={"_id": like} if like is not None else text, vector=query, flt=flt, n=n, index=index)
    docs = found["docs"]
    if as_json:
        for doc in docs:
            print(json.dumps(summary(doc), default=str))
        return
    fields: dict[str, None] = {}
    for doc in docs:
        fields.update(dict.fromkeys(k for k in doc if not k.startswith("_")))
    columns = list(fields)[:FIELDS]
    table = Table(title=f"nearest in {collection} by {found['index']} ({len(docs)} of n={n})")
    table.add_column("rank", justify="right")
    width = max([3] + [len(str(d.get("_id"))) for d in docs])
    table.add_column("_id", no_wrap=True, min_width=width)  # whole, so that it can be pasted back into --like
    table.add_column("score", justify="right")
    for column in columns:
        table.add_column(column)
    for rank, doc in enumerate(docs, 1):
        table.add_row(str(rank), str(doc.get("_id")), f"{doc['_score']:.4f}",
                      *(cell_text(doc.get(k), 40) if k in doc else "" for k in columns))
    console.print(table)
    console.print(_matched_line(found, n, bool(flt)), highlight=False)


def _matched_line(found: dict, n: int, filtered: bool) -> str:
    if not found["complete"]:
        return f"fewer than n={n} documents match the filter: {found['matched'] or 0} do"
    if filtered and found["matched"] is not None:
        return f"{found['matched']} documents match the filter"
    if len(found["docs"]) < n:
        return f"{len(found['docs'])} shown: the index holds no more"
    return f"{len(found['docs'])} shown"


def _size(n) -> str:
    if not isinstance(n, (int, float)):
        return ""
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def vector_indexes_command(collection: str = CollectionArg, uri: Optional[str] = UriOpt,
                           blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
                           as_json: bool = typer.Option(False, "--json", help="print one JSON document (a list of "
                                                        "indexes) instead of a table")):
    """List a collection's vector indexes: what they read, engine, vectors, dims, metric, memory, how many filters
    have an index of their own (--json: all their figures, the filters themselves)."""
    from mlwarehouse.cli.common import cell_text
    from mlwarehouse.web.search import indexes
    rows = indexes(open_collection(uri, blobs, project, collection))
    if as_json:
        print(json.dumps(rows, default=str))
        return
    columns = ("name", "source", "engine", "vectors", "dims", "metric", "memory", "filters")
    table = Table(title=f"vector indexes of {collection} in {project}")
    for column in columns:
        table.add_column(column, no_wrap=column == "name")
    for row in rows:
        if row["error"]:
            table.add_row(row["name"], row["source"], row["engine"], row["error"], "", "", "", "")
            continue
        memory = row.get("memory_bytes")
        table.add_row(*(cell_text(row.get(k)) for k in columns[:-2]), _size(memory), str(len(row.get("filters") or [])))
    if not rows:
        table.add_row("(none)", *[""] * (len(columns) - 1))
    console.print(table)
