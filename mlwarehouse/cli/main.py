"""The ``mlw`` command: look into a warehouse, run workers, collect garbage, run the demo.

Every command takes ``--uri/--blobs`` (else ``$MLW_URI``/``$MLW_BLOBS``, else the embedded default) and
``--project``. Listings print tables, or JSON lines with ``--json`` for scripts. Errors print one line and exit 1.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.table import Table

from mlwarehouse import schema
from mlwarehouse.cli.common import BlobsOpt, ProjectOpt, UriOpt, connect, console, open_project, show_error
from mlwarehouse.cli.items import items_app
from mlwarehouse.errors import NotFound, WarehouseError
from mlwarehouse.query.text import parse_filter_text, parse_sort_text
from mlwarehouse.runs import summary

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mlwarehouse: the database for the whole machine-learning process.")
app.add_typer(items_app, name="items", help="Item datasets: import a folder or arrays, show versions and items.")
WhereOpt = typer.Option(None, "--where", "-w",
                        help='a MongoDB filter as JSON, e.g. \'{"test_accuracy": {"$gt": 0.9}}\'')
SortOpt = typer.Option(None, "--sort", "-s", help="field:1 or field:-1, comma separated (default: newest first)")
LimitOpt = typer.Option(20, "--limit", "-n", help="how many rows")
JsonOpt = typer.Option(False, "--json", help="JSON lines instead of a table")


def parse_where(text: str | None) -> dict:
    """``--where`` JSON to a filter dict ({} when empty), with QueryError for anything else."""
    return parse_filter_text(text, "--where") or {}


def parse_sort(text: str | None) -> list[tuple[str, int]] | None:
    """``--sort acc:-1,time:1`` to a sort list."""
    return parse_sort_text(text, "--sort")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
        return text if len(text) <= 60 else text[:57] + "..."
    return "" if value is None else str(value)


def _show(rows: list[dict], columns: list[str], as_json: bool, title: str) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row, default=str))
        return
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _user_fields(docs: list[dict], skip: set[str], most: int = 6) -> list[str]:
    seen: dict[str, None] = {}
    for doc in docs:
        for key, value in doc.items():
            if key not in skip and not key.startswith("_") and not isinstance(value, (dict, list)):
                seen.setdefault(key)
    return list(seen)[:most]


@app.command()
def init(uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt):
    """Create (or open) the warehouse and say where it is."""
    with connect(uri, blobs) as wh:
        console.print(f"warehouse ready: index {wh.settings.index_uri}, blobs {wh.settings.blobs_uri}")


@app.command()
def projects(uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, as_json: bool = JsonOpt):
    """List the projects."""
    with connect(uri, blobs) as wh:
        _show([{"project": name} for name in wh.projects()], ["project"], as_json, "projects")


def _listing(registry: str, help_text: str, base: list[str], hidden: set[str]) -> None:
    """Add ``mlw REGISTRY``: the records its ``find`` returns as rows, the ``base`` columns first, then the first
    user fields that are neither there nor ``hidden``."""
    def command(where: Optional[str] = WhereOpt, sort: Optional[str] = SortOpt, limit: int = LimitOpt,
                uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
                as_json: bool = JsonOpt):
        found = getattr(open_project(uri, blobs, project), registry).find(
            where=parse_where(where), sort=parse_sort(sort), limit=limit)
        docs = [r.doc for r in found]
        _show(docs, base + _user_fields(docs, set(base) | hidden), as_json, f"{registry} in {project}")
    app.command(registry, help=help_text)(command)


_listing("datasets", "List datasets (newest first).", ["_id", "name", "version", "time", "description"],
         {"project", "value"})
_listing("models", "List models (newest first, or --sort test_accuracy:-1 for a leaderboard).",
         ["_id", "name", "epoch", "run"], {"project", "time", "kind", "checkpoint"})


@app.command()
def best(metric: str = typer.Argument(..., help="the field to rank by, e.g. test_accuracy"),
         mode: str = typer.Option("max", help="max or min"), where: Optional[str] = WhereOpt,
         uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
         as_json: bool = JsonOpt):
    """Show the best model by a metric."""
    p = open_project(uri, blobs, project)
    record = p.models.best(metric, mode=mode, where=parse_where(where) or None)
    doc = {k: v for k, v in record.doc.items() if k not in ("weights", "architecture", "_blobs")}
    if as_json:
        print(json.dumps(doc, default=str))
    else:
        _show([{"field": k, "value": v} for k, v in doc.items()], ["field", "value"], False, f"best by {metric}")


@app.command()
def runs(where: Optional[str] = WhereOpt, sort: Optional[str] = SortOpt, limit: int = LimitOpt,
         uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
         as_json: bool = JsonOpt):
    """List runs with their status and metric summaries."""
    p = open_project(uri, blobs, project)
    docs = [r.doc for r in p.runs.find(where=parse_where(where), sort=parse_sort(sort), limit=limit)]
    rows = []
    for doc in docs:
        row = {k: doc.get(k) for k in ("_id", "name", "status", "started", "task")}
        for name, stats in summary.metrics(doc).items():
            row[name] = stats.get(summary.LAST)
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))[:10] or ["_id", "name", "status"]
    _show(rows, columns, as_json, f"runs in {project}")


@app.command()
def tasks(where: Optional[str] = WhereOpt, sort: Optional[str] = SortOpt, limit: int = LimitOpt,
          task_name: Optional[str] = typer.Option(None, "--task-name", "-t"),
          status: Optional[str] = typer.Option(None, "--status"),
          uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
          as_json: bool = JsonOpt):
    """List tasks with status, attempts and results."""
    p = open_project(uri, blobs, project)
    records = p.tasks.find(where=parse_where(where) or None, task_name=task_name, status=status,
                           sort=parse_sort(sort), limit=limit)
    rows = [{k: r.doc.get(k) for k in ("_id", "task_name", "status", "attempts", "hyper_parameters", "result")}
            for r in records]
    _show(rows, ["_id", "task_name", "status", "attempts", "hyper_parameters", "result"], as_json,
          f"tasks in {project}")


@app.command()
def output(task_id: str, uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt,
           project: str = ProjectOpt):
    """Print a task's captured output."""
    p = open_project(uri, blobs, project)
    sys.stdout.write(p.tasks.output(task_id))


