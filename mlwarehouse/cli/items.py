"""``mlw items``: import a folder of images or arrays into an item dataset, and show item datasets.

    mlw items import ./photos pets            one class per subfolder, images stored as they are
    mlw items import mnist.npz mnist          every array in the file is a column (same length)
    mlw items show mnist --items 5
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mlwarehouse.cli.common import BlobsOpt, ProjectOpt, UriOpt, console, err_console, fail, open_project
from mlwarehouse.errors import NotFound, WarehouseError

__all__ = ["items_app"]

items_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Item datasets: many small items packed into shards, streamed into training.")


def _columns(path: Path) -> dict:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if path.suffix == ".npy":
        return {"x": np.load(path, allow_pickle=False)}
    raise NotFound(f"{str(path)!r} is not a folder, an .npz or an .npy file")


@items_app.command("import")
def import_(source: Path = typer.Argument(..., help="a folder of images (class subfolders), .npz or .npy"),
            name: str = typer.Argument(..., help="dataset name"),
            version: Optional[str] = typer.Option(None, "--version", help="version (default: the next integer)"),
            shard_mb: int = typer.Option(16, "--shard-mb", help="shard size in MB"),
            description: Optional[str] = typer.Option(None, "--description", "-d"),
            uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt) -> None:
    """Import a folder of images or a file of arrays as a new, finished version of an item dataset."""
    try:
        items = open_project(uri, blobs, project).items
        if source.is_dir():
            total = sum(1 for p in source.rglob("*") if p.is_file())
            columns = None
        else:
            columns = _columns(source)
            total = len(next(iter(columns.values()))) if columns else 0
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err_console) as bar:
            task = bar.add_task(f"importing {source.name}", total=total)
            advance = lambda n: bar.advance(task, n)  # noqa: E731
            ds = items.create(name, version=_version(version), description=description,
                              shard_bytes=shard_mb << 20)
            try:
                if columns is None:
                    ds.append_folder(source, progress=advance)
                else:
                    ds.append(columns, progress=advance)
            except BaseException:
                ds.delete()  # a failed import leaves no half-filled version behind
                raise
            ds.finish()
        console.print(f"{name} version {ds.version}: {ds.doc['count']} items in {ds.doc['shards']} shards "
                      f"({ds.doc['bytes'] / 1e6:.1f} MB)", markup=False)
    except (WarehouseError, OSError) as exc:
        fail(exc)


def _version(text: str | None) -> str | int | None:
    """A version as typed: digits are the integer versions that imports number by default."""
    return None if text is None else (int(text) if text.isdigit() else text)


@items_app.command("show")
def show(name: str = typer.Argument(..., help="dataset name"),
         version: Optional[str] = typer.Option(None, "--version", help="version (default: the newest)"),
         items_n: int = typer.Option(5, "--items", "-n", help="how many items to show"),
         uri: Optional[str] = UriOpt, blobs: Optional[str] = BlobsOpt, project: str = ProjectOpt) -> None:
    """Show a dataset's versions, then one version's fields and first items."""
    try:
        items = open_project(uri, blobs, project).items
        versions = items.versions(name)
        if not versions:
            raise NotFound(f"no item dataset {name!r} in project {project!r}")
        table = Table(title=f"{name}: versions")
        for col in ("version", "state", "items", "shards", "MB", "time"):
            table.add_column(col)
        for v in versions:
            d = v.doc
            table.add_row(str(d["version"]), d["state"], str(d["count"]), str(d["shards"]),
                          f"{d['bytes'] / 1e6:.1f}", d["time"][:19])
        console.print(table)
        ds = items.get(name, version=_version(version))
        fields = Table(title=f"{name} version {ds.version}: fields")
        for col in ("field", "kind", "dtype", "shape"):
            fields.add_column(col)
        for field, spec in ds.doc["fields"].items():
            fields.add_row(field, spec["kind"], str(spec.get("dtype") or ""), json.dumps(spec.get("shape")))
        console.print(fields)
        shown = Table(title=f"first {items_n} items")
        shown.add_column("id")
        for field in ds.doc["fields"]:
            shown.add_column(field)
        for rec in ds.find(limit=items_n):
            values = rec.load()
            shown.add_row(rec.id, *[_describe(values[f]) for f in ds.doc["fields"]])
        console.print(shown)
    except WarehouseError as exc:
        fail(exc)


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{list(value.shape)}"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return json.dumps(value)[:40]
