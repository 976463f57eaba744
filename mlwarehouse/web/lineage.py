"""The lineage of a page's entity: links to what it came from and what was made from it, and a small graph.

The graph is inline SVG drawn on the server (no script): the entity in the middle, upstream nodes in columns to
the left by distance, downstream ones to the right, a line from each node to the node it was reached through,
every node a link to its page. Pages show at most :data:`SHOWN` nodes each way (the CLI and API show them all).
"""

from __future__ import annotations

from urllib.parse import quote

from markupsafe import Markup, escape

__all__ = ["section", "href", "graph_svg", "SHOWN"]

#: nodes listed per direction on a page
SHOWN = 200
#: nodes drawn per column of the graph (the rest are counted)
_PER_COLUMN = 8
_W, _H, _GAP_X, _GAP_Y, _PAD = 150, 26, 40, 10, 8


def _part(value) -> str:
    return quote(str(value), safe="")


def href(project: str, kind: str, ident: str, name: str | None = None) -> str | None:
    """The page of a node, or None where it has none (an unknown id)."""
    base = f"/p/{_part(project)}"
    pages = {"dataset": "datasets", "run": "runs", "model": "models", "checkpoint": "models", "task": "tasks"}
    if kind in pages:
        return f"{base}/{pages[kind]}/{_part(ident)}"
    if kind == "collection" and name:
        return f"{base}/collection?name={_part(name)}"
    if kind in ("listener", "vector_index") and name and "." in name:
        return f"{base}/collection?name={_part(name.rsplit('.', 1)[0])}"
    return None


def section(p, project: str, ident: str, depth: int = 10) -> dict:
    """``{"upstream": [...], "downstream": [...], "more": {...}}``: rows with kind, name, id, relation,
    distance, deleted and href, nearest first."""
    out: dict = {"more": {}}
    for direction in ("upstream", "downstream"):
        nodes = getattr(p.lineage, direction)(ident, depth)
        out["more"][direction] = max(0, len(nodes) - SHOWN)
        out[direction] = [{**n.as_dict(), "href": None if n.deleted else href(project, n.kind, n.id, n.name)}
                          for n in nodes[:SHOWN]]
    return out


def graph_svg(center: dict, lineage: dict) -> Markup:
    """The graph of ``center`` (``{"id", "kind", "name"}``) and its ``section`` as an SVG element."""
    columns: dict[int, list[dict]] = {0: [{**center, "href": None, "deleted": False}]}
    hidden: dict[int, int] = {}
    for sign, direction in ((-1, "upstream"), (1, "downstream")):
        for node in lineage.get(direction, ()):
            column = sign * node["distance"]
            if len(columns.setdefault(column, [])) < _PER_COLUMN:
                columns[column].append(node)
            else:
                hidden[column] = hidden.get(column, 0) + 1
    order = sorted(columns)
    tallest = max(len(v) + (1 if hidden.get(k) else 0) for k, v in columns.items())
    width = len(order) * (_W + _GAP_X) - _GAP_X + 2 * _PAD
    height = tallest * (_H + _GAP_Y) - _GAP_Y + 2 * _PAD
    where: dict[str, tuple[float, float]] = {}
    boxes, lines = [], []
    for i, column in enumerate(order):
        x = _PAD + i * (_W + _GAP_X)
        for j, node in enumerate(columns[column]):
            y = _PAD + j * (_H + _GAP_Y)
            where[node["id"]] = (x, y)
            boxes.append(_box(node, x, y, center=column == 0))
        if hidden.get(column):
            y = _PAD + len(columns[column]) * (_H + _GAP_Y) + _H * 0.7
            boxes.append(f'<text x="{x + 4}" y="{y:.0f}" class="more">+{hidden[column]} more</text>')
    for column in order:
        for node in columns[column]:
            via = node.get("via")
            if column == 0 or via not in where:
                continue
            (x1, y1), (x2, y2) = where[node["id"]], where[via]
            if column < 0:  # upstream: from this node's right edge to its child's left edge
                a, b = (x1 + _W, y1 + _H / 2), (x2, y2 + _H / 2)
            else:
                a, b = (x2 + _W, y2 + _H / 2), (x1, y1 + _H / 2)
            lines.append(f'<line x1="{a[0]:.0f}" y1="{a[1]:.0f}" x2="{b[0]:.0f}" y2="{b[1]:.0f}"><title>'
                         f'{escape(node["relation"])}</title></line>')
    return Markup(f'<svg class="lineage-graph" xmlns="http://www.w3.org/2000/svg" width="{width}" '
                  f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">'
                  f'{"".join(lines)}{"".join(boxes)}</svg>')


def _box(node: dict, x: float, y: float, *, center: bool) -> str:
    label = f"{node.get('kind')}: {node.get('name') or node['id']}"
    shown = label if len(label) <= 22 else label[:21] + "…"
    cls = "node center" if center else "node deleted" if node.get("deleted") else f"node {node.get('kind')}"
    title = f"{label} {node['id']}" + (" (deleted)" if node.get("deleted") else "")
    inner = (f'<rect x="{x}" y="{y}" width="{_W}" height="{_H}" rx="4"></rect>'
             f'<text x="{x + 6}" y="{y + _H * 0.65:.0f}">{escape(shown)}</text><title>{escape(title)}</title>')
    link = node.get("href")
    if link:
        return f'<a href="{escape(link)}" class="{cls}">{inner}</a>'
    return f'<g class="{cls}">{inner}</g>'
