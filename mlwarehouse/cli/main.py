"""The ``mlw`` command: look into a warehouse, run workers, collect garbage, run the demo.

Every command takes ``--uri/--blobs`` (else ``$MLW_URI``/``$MLW_BLOBS``, else the embedded default) and
``--project``. Listings print tables, or with ``--json`` one JSON document (a list of rows) for scripts. Ids are
taken whole or by a unique prefix. Errors print one line and exit 1; usage errors one line and a hint, exit 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.table import Table

from mlwarehouse import schema
from mlwarehouse.cli.collections import collections_command, find_command
from mlwarehouse.cli.common import (
    BlobsOpt,
    ProjectOpt,
    UriOpt,
    cell_text,
    click_exit_status,
    connect,
    console,
    open_existing,
    open_project,
    show_error,
)
from mlwarehouse.cli.items import items_app
from mlwarehouse.cli.lineage import lineage_command
from mlwarehouse.cli.search import search_command, vector_indexes_command
from mlwarehouse.cli.show import arrays_of, locate_alias, model_extras, render
from mlwarehouse.errors import WarehouseError
from mlwarehouse.query.text import parse_filter_text, parse_sort_text
from mlwarehouse.runs import summary

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mlwarehouse: the database for the whole machine-learning process.")
app.add_typer(items_app, name="items", help="Item datasets: import a folder or arrays, show versions and items.")
app.command("collections")(collections_command)
app.command("find")(find_command)
app.command("search")(search_command)
app.command("vector-indexes")(vector_indexes_command)
app.command("lineage")(lineage_command)
WhereOpt = typer.Option(None, "--where", "-w",
                        help='a MongoDB filter as JSON, e.g. \'{"test_accuracy": {"$gt": 0.9}}\'')
SortOpt = typer.Option(None, "--sort", "-s", help="field:1 or field:-1, comma separated (default: newest first)")
LimitOpt = typer.Option(20, "--limit", "-n", help="how many rows")
JsonOpt = typer.Option(False, "--json", help="print one JSON document (a list of rows) instead of a table")
ObjectJsonOpt = typer.Option(False, "--json", help="print one JSON object instead of a table")
AnyProjectOpt = typer.Option(None, "--project", "-p", help="look only in this project (default: in every project; "
                             "ids are unique across projects)")
#: columns that hold ids: never cut, so that they can be pasted back into ``mlw show``
ID_COLUMNS = {"_id", "run", "task"}


def _version_callback(value: bool) -> None:
    if value:
        from mlwarehouse import __version__
        console.print(f"mlw {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="print the version and exit")) -> None:
    """mlwarehouse: the database for the whole machine-learning process."""


def parse_where(text: str | None) -> dict:
    """``--where`` JSON to a filter dict ({} when empty), with QueryError for anything else."""
    return parse_filter_text(text, "--where") or {}


def parse_sort(text: str | None) -> list[tuple[str, int]] | None:
    """``--sort acc:-1,time:1`` to a sort list."""
    return parse_sort_text(text, "--sort")


def _show(rows: list[dict], columns: list[str], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table(title=title, show_lines=False)
    for column in columns:
        if column in ID_COLUMNS:  # whole, even on a narrow terminal (rich would cut it to "01M8…")
            width = max([len(column)] + [len(cell_text(row.get(column))) for row in rows])
            table.add_column(column, no_wrap=True, min_width=width)
        else:
            table.add_column(column)
    for row in rows:
        table.add_row(*(cell_text(row.get(c)) for c in columns))
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


def _list(registry: str, base: list[str], hidden: set[str], where, sort, limit, uri, blobs, project, as_json,
          **find) -> None:
    """``mlw REGISTRY``: the records its ``find`` returns as rows, the ``base`` columns first, then the first user
    fields that are neither there nor ``hidden``."""
    flt, order = parse_where(where), parse_sort(sort)  # a typo in them is told before a missing project
    found = getattr(open_existing(uri, blobs, project), registry).find(where=flt, sort=order, limit=limit, **find)
    docs = [r.doc for r in found]
    _show(docs, base + _user_fields(docs, set(base) | hidden), as_json, f"{registry} in {project}")


@app.command()
def datasets(where: Optional[str] = WhereOpt, sort: Optional[str] = SortOpt, limit: int = LimitOpt,
             uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
             as_json: bool = JsonOpt):
    """List datasets (newest first)."""
    _list("datasets", ["_id", "name", "version", "time", "description"], {"project", "value"},
          where, sort, limit, uri, blobs, project, as_json)


CheckpointsOpt = typer.Option(False, "--checkpoints", help="checkpoints too (default: final models only)")


@app.command()
def models(where: Optional[str] = WhereOpt, sort: Optional[str] = SortOpt, limit: int = LimitOpt,
           checkpoints: bool = CheckpointsOpt, uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt,
           project: str = ProjectOpt, as_json: bool = JsonOpt):
    """List final models (newest first, or --sort test_accuracy:-1 for a leaderboard)."""
    base = ["_id", "name", "epoch", "run"] + (["checkpoint"] if checkpoints else [])
    _list("models", base, {"project", "time", "kind", "checkpoint"}, where, sort, limit, uri, blobs, project,
          as_json, checkpoints=checkpoints)


@app.command()
def best(metric: str = typer.Argument(..., help="the field to rank by, e.g. test_accuracy"),
         mode: str = typer.Option("max", help="max or min"), where: Optional[str] = WhereOpt,
         checkpoints: bool = CheckpointsOpt,
         uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
         as_json: bool = ObjectJsonOpt):
    """Show the best final model (or checkpoint, with --checkpoints) by a metric."""
    flt = parse_where(where) or None
    record = open_existing(uri, blobs, project).models.best(metric, mode=mode, where=flt, checkpoints=checkpoints)
    doc = {k: v for k, v in record.doc.items() if k not in ("weights", "architecture", "_blobs")}
    if as_json:
        print(json.dumps(doc, default=str))
    else:
        _show([{"field": k, "value": v} for k, v in doc.items()], ["field", "value"], False, f"best by {metric}")


@app.command()
def runs(where: Optional[str] = WhereOpt, sort: Optional[str] = SortOpt, limit: int = LimitOpt,
         uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
         as_json: bool = JsonOpt):
    """List runs: status, the hyper-parameters that differ between the listed runs, the last metric values."""
    flt, order = parse_where(where), parse_sort(sort)
    docs = [r.doc for r in open_existing(uri, blobs, project).runs.find(where=flt, sort=order, limit=limit)]
    if as_json:
        _show([{k: doc.get(k) for k in RUN_FIELDS + ("hyper_parameters",)} | _metrics(doc) for doc in docs],
              [], True, "")
        return
    varying = _varying(docs)
    rows, metrics = [], {}
    for doc in docs:
        hp = doc.get("hyper_parameters") if isinstance(doc.get("hyper_parameters"), dict) else {}
        row = {k: doc.get(k) for k in RUN_FIELDS}
        row.update({column: hp.get(key) for key, column in varying.items()})
        last = _metrics(doc)
        row.update(last)
        metrics.update(dict.fromkeys(last))
        rows.append(row)
    columns = [*RUN_FIELDS, *list(varying.values())[:8], *list(metrics)[:8]]
    _show(rows, columns, False, f"runs in {project}")


RUN_FIELDS = ("_id", "name", "status", "started", "task")


def _metrics(doc: dict) -> dict:
    """The last value of each metric a run logged, by summary key."""
    return {name: stats.get(summary.LAST) for name, stats in summary.metrics(doc).items()}


def _varying(docs: list[dict]) -> dict[str, str]:
    """Hyper-parameter name -> column name, for those whose values differ between ``docs`` (all of them when
    one run is listed): what tells the runs of a sweep apart."""
    hps = [d.get("hyper_parameters") if isinstance(d.get("hyper_parameters"), dict) else {} for d in docs]
    keys = dict.fromkeys(k for hp in hps for k in hp)
    varying = [k for k in keys
               if len(docs) == 1 or len({json.dumps(hp.get(k), sort_keys=True, default=str) for hp in hps}) > 1]
    return {k: k if k not in RUN_FIELDS else f"hyper_parameters.{k}" for k in varying}


@app.command()
def tasks(where: Optional[str] = WhereOpt, sort: Optional[str] = SortOpt, limit: int = LimitOpt,
          task_name: Optional[str] = typer.Option(None, "--task-name", "-t"),
          status: Optional[str] = typer.Option(None, "--status"),
          uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt,
          as_json: bool = JsonOpt):
    """List tasks with status, attempts and results."""
    flt, order = parse_where(where) or None, parse_sort(sort)
    records = open_existing(uri, blobs, project).tasks.find(where=flt, task_name=task_name, status=status,
                                                            sort=order, limit=limit)
    rows = [{k: r.doc.get(k) for k in ("_id", "task_name", "status", "attempts", "hyper_parameters", "result")}
            for r in records]
    _show(rows, ["_id", "task_name", "status", "attempts", "hyper_parameters", "result"], as_json,
          f"tasks in {project}")


@app.command()
def output(task_id: str = typer.Argument(..., metavar="TASK_ID", help="a task's id or a unique prefix of it"),
           uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: Optional[str] = AnyProjectOpt):
    """Print a task's captured output."""
    wh, collection, doc = _locate(uri, blobs, project, task_id, (schema.TASKS.name,))
    sys.stdout.write(wh.project(doc["project"]).tasks.output(doc["_id"]))


