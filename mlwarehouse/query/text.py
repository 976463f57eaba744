"""Filters and sorts typed as text (``mlw --where/--sort``, the web UI's query box and sort links).

One parser for every front end, so a filter that works in the shell works in the browser, and both name what
is wrong the same way (QueryError). ``label`` is how the front end calls the input in its messages.
"""

from __future__ import annotations

import json

from mlwarehouse.errors import QueryError
from mlwarehouse.query.jsonvalues import split_path

__all__ = ["parse_filter_text", "parse_sort_text"]


def parse_filter_text(text: str | None, label: str = "the query") -> dict | None:
    """A filter typed as JSON text (``{"status": "complete"}``), or None when the text is empty."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QueryError(f"{label} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise QueryError(f"{label} is nested too deeply") from None
    if not isinstance(value, dict):
        raise QueryError(f"{label} must be a JSON object such as {{\"status\": \"complete\"}}, "
                         f"not {type(value).__name__}")
    return value


def parse_sort_text(text: str | None, label: str = "sort") -> list[tuple[str, int]] | None:
    """``"acc:-1,time"`` -> ``[("acc", -1), ("time", 1)]``: fields joined by commas, each ``:1`` (the default),
    ``:+1`` or ``:-1``; None when the text is empty."""
    if text is None or not text.strip():
        return None
    out = []
    for part in text.split(","):
        name, _, direction = part.strip().partition(":")
        if not name or direction not in ("", "1", "+1", "-1"):
            raise QueryError(f"{label} {part.strip()!r}: write field:1 or field:-1")
        split_path(name, label)
        out.append((name, -1 if direction == "-1" else 1))
    return out
