// mlwarehouse UI: the sweep view of a set of runs. Parallel coordinates (an axis per hyper-parameter that varies,
// then the chosen metric; drag along an axis to keep the runs in a range), a scatter of a parameter against a
// metric with the runs grouped over a field (the mean as a line, min to max as a band), the groups' table and the
// runs' table, both filtered by the brushes. Plain SVG, no framework; the data is one request to
// /api/p/<project>/sweep (columnar: a list of values per parameter and per metric); every text is written with
// textContent or as an SVG attribute, never as HTML. Needs app.js (mlw.num formats numbers as the tables do).
"use strict";
const mlwSweep = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                  "#7f7f7f", "#bcbd22"];
  // line colours by how good the chosen metric is: dark blue (worst) to orange (best)
  const RAMP = [[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64]];
  const MISSING = "#a0a4ab";
  // the most bands the scatter draws, and rows the groups' table lists
  const MAX_SERIES = 10, MAX_GROUPS = 200;

  function svg(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, content, attrs) {
    const node = svg("text", {x, y, ...(attrs || {})}, parent);
    node.textContent = content;
    return node;
  }

  function tag(name, content, parent, className) {
    const node = document.createElement(name);
    if (className) node.className = className;
    if (content !== undefined && content !== null) node.textContent = content;
    if (parent) parent.appendChild(node);
    return node;
  }

  function ramp(g) {
    const x = Math.max(0, Math.min(1, g)) * (RAMP.length - 1), i = Math.min(RAMP.length - 2, Math.floor(x));
    const f = x - i, a = RAMP[i], b = RAMP[i + 1];
    return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * f)).join(",")})`;
  }

  // "Nice" ticks between lo and hi (steps of 1, 2 or 5 times a power of ten).
  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count, mag = 10 ** Math.floor(Math.log10(raw)), err = raw / mag;
    const step = mag * (err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function logTicks(lo, hi) {
    const out = [];
    for (let e = Math.ceil(Math.log10(lo) - 1e-9); e <= Math.floor(Math.log10(hi) + 1e-9); e++) out.push(10 ** e);
    return out.length >= 2 ? out : [lo, hi];
  }

  // An axis over one column: position t in [0, 1] of each run (NaN where missing), ticks, and the inverse of a
  // range of t for the brush's data-lo/data-hi (numbers) or data-categories (the categories inside).
  function axis(kind, column, values) {
    const a = {kind, name: column.name, type: column.type, column, pos: new Float64Array(values.length)};
    if (column.type === "category") {
      const n = column.categories.length;
      a.t = (code) => (code === null || code === undefined) ? NaN : (n === 1 ? 0.5 : code / (n - 1));
      const stride = Math.max(1, Math.ceil(n / 14));
      a.ticks = column.categories.map((label, code) => [a.t(code), label]).filter((_, i) => i % stride === 0);
      a.label = (code) => (code === null || code === undefined) ? "" : column.categories[code];
      a.describe = (lo, hi) => ({categories: JSON.stringify(column.categories.filter((_, c) =>
        a.t(c) >= lo - 1e-9 && a.t(c) <= hi + 1e-9))});
    } else {
      const finite = values.filter((v) => typeof v === "number" && Number.isFinite(v));
      let lo = Math.min(...finite), hi = Math.max(...finite);
      if (!finite.length) { lo = 0; hi = 1; }
      const log = column.scale === "log" && lo > 0;
      const f = log ? Math.log : (v) => v, inv = log ? Math.exp : (v) => v;
      const a0 = f(lo), a1 = f(hi);
      a.t = (v) => (typeof v !== "number" || !Number.isFinite(v) || (log && v <= 0)) ? NaN
        : (a1 === a0 ? 0.5 : (f(v) - a0) / (a1 - a0));
      a.value = (t) => a1 === a0 ? lo : inv(a0 + t * (a1 - a0));
      const distinct = [...new Set(finite)].sort((x, y) => x - y);
      // a parameter's few values are its ticks (a grid's points); else round numbers
      const ticks = kind === "param" && distinct.length <= 10 ? distinct : log ? logTicks(lo, hi) : niceTicks(lo, hi, 5);
      a.ticks = ticks.filter((v) => v >= lo && v <= hi).map((v) => [a.t(v), mlw.num(v)]);
      a.label = (v) => mlw.num(v);
      a.describe = (lo2, hi2) => ({lo: String(a.value(lo2)), hi: String(a.value(hi2))});
    }
    values.forEach((v, i) => { a.pos[i] = a.t(v); });
    return a;
  }

  function page(root) {
    if (!root) return;
    const project = root.dataset.project;
    const status = document.getElementById("sweep-status");
    const pick = {metric: document.getElementById("sweep-metric"), stat: document.getElementById("sweep-stat"),
                  x: document.getElementById("sweep-x"), y: document.getElementById("sweep-y"),
                  group: document.getElementById("sweep-group")};
    const state = {data: null, brushes: new Map(), selected: null, drawnLines: null, axes: [], lines: [], rows: []};

    async function load(stat) {
      const query = new URLSearchParams({q: root.dataset.q, task: root.dataset.task, stat, limit: root.dataset.limit});
      status.textContent = "loading…";
      status.className = "muted";
      try {
        const response = await fetch(`/api/p/${encodeURIComponent(project)}/sweep?${query}`);
        const body = await response.json().catch(() => ({error: response.statusText}));
        if (!response.ok) throw new Error(body.error || response.statusText);
        return body;
      } catch (err) {
        status.textContent = err.message;
        status.className = "error";
        return null;
      }
    }

    function options(select, names, chosen, none) {
      select.replaceChildren();
      if (none) tag("option", none, select).value = "";
      for (const name of names) tag("option", name, select).value = name;
      select.value = names.includes(chosen) ? chosen : (none ? "" : names[0] || "");
    }

    function start(data) {
      state.data = data;
      // the figures' widths, read once: reading a width after the table changed would lay out its rows again
      state.widths = {parallel: document.getElementById("sweep-parallel").clientWidth,
                      scatter: document.getElementById("sweep-scatter").clientWidth};
      const varying = data.params.filter((p) => p.varies).map((p) => p.name);
      const metrics = data.metrics.map((m) => m.name);
      options(pick.metric, metrics, pick.metric.value || data.metric);
      options(pick.y, metrics, pick.y.value || pick.metric.value);
      const seed = [varying.find((n) => n === "seed"), varying.find((n) => /seed/i.test(n))].find((n) => n && merges(n));
      options(pick.group, varying, pick.group.dataset.touched ? pick.group.value : seed, "(none)");
      options(pick.x, varying, pick.x.value || varying.find((n) => n !== pick.group.value));
      const fixed = data.params.filter((p) => !p.varies);
      document.getElementById("sweep-fixed").textContent = fixed.length ? "the same in every run: " + fixed.map((p) =>
        `${p.name} = ${p.type === "category" ? p.categories[0] : mlw.num(p.values.find((v) => v !== null))}`)
        .join(", ") : "";
      const more = [data.more_params && `${data.more_params} more parameters`,
                    data.more_metrics && `${data.more_metrics} more metrics`].filter(Boolean);
      status.textContent = `${data.count} of ${data.total} runs read` + (more.length ? ` (${more.join(", ")} not shown)` : "");
      build();
    }

    const param = (name) => state.data.params.find((p) => p.name === name);
    // whether grouping over ``over`` puts some runs together (else every group would be one run)
    function merges(over) {
      const keys = state.data.params.filter((p) => p.varies && p.name !== over), seen = new Set();
      for (let i = 0; i < state.data.count; i++) seen.add(JSON.stringify(keys.map((p) => p.values[i])));
      return seen.size < state.data.count;
    }
    // a task result is one value; a summary metric is shown by one stat of its history
    const statOf = (m) => m.name.startsWith("result.") ? "task result" : state.data.stat;
    const metric = (name) => state.data.metrics.find((m) => m.name === name);

    // every view, for the chosen metric
    function build() {
      const data = state.data;
      const chosen = metric(pick.metric.value);
      state.axes = data.params.filter((p) => p.varies).map((p) => axis("param", p, p.values));
      if (chosen) state.axes.push(axis("metric", chosen, chosen.values));
      for (const key of [...state.brushes.keys()]) {
        if (!state.axes.some((a) => a.name === key)) state.brushes.delete(key);
      }
      drawParallel();
      drawTable();
      select();
    }

    // -- parallel coordinates ---------------------------------------------------------------------------------
    function drawParallel() {
      const box = document.getElementById("sweep-parallel");
      box.replaceChildren();
      const n = state.data.count, axes = state.axes;
      const width = Math.max(640, state.widths.parallel || 900), height = 400;
      const top = 46, bottom = height - 56, missingY = bottom + 24, left = 80, right = width - 110;
      const xs = axes.map((_, i) => axes.length === 1 ? (left + right) / 2 : left + i * (right - left) / (axes.length - 1));
      const y = (t) => bottom - t * (bottom - top);
      const plot = svg("svg", {width, height, viewBox: `0 0 ${width} ${height}`, class: "pc", role: "img",
                               "aria-label": "parallel coordinates"}, box);
      const dim = svg("g", {class: "lines dimmed"}, plot), live = svg("g", {class: "lines live"}, plot);
      const m = axes.length && axes[axes.length - 1].kind === "metric" ? axes[axes.length - 1] : null;
      const better = m && metric(m.name).direction === "min" ? (t) => 1 - t : (t) => t;
      state.lines = [];
      state.drawnLines = null;  // new elements: select() sets every one
      for (let i = 0; i < n; i++) {
        const d = axes.map((a, k) => `${k ? "L" : "M"}${xs[k].toFixed(1)},${(Number.isNaN(a.pos[i]) ? missingY : y(a.pos[i])).toFixed(1)}`).join("");
        const colour = m && !Number.isNaN(m.pos[i]) ? ramp(better(m.pos[i])) : MISSING;
        state.lines.push(svg("path", {d, stroke: colour, class: "line", "data-i": i, "data-id": state.data.runs.id[i]}, live));
      }
      state.lineGroups = [dim, live];
      axes.forEach((a, k) => {
        const g = svg("g", {class: `axis ${a.kind}`, "data-name": a.name, "data-type": a.type,
                            transform: `translate(${xs[k].toFixed(1)},0)`}, plot);
        svg("line", {x1: 0, x2: 0, y1: top, y2: bottom, class: "spine"}, g);
        text(g, 0, top - 26, a.name, {class: "title", "text-anchor": "middle"});
        if (a.kind === "metric") text(g, 0, top - 12, statOf(a.column), {class: "sub", "text-anchor": "middle"});
        let last = Infinity;
        for (const [t, label] of a.ticks) {
          if (Math.abs(last - y(t)) < 12) continue;  // labels would overlap
          last = y(t);
          svg("line", {x1: -4, x2: 0, y1: y(t), y2: y(t), class: "tick"}, g);
          text(g, -7, y(t) + 4, label, {class: "tick-label", "text-anchor": "end"});
        }
        if ([...a.pos].some(Number.isNaN)) text(g, -7, missingY + 4, "none", {class: "tick-label missing", "text-anchor": "end"});
        const brush = svg("rect", {class: "brush", x: -9, width: 18, y: 0, height: 0, visibility: "hidden"}, g);
        const hit = svg("rect", {class: "hit", x: -16, width: 32, y: top - 6, height: bottom - top + 12}, g);
        brushable(a, g, hit, brush, y, top, bottom);
      });
    }

    function brushable(a, g, hit, brush, y, top, bottom) {
      const toT = (event) => {  // a drag that starts or ends within 5 px of an axis' end takes in that end
        let py = event.clientY - hit.ownerSVGElement.getBoundingClientRect().top;
        if (py < top + 5) py = top;
        if (py > bottom - 5) py = bottom;
        return (bottom - py) / (bottom - top);
      };
      const show = () => {
        const b = state.brushes.get(a.name);
        if (!b) { brush.setAttribute("visibility", "hidden"); g.classList.remove("brushed"); return; }
        brush.setAttribute("visibility", "visible");
        brush.setAttribute("y", y(b[1]));
        brush.setAttribute("height", Math.max(1, y(b[0]) - y(b[1])));
        for (const [key, value] of Object.entries(a.describe(b[0], b[1]))) brush.dataset[key] = value;
        g.classList.add("brushed");
      };
      let from = null, fromY = 0, pending = false;
      hit.addEventListener("pointerdown", (event) => {
        event.preventDefault();
        hit.setPointerCapture(event.pointerId);
        from = toT(event);
        fromY = event.clientY;
      });
      hit.addEventListener("pointermove", (event) => {
        if (from === null || Math.abs(event.clientY - fromY) < 3) return;
        const to = toT(event);
        state.brushes.set(a.name, [Math.min(from, to), Math.max(from, to)]);
        show();
        if (pending) return;
        pending = true;
        requestAnimationFrame(() => { pending = false; if (from !== null) select(true); });
      });
      const end = (event) => {
        if (from === null) return;
        if (Math.abs(event.clientY - fromY) < 3) state.brushes.delete(a.name);  // a click clears the axis
        from = null;
        show();
        select();
      };
      hit.addEventListener("pointerup", end);
      hit.addEventListener("pointercancel", end);
      show();
    }

    // Which runs pass every brush; then every view shows them. While a brush is dragged (``moving``) only the lines
    // (those whose state changed) and the count follow at once; the table's rows, the lines' order (kept ones on
    // top), the scatter and the groups follow when the drag ends.
    function select(moving) {
      const n = state.data.count, keep = new Uint8Array(n).fill(1);
      for (const a of state.axes) {
        const b = state.brushes.get(a.name);
        if (!b) continue;
        for (let i = 0; i < n; i++) {
          const t = a.pos[i];
          if (!(t >= b[0] - 1e-9 && t <= b[1] + 1e-9)) keep[i] = 0;
        }
      }
      const changed = (before, apply) => {
        for (let i = 0; i < n; i++) if (!before || before[i] !== keep[i]) apply(i, keep[i] === 1);
      };
      changed(state.drawnLines, (i, on) => state.lines[i].classList.toggle("dim", !on));
      state.drawnLines = keep;
      const shown = keep.reduce((s, v) => s + v, 0);
      const count = document.getElementById("sweep-count");
      count.textContent = `${shown} of ${n} selected` + (n < state.data.total ? ` (${state.data.total} match)` : "");
      count.dataset.shown = String(shown);
      if (moving) return;
      changed(state.selected, (i, on) => { state.rows[i].hidden = !on; });
      state.selected = keep;
      const [dim, live] = state.lineGroups;
      state.lines.forEach((line, i) => {
        const group = keep[i] ? live : dim;
        if (line.parentNode !== group) group.appendChild(line);
      });
      drawScatter();
    }

    // -- the runs' table ----------------------------------------------------------------------------------------
    function cellText(column, value) {
      if (value === null || value === undefined) return "";
      return column.type === "category" ? column.categories[value] : mlw.num(value);
    }

    function drawTable() {
      const data = state.data, table = document.getElementById("sweep-runs");
      const params = data.params.filter((p) => p.varies), chosen = metric(pick.metric.value);
      const head = table.tHead, body = table.tBodies[0];
      head.replaceChildren();
      body.replaceChildren();
      const hr = head.insertRow();
      for (const title of ["run", "status", ...params.map((p) => p.name), ...(chosen ? [`${chosen.name} (${statOf(chosen)})`] : [])]) {
        tag("th", title, hr);
      }
      const order = [...Array(data.count).keys()];
      if (chosen) {
        const sign = chosen.direction === "min" ? 1 : -1, v = chosen.values;
        order.sort((i, j) => (v[i] === null) - (v[j] === null) || sign * ((v[i] ?? 0) - (v[j] ?? 0)));
      }
      state.rows = new Array(data.count);
      state.selected = null;
      for (const i of order) {
        const row = body.insertRow();
        row.dataset.id = data.runs.id[i];
        const a = tag("a", data.runs.name[i] || data.runs.id[i], row.insertCell());
        a.href = `/p/${encodeURIComponent(data.project)}/runs/${encodeURIComponent(data.runs.id[i])}`;
        tag("span", data.runs.status[i], row.insertCell(), `status ${data.runs.status[i]}`);
        for (const p of params) {
          const td = tag("td", cellText(p, p.values[i]), row, p.type === "number" ? "num" : "");
          td.dataset.field = p.name;
        }
        if (chosen) tag("td", cellText(chosen, chosen.values[i]), row, "num metric").dataset.field = chosen.name;
        row.addEventListener("mouseenter", () => hot(i, true));
        row.addEventListener("mouseleave", () => hot(i, false));
        state.rows[i] = row;
      }
    }

    function hot(i, on) {
      state.lines[i]?.classList.toggle("hot", on);
      if (on && state.lines[i]) state.lines[i].parentNode.appendChild(state.lines[i]);
      document.querySelector(`#sweep-scatter circle.pt[data-i="${i}"]`)?.classList.toggle("hot", on);
    }

    // -- the scatter and the groups -------------------------------------------------------------------------
    function groupsOf(xName, yMetric, over) {
      const data = state.data, keep = state.selected;
      const keys = data.params.filter((p) => p.varies && p.name !== over);
      const groups = new Map();
      for (let i = 0; i < data.count; i++) {
        const v = yMetric.values[i];
        if (!keep[i] || typeof v !== "number") continue;
        const id = JSON.stringify(keys.map((p) => p.values[i]));
        let g = groups.get(id);
        if (!g) {
          g = {id, values: Object.fromEntries(keys.map((p) => [p.name, p.values[i]])), runs: [], ys: []};
          g.series = JSON.stringify(keys.filter((p) => p.name !== xName).map((p) => p.values[i]));
          groups.set(id, g);
        }
        g.runs.push(i);
        g.ys.push(v);
      }
      for (const g of groups.values()) {
        g.n = g.ys.length;
        g.mean = g.ys.reduce((s, v) => s + v, 0) / g.n;
        g.min = Math.min(...g.ys);
        g.max = Math.max(...g.ys);
      }
      return {keys, groups: [...groups.values()]};
    }

    // series keys (JSON lists of parameter values) in the order of their values, numbers as numbers
    function byValues(a, b) {
      const x = JSON.parse(a), y = JSON.parse(b);
      for (let k = 0; k < x.length; k++) {
        if (x[k] === y[k]) continue;
        if (x[k] === null) return 1;
        if (y[k] === null) return -1;
        return x[k] < y[k] ? -1 : 1;
      }
      return 0;
    }

    function drawScatter() {
      const box = document.getElementById("sweep-scatter"), legend = document.getElementById("sweep-legend");
      box.replaceChildren();
      legend.replaceChildren();
      const xp = param(pick.x.value), ym = metric(pick.y.value), over = pick.group.value;
      const note = document.getElementById("sweep-groups-note");
      if (!xp || !ym) {
        tag("p", "no parameter varies across these runs, or they logged no metric", box, "empty");
        drawGroups(null, ym, over);
        return;
      }
      const width = Math.min(720, Math.max(420, state.widths.scatter || 640)), height = 360;
      const left = 64, right = width - 16, top = 14, bottom = height - 46;
      const ax = axis("param", xp, xp.values), ay = axis("metric", ym, ym.values);
      const pad = (t) => 0.04 + 0.92 * t;
      const X = (t) => left + pad(t) * (right - left), Y = (t) => bottom - pad(t) * (bottom - top);
      const plot = svg("svg", {width, height, viewBox: `0 0 ${width} ${height}`, class: "scatter", role: "img",
                               "aria-label": `scatter of ${ym.name} against ${xp.name}`,
                               "data-x": xp.name, "data-y": ym.name}, box);
      svg("line", {x1: left, x2: right, y1: bottom, y2: bottom, class: "frame"}, plot);
      svg("line", {x1: left, x2: left, y1: top, y2: bottom, class: "frame"}, plot);
      let last = -Infinity;
      for (const [t, label] of ax.ticks) {
        if (X(t) - last < 7 * label.length + 8) continue;  // labels would overlap
        last = X(t);
        text(plot, X(t), bottom + 16, label, {class: "tick-label", "text-anchor": "middle"});
      }
      last = Infinity;
      for (const [t, label] of ay.ticks) {
        if (Math.abs(last - Y(t)) < 12) continue;
        last = Y(t);
        svg("line", {x1: left, x2: right, y1: Y(t), y2: Y(t), class: "grid"}, plot);
        text(plot, left - 6, Y(t) + 4, label, {class: "tick-label", "text-anchor": "end"});
      }
      text(plot, (left + right) / 2, height - 8, xp.name, {class: "title", "text-anchor": "middle"});
      text(plot, 14, (top + bottom) / 2, `${ym.name} (${statOf(ym)})`,
           {class: "title", "text-anchor": "middle", transform: `rotate(-90 14 ${(top + bottom) / 2})`});
      const points = svg("g", {class: "points"}, plot);
      for (let i = 0; i < state.data.count; i++) {
        if (Number.isNaN(ax.pos[i]) || Number.isNaN(ay.pos[i])) continue;
        const on = state.selected[i] === 1;
        svg("circle", {cx: X(ax.pos[i]).toFixed(1), cy: Y(ay.pos[i]).toFixed(1), r: on ? 3.5 : 2.5,
                       class: on ? "pt" : "pt dim", "data-i": i, "data-id": state.data.runs.id[i]}, points);
      }
      if (!over) { note.textContent = "choose a field to group over (the runs that differ only in it)"; drawGroups(null, ym, over); return; }
      if (over === xp.name) { note.textContent = `${over} is the scatter's x axis: group over another field`; drawGroups(null, ym, over); return; }
      const {keys, groups} = groupsOf(xp.name, ym, over);
      if (groups.every((g) => g.n === 1)) {
        note.textContent = `no two kept runs differ only in ${over}: nothing to average`;
        drawGroups(null, ym, over);
        return;
      }
      const all = [...new Set(groups.map((g) => g.series))].sort(byValues), series = all.slice(0, MAX_SERIES);
      note.textContent = `over ${over}: mean, min and max of ${ym.name} per group` +
        (all.length > series.length ? ` (bands of the first ${series.length} of ${all.length} series)` : "");
      const bands = svg("g", {class: "bands"}, plot);
      plot.insertBefore(bands, points);
      series.forEach((s, k) => {
        const members = groups.filter((g) => g.series === s && !Number.isNaN(ax.t(g.values[xp.name])))
          .sort((a, b) => ax.t(a.values[xp.name]) - ax.t(b.values[xp.name]));
        if (!members.length) return;
        const colour = COLORS[k % COLORS.length];
        const px = (g) => X(ax.t(g.values[xp.name])).toFixed(1), py = (v) => Y(ay.t(v)).toFixed(1);
        const edge = [...members.map((g) => `${px(g)},${py(g.max)}`), ...[...members].reverse().map((g) => `${px(g)},${py(g.min)}`)];
        svg("polygon", {points: edge.join(" "), class: "band", fill: colour, "data-series": s}, bands);
        svg("polyline", {points: members.map((g) => `${px(g)},${py(g.mean)}`).join(" "), class: "mean-line",
                         stroke: colour, "data-series": s}, bands);
        for (const g of members) {
          const c = svg("circle", {cx: px(g), cy: py(g.mean), r: 4.5, class: "mean", fill: colour, "data-key": g.id}, bands);
          svg("title", {}, c).textContent = `mean ${mlw.num(g.mean)} (min ${mlw.num(g.min)}, max ${mlw.num(g.max)}, ${g.n} runs)`;
        }
        const label = keys.filter((p) => p.name !== xp.name).map((p) => `${p.name}=${cellText(p, members[0].values[p.name])}`).join(", ");
        const item = tag("span", null, legend, "item");
        tag("span", null, item, "swatch").style.background = colour;
        item.append(label || "all runs");
      });
      drawGroups({keys, groups}, ym, over);
    }

    function drawGroups(grouped, ym, over) {
      const table = document.getElementById("sweep-groups");
      table.tHead.replaceChildren();
      table.tBodies[0].replaceChildren();
      if (!grouped || !ym) return;
      const hr = table.tHead.insertRow();
      for (const title of [...grouped.keys.map((p) => p.name), `runs (${over})`, "mean", "min", "max"]) tag("th", title, hr);
      const sign = ym.direction === "min" ? 1 : -1;
      const sorted = [...grouped.groups].sort((a, b) => sign * (a.mean - b.mean));
      if (sorted.length > MAX_GROUPS) {
        const td = tag("td", `and ${sorted.length - MAX_GROUPS} more groups`, table.tBodies[0].insertRow(), "empty");
        td.colSpan = grouped.keys.length + 4;
      }
      for (const g of sorted.slice(0, MAX_GROUPS)) {
        const row = table.tBodies[0].insertRow();
        row.dataset.key = g.id;
        for (const p of grouped.keys) tag("td", cellText(p, g.values[p.name]), row, p.type === "number" ? "num" : "").dataset.field = p.name;
        for (const [field, value] of [["n", String(g.n)], ["mean", mlw.num(g.mean)], ["min", mlw.num(g.min)], ["max", mlw.num(g.max)]]) {
          tag("td", value, row, "num").dataset.field = field;
        }
      }
    }

    // one run under the pointer, in words (one listener for every line and point, not a title on each of them)
    function hover(event) {
      const target = event.target.closest("path.line, circle.pt");
      const out = document.getElementById("sweep-hover");
      if (!target) return;
      const i = Number(target.dataset.i), data = state.data, chosen = metric(pick.metric.value);
      const params = data.params.filter((p) => p.varies).map((p) => `${p.name}=${cellText(p, p.values[i])}`);
      if (chosen) params.push(`${chosen.name}=${cellText(chosen, chosen.values[i])}`);
      out.textContent = `${data.runs.name[i] || ""} (${data.runs.id[i]}): ${params.join(", ")}`;
    }

    // -- controls ---------------------------------------------------------------------------------------------
    for (const id of ["sweep-parallel", "sweep-scatter"]) document.getElementById(id).addEventListener("mouseover", hover);
    pick.metric.addEventListener("change", () => { pick.y.value = pick.metric.value; build(); });
    pick.x.addEventListener("change", drawScatter);
    pick.y.addEventListener("change", drawScatter);
    pick.group.addEventListener("change", () => { pick.group.dataset.touched = "1"; drawScatter(); });
    document.getElementById("sweep-clear").addEventListener("click", () => {
      state.brushes.clear();
      drawParallel();
      select();
    });
    pick.stat.addEventListener("change", async () => {
      const data = await load(pick.stat.value);
      state.brushes.delete(pick.metric.value);  // its values are another stat's now
      if (data) start(data);
    });
    load(root.dataset.stat).then((data) => {
      if (!data) return;
      if (!data.count) { status.textContent = "no runs match"; return; }
      start(data);
      root.dataset.ready = "1";
    });
  }

  return {page, axis, niceTicks};
})();
