// embedlift playground. Every action is one public API call (see README "Playground"); keys come from the
// "API keys" box and stay in this tab's sessionStorage.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { adapters: [], active: undefined, chart: null }; // active: undefined until the first listing
const TOP = 5; // "fixed" / "broke": the first relevant document enters / leaves the top 5

// ------------------------------------------------------------------------------------------------ API
function headers(admin) {
  const key = admin ? $("#admin-key").value || $("#read-key").value : $("#read-key").value || $("#admin-key").value;
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(path, { method = "GET", body, admin = false } = {}) {
  const r = await fetch(path, { method, headers: headers(admin), body: body === undefined ? undefined : JSON.stringify(body) });
  const data = r.status === 204 ? null : await r.json().catch(() => null);
  if (!r.ok) {
    const detail = data && (data.detail || (data.error && data.error.message));
    if (r.status === 401 || r.status === 403) $("#keys").open = true;
    throw new Error(`${r.status}: ${detail || r.statusText}`);
  }
  return { status: r.status, data };
}

function say(message, error = false) {
  const el = $("#status");
  el.textContent = message;
  el.classList.toggle("error", error);
}

async function guarded(fn) {
  try {
    await fn();
  } catch (e) {
    say(e.message, true);
  }
}

// --------------------------------------------------------------------------------------------- adapters
async function refreshAdapters() {
  const { data } = await api("/adapters");
  const changed = data.active !== state.active || data.adapters.length !== state.adapters.length;
  if (state.active !== undefined && data.active !== state.active) say(`active adapter is now ${data.active || "the base"} (${new Date().toLocaleTimeString()})`);
  state.adapters = data.adapters;
  state.active = data.active;
  $("#active-badge").textContent = `active: ${data.active || "base"}`;
  if (!changed && $("#adapter-table tbody").children.length) return;
  const rows = data.adapters.map((a) => {
    const tr = document.createElement("tr");
    tr.className = a.active ? "active" : "";
    tr.dataset.name = a.name;
    const metrics = Object.entries(a.metrics || {}).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join("; ");
    for (const text of [a.name, a.version, a.kind, a.apply_to, metrics]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const td = document.createElement("td");
    const b = document.createElement("button");
    b.textContent = a.active ? "active" : "Activate";
    b.disabled = a.active;
    b.addEventListener("click", () => guarded(() => activate(a.name)));
    td.append(b);
    tr.append(td);
    return tr;
  });
  $("#adapter-table tbody").replaceChildren(...rows);
  const names = data.adapters.map((a) => a.name);
  fill($("#compare-a"), ["active", ...names, "none"], $("#compare-a").value || "active");
  fill($("#compare-b"), ["none", ...names], $("#compare-b").value || "none");
  fill($("#eval-adapters"), names);
}

function fill(select, values, selected) {
  const keep = new Set([...select.selectedOptions].map((o) => o.value));
  select.replaceChildren(...values.map((v) => new Option(v, v, false, v === selected || keep.has(v))));
}

async function activate(name) {
  await api(`/adapters/${encodeURIComponent(name)}/activate`, { method: "POST", admin: true });
  await refreshAdapters();
}

async function rollback() {
  await api("/adapters/rollback", { method: "POST", admin: true });
  await refreshAdapters();
}

// ----------------------------------------------------------------------------------------------- search
async function refreshDatasets() {
  const { data } = await api("/datasets");
  fill($("#eval-stored"), ["", ...data.datasets.map((d) => d.name)], $("#eval-stored").value);
}

async function refreshCollections() {
  const { data } = await api("/collections");
  fill($("#collection"), data.collections.filter((c) => c.status === "ready").map((c) => c.name), $("#collection").value);
}

async function search(event) {
  event.preventDefault();
  const collection = $("#collection").value;
  if (!collection) throw new Error("no collection: create one with PUT /collections/{name} and upsert documents");
  const body = { query: $("#query").value, k: Number($("#k").value), ...($("#mode").value ? { mode: $("#mode").value } : {}) };
  const models = ["base", $("#compare-a").value, $("#compare-b").value].filter((m, i, all) => m !== "none" && all.indexOf(m) === i);
  say("searching…");
  const results = await Promise.all(
    models.map((m) => api(`/collections/${encodeURIComponent(collection)}/search`, { method: "POST", body: { ...body, adapter: m === "active" ? null : m } })),
  );
  const columns = results.map((r, i) => ({
    label: `${models[i] === "active" ? `active (${r.data.adapter})` : r.data.adapter} · ${r.data.mode_used}`,
    hits: r.data.hits,
    note: r.data.note,
  }));
  renderColumns(columns);
  say(`${columns.length} columns for “${body.query}”`);
}

function renderColumns(columns) {
  const baseRank = new Map(columns[0].hits.map((h, i) => [h.id, i + 1]));
  const seen = new Map();
  for (const c of columns) for (const h of c.hits) seen.set(h.id, (seen.get(h.id) || 0) + 1);
  const els = columns.map((c, ci) => {
    const col = document.createElement("div");
    col.className = "column";
    col.dataset.model = c.label;
    const h2 = document.createElement("h2");
    h2.textContent = c.label;
    col.append(h2);
    if (c.note) {
      const note = document.createElement("p");
      note.className = "muted note";
      note.textContent = c.note;
      col.append(note);
    }
    c.hits.forEach((h, i) => {
      const card = document.createElement("div");
      card.className = "hit" + (seen.get(h.id) === 1 ? " only" : "");
      card.dataset.id = h.id;
      const meta = document.createElement("div");
      meta.className = "meta";
      const id = document.createElement("span");
      id.className = "id";
      id.textContent = `${i + 1}. ${h.id}`;
      const score = document.createElement("span");
      score.textContent = `score ${h.score.toFixed(3)}`;
      const sides = h.scores || {};
      score.title = `dense ${sides.dense == null ? "—" : sides.dense.toFixed(3)}, lexical ${sides.lexical == null ? "—" : sides.lexical.toFixed(3)}`;
      meta.append(id, score);
      if (ci > 0) meta.append(rankChange(baseRank.get(h.id), i + 1));
      const p = document.createElement("p");
      p.textContent = h.text.slice(h.span[0], h.span[1]);
      card.append(meta, p);
      col.append(card);
    });
    return col;
  });
  $("#columns").replaceChildren(...els);
}

function rankChange(before, after) {
  const span = document.createElement("span");
  span.className = "rank-change";
  if (before === undefined) {
    span.textContent = "new";
    span.classList.add("new");
  } else if (before > after) {
    span.textContent = `▲${before - after}`;
    span.classList.add("up");
  } else if (before < after) {
    span.textContent = `▼${after - before}`;
    span.classList.add("down");
  } else {
    span.textContent = "=";
  }
  span.title = before === undefined ? "not in the base's top k" : `base rank ${before}`;
  return span;
}

// ------------------------------------------------------------------------------------------------- eval
async function runEval(event) {
  event.preventDefault();
  const file = $("#eval-file").files[0];
  const stored = $("#eval-stored").value;
  if (!file && !stored) throw new Error("choose a dataset file to upload, or a stored dataset");
  let dataset = { queries: {} };
  const source = {};
  if (file) {
    try {
      dataset = JSON.parse(await file.text());
    } catch (e) {
      throw new Error(`${file.name} is not JSON: ${e.message}`);
    }
    source.dataset = dataset;
  } else {
    source.dataset_name = stored; // read by the server from its datasets directory; rows show query ids
  }
  const adapters = [...$("#eval-adapters").selectedOptions].map((o) => o.value);
  const hybrid = $("#eval-hybrid").checked ? { mode: "hybrid" } : {};
  const body = { ...source, k: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], per_query: true, ...hybrid, ...(adapters.length ? { adapters } : {}) };
  say(`evaluating ${file ? file.name : stored}…`);
  let { status, data } = await api("/eval", { method: "POST", body });
  if (status === 202) data = await waitForJob(data.job.id);
  renderEval(data, dataset);
  say(`evaluated ${data.queries} queries against ${data.documents} documents`);
}

async function waitForJob(id) {
  for (;;) {
    const { data } = await api(`/jobs/${id}`);
    if (data.status === "succeeded") return data.result;
    if (data.status === "failed") throw new Error(`eval job failed: ${data.error}`);
    say(`eval job ${data.status}: ${data.done}/${data.total}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

function renderEval(result, dataset) {
  const ks = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
  const models = Object.keys(result.metrics);
  const colors = ["#6b7280", "#2563eb", "#d97706", "#059669", "#9333ea"];
  const datasets = models.map((m, i) => ({
    label: result.models[m] || m,
    data: ks.map((k) => result.metrics[m][`hit_rate@${k}`]),
    borderColor: colors[i % colors.length],
    backgroundColor: colors[i % colors.length],
    borderDash: m === "lexical" || m.endsWith("+hybrid") ? [6, 4] : [], // hybrid and lexical rows dashed
    tension: 0.2,
  }));
  if (state.chart) state.chart.destroy();
  state.chart = new Chart($("#hit-chart"), {
    type: "line",
    data: { labels: ks.map((k) => `@${k}`), datasets },
    options: { animation: false, maintainAspectRatio: false, plugins: { title: { display: true, text: "hit rate at k" } }, scales: { y: { min: 0, max: 1 } } },
  });
  const rows = [["model", "hit_rate@1", "hit_rate@5", "hit_rate@10", "mrr@10"], ...models.map((m) => [result.models[m] || m, ...["hit_rate@1", "hit_rate@5", "hit_rate@10", "mrr@10"].map((k) => fmt(result.metrics[m][k]))])];
  $("#eval-table").replaceChildren(...rows.map((r, i) => row(r, i === 0 ? "th" : "td")));
  const changes = models.filter((m) => m !== "base").map((m) => changeTable(m, result, dataset));
  $("#changes-title").hidden = changes.length === 0;
  $("#changes").replaceChildren(...changes);
}

function changeTable(model, result, dataset) {
  const base = result.ranks.base;
  const mine = result.ranks[model];
  const fixed = Object.keys(mine).filter((q) => base[q] > TOP && mine[q] <= TOP);
  const broke = Object.keys(mine).filter((q) => base[q] <= TOP && mine[q] > TOP);
  const box = document.createElement("div");
  box.className = "column changes";
  box.dataset.model = model;
  const h2 = document.createElement("h2");
  h2.textContent = `${result.models[model] || model}: fixed ${fixed.length}, broke ${broke.length}`;
  const table = document.createElement("table");
  table.append(row(["", "query", "base rank", "adapter rank"], "th"));
  for (const [what, ids] of [["fixed", fixed], ["broke", broke]]) {
    for (const q of ids) {
      const tr = row([what === "fixed" ? "✔ fixed" : "✘ broke", dataset.queries[q] || q, base[q], mine[q]], "td");
      tr.className = what === "fixed" ? "up" : "down";
      table.append(tr);
    }
  }
  box.append(h2, table);
  return box;
}

function row(cells, tag) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const el = document.createElement(tag);
    el.textContent = c;
    tr.append(el);
  }
  return tr;
}

const fmt = (v) => (v === undefined ? "" : v.toFixed(3));

// ------------------------------------------------------------------------------------------------- wiring
function show(view) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.view === view);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${view}`;
}

function remember(input) {
  input.value = sessionStorage.getItem(input.id) || "";
  input.addEventListener("change", () => {
    sessionStorage.setItem(input.id, input.value);
    guarded(load);
  });
}

async function load() {
  await refreshAdapters();
  await refreshCollections();
  await refreshDatasets();
  say("");
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => show(b.dataset.view));
  remember($("#read-key"));
  remember($("#admin-key"));
  $("#search-form").addEventListener("submit", (e) => guarded(() => search(e)));
  $("#eval-form").addEventListener("submit", (e) => guarded(() => runEval(e)));
  $("#activate-base").addEventListener("click", () => guarded(() => activate("base")));
  $("#rollback").addEventListener("click", () => guarded(rollback));
  guarded(load);
  // swaps made elsewhere (the CLI, another tab, the adapters directory) show up without a reload
  setInterval(() => refreshAdapters().catch(() => {}), 2000);
});
