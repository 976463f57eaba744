"""What every ``mlw`` command shares: the consoles, the warehouse options, opening it, and one-line errors."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

__all__ = ["console", "err_console", "UriOpt", "BlobsOpt", "ProjectOpt", "connect", "open_project",
           "show_error", "fail"]

# markup off: stored names and values may hold [brackets] that rich would read as style tags
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

UriOpt = typer.Option(None, "--uri", envvar="MLW_URI", help="index URI (default: the embedded ./.mlwarehouse)")
BlobsOpt = typer.Option(None, "--blobs", envvar="MLW_BLOBS", help="blob store URI")
ProjectOpt = typer.Option("default", "--project", "-p", envvar="MLW_PROJECT", help="project name")


def connect(uri: str | None, blobs: str | None):
    """The warehouse the options name (its modules are imported when a command runs, not when ``mlw`` loads)."""
    from mlwarehouse.warehouse import connect as connect_warehouse
    return connect_warehouse(uri, blobs=blobs)


def open_project(uri: str | None, blobs: str | None, project: str):
    return connect(uri, blobs).project(project)


def show_error(exc: BaseException) -> None:
    """An error as one line on stderr: ``error: NotFound: ...``."""
    err_console.print(Text("error:", style="red"), f"{type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)


def fail(exc: BaseException):
    """Report ``exc`` and exit with status 1 (for sub-apps that also run on their own)."""
    show_error(exc)
    raise typer.Exit(1)
