"""What every ``mlw`` command shares: the consoles, the warehouse options, opening it, one-line errors, and usage
errors from either click (typer's bundled one or the standalone package)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from mlwarehouse.errors import NotFound

__all__ = ["cell_text", "console", "err_console", "UriOpt", "BlobsOpt", "ProjectOpt", "connect", "open_project",
           "open_existing", "show_error", "show_usage_error", "fail", "click_exit_status"]

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


def open_existing(uri: str | None, blobs: str | None, project: str):
    """The project, or NotFound naming the projects there are (a typo in ``-p`` is not an empty listing)."""
    wh = connect(uri, blobs)
    names = wh.projects()
    if project not in names:
        wh.close()
        raise NotFound(f"no project {project!r}; projects: {', '.join(names) or '(none yet)'}")
    return wh.project(project)


def show_error(exc: BaseException) -> None:
    """An error as one line on stderr: ``error: NotFound: ...``."""
    err_console.print(Text("error:", style="red"), f"{type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)


def show_usage_error(message: str, hint: str) -> None:
    """A usage error as one line, then the hint: ``error: No such option: --limt`` / ``Try 'mlw models --help'``."""
    err_console.print(Text("error:", style="red"), message, highlight=False, soft_wrap=True)
    err_console.print(hint, highlight=False, soft_wrap=True)


def fail(exc: BaseException):
    """Report ``exc`` and exit with status 1 (for sub-apps that also run on their own)."""
    show_error(exc)
    raise typer.Exit(1)


def _click_modules() -> list:
    """The click exception modules in use: recent typer releases bundle their own click (``typer._click``), older
    ones use the standalone ``click``; a module that is not imported raised nothing."""
    return [m for m in (sys.modules.get("typer._click.exceptions"), sys.modules.get("click.exceptions")) if m]


def click_exit_status(exc: Exception) -> int | None:
    """Report a click exception of either click and return its exit status; None if ``exc`` is none of them."""
    if isinstance(exc, typer.Abort):  # typer's own (bundled click) or click's (older typer)
        return 130
    for module in _click_modules():
        if isinstance(exc, module.UsageError) and type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # ``mlw items``: the help is the message
            return exc.exit_code
        if isinstance(exc, module.UsageError):
            ctx = exc.ctx
            hint = (f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help." if ctx is not None
                    else "Try 'mlw --help' for help.")
            show_usage_error(" ".join(exc.format_message().split()), hint)
            return exc.exit_code
        if isinstance(exc, module.ClickException):
            show_usage_error(" ".join(exc.format_message().split()), "Try 'mlw --help' for help.")
            return exc.exit_code
    return None


def cell_text(value: Any) -> str:
    """A value as a table cell: floats to 4 digits, JSON cut at 60 characters."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
        return text if len(text) <= 60 else text[:57] + "..."
    return "" if value is None else str(value)
