"""The live "champion" panel: every alias of a project with its holder, the holder's latest evaluations beside the
previous holder's (``accuracy improved from 0.91 to 0.94 at 14:02``), and each alias's whole history.

The panel sits at the top of the models page (where a user looks for "which model is the champion") and polls
``GET /api/p/{project}/aliases`` every few seconds, as the task board polls its tasks, so an alias moved by a
promoter or another process shows up without a reload. Routes take the model name and the alias as query
parameters (``/p/{project}/alias?name=mlp&alias=champion``), so any name (with ``/``, ``@`` or ``?`` in it) reaches
its page, as on the collection pages.

Reads are bounded: one column scan of the project's alias changes (name, alias, version) to find each alias's
newest change and count its changes, then per alias shown its newest change, a short walk back to the previous
holder when the newest change does not name it, and the newest evaluations of the holder and the previous
holder's values on the same (data, fold, metric). "Previous holder" is the latest model other than the holder
that held the alias before it (a re-set of the same model, or a removal in between, does not hide it).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from mlwarehouse import schema
from mlwarehouse.errors import NotFound, QueryError
from mlwarehouse.models.aliases import ALIAS_RE
from mlwarehouse.web.data import LOWER_IS_BETTER, fmt, rank_metric

__all__ = ["router", "panel", "history", "direction"]

router = APIRouter()
ALIASES, EVALUATIONS, MODELS, DATASETS = (c.name for c in (schema.ALIASES, schema.EVALUATIONS, schema.MODELS,
                                                           schema.DATASETS))
#: aliases the panel shows (the first, by name and alias), evaluations per holder, changes walked back to find
#: the previous holder
ALIASES_SHOWN, EVALUATIONS_SHOWN, WALK = 200, 5, 100
CHANGE_FIELDS = ("version", "model", "previous", "changed", "by", "reason")


def direction(metric: str) -> str:
    """``"min"`` for a metric whose name says lower is better (loss, error, mse...), else ``"max"``."""
    return "min" if any(word in metric.lower() for word in LOWER_IS_BETTER) else "max"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _href(project: str, *parts: str) -> str:
    return "/p/" + "/".join(quote(str(x), safe="") for x in (project, *parts))


def history_href(project: str, name: str, alias: str) -> str:
    return f"{_href(project, 'alias')}?{urlencode({'name': name, 'alias': alias})}"


def _check(name: Any, alias: Any) -> tuple[str, str]:
    if not isinstance(name, str) or not name or len(name) > 200:
        raise QueryError(f"name= is a model name of 1 to 200 characters, not {name!r}")
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise QueryError(f"alias= is 1 to 64 letters, digits, '_', '.' or '-', not {alias!r}")
    return name, alias


# -- the panel ---------------------------------------------------------------------------------------------------
def panel(p, *, limit: int = ALIASES_SHOWN, evaluations: int = EVALUATIONS_SHOWN) -> dict:
    """Every alias of project ``p`` now (removed ones too), by name and alias: ``{"aliases": [...], "total",
    "held", "removed"}``; each entry has the holder (``model``, None when removed), its newest change's fields,
    ``changes`` (how many), ``previous`` (the holder before) and ``evaluations`` (the holder's newest, each with
    the previous holder's value and the delta)."""
    counts: dict[tuple[str, str], list[int]] = {}  # (name, alias) -> [changes, newest version]
    for name, alias, version in p.values(ALIASES, None, ["name", "alias", "version"]):
        if isinstance(name, str) and isinstance(alias, str) and isinstance(version, int):
            seen = counts.setdefault((name, alias), [0, 0])
            seen[0] += 1
            seen[1] = max(seen[1], version)
    entries = []
    for (name, alias), (changes, version) in sorted(counts.items())[:limit]:
        head = p.find_one(ALIASES, {"name": name, "alias": alias, "version": version})
        if head is not None:
            entries.append(_entry(p, name, alias, head, changes))
    _evaluations(p, entries, evaluations)
    _existing(p, entries)
    for entry in entries:
        entry["headline"] = _headline(entry)
    held = sum(1 for e in entries if e["model"] is not None)
    return {"aliases": entries, "total": len(counts), "held": held, "removed": len(entries) - held}


def _entry(p, name: str, alias: str, head: dict, changes: int) -> dict:
    holder, previous, since = head.get("model"), head.get("previous"), head.get("changed")
    if holder is not None and (previous is None or previous == holder) and head["version"] > 1:
        previous, since = _walk_back(p, name, alias, head)
    return {"name": name, "alias": alias, "spelling": f"{name}@{alias}", "model": holder,
            "removed": holder is None, **{f: head.get(f) for f in CHANGE_FIELDS if f not in ("model", "previous")},
            "previous": previous if previous != holder else None, "since": since, "changes": changes}


def _walk_back(p, name: str, alias: str, head: dict) -> tuple[str | None, Any]:
    """The latest other model that held the alias before ``head``'s holder, and when the holder's unbroken
    tenure began (a removal breaks it)."""
    holder, since, broken = head["model"], head.get("changed"), False
    older = p.find(ALIASES, {"name": name, "alias": alias, "version": {"$lt": head["version"]}},
                   sort=[("version", -1)], limit=WALK, projection={"model": 1, "changed": 1})
    for change in older:
        model = change.get("model")
        if model is None:
            broken = True
        elif model != holder:
            return model, since
        elif not broken:
            since = change.get("changed")
    return None, since


def _evaluations(p, entries: list[dict], shown: int) -> None:
    """The holder's newest evaluations, each with the previous holder's value on the same (data, fold, metric)."""
    datasets: set[str] = set()
    for entry in entries:
        entry["evaluations"] = []
        if entry["model"] is None:
            continue
        docs = p.find(EVALUATIONS, {"model": entry["model"]}, sort=[("time", -1)], limit=shown)
        before: dict[tuple, Any] = {}
        if entry["previous"] is not None and docs:
            for doc in p.find(EVALUATIONS, {"model": entry["previous"],
                                            "metric": {"$in": sorted({str(d.get("metric")) for d in docs})},
                                            "data": {"$in": sorted({str(d.get("data")) for d in docs})}},
                              projection={"data": 1, "fold": 1, "metric": 1, "value": 1}):
                before[(doc.get("data"), doc.get("fold"), doc.get("metric"))] = doc.get("value")
        for doc in docs:
            metric, value = str(doc.get("metric")), doc.get("value")
            old = before.get((doc.get("data"), doc.get("fold"), doc.get("metric")))
            delta = value - old if _number(value) and _number(old) else None
            way = direction(metric)
            change = None if delta is None else "unchanged" if delta == 0 else \
                "improved" if (delta > 0) == (way == "max") else "worse"
            if isinstance(doc.get("dataset"), str):
                datasets.add(doc["dataset"])
            entry["evaluations"].append({
                "metric": metric, "value": value, "data": doc.get("data"), "data_kind": doc.get("data_kind"),
                "dataset": doc.get("dataset"), "query": doc.get("query"),
                "fold": doc.get("fold") if doc.get("fold") not in ("", "null") else None,
                "run": doc.get("run"), "time": doc.get("time"), "previous_value": old, "delta": delta,
                "direction": way, "change": change})
    labels = {d["_id"]: f"{d.get('name')} v{d.get('version')}" if d.get("version") is not None else str(d.get("name"))
              for d in p.find(DATASETS, {"_id": {"$in": sorted(datasets)}}, projection={"name": 1, "version": 1})}
    for entry in entries:
        for e in entry["evaluations"]:
            e["data_label"], e["data_href"] = _data_label(p.name, e, labels)


def _data_label(project: str, e: dict, labels: dict[str, str]) -> tuple[str, str | None]:
    if e["dataset"] is not None:
        if e["dataset"] in labels:
            return labels[e["dataset"]], _href(project, "datasets", e["dataset"])
        return f"{e['dataset']} (deleted)", None
    try:
        spec = json.loads(e["query"]) if isinstance(e["query"], str) else None
    except ValueError:
        spec = None
    if isinstance(spec, dict) and isinstance(spec.get("collection"), str):
        where = json.dumps(spec.get("filter") or {}, sort_keys=True)
        return f"{spec['collection']} where {where}" if where != "{}" else spec["collection"], None
    return str(e["data"]), None


def _existing(p, entries: list[dict]) -> None:
    """Links to the holders and previous holders that are still stored (a deleted model is named, not linked)."""
    ids = sorted({i for e in entries for i in (e["model"], e["previous"]) if isinstance(i, str)})
    stored = {d["_id"] for d in p.find(MODELS, {"_id": {"$in": ids}}, projection={"_id": 1})} if ids else set()
    project = p.name
    for entry in entries:
        for field in ("model", "previous"):
            ident = entry[field]
            entry[f"{field}_href"] = _href(project, "models", ident) if ident in stored else None
            entry[f"{field}_deleted"] = ident is not None and ident not in stored
        entry["history_href"] = history_href(project, entry["name"], entry["alias"])


def _headline(entry: dict) -> str:
    """One line on the latest move: ``accuracy improved from 0.91 to 0.94 at 2026-01-31 14:02:11`` (the time the
    holder took the alias)."""
    at = str(entry.get("since") or entry.get("changed") or "")[:19].replace("T", " ")
    if entry["removed"]:
        return f"removed at {at}" + (f" (was {entry['previous']})" if entry["previous"] else "")
    compared = [e for e in entry["evaluations"] if e["delta"] is not None]
    if compared:  # the metric a leaderboard would rank by (test_*, then accuracy-like), else the newest
        top = rank_metric([e["metric"] for e in compared])
        e = next((e for e in compared if top and e["metric"] == top[0]), compared[0])
        return f"{e['metric']} {e['change']} from {fmt(e['previous_value'])} to {fmt(e['value'])} at {at}"
    if entry["previous"] is None:
        return f"first holder since {at}"
    return f"took over from {entry['previous']} at {at}"


# -- one alias's history -----------------------------------------------------------------------------------------
def history(p, name: str, alias: str, *, limit: int = 500) -> dict:
    """Every change of ``name@alias`` (the newest ``limit``), newest first; NotFound if it was never set."""
    name, alias = _check(name, alias)
    flt = {"name": name, "alias": alias}
    total = p.count(ALIASES, flt)
    if not total:
        raise NotFound(f"alias {name}@{alias} was never set in project {p.name!r}")
    docs = p.find(ALIASES, flt, sort=[("version", -1)], limit=limit, projection={f: 1 for f in CHANGE_FIELDS})
    ids = sorted({d[f] for d in docs for f in ("model", "previous") if isinstance(d.get(f), str)})
    stored = {d["_id"] for d in p.find(MODELS, {"_id": {"$in": ids}}, projection={"_id": 1})} if ids else set()
    changes = []
    for doc in docs:
        change = {f: doc.get(f) for f in CHANGE_FIELDS}
        for field in ("model", "previous"):
            change[f"{field}_href"] = _href(p.name, "models", change[field]) if change[field] in stored else None
        changes.append(change)
    holder = changes[0]["model"] if changes else None
    return {"name": name, "alias": alias, "spelling": f"{name}@{alias}", "model": holder, "removed": holder is None,
            "total": total, "changes": changes, "history_href": history_href(p.name, name, alias)}


# -- routes ------------------------------------------------------------------------------------------------------
def _project(request: Request, name: str):
    return request.app.state.warehouse.project(name)


@router.get("/api/p/{project:path}/aliases")
def aliases_api(request: Request, project: str) -> dict:
    """The champion panel as JSON (what the models page polls)."""
    return panel(_project(request, project))


@router.get("/api/p/{project:path}/alias")
def alias_api(request: Request, project: str, name: str = "", alias: str = "",
              limit: int = Query(500, ge=1, le=10_000)) -> dict:
    """Every change of one alias, newest first."""
    return history(_project(request, project), name, alias, limit=limit)


@router.get("/p/{project:path}/alias", response_class=HTMLResponse)
def alias_page(request: Request, project: str, name: str = "", alias: str = "",
               limit: int = Query(500, ge=1, le=10_000)):
    view = history(_project(request, project), name, alias, limit=limit)
    return request.app.state.templates.TemplateResponse(
        request, "alias.html", {"project": project, "tab": "models", "view": view})