def _locate(uri, blobs, project: str | None, id_or_prefix: str, collections: tuple[str, ...]):
    """``(warehouse, collection, doc)`` for an id or unique id prefix, in any project unless ``-p`` names one."""
    if project is None:
        wh = connect(uri, blobs)
    else:
        wh = open_existing(uri, blobs, project).warehouse
    collection, doc = wh.locate(id_or_prefix, collections, project=project)
    return wh, collection, doc


@app.command()
def worker(task_name: Optional[str] = typer.Option(None, "--task-name", "-t", help="only tasks with this name"),
           concurrency: int = typer.Option(1, "--concurrency", "-c", help="tasks run at once"),
           once: bool = typer.Option(False, "--once", help="exit when no pending task is left"),
           lease: float = typer.Option(30.0, "--lease", help="lease seconds, renewed by heartbeats"),
           listeners: bool = typer.Option(True, "--listeners/--no-listeners",
                                          help="also compute the outputs of collections' listeners"),
           warm: Optional[bool] = typer.Option(None, "--warm/--cold",
                                               help="fork each task from a pre-imported runtime (--warm, waiting "
                                                    "for it) or start a fresh interpreter (--cold); default: warm "
                                                    "once ready where fork exists, or MLW_WORKER_MODE"),
           uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt):
    """Pull tasks from the warehouse and run each in its own process (this executes task scripts), and compute
    listeners' outputs in a thread beside them (this runs the listeners' models)."""
    import threading

    from mlwarehouse.collections.worker import ListenerWorker
    from mlwarehouse.tasks.worker import Worker
    p = open_project(uri, blobs, project)
    if task_name == schema.LISTENER_TASK:  # listener tasks are not scripts: only the listener worker runs them
        ListenerWorker(p, lease_seconds=lease, once=once, verbose=True).run()
        return
    scripts = Worker(p, task_name, concurrency=concurrency, lease_seconds=lease, once=once, warm=warm)
    if not listeners:
        scripts.run()
        return
    side = ListenerWorker(p, lease_seconds=lease, once=once, verbose=True)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            side.run()
        except BaseException as exc:  # told after the script worker stops
            failure.append(exc)
            scripts.stop()
    thread = threading.Thread(target=work, name="mlw-listeners", daemon=True)
    thread.start()
    try:
        scripts.run()
    finally:
        if not once or scripts.stopped:  # with --once the listener worker ends when nothing is pending
            side.stop()
        while thread.is_alive():
            thread.join(0.2)
    if failure:
        raise failure[0]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def evaluate(ctx: typer.Context):
    """Evaluate every new model matching a query on a dataset, record the evaluations and promote by a gate, until
    stopped (SIGTERM finishes the current model): mlw evaluate --models '{"name": "mlp"}' --dataset test-set
    --metric accuracy --alias champion --margin 0.01 (mlw evaluate --help for every option)."""
    from mlwarehouse.loops.evaluator import main as evaluator_main
    raise typer.Exit(evaluator_main(list(ctx.args), prog="mlw evaluate"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def train(ctx: typer.Context):
    """Keep training a model on a collection as new documents arrive, saving it every N steps, until stopped
    (SIGTERM finishes the current step): mlw train --model module:Class --collection digits --inputs x --target y
    --name mlp --save-every 200 (mlw train --help for every option)."""
    from mlwarehouse.loops.trainer import main as trainer_main
    raise typer.Exit(trainer_main(list(ctx.args), prog="mlw train"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def serve(ctx: typer.Context):
    """Serve predictions over HTTP from whatever model holds an alias, swapping to each new holder without
    dropping a request: mlw serve mlp@champion --port 8080 (binds 127.0.0.1 unless told; mlw serve --help)."""
    from mlwarehouse.loops.server import main as server_main
    raise typer.Exit(server_main(list(ctx.args), prog="mlw serve"))


@app.command()
def gc(grace: float = typer.Option(3600.0, "--grace", help="keep blobs written in the last N seconds"),
       dry_run: bool = typer.Option(False, "--dry-run", help="only report what would be removed"),
       uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, as_json: bool = ObjectJsonOpt):
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


@app.command()
def show(entity_id: str = typer.Argument(..., metavar="ID",
                                         help="the _id of a run, model, dataset or task, a unique prefix of it, "
                                              "or a model alias (mlp@champion)"),
         uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: Optional[str] = AnyProjectOpt,
         as_json: bool = ObjectJsonOpt):
    """Show one run, model, dataset or task, in whichever project it is (arrays by shape and dtype, not loaded);
    a model also by an alias (``mlp@champion``), with its aliases and evaluations."""
    wh = connect(uri, blobs) if project is None else open_existing(uri, blobs, project).warehouse
    found = locate_alias(wh, entity_id, project)
    collection, doc = found if found is not None else wh.locate(entity_id, ENTITIES, project=project)
    p = wh.project(doc["project"])
    arrays = arrays_of(p, collection, doc)
    extras = model_extras(p, doc) if collection == schema.MODELS.name else None
    if as_json:
        print(json.dumps({"collection": collection, "doc": doc, "arrays": arrays, **(extras or {})}, default=str))
        return
    render(collection, doc, arrays, extras)


@app.command("export")
def export_(project_name: str = typer.Argument(..., metavar="PROJECT", help="the project to export"),
            path: str = typer.Argument(..., metavar="FILE.tar", help="the archive to write"),
            uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, as_json: bool = ObjectJsonOpt):
    """Export a project (documents and blobs) to a portable tar archive."""
    from mlwarehouse.archive.tarball import export_project
    with open_existing(uri, blobs, project_name).warehouse as wh, _progress(not as_json) as progress:
        report = export_project(wh, project_name, path, progress=progress)
    if as_json:
        print(json.dumps(report))
    else:
        counts = _counts({**report["collections"], **report.get("tables", {})})
        console.print(f"exported project {report['project']}: {report['documents']} documents ({counts}) "
                      f"and {report['blobs']} blobs "
                      f"({report['blob_bytes'] / 1e6:.1f} MB) to {report['path']}", highlight=False)


@app.command("import")
def import_(path: str = typer.Argument(..., metavar="FILE.tar", help="an archive written by mlw export"),
            project_name: Optional[str] = typer.Option(None, "--project", "-p",
                                                       help="import under this name (documents get new ids)"),
            uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, as_json: bool = ObjectJsonOpt):
    """Import a project archive: blobs verified first, then the documents."""
    from mlwarehouse.archive.tarball import import_project
    with connect(uri, blobs) as wh, _progress(not as_json) as progress:
        report = import_project(wh, path, project=project_name, progress=progress)
    if as_json:
        print(json.dumps(report))
    else:
        renamed = f" (from {report['source']}, with new ids)" if report["renamed"] else ""
        counts = _counts({**report["collections"], **report.get("tables", {})})
        console.print(f"imported project {report['project']}{renamed}: {report['documents']} documents "
                      f"({counts}) and {report['blobs']} blobs", highlight=False)


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
       allow_host: list[str] = typer.Option([], "--allow-host", envvar="MLW_UI_ALLOW_HOST",
                                            help="a Host name to answer besides loopback names (repeatable)"),
       uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt):
    """Serve the web UI: runs and their curves, the model leaderboard, the task board, dataset previews."""
    from mlwarehouse.web import serve
    with connect(uri, blobs) as wh:
        serve(wh, host=host, port=port, writable=writable, allowed_hosts=allow_host)


@app.command()
def demo(home: Optional[str] = typer.Option(None, "--home", help="where the demo warehouse goes "
                                             "(default: ./.mlwarehouse)"),
         workers: int = typer.Option(2, "--workers"), epochs: int = typer.Option(15, "--epochs"),
         continuous: bool = typer.Option(False, "--continuous", help="the continuous demo instead: a trainer, an "
                                         "evaluator and a deployer as processes while new data arrives"),
         seconds: float = typer.Option(30.0, "--seconds", help="how long the continuous demo runs")):
    """The end-to-end demo: digits data, a sweep of MLPs run by two workers, a leaderboard, the best model
    (--continuous: the three continuous loops while new data arrives, the champion improving live)."""
    if continuous:
        from mlwarehouse.examples.continuous import run_continuous_demo
        run_continuous_demo(home=home, seconds=seconds)
        return
    from mlwarehouse.examples.demo import run_demo
    run_demo(home=home, workers=workers, epochs=epochs)


def main() -> None:
    """Entry point: WarehouseErrors as one line (exit 1), usage errors as one line and a hint (exit 2)."""
    try:
        code = app(prog_name="mlw", standalone_mode=False)  # a typer.Exit in a sub-app comes back as its code
    except (WarehouseError, OSError) as exc:  # OSError: a file named on the command line
        show_error(exc)
        sys.exit(1)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except Exception as exc:  # click's usage errors and the like
        handled = click_exit_status(exc)
        if handled is None:
            raise
        sys.exit(handled)
    sys.exit(code if isinstance(code, int) else 0)
