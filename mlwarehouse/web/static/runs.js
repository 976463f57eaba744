// mlwarehouse UI: the run page and the run comparison. Every metric of the shown runs as its own small chart
// (uPlot), losses first, one-point metrics as numbers; x on the step, the epoch or the wall time; EMA smoothing;
// a log y scale; charts of running runs refreshed every 2 s. On the runs page each table row has a colour, and
// the lines, the legend and the diff view use the same one. Data comes from /api (one request for every metric,
// downsampled on the server) and is written into the page with textContent, never as HTML. Needs app.js.
"use strict";
const mlwRuns = (() => {
  // 20 distinct colours (Tableau 10, then their darker and lighter kin): row i of the table draws in COLORS[i]
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                  "#7f7f7f", "#bcbd22", "#0b3d91", "#8b0000", "#006400", "#b35900", "#4b0082", "#5c3317",
                  "#c71585", "#00868b", "#3d3d3d", "#6b6b00"];
  const colorOf = (i) => COLORS[i % COLORS.length];
  const api = mlw.api;
  const X_LABELS = {step: "step", epoch: "epoch", time: "wall time (s)"};
  const LIVE_MS = 2000;

  const {getJSON, num, el} = mlw;  // el(tag, text, className)

  function swatch(color) {
    const s = el("span", null, "swatch");
    s.style.background = color;
    return s;
  }

  // TensorBoard's debiased exponential moving average; gaps (null) stay gaps
  function ema(values, weight) {
    if (!weight) return values;
    let last = 0, n = 0;
    return values.map((v) => {
      if (v === null || !Number.isFinite(v)) return null;
      n += 1;
      last = last * weight + (1 - weight) * v;
      return last / (1 - Math.pow(weight, n));
    });
  }

  // The controls of a page (x axis, smoothing, log y), remembered in this browser.
  function controls(onChange) {
    const x = document.getElementById("x-axis"), smooth = document.getElementById("smoothing");
    const logy = document.getElementById("log-y"), shown = document.getElementById("smoothing-value");
    const saved = JSON.parse(localStorage.getItem("mlw.charts") || "{}");
    if (saved.x && [...x.options].some((o) => o.value === saved.x)) x.value = saved.x;
    if (typeof saved.smooth === "number") smooth.value = String(saved.smooth);
    if (typeof saved.logy === "boolean") logy.checked = saved.logy;
    const state = () => ({x: x.value, smooth: Number(smooth.value), logy: logy.checked});
    const save = () => { localStorage.setItem("mlw.charts", JSON.stringify(state())); shown.textContent = smooth.value; };
    save();
    x.addEventListener("change", () => { save(); onChange(true); });
    smooth.addEventListener("input", () => { save(); onChange(false); });
    logy.addEventListener("change", () => { save(); onChange(false); });
    return state;
  }

  // The small multiples of one /runs/points answer in `box`: numbers first (metrics of at most one point per
  // run), then one chart per metric. `colors` maps run id -> colour, `labels` run id -> legend text.
  function Grid(box) {
    const plots = new Map();  // metric key -> uPlot
    let last = null;

    function clear() { plots.forEach((p) => p.destroy()); plots.clear(); box.replaceChildren(); }

    function numbers(metrics, runs, colors) {
      const strip = el("div", null, "numbers");
      for (const m of metrics) {
        const card = el("div", null, "number-card");
        card.dataset.metric = m.key;
        card.appendChild(el("h3", m.key));
        for (const s of m.series) {
          const row = el("div", null, "number");
          row.dataset.run = s.id;
          if (runs.length > 1) row.append(swatch(colors[s.id]), el("span", runs.find((r) => r.id === s.id).label, "label"));
          row.appendChild(el("b", num(s.last), "value"));
          card.appendChild(row);
        }
        strip.appendChild(card);
      }
      return strip;
    }

    function chart(card, m, body, colors, labels, view, width) {
      const smooth = view.smooth, logy = view.logy;
      const drawn = m.series.filter((s) => s.x.length > 0);
      card.dataset.series = String(drawn.length);
      card.dataset.points = String(drawn.reduce((n, s) => n + s.x.length, 0));
      card.dataset.count = String(m.series.reduce((n, s) => n + s.count, 0));
      const plotBox = card.querySelector(".plot");
      const old = plots.get(m.key);
      if (old) { old.destroy(); plots.delete(m.key); }
      plotBox.replaceChildren();
      const note = card.querySelector(".note");
      const missing = m.series.reduce((n, s) => n + s.missing_x, 0);
      note.textContent = missing ? `${missing} point${missing === 1 ? "" : "s"} without ${body.x === "time" ? "a time" : "an " + body.x}` : "";
      if (!drawn.length) { plotBox.appendChild(el("p", `no points on the ${body.x} axis`, "empty")); return; }
      const clean = (v) => (logy && !(v > 0)) ? null : v;
      const tables = drawn.map((s) => {
        const raw = s.y.map(clean);
        return smooth ? [s.x, raw, ema(raw, smooth)] : [s.x, raw];
      });
      const data = drawn.length === 1 ? tables[0] : uPlot.join(tables);
      const series = [{label: X_LABELS[body.x]}];
      for (const s of drawn) {
        const color = colors[s.id];
        if (smooth) series.push({label: `${labels[s.id]} (raw)`, stroke: color + "38", width: 1, spanGaps: true,
                                 points: {show: false}});
        series.push({label: labels[s.id], stroke: color, width: 1.5, spanGaps: true});
      }
      const readout = card.querySelector(".readout");
      const plot = new uPlot({
        width, height: 190, legend: {show: false}, cursor: {sync: {key: "mlw-runs"}},
        scales: {x: {time: false}, y: logy ? {distr: 3} : {}},
        series, axes: [{label: X_LABELS[body.x], labelSize: 18, size: 36}, {size: 52}],
        hooks: {setCursor: [(u) => {
          const i = u.cursor.idx;
          if (i === null || i === undefined) { readout.textContent = ""; return; }
          const parts = [];
          for (let k = 1; k < u.series.length && parts.length < 6; k++) {
            if (smooth && u.series[k].label.endsWith(" (raw)")) continue;
            const v = u.data[k][i];
            if (v !== null && v !== undefined) parts.push(`${drawn.length > 1 ? u.series[k].label + " " : ""}${num(v)}`);
          }
          readout.textContent = `${X_LABELS[body.x]} ${num(u.data[0][i])}: ${parts.join(", ")}`;
        }]},
      }, data, plotBox);
      plots.set(m.key, plot);
    }

    // draw `body` (an answer of /runs/points); charts already on the page are redrawn in place
    function draw(body, colors, view) {
      last = {body, colors, view};
      const labels = Object.fromEntries(body.runs.map((r) => [r.id, r.label]));
      const single = body.metrics.filter((m) => m.single), curves = body.metrics.filter((m) => !m.single);
      const signature = body.x + "|" + body.metrics.map((m) => m.key + (m.single ? "#" : "")).join(",");
      if (box.dataset.signature !== signature) { clear(); box.dataset.signature = signature; }
      const oldStrip = box.querySelector(".numbers");
      const strip = numbers(single, body.runs, colors);
      if (oldStrip) oldStrip.replaceWith(strip); else box.prepend(strip);
      strip.hidden = !single.length;
      let grid = box.querySelector(".charts-grid");
      if (!grid) { grid = el("div", null, "charts-grid"); box.appendChild(grid); }
      grid.classList.toggle("one", curves.length === 1);
      for (const m of curves) {
        let card = grid.querySelector(`.chart-card[data-metric="${CSS.escape(m.key)}"]`);
        if (!card) {
          card = el("div", null, "chart-card");
          card.dataset.metric = m.key;
          const head = el("div", null, "card-head");
          head.append(el("h3", m.key), el("span", null, "note muted"));
          card.append(head, el("div", null, "plot"), el("div", null, "readout muted"));
          grid.appendChild(card);
        }
        const width = Math.max(260, Math.floor(card.clientWidth - 16));
        chart(card, m, body, colors, labels, view, width);
      }
    }

    function redraw(view) { if (last) draw(last.body, last.colors, view); }
    function widest() { const c = box.querySelector(".chart-card"); return c ? c.clientWidth : box.clientWidth / 2; }
    return {draw, redraw, clear, widest};
  }

  // Call `redraw` 200 ms after the window's width settles; a change of height alone (a full-page screenshot,
  // a mobile toolbar) redraws nothing, so charts are not rebuilt under a reader's cursor.
  function onWidthChange(redraw) {
    let timer = null, width = window.innerWidth;
    window.addEventListener("resize", () => {
      if (window.innerWidth === width) return;
      width = window.innerWidth;
      clearTimeout(timer);
      timer = setTimeout(redraw, 200);
    });
  }

  function pointsWanted(grid, box) {
    const width = grid.widest() || box.clientWidth || 600;
    return Math.max(200, Math.min(2000, Math.round(2 * width)));
  }

  // Poll `refresh` every 2 s while the page is visible and `running()` is true; refresh once more when it ends.
  function live(refresh, running, badge) {
    let timer = null;
    const schedule = () => {
      if (timer !== null) return;
      if (running()) {
        timer = setTimeout(tick, LIVE_MS);
        if (badge) { badge.textContent = "live"; badge.className = "live"; }
      } else if (badge) badge.textContent = "";
    };
    const tick = async () => {
      timer = null;
      if (!document.hidden) await refresh();
      schedule();
    };
    return schedule;
  }

  function runPage(project, runId) {
    const box = document.getElementById("charts");
    if (!box) return;
    const status = document.getElementById("charts-status"), badge = document.getElementById("charts-live");
    const runStatus = document.getElementById("run-status");
    const grid = Grid(box);
    let current = null;
    const view = controls((refetch) => refetch ? load() : grid.redraw(view()));
    const colors = {[runId]: colorOf(0)};
    const running = () => current !== null && current.runs[0].status === "running";
    const watch = live(() => load(), running, badge);
    async function load() {
      const v = view();
      try {
        current = await getJSON(`${api(project)}/runs/points?ids=${encodeURIComponent(runId)}` +
                                `&x=${v.x}&points=${pointsWanted(grid, box)}`);
      } catch (err) { status.textContent = err.message; status.className = "error"; return; }
      status.className = "muted";
      const charts = current.metrics.filter((m) => !m.single).length;
      status.textContent = current.metrics.length ? `${charts} chart${charts === 1 ? "" : "s"}, ` +
        `${current.metrics.length - charts} number${current.metrics.length - charts === 1 ? "" : "s"}` : "no metrics logged";
      const r = current.runs[0];
      if (runStatus && runStatus.textContent !== r.status) { runStatus.textContent = r.status; runStatus.className = `status ${r.status}`; }
      grid.draw(current, colors, view());
      watch();
    }
    load();
    onWidthChange(() => grid.redraw(view()));
  }

  // the diff of /runs/compare: a column per run, a row per hyper-parameter and per metric (its last value, min,
  // max and point count in the title); rows where the runs differ are marked, and "only differences" hides the rest
  function diffTable(box, body, colors) {
    const wasOnly = Boolean(box.querySelector("#diff-only:checked"));  // kept over live refreshes
    box.replaceChildren();
    if (body.runs.length < 2) return;
    const table = el("table", null, "diff");
    table.id = "diff-table";
    const head = table.createTHead().insertRow();
    head.appendChild(el("th", ""));
    for (const r of body.runs) {
      const th = el("th", null, "run");
      th.dataset.run = r.id;
      th.style.borderTopColor = colors[r.id];
      const a = el("a", r.label);
      a.href = `/p/${encodeURIComponent(box.dataset.project)}/runs/${encodeURIComponent(r.id)}`;
      th.append(swatch(colors[r.id]), a);
      head.appendChild(th);
    }
    const tbody = table.createTBody();
    const section = (title) => { const td = el("td", title, "section"); td.colSpan = body.runs.length + 1; tbody.insertRow().appendChild(td); };
    const row = (key, cells, differs, kind) => {
      const tr = tbody.insertRow();
      tr.dataset.key = key;
      tr.dataset.kind = kind;
      tr.className = differs ? "differs" : "same";
      tr.appendChild(el("th", key));
      const first = cells[0] ? cells[0].text : null;
      for (const c of cells) {
        const td = el("td", c ? c.text : "", "num");
        if (c && c.title) td.title = c.title;
        if (differs && (c ? c.text : null) !== first) td.classList.add("changed");
        tr.appendChild(td);
      }
    };
    section("hyper-parameters");
    for (const p of body.params) row(p.key, p.values.map((v) => v === null ? null : {text: v}), p.differs, "param");
    section("metrics (last value)");
    for (const m of body.metrics) {
      row(m.key, m.stats.map((s) => s ? {text: num(s.last), title: `min ${num(s.min)}, max ${num(s.max)}, ${s.count} points`} : null),
          m.differs, "metric");
    }
    const only = el("label", null, "only");
    const box2 = el("input");
    box2.type = "checkbox";
    box2.id = "diff-only";
    only.append(box2, " only differences");
    box2.checked = wasOnly;
    table.classList.toggle("only-differences", wasOnly);
    box2.addEventListener("change", () => table.classList.toggle("only-differences", box2.checked));
    const differ = body.params.filter((p) => p.differs).length + body.metrics.filter((m) => m.differs).length;
    const title = el("h2", "Diff ");
    title.appendChild(el("small", `${differ} of ${body.params.length + body.metrics.length} rows differ`));
    const scroll = el("div", null, "scroll");
    scroll.appendChild(table);
    box.append(title, only, scroll);
  }

  function runsPage(project) {
    const rows = [...document.querySelectorAll("#runs tbody tr[data-id]")];
    const colors = {};
    rows.forEach((tr, i) => {
      const color = colorOf(i);
      colors[tr.dataset.id] = color;
      tr.dataset.color = color;
      const s = tr.querySelector(".swatch");
      if (s) s.style.background = color;
    });
    const picked = () => rows.filter((tr) => tr.querySelector("input.pick").checked).map((tr) => tr.dataset.id);
    const mark = () => rows.forEach((tr) => {
      const on = tr.querySelector("input.pick").checked;
      tr.classList.toggle("picked", on);
      tr.style.boxShadow = on ? `inset 4px 0 0 ${tr.dataset.color}` : "";
    });
    const all = document.getElementById("select-all");
    if (all) all.addEventListener("change", () => { rows.forEach((tr) => { tr.querySelector("input.pick").checked = all.checked; }); mark(); });
    document.querySelectorAll("#runs input.pick").forEach((b) => b.addEventListener("change", mark));
    const box = document.getElementById("charts"), status = document.getElementById("compare-status");
    const legend = document.getElementById("legend"), diff = document.getElementById("diff");
    const badge = document.getElementById("charts-live"), metric = document.getElementById("metric");
    diff.dataset.project = project;
    const grid = Grid(box);
    let ids = [], current = null;
    const view = controls((refetch) => { if (!ids.length) return; if (refetch) load(); else grid.redraw(view()); });
    const running = () => current !== null && current.runs.some((r) => r.status === "running");
    const watch = live(() => load(true), running, badge);
    async function load(again) {
      const v = view();
      const only = metric && metric.value ? `&metrics=${encodeURIComponent(metric.value)}` : "";
      const list = ids.map(encodeURIComponent).join(",");
      if (!again) status.textContent = "loading…";
      let diffBody;
      try {
        [current, diffBody] = await Promise.all([
          getJSON(`${api(project)}/runs/points?ids=${list}&x=${v.x}&points=${pointsWanted(grid, box)}${only}`),
          ids.length > 1 ? getJSON(`${api(project)}/runs/compare?ids=${list}`) : Promise.resolve(null)]);
      } catch (err) { status.textContent = err.message; status.className = "error"; return; }
      status.className = "muted";
      legend.replaceChildren();
      for (const r of current.runs) {
        const item = el("span", null, "entry");
        item.dataset.run = r.id;
        item.append(swatch(colors[r.id]), el("span", r.label, "label"));
        legend.appendChild(item);
      }
      const charts = current.metrics.filter((m) => !m.single).length;
      const counts = current.metrics.flatMap((m) => m.series.map((s) => s.count));
      const shown = current.metrics.flatMap((m) => m.series.map((s) => s.x.length));
      const thinned = counts.some((c, i) => c > shown[i]);
      status.textContent = `${current.runs.length} run${current.runs.length === 1 ? "" : "s"}: ${charts} chart` +
        `${charts === 1 ? "" : "s"}, ${current.metrics.length - charts} shown as numbers` +
        (thinned ? ` · long curves drawn from at most ${current.points} points each (min and max kept)` : "");
      grid.draw(current, colors, view());
      if (diffBody) diffTable(diff, diffBody, colors); else diff.replaceChildren();
      watch();
    }
    document.getElementById("compare").addEventListener("click", () => {
      ids = picked();
      if (!ids.length) { status.textContent = "select at least one run"; return; }
      grid.clear();
      box.dataset.signature = "";
      load();
    });
    if (metric) metric.addEventListener("change", () => { if (ids.length) { grid.clear(); box.dataset.signature = ""; load(); } });
    onWidthChange(() => grid.redraw(view()));
  }

  return {runPage, runsPage, ema, num, COLORS};
})();
