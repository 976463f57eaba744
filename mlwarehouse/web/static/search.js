// mlwarehouse UI: the list pages' text search and saved views (templates/_query.html).
// Typing in the search box re-opens the page (location.replace, debounced: no history entry per key) with the
// form's q, text, sort and columns, so the rows are exactly the server-rendered ones and the address is always
// shareable; the box gets its focus and caret back. Same-page links (sort columns, pager, checkpoints) keep the
// text and the chosen columns (runs, models: the "columns" box, applied on Enter). A saved view keeps them too. The
// task board's poll (static/tasks.js) is given the text too. Saved views are listed from /api/p/<project>/views;
// saving and deleting (a writable UI) send the X-MLW header. Text is written with textContent only.
"use strict";
(() => {
  const form = document.getElementById("query-form");
  if (!form) return;
  const project = form.dataset.project, page = form.dataset.page;
  const api = `/api/p/${encodeURIComponent(project)}/views`;
  const box = document.getElementById("text-search");
  const FOCUS = "mlw-search-caret";
  const text = () => new URLSearchParams(location.search).get("text") || "";
  const kept = () => ["text", "columns"].filter((key) => new URLSearchParams(location.search).get(key));
  const chosenColumns = (value) => value.split(",").map((c) => c.trim()).filter(Boolean);

  function address() {  // the page for what the form holds now, other parameters (limit, checkpoints) kept
    const params = new URLSearchParams(location.search);
    for (const key of ["before", "after", "skip"]) params.delete(key);  // a new search starts at the first page
    for (const [key, value] of new FormData(form)) params.set(key, value);
    if (!params.get("columns")) params.delete("columns");  // no choice: the page's default columns
    return `${location.pathname}?${params}`;
  }

  let timer = null;
  box.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      if (box.value.trim() === text().trim()) return;
      box.classList.add("busy");
      sessionStorage.setItem(FOCUS, String(box.selectionStart ?? box.value.length));
      location.replace(address());
    }, 350);
  });
  const caret = sessionStorage.getItem(FOCUS);
  if (caret !== null) {
    sessionStorage.removeItem(FOCUS);
    box.focus();
    const at = Math.min(Number(caret) || box.value.length, box.value.length);
    box.setSelectionRange(at, at);
  }

  document.addEventListener("click", (event) => {  // links to this page (another sort or page) keep text, columns
    const a = event.target.closest("a[href]");
    if (!a || a.classList.contains("clear") || !kept().length) return;
    const url = new URL(a.href, location.href);
    if (url.origin !== location.origin || url.pathname !== location.pathname) return;
    const here = new URLSearchParams(location.search);
    for (const key of kept()) if (!url.searchParams.has(key)) url.searchParams.set(key, here.get(key));
    a.href = url.pathname + url.search;
  }, true);

  const select = document.getElementById("views-select");
  const status = document.getElementById("views-status");
  const name = document.getElementById("view-name");
  const save = document.getElementById("save-view"), remove = document.getElementById("delete-view");
  const say = (message, bad) => { status.textContent = message; status.className = bad ? "error" : "muted"; };

  async function call(url, options) {
    const response = await fetch(url, options);
    const body = await response.json().catch(() => ({error: response.statusText}));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  async function list(chosen) {
    const found = await call(`${api}?page=${encodeURIComponent(page)}`);
    select.replaceChildren(new Option(found.views.length ? "saved views…" : "no saved views", ""));
    for (const v of found.views) {
      const option = new Option(v.name, v.url);
      option.dataset.id = v.id;
      option.title = [v.text && `text: ${v.text}`, v.q && `q: ${v.q}`, v.sort && `sort: ${v.sort}`,
                      v.columns && v.columns.length && `columns: ${v.columns.join(",")}`].filter(Boolean).join("\n");
      select.appendChild(option);
    }
    const here = chosen || `${location.pathname}${location.search}`;
    for (const option of select.options) if (option.value && option.value === here) option.selected = true;
    if (remove) remove.disabled = !select.value;
  }

  select.addEventListener("change", () => {
    if (remove) remove.disabled = !select.value;
    if (select.value) location.assign(select.value);
  });
  if (save) save.addEventListener("click", async () => {
    const params = new URLSearchParams(location.search);
    const view = {name: name.value.trim(), page, q: params.get("q") || "", text: params.get("text") || "",
                  sort: params.get("sort") || (form.elements.sort ? form.elements.sort.value : "")};
    const columns = chosenColumns(params.get("columns") || "");  // the columns shown now (the URL's choice)
    if (columns.length) view.columns = columns;
    if (!view.name) { say("give the view a name", true); name.focus(); return; }
    try {
      const saved = await call(api, {method: "POST", headers: {"X-MLW": "1", "Content-Type": "application/json"},
                                     body: JSON.stringify(view)});
      say(`saved “${saved.view.name}”`);
      name.value = "";
      await list(saved.view.url);
    } catch (err) { say(err.message, true); }
  });
  if (remove) remove.addEventListener("click", async () => {
    const option = select.selectedOptions[0];
    if (!option || !option.dataset.id) return;
    try {
      await call(`${api}/${encodeURIComponent(option.dataset.id)}`, {method: "DELETE", headers: {"X-MLW": "1"}});
      say(`deleted “${option.textContent}”`);
      await list();
    } catch (err) { say(err.message, true); }
  });
  list().catch((err) => say(`views not listed: ${err.message}`, true));
})();