@app.command()
def worker(task_name: Optional[str] = typer.Option(None, "--task-name", "-t", help="only tasks with this name"),
           concurrency: int = typer.Option(1, "--concurrency", "-c", help="tasks run at once"),
           once: bool = typer.Option(False, "--once", help="exit when no pending task is left"),
           lease: float = typer.Option(30.0, "--lease", help="lease seconds, renewed by heartbeats"),
           uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt):
    """Pull tasks from the warehouse and run each in its own process (this executes task scripts)."""
    from mlwarehouse.tasks.worker import Worker
    p = open_project(uri, blobs, project)
    Worker(p, task_name, concurrency=concurrency, lease_seconds=lease, once=once).run()


@app.command()
def gc(grace: float = typer.Option(3600.0, "--grace", help="keep blobs written in the last N seconds"),
       dry_run: bool = typer.Option(False, "--dry-run", help="only report what would be removed"),
       uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, as_json: bool = JsonOpt):
    """Remove blobs that no document references."""
    with connect(uri, blobs) as wh:
        report = wh.gc(grace_seconds=grace, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    figures = {"scanned": report.scanned, "referenced": report.referenced, "removed": len(report.removed),
               "removed_bytes": report.removed_bytes, "kept_recent": report.kept_recent, "dry_run": dry_run}
    if as_json:
        print(json.dumps(figures))
    else:
        console.print(f"{report.scanned} blobs scanned, {report.referenced} referenced; {verb} "
                      f"{len(report.removed)} ({report.removed_bytes / 1e6:.1f} MB); "
                      f"{report.kept_recent} unreferenced but younger than {grace:g} s kept")


@app.command()
def sql(query: str, uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, as_json: bool = JsonOpt):
    """Run read-only SQL over the documented views (runs, metrics, models, datasets)."""
    with connect(uri, blobs) as wh:
        rows = wh.sql(query)
    _show(rows, list(rows[0]) if rows else [], as_json, "sql")


ENTITIES = (schema.RUNS.name, schema.MODELS.name, schema.DATASETS.name, schema.TASKS.name)
#: the collections whose documents hold arrays (shown by shape and dtype)
WITH_ARRAYS = (schema.MODELS.name, schema.DATASETS.name)


@app.command()
def show(entity_id: str = typer.Argument(..., metavar="ID", help="the _id of a run, model, dataset or task"),
         uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
         as_json: bool = JsonOpt):
    """Show one run, model, dataset or task (arrays by shape and dtype, without loading them)."""
    p = open_project(uri, blobs, project)
    for collection in ENTITIES:
        doc = p.find_one(collection, {"_id": entity_id})
        if doc is not None:
            break
    else:
        raise NotFound(f"no run, model, dataset or task with id {entity_id!r} in project {project!r}")
    arrays = _arrays(p, collection, doc) if collection in WITH_ARRAYS else []
    if as_json:
        print(json.dumps({"collection": collection, "doc": doc, "arrays": arrays}, default=str))
        return
    _render(collection, doc, arrays)


_HIDDEN = {"_blobs", "weights", "value", "summary", "architecture", "script", "output", "output_blob", "traceback",
           "error", "project"}


def _render(collection: str, doc: dict, arrays: list[dict]) -> None:
    """One entity as a field table, plus what its kind has: summaries, error tail, arrays."""
    from rich.panel import Panel
    kind = collection[:-1]
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    for key, value in doc.items():
        if key not in _HIDDEN:
            fields.add_row(key, _cell(value) if not isinstance(value, (dict, list)) else json.dumps(value))
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
            table.add_row(kind_name, metric, *(_cell(stats.get(k[0])) + _step(stats, k) for k in _STEPPED),
                          _cell(stats.get(summary.COUNT)))
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


def _arrays(p, collection: str, doc: dict) -> list[dict]:
    """Path, codec, shape, dtype and size of each blob a model or dataset holds, read from headers only."""
    from mlwarehouse.web.arrays import Leaf, describe, leaves
    if collection == schema.MODELS.name:
        found = []
        for name, ref in doc.get("weights") or []:
            label = ".".join(map(str, name)) if isinstance(name, list) else str(name)
            found.extend(Leaf(len(found), f"{label}{leaf.path[len('value'):]}", leaf.ref) for leaf in leaves(ref))
    else:
        found = leaves(doc.get("value"))
    return [{"path": leaf.path, "codec": leaf.codec, "shape": list(leaf.shape) if leaf.shape is not None else None,
             "dtype": leaf.dtype, "bytes": leaf.nbytes} for leaf in (describe(p.blobs, x) for x in found)]


@app.command("export")
def export_(project_name: str = typer.Argument(..., metavar="PROJECT", help="the project to export"),
            path: str = typer.Argument(..., metavar="FILE.tar", help="the archive to write"),
            uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, as_json: bool = JsonOpt):
    """Export a project (documents and blobs) to a portable tar archive."""
    from mlwarehouse.archive.tarball import export_project
    with connect(uri, blobs) as wh, _progress(not as_json) as progress:
        report = export_project(wh, project_name, path, progress=progress)
    if as_json:
        print(json.dumps(report))
    else:
        console.print(f"exported project {report['project']}: {report['documents']} documents "
                      f"({_counts(report['collections'])}) and {report['blobs']} blobs "
                      f"({report['blob_bytes'] / 1e6:.1f} MB) to {report['path']}", highlight=False)


@app.command("import")
def import_(path: str = typer.Argument(..., metavar="FILE.tar", help="an archive written by mlw export"),
            project_name: Optional[str] = typer.Option(None, "--project", "-p",
                                                       help="import under this name (documents get new ids)"),
            uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, as_json: bool = JsonOpt):
    """Import a project archive: blobs verified first, then the documents."""
    from mlwarehouse.archive.tarball import import_project
    with connect(uri, blobs) as wh, _progress(not as_json) as progress:
        report = import_project(wh, path, project=project_name, progress=progress)
    if as_json:
        print(json.dumps(report))
    else:
        renamed = f" (from {report['source']}, with new ids)" if report["renamed"] else ""
        console.print(f"imported project {report['project']}{renamed}: {report['documents']} documents "
                      f"({_counts(report['collections'])}) and {report['blobs']} blobs", highlight=False)


def _counts(counts: dict) -> str:
    return ", ".join(f"{n} {c}" for c, n in counts.items())


class _progress:
    """A rich progress display fed by ``progress(stage, done, total)`` callbacks, shown only on a terminal."""

    def __init__(self, wanted: bool):
        self.bar = None
        if wanted and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                MofNCompleteColumn(), console=console, transient=True)
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.start()
        return self.update

    def update(self, stage: str, done: int, total: int) -> None:
        if stage == "blobs":
            return  # the byte count of the blobs says more
        if stage == "bytes":  # in MB, so that "M of N" stays readable
            stage, done, total = "blob MB", round(done / 1e6), max(1, round(total / 1e6))
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def ui(host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback by default)"),
       port: int = typer.Option(8765, "--port"),
       writable: bool = typer.Option(False, "--writable", help="allow cancelling and retrying tasks from the UI"),
       uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt):
    """Serve the web UI: runs and their curves, the model leaderboard, the task board, dataset previews."""
    from mlwarehouse.web import serve
    with connect(uri, blobs) as wh:
        serve(wh, host=host, port=port, writable=writable)


@app.command()
def demo(home: Optional[str] = typer.Option(None, "--home", help="where the demo warehouse goes "
                                             "(default: ./.mlwarehouse)"),
         workers: int = typer.Option(2, "--workers"), epochs: int = typer.Option(15, "--epochs")):
    """The end-to-end demo: digits data, a sweep of MLPs run by two workers, a leaderboard, the best model."""
    from mlwarehouse.examples.demo import run_demo
    run_demo(home=home, workers=workers, epochs=epochs)


def main() -> None:
    """Entry point: typer app with WarehouseErrors shown as one line."""
    try:
        code = app(standalone_mode=False)  # a typer.Exit inside a sub-app comes back as its code
    except (WarehouseError, OSError) as exc:  # OSError: a file named on the command line
        show_error(exc)
        sys.exit(1)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except Exception as exc:  # click usage errors and the like
        import click
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise
    sys.exit(code if isinstance(code, int) else 0)

