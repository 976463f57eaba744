"""Log blocks: how logged points are stored, and how they are read back as points or as columns.

A point is one ``run.log(...)`` call: ``{"run", "kind", "step", "epoch"?, "time", <metrics>}``. Storing one
document per point made every point pay for a row, its JSON and its index entries, which held logging to a third
of a raw ``executemany`` of one row per metric. The writer now stores the points of one batch as **blocks**: one
document per run, kind and set of metric names, holding one short array per point::

    {"_id", "project", "run", "kind",
     "step": <lowest step>, "last": <highest step>, "n": <points>, "time": <first point's time>,
     "metrics": ["loss", "accuracy"],
     "rows": "[[step, time, epoch, loss, accuracy], ...]"}

``rows`` is the JSON text of one short array per point (packed: the index checks and stores one string instead of
walking thousands of small arrays, which cost as much as the rest of a write). ``time`` in a row is the point's
time in microseconds since 1970 (an integer: its JSON is a third cheaper to write than a float's; read back as the
warehouse's UTC text, :func:`utc_text`); ``step`` and ``epoch`` are null where the point has none. Every point of
a block has exactly the block's metrics (a point with other metrics starts another block), so a null in a row is a
logged null (a NaN or infinity), never "not logged". Rows rather than columns: SQL reads a block point by point
(``json_each`` over the rows, one short array each: :mod:`mlwarehouse.index.views`) without looking elements up by
position in long arrays. Points keep the order they were logged in; readers order them by step, ties in logging
order (block ``_id``, then position). A block holds at most :data:`MAX_POINTS` points.

Documents of the older layout (one per point, no ``rows``) are read as blocks of one point, so a warehouse written
before blocks reads the same.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any

import orjson

from mlwarehouse import schema
from mlwarehouse.errors import InvalidDocument
from mlwarehouse.query.filters import matches, parse_filter, sort_docs

__all__ = ["ROWS", "NAMES", "MAX_POINTS", "POINT_FIELDS", "group", "block", "build", "points_of",
           "read_points", "read_columns", "count_points", "delete_points", "last_step", "block_filter", "utc_text"]

LOGS = schema.LOGS.name
#: the fields of a block holding its rows and its metric names
ROWS, NAMES = schema.LOG_BLOCK_ROWS, schema.LOG_BLOCK_NAMES
#: the most points one block holds (a batch of more becomes several blocks)
MAX_POINTS = 8192
#: the fields at the head of every row, in this order (the metrics follow)
POINT_FIELDS = schema.LOG_ROW_HEAD
_HEAD = len(POINT_FIELDS)
_NOT_METRICS = frozenset(("run", "kind", *POINT_FIELDS))
#: the fields of a point that say whose it is (left out of a "bare" point)
_HEADER = frozenset(("_id", "project", "run", "kind", "_blobs"))
#: the fields a filter on points may name that select blocks by themselves
_BLOCK_KEYS = frozenset({"run", "kind", "project"})


#: an escaped NUL in JSON text: ``\u0000`` after an even number of backslashes
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _plain_number(value: Any) -> Any:
    """What orjson cannot write itself: subclasses of float and int (numpy's float64 is one) as plain numbers."""
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _encode(rows: list) -> str:
    """Compact JSON text of the rows: orjson writes it about ten times faster than the standard library (its
    floats are the shortest that read back the same); a value of no JSON type is a TypeError."""
    return orjson.dumps(rows, default=_plain_number).decode()


@functools.lru_cache(maxsize=4096)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def utc_text(t: Any) -> Any:
    """A time in microseconds since 1970 (an int, as rows hold it) or in seconds (a ``time.time()`` float) as the
    warehouse's UTC text (``2024-05-01T10:00:00.123456Z``, as :func:`mlwarehouse.ids.utc_now` writes it);
    anything else as it is."""
    if type(t) is float:
        t = int(t * 1_000_000)
    elif type(t) is not int:
        return t
    second, micro = divmod(t, 1_000_000)
    return f"{_second(second)}.{micro:06d}Z"


def _micros(t: Any) -> Any:
    """A point's time as rows hold it: microseconds (a ``time.time()`` float converted), anything else as it is."""
    return int(t * 1_000_000) if type(t) is float else t


def group(points: Sequence[dict]) -> list[list[dict]]:
    """The points of a batch grouped by run, kind and field set (at most :data:`MAX_POINTS` each), in the order
    of each group's first point, so that blocks given increasing ids follow logging order."""
    groups: list[list[dict]] = []
    current: dict[tuple, list[dict]] = {}
    for point in points:
        key = (point.get("run"), point["kind"], tuple(point))
        members = current.get(key)
        if members is None or len(members) >= MAX_POINTS:
            members = current[key] = []
            groups.append(members)
        members.append(point)
    return groups


def block(points: list[dict], _id: str, project: str) -> dict:
    """The block document of one group of points (each with ``run``, ``kind``, ``time`` and the same fields);
    InvalidDocument for a value that cannot be stored (of no JSON type, a lone surrogate, a NUL, an integer beyond
    64 bits). A NaN or infinity is written as null, as ``run.log`` stores them."""
    first = points[0]
    names = [k for k in first if k not in _NOT_METRICS]
    try:  # the points of run.log() carry every field of the head (None where they have none)
        rows = list(map(itemgetter(*POINT_FIELDS, *names), points))
    except KeyError:
        rows = [(p.get("step"), p.get("time"), p.get("epoch"), *(p[n] for n in names)) for p in points]
    if float in set(type(r[1]) for r in rows):  # time.time() floats, from a caller other than run.log()
        rows = [(r[0], _micros(r[1]), *r[2:]) for r in rows]
    return {"_id": _id, "project": project, "run": first.get("run"), "kind": first["kind"], **_packed(names, rows)}


def _packed(names: list[str], rows: list) -> dict:
    """The fields of a block holding ``rows`` (``step``, ``last``, ``n``, ``time``, metric names, packed rows)."""
    steps = [r[0] for r in rows if type(r[0]) is int]
    try:
        text = _encode(rows)
    except (TypeError, ValueError) as exc:
        raise InvalidDocument(f"a log point holds a value that is not JSON: {exc}") from None
    if "\\u0000" in text and _NUL.search(text):  # refused as in any stored string: PostgreSQL cannot read one
        raise InvalidDocument("a log point holds a string with a NUL character")
    return {"step": min(steps) if steps else None, "last": max(steps) if steps else None, "n": len(rows),
            "time": utc_text(rows[0][1]) if rows else None, NAMES: names, ROWS: text}


def build(points: Sequence[dict], ids: Iterable[str], project: str) -> list[dict]:
    """The blocks of ``points``, ``ids`` giving each its ``_id`` (as many as :func:`group` makes groups)."""
    return [block(members, _id, project) for members, _id in zip(group(points), ids)]


def _layout(doc: dict) -> tuple[list, list] | None:
    """(metric names, rows) of a block; None for a document of the older one-point layout. Rows that do not
    parse, or are no list, read as none (the store is not trusted to hold what the writer wrote)."""
    names, text = doc.get(NAMES), doc.get(ROWS)
    if not isinstance(names, list) or not isinstance(text, str):
        return None
    try:
        rows = orjson.loads(text)
    except ValueError:
        return names, []
    return names, rows if isinstance(rows, list) else []


def points_of(doc: dict, *, bare: bool = False) -> list[dict]:
    """A block's points as documents ``{"_id": "<block>.<i>", "project", "run", "kind", "step", "time",
    "epoch"?, <metrics>}`` (no ``step``/``epoch`` where the point had none; ``bare``: without the first four);
    an older one-point document as it is."""
    layout = _layout(doc)
    if layout is None:
        return [{k: v for k, v in doc.items() if k not in _HEADER} if bare else doc]
    names, rows = layout
    keys = (*POINT_FIELDS, *names)
    width = len(keys)
    head = {} if bare else {"project": doc.get("project"), "run": doc.get("run"), "kind": doc.get("kind")}
    bid = doc.get("_id")
    out = []
    for i, row in enumerate(rows):
        if type(row) is not list or len(row) != width:
            continue  # a damaged row is skipped, not guessed at
        point = {"_id": f"{bid}.{i}", **head} if not bare else {}
        point.update(zip(keys, row))
        if row[0] is None:
            del point["step"]
        t = row[1]
        if type(t) is int:
            point["time"] = utc_text(t)
        if row[2] is None:
            del point["epoch"]
        out.append(point)
    return out


def block_filter(flt: dict | None) -> tuple[dict, dict | None]:
    """Split a filter on points into (a filter on blocks, what is left to test on each point). Equalities and
    ``$in`` on run, kind and project (at the top or in a top-level ``$and``) select blocks; the rest is tested on
    the points."""
    if not flt:
        return {}, None
    parts = flt["$and"] if set(flt) == {"$and"} and isinstance(flt["$and"], list) else [flt]
    on_blocks, rest = [], []
    for part in parts:
        if not isinstance(part, dict):
            rest.append(part)
            continue
        mine = {k: v for k, v in part.items() if k in _BLOCK_KEYS and _plain(v)}
        if mine:
            on_blocks.append(mine)
        if len(mine) < len(part):
            rest.append({k: v for k, v in part.items() if k not in mine})
    blocks = on_blocks[0] if len(on_blocks) == 1 else {"$and": on_blocks} if on_blocks else {}
    points = None if not rest else rest[0] if len(rest) == 1 else {"$and": rest}
    return blocks, points


def _plain(value: Any) -> bool:
    """An equality or ``$in`` that a block's field answers for all its points alike."""
    if isinstance(value, dict):
        return set(value) == {"$in"} and isinstance(value["$in"], list)
    return True


def _blocks(project, flt: dict, projection: dict | None = None) -> list[dict]:
    return project.find(LOGS, flt, sort=[("_id", 1)], projection=projection)


def read_points(project, flt: dict | None = None, *, sort=None, limit: int | None = None,
                fields: Sequence[str] | None = None, bare: bool = False) -> list[dict]:
    """The points matching ``flt`` (a filter on points), by step (ties in logging order) unless ``sort`` says
    otherwise; ``fields`` keeps only those fields (and ``_id``); ``bare`` leaves out ``_id``, ``project``,
    ``run`` and ``kind`` (filters still see them)."""
    on_blocks, on_points = block_filter(flt)
    test = parse_filter(on_points) if on_points else None
    found = []
    for doc in _blocks(project, on_blocks):
        points = points_of(doc, bare=bare and test is None)
        found.extend(points if test is None else (p for p in points if matches(p, test)))
    if bare and test is not None:
        found = [{k: v for k, v in p.items() if k not in _HEADER} for p in found]
    if not sort or list(sort) == [("step", 1)]:
        found = _by_step(found)
    else:
        found = sort_docs(found, sort)
    if limit:
        found = found[:limit]
    if fields is not None:
        keep = {"_id", *fields}
        found = [{k: v for k, v in p.items() if k in keep} for p in found]
    return found


def _by_step(points: list[dict]) -> list[dict]:
    """Points in step order, ties in the order given: without sorting when they are in order already (the
    usual case), by a plain key when every step is an integer, else by the query language's order."""
    steps = [p.get("step") for p in points]
    if _ascending(steps):
        return points
    if all(type(s) is int for s in steps):
        order = sorted(range(len(points)), key=steps.__getitem__)
        return [points[i] for i in order]
    return sort_docs(points, [("step", 1)])


def count_points(project, flt: dict | None = None) -> int:
    """How many points match ``flt`` (a filter on points); blocks selected whole are counted from ``n``."""
    on_blocks, on_points = block_filter(flt)
    if on_points is not None:
        return len(read_points(project, flt))
    total = 0
    for doc in _blocks(project, on_blocks, projection={"n": 1, NAMES: 1}):
        n = doc.get("n")
        total += n if type(n) is int and isinstance(doc.get(NAMES), list) else 1  # an older one-point document
    return total


def read_columns(project, run_id: str, kind: str, names: Sequence[str], *, after: int | None = None,
                 require: str | None = None) -> list[list]:
    """Columns of one run's points of one kind in step order (ties in logging order): one list per name in
    ``names`` (a metric or a point field; ``time`` in seconds since 1970 where it is a number), None where a point
    lacks it. ``after`` keeps the points of a higher step; ``require`` only the points that logged that metric
    (even as null)."""
    flt: dict = {"run": run_id, "kind": kind}
    if after is not None:
        flt = {"$and": [flt, {"$or": [{"last": {"$gt": after}}, {ROWS: {"$exists": False}}]}]}
    columns: list[list] = [[] for _ in names]
    steps: list = []
    for doc in _blocks(project, flt):
        layout = _layout(doc)
        if layout is None:  # the older one-point layout
            if require is not None and require not in doc:
                continue
            steps.append(doc.get("step"))
            for out, name in zip(columns, names):
                out.append(doc.get(name))
            continue
        metrics, rows = layout
        if require is not None and require not in metrics:
            continue
        width = _HEAD + len(metrics)
        rows = [r for r in rows if isinstance(r, list) and len(r) == width]
        at = {name: i for i, name in enumerate(POINT_FIELDS)}
        at.update((name, _HEAD + i) for i, name in enumerate(metrics))
        steps.extend(r[0] for r in rows)
        for out, name in zip(columns, names):
            j = at.get(name)
            if j == 1:  # time: microseconds -> seconds, like time.time()
                out.extend([r[1] / 1e6 if type(r[1]) is int else r[1] for r in rows])
            else:
                out.extend([r[j] for r in rows] if j is not None else [None] * len(rows))
    keep = range(len(steps))
    if after is not None:
        keep = [i for i in keep if type(steps[i]) is int and steps[i] > after]
    if not _ascending(steps):
        keep = sorted(keep, key=lambda i: _step_key(steps[i]))
    if not isinstance(keep, range):  # filtered or reordered
        columns = [[c[i] for i in keep] for c in columns]
    return columns


def _step_key(step: Any) -> float:
    return step if type(step) is int else math.inf


def _ascending(steps: list) -> bool:
    """Whether integer steps never decrease (a point without one counts as out of order)."""
    previous = -math.inf
    for s in steps:
        if type(s) is not int or s < previous:
            return False
        previous = s
    return True


def last_step(project, run_id: str, kind: str) -> int | None:
    """The highest step stored for a run and kind (blocks and older one-point documents alike)."""
    best = None
    for field, layout in (("last", {"$exists": True}), ("step", {"$exists": False})):
        doc = project.find_one(LOGS, {"run": run_id, "kind": kind, ROWS: layout}, sort=[(field, -1)],
                               projection={field: 1})
        value = doc.get(field) if doc else None
        if type(value) is int and (best is None or value > best):
            best = value
    return best


def delete_points(project, flt: dict | None = None) -> int:
    """Delete the points matching ``flt`` (a filter on points); returns how many. Blocks selected whole are
    deleted; a block with some matching points is rewritten (same ``_id``) with the others."""
    on_blocks, on_points = block_filter(flt)
    if on_points is None:
        return sum(len(points_of(doc)) for doc in project.delete(LOGS, on_blocks))
    test = parse_filter(on_points)
    removed = 0
    for doc in _blocks(project, on_blocks):
        points = points_of(doc)
        keep = [p for p in points if not matches(p, test)]
        if len(keep) == len(points):
            continue
        layout = _layout(doc)
        if keep and layout is not None:
            names, rows = layout
            kept = [rows[int(p["_id"].rpartition(".")[2])] for p in keep]  # rows in their stored form
            project.update(LOGS, {"_id": doc["_id"]}, {"$set": _packed(names, kept)})
        else:
            project.delete(LOGS, {"_id": doc["_id"]})
        removed += len(points) - len(keep)
    return removed
