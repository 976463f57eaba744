// mlwarehouse UI: what every page's script shares (fetching /api, cells and elements, times and numbers as the
// tables show them) and the live champion panel (run charts: runs.js; the task board: tasks.js; the sweep view:
// sweep.js; each needs this file first). No framework, no network beyond this server: data is fetched from /api and
// written into the page with textContent (never as HTML).
"use strict";
const mlw = (() => {
  const api = (project) => `/api/p/${encodeURIComponent(project)}`;

  async function getJSON(url, options) {
    const response = await fetch(url, options);
    const body = await response.json().catch(() => ({error: response.statusText}));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  // a new cell of `row` holding `child` (a node, or text written with textContent)
  function cell(row, child, className) {
    const td = row.insertCell();
    if (className) td.className = className;
    if (child instanceof Node) td.appendChild(child);
    else if (child !== undefined && child !== null) td.textContent = child;
    return td;
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  const when = (t) => (typeof t === "string" && t.length >= 19) ? t.slice(0, 19).replace("T", " ") : (t || "");

  // Numbers as the server's tables show them (Python's "%.4g": 4 significant digits, exponent below 1e-4 and
  // from 1e4 on); integers as they are.
  function num(value, sign) {
    if (typeof value !== "number") return value === null || value === undefined ? "" : String(value);
    const plus = sign && value >= 0 ? "+" : "";
    if (Number.isInteger(value) && !sign) return String(value);
    if (!Number.isFinite(value)) return plus + String(value);
    const strip = (text) => text.includes(".") ? text.replace(/0+$/, "").replace(/\.$/, "") : text;
    const [mantissa, power] = value.toExponential(3).split("e");
    const exp = Number(power);
    if (exp < -4 || exp >= 4) {
      return plus + strip(mantissa) + "e" + (exp < 0 ? "-" : "+") + String(Math.abs(exp)).padStart(2, "0");
    }
    return plus + strip(value.toFixed(3 - exp));
  }

  function link(href, text) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    return a;
  }

  function span(text, className) {
    const s = document.createElement("span");
    if (className) s.className = className;
    s.textContent = text;
    return s;
  }

  // One row of the champion panel, the same as templates/_champions.html draws it.
  function aliasRow(tbody, a) {
    const row = tbody.insertRow();
    row.dataset.spelling = a.spelling;
    row.dataset.model = a.model || "";
    if (a.removed) row.className = "removed";
    const code = document.createElement("code");
    code.className = "alias";
    code.textContent = a.spelling;
    cell(row).appendChild(code);
    const holder = cell(row, null, "holder");
    if (a.removed) holder.appendChild(span("removed", "tag removed"));
    else if (a.model_href) holder.appendChild(link(a.model_href, a.model));
    else holder.append(a.model + " ", span("(deleted)", "muted"));
    const history = link(a.history_href, `${a.changes} change${a.changes === 1 ? "" : "s"}`);
    history.className = "history";
    cell(row).appendChild(history);
    cell(row, a.headline, "headline");
    const evals = cell(row, null, "evals");
    if (!a.evaluations.length) evals.appendChild(span("none recorded", "muted"));
    for (const e of a.evaluations) {
      const div = document.createElement("div");
      div.className = e.change ? `eval ${e.change}` : "eval";
      div.dataset.metric = e.metric;
      const value = document.createElement("b");
      value.className = "value";
      value.textContent = num(e.value);
      div.append(e.metric + " ", value, " on ");
      div.appendChild(e.data_href ? link(e.data_href, e.data_label) : span(e.data_label, "data"));
      if (e.fold) {
        const fold = document.createElement("code");
        fold.className = "fold";
        fold.textContent = e.fold;
        div.append(" ", fold);
      }
      if (e.delta !== null && e.delta !== undefined) {
        const delta = span(`was ${num(e.previous_value)}, ${num(e.delta, true)}`, "delta");
        delta.title = `${e.change} (${e.direction === "max" ? "higher" : "lower"} is better)`;
        div.append(" ", delta);
      }
      evals.appendChild(div);
    }
    const previous = cell(row, null, "previous");
    if (a.previous_href) {
      const prev = link(a.previous_href, a.previous.slice(-8));
      prev.title = a.previous;
      previous.appendChild(prev);
    } else if (a.previous) {
      const short = span(a.previous.slice(-8));
      short.title = a.previous;
      previous.append(short, " ", span("(deleted)", "muted"));
    }
    const set = cell(row, null, "set");
    set.title = a.reason || "";
    set.appendChild(span(when(a.changed), "changed"));
    if (a.by) set.append(" by ", span(a.by, "by"));
    return row;
  }

  // The champion panel of the models page: re-drawn from /api/p/<project>/aliases every 2 s while the page is
  // visible, only when something changed; a row whose holder moved since the last drawing is marked "moved".
  function championsPanel(project) {
    const panel = document.getElementById("champions");
    if (!panel) return;
    const tbody = panel.querySelector("tbody");
    const live = document.getElementById("champions-live");
    let last = null;
    const refresh = async () => {
      try {
        const data = await getJSON(`${api(project)}/aliases`);
        const text = JSON.stringify(data);
        if (text !== last) {
          const before = new Map([...tbody.querySelectorAll("tr[data-spelling]")]
            .map((r) => [r.dataset.spelling, r.dataset.model]));
          tbody.replaceChildren();
          for (const a of data.aliases) {
            const row = aliasRow(tbody, a);
            if (before.has(a.spelling) && before.get(a.spelling) !== (a.model || "")) row.classList.add("moved");
          }
          if (!data.aliases.length) {
            const td = cell(tbody.insertRow(), "no alias is set in this project: point one at a model with ", "empty");
            const hint = document.createElement("code");
            hint.textContent = 'wh.models.aliases.set("mlp", "champion", model)';
            td.appendChild(hint);
            td.colSpan = 7;
            td.parentElement.className = "none";
          }
          document.getElementById("champions-held").textContent = data.held;
          document.getElementById("champions-removed").textContent = data.removed;
          last = text;
        }
        live.textContent = `live, updated ${new Date().toLocaleTimeString()}`;
        live.className = "muted";
      } catch (err) {
        live.textContent = `not updated: ${err.message}`;
        live.className = "error";
      }
    };
    setInterval(() => { if (!document.hidden) refresh(); }, 2000);
  }

  return {championsPanel, num, api, getJSON, cell, el, when};
})();
