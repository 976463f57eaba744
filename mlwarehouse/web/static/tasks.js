// mlwarehouse UI: the live task board. Polls /api/p/<project>/tasks/page with the page's own query (q, limit and
// the keyset cursor before/after from the address bar) every 2 s while the page is visible, and re-draws the rows,
// the counts and the pager when something changed, the way templates/tasks.html draws them. Text is written with
// textContent only (never as HTML). Cancel and retry buttons (a writable UI) POST with the X-MLW header. Needs app.js.
"use strict";
const mlwTasks = (() => {
  const {api, getJSON, cell, el, when} = mlw;

  function taskRow(tbody, project, t, writable) {
    const row = tbody.insertRow();
    row.dataset.id = t.id;
    row.dataset.status = t.status;
    const link = el("a", t.task_name);
    link.href = `/p/${encodeURIComponent(project)}/tasks/${encodeURIComponent(t.id)}`;
    cell(row, link);
    cell(row, el("span", t.status, `status ${t.status}`));
    cell(row, `${t.attempts}/${t.max_attempts}`, "num");
    cell(row, el("code", JSON.stringify(t.hyper_parameters)));
    cell(row, t.result !== null && t.result !== undefined ? el("code", JSON.stringify(t.result)) : null);
    cell(row, t.worker || "");
    cell(row, when(t.started));
    cell(row, when(t.ended));
    const tail = el("div", null, "tail");
    const inner = el("div");
    if (t.output_tail) inner.appendChild(el("pre", t.output_tail, "out"));
    if (t.error_tail) inner.appendChild(el("pre", t.error_tail, "err"));
    tail.appendChild(inner);
    cell(row, tail, "output");
    if (writable) {
      const action = ["pending", "running"].includes(t.status) ? "cancel"
                   : ["failed", "cancelled"].includes(t.status) ? "retry" : null;
      const td = cell(row);
      if (action) {
        const button = el("button", action, "act");
        button.dataset.action = action;
        td.appendChild(button);
      }
    }
  }

  function pager(data, params) {
    const nav = document.getElementById("task-pager");
    if (!nav) return;
    const n = data.rows.length;
    nav.querySelector(".range").textContent = n ? `tasks ${data.offset + 1}–${data.offset + n} of ${data.total}`
                                                : `no tasks on this page (of ${data.total})`;
    const link = (cls, key, value) => {
      const a = nav.querySelector(`a.${cls}`);
      const next = new URLSearchParams();
      if (params.get("q")) next.set("q", params.get("q"));
      next.set("limit", String(data.limit));
      if (key) next.set(key, value);
      const shown = cls === "newest" ? !!data.newer : !!value;
      a.hidden = !shown;
      if (shown) a.href = `?${next}`; else a.removeAttribute("href");
    };
    link("newest", null, null);
    link("newer", "after", data.newer);
    link("older", "before", data.older);
  }

  function board(project, writable) {
    if (document.querySelector(".error[role=alert]")) return;  // a bad query: nothing to poll
    const tbody = document.querySelector("#tasks tbody");
    const live = document.getElementById("live");
    const params = new URLSearchParams(location.search);
    const query = new URLSearchParams();
    for (const key of ["q", "text", "limit", "before", "after"]) if (params.get(key)) query.set(key, params.get(key));
    let last = null;
    const refresh = async () => {
      try {
        const data = await getJSON(`${api(project)}/tasks/page?${query}`);
        const text = JSON.stringify(data);
        if (text !== last) {
          tbody.replaceChildren();
          data.rows.forEach((t) => taskRow(tbody, project, t, writable));
          if (!data.rows.length) {
            const td = cell(tbody.insertRow(), `no tasks${params.get("q") ? " match this query" : ""}`, "empty");
            td.colSpan = writable ? 10 : 9;
          }
          for (const [status, n] of Object.entries(data.counts)) {
            const b = document.querySelector(`#counts b[data-status="${status}"]`);
            if (b) b.textContent = n;
          }
          pager(data, params);
          last = text;
        }
        live.textContent = `live, updated ${new Date().toLocaleTimeString()}`;
        live.className = "muted";
      } catch (err) {
        live.textContent = `not updated: ${err.message}`;
        live.className = "error";
      }
    };
    if (writable) tbody.addEventListener("click", async (event) => {
      const button = event.target.closest("button.act");
      if (!button) return;
      const id = button.closest("tr").dataset.id;
      try {
        await getJSON(`${api(project)}/tasks/${encodeURIComponent(id)}/${button.dataset.action}`,
                      {method: "POST", headers: {"X-MLW": "1"}});
      } catch (err) { live.textContent = err.message; live.className = "error"; }
      refresh();
    });
    setInterval(() => { if (!document.hidden) refresh(); }, 2000);
  }

  return {board, taskRow};
})();
