// finetune board: one page over the JSON routes of finetune/board/app.py. Plain DOM + Plotly, no build step.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const S = {
  runs: [], selected: new Set(), firstLoad: true, sort: {key: "started", asc: false}, filter: "",
  metrics: {},          // run id -> {rows, offset}
  xaxis: "step", openRun: null, job: null, jobOffset: 0,
  chat: {left: [], right: []},
};
const FIRST_KEYS = ["loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "memory_gib", "rewards/accuracy",
  "rewards/margin", "reward", "reward_std", "kl", "completion_length"];
const NOT_CURVES = new Set(["step", "epoch", "time"]);

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const num = (v, d = 4) => (typeof v !== "number" ? "" : Number.isInteger(v) ? String(v) :
  Math.abs(v) >= 1000 ? v.toFixed(0) : String(+v.toPrecision(d)));
const runPath = (id) => id.split("/").map(encodeURIComponent).join("/");

async function api(path, body) {
  const opts = {headers: TOKEN ? {"X-Board-Token": TOKEN} : {}};
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  return fetch(path, opts);
}
async function getJSON(path) {
  const r = await api(path);
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r.json();
}

// ------------------------------------------------------------------ runs table

function duration(s) {
  if (typeof s !== "number") return "";
  const m = Math.floor(s / 60);
  return m ? `${m} min ${Math.round(s % 60)} s` : `${s.toFixed(1)} s`;
}
function sortValue(r, key) {
  const v = key === "name" ? r.id : r[key];
  return v === null || v === undefined ? -Infinity : v;
}

function runRow(r) {
  const steps = r.total_steps ? `${r.steps} / ${r.total_steps}` : (r.steps ?? "");
  const mem = r.peak_memory_gib == null ? "" : num(r.peak_memory_gib, 3) + (r.plan_gib ? ` / ${num(r.plan_gib, 3)}` : "");
  const started = r.started ? new Date(r.started * 1000).toLocaleString() : "";
  const act = r.status === "running" ? `<button class="stop" data-run="${esc(r.id)}">stop</button>` :
    (r.status === "interrupted" || r.status === "failed") && (r.checkpoints || []).length ?
      `<button class="resume" data-run="${esc(r.id)}">resume</button>` : "";
  return `<tr data-run="${esc(r.id)}">
    <td><input type="checkbox" class="pick" ${S.selected.has(r.id) ? "checked" : ""}></td>
    <td><a class="run-link">${esc(r.group ? r.name : r.id)}</a></td>
    <td><span class="status ${esc(r.status)}" title="${esc(r.problem || "")}">${esc(r.status)}</span></td>
    <td>${esc(r.objective)}</td><td>${esc(r.method)}</td><td class="num">${esc(steps)}</td>
    <td class="num">${num(r.best_eval_loss)}</td><td class="num">${num(r.tokens_per_s)}</td>
    <td class="num">${mem}</td><td>${esc(started)}</td><td>${duration(r.duration_s)}</td><td>${act}</td></tr>`;
}

function renderRuns() {
  const {key, asc} = S.sort;
  const shown = S.runs.filter((r) => r.id.toLowerCase().includes(S.filter.toLowerCase()));
  shown.sort((a, b) => {
    const x = sortValue(a, key), y = sortValue(b, key);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
  });
  const groups = new Map();
  for (const r of shown) {
    const g = r.group || "";
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g).push(r);
  }
  let html = "";
  for (const [g, rows] of groups) {
    if (g) html += `<tr class="group"><td></td><td colspan="11">sweep ${esc(g)} (${rows.length} points)</td></tr>`;
    html += rows.map(runRow).join("");
  }
  $("#runs-table tbody").innerHTML = html;
  $$("#runs-table th[data-key]").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.key === key);
    th.classList.toggle("asc", th.dataset.key === key && asc);
  });
}

async function refreshRuns() {
  try {
    const data = await getJSON("/api/runs");
    const changed = JSON.stringify(data.runs) !== JSON.stringify(S.runs);
    S.runs = data.runs;
    $("#runs-dir").textContent = data.runs_dir;
    if (S.firstLoad) {
      S.runs.filter((r) => r.status !== "damaged").forEach((r) => S.selected.add(r.id));
      S.firstLoad = false;
    }
    if (changed) {  // re-drawn only when something changed: the rows a reader is clicking stay put
      renderRuns();
      fillRunSelects();
    }
    await refreshCurves();
  } catch (e) {
    console.error(e);
  }
}

// ------------------------------------------------------------------ curves

async function fetchMetrics(id) {
  const m = S.metrics[id] || (S.metrics[id] = {rows: [], offset: 0});
  const data = await getJSON(`/api/metrics/${runPath(id)}?offset=${m.offset}`);
  if (data.rows.length) m.rows.push(...data.rows);
  m.offset = data.offset;
}

function curveKeys(ids) {
  const keys = new Set();
  for (const id of ids) for (const row of S.metrics[id]?.rows || [])
    for (const [k, v] of Object.entries(row)) if (typeof v === "number" && !NOT_CURVES.has(k)) keys.add(k);
  const first = FIRST_KEYS.filter((k) => keys.has(k));
  return first.concat([...keys].filter((k) => !first.includes(k)).sort());
}

function chartId(key) { return "chart-" + key.replace(/[^A-Za-z0-9_]/g, "_"); }

function drawCharts(ids) {
  const box = $("#charts");
  const keys = curveKeys(ids);
  for (const key of keys) {
    let div = document.getElementById(chartId(key));
    if (!div) {
      div = document.createElement("div");
      div.id = chartId(key);
      div.className = "chart";
      div.dataset.key = key;
      box.appendChild(div);
    }
    const traces = ids.map((id) => {
      const rows = (S.metrics[id]?.rows || []).filter((r) => typeof r[key] === "number");
      const t0 = (S.metrics[id]?.rows || []).find((r) => typeof r.time === "number")?.time || 0;
      const x = rows.map((r) => (S.xaxis === "time" ? (r.time - t0) : r.step));
      return {x, y: rows.map((r) => r[key]), name: id, mode: rows.length < 40 ? "lines+markers" : "lines"};
    }).filter((t) => t.y.length);
    Plotly.react(div, traces, {
      title: {text: key, x: 0.02}, margin: {l: 50, r: 10, t: 35, b: 35}, showlegend: ids.length > 1,
      legend: {orientation: "h", y: -0.25}, uirevision: key,  // a zoom survives the live updates
      xaxis: {title: {text: S.xaxis === "time" ? "seconds since first record" : "step"}},
    }, {displayModeBar: false, responsive: true});
  }
  for (const div of $$(".chart", box)) if (!keys.includes(div.dataset.key)) { Plotly.purge(div); div.remove(); }
  $("#curves-note").textContent = ids.length ? "" : "tick a run to see its curves";
}

async function refreshCurves() {
  const ids = [...S.selected].filter((id) => S.runs.some((r) => r.id === id));
  await Promise.all(ids.map((id) => fetchMetrics(id).catch(console.error)));
  drawCharts(ids);
}

// ------------------------------------------------------------------ one run

function table(headers, rows) {
  return `<table><thead><tr>${headers.map((h) => `<th>${esc(h)}</th>`).join("")}</tr></thead><tbody>${
    rows.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("")}</tbody></table>`;
}

function evalTables(evals) {
  return evals.map((e) => {
    const models = Object.keys(e.models);
    const metrics = [...new Set(models.flatMap((m) => Object.keys(e.models[m] || {})))];
    return `<h3>eval ${esc(e.file)} (${esc(e.examples)} examples of ${esc(e.data)})</h3>` +
      table(["metric", ...models], metrics.map((k) => [esc(k), ...models.map((m) => num(e.models[m][k]))]));
  }).join("");
}

function sampleTables(title, steps, columns) {
  if (!steps.length) return "";
  return `<h3>${esc(title)}</h3>` + steps.map((s) => `<details ${s === steps[0] ? "open" : ""}><summary>step ${
    esc(s.step)} (${s.samples.length})</summary><div class="samples">${
    table(columns, s.samples.map((x) => columns.map((c) => esc(typeof x[c] === "number" ? num(x[c]) : x[c]))))
  }</div></details>`).join("");
}

async function openRun(id) {
  S.openRun = id;
  showTab("run");
  $("#run-title").textContent = id;
  const d = await getJSON(`/api/run/${runPath(id)}`);
  const env = d.environment || {};
  const versions = Object.entries(env.versions || {}).map(([k, v]) => `${k} ${v ?? "-"}`).join(", ");
  const r = d.row;
  $("#run-body").innerHTML = `
    <p><span class="status ${esc(r.status)}">${esc(r.status)}</span> ${esc(r.problem || "")}
      ${r.status === "running" ? `<button class="stop" data-run="${esc(id)}">stop</button>` : ""}
      ${(r.status === "interrupted" || r.status === "failed") && d.checkpoints.length ?
        `<button class="resume" data-run="${esc(id)}">resume</button>` : ""}</p>
    <h3>checkpoints</h3>${table(["checkpoint", "step", "verify"], d.checkpoints.map((c) => [esc(c.name), esc(c.step),
      `<span class="${c.intact ? "ok" : "bad"}">${esc(c.summary)}</span>`]))}
    ${d.summary ? `<h3>summary</h3>${table(["key", "value"], Object.entries(d.summary).map(([k, v]) =>
      [esc(k), esc(typeof v === "number" ? num(v, 6) : JSON.stringify(v))]))}` : ""}
    <h3>environment</h3>${table(["", ""], [["device", esc(env.device)], ["python", esc(env.python)],
      ["versions", esc(versions)], ["data fingerprint", esc(env.data_fingerprint)], ["git commit", esc(env.git_commit)],
      ["allocator", esc(env.allocator)]])}
    ${evalTables(d.evals)}
    ${sampleTables("generations at eval steps", d.eval_samples, ["index", "prompt", "reference", "prediction", "correct"])}
    ${sampleTables("GRPO samples", d.grpo_samples, ["group", "prompt", "reference", "completion", "reward", "advantage"])}
    <h3>resolved recipe</h3><pre id="run-recipe">${esc(d.recipe)}</pre>`;
}

// ------------------------------------------------------------------ compare

function fillRunSelects() {
  const ids = S.runs.filter((r) => r.status !== "damaged").map((r) => r.id);
  for (const sel of [$("#diff-a"), $("#diff-b")]) setOptions(sel, ids.map((id) => `<option>${esc(id)}</option>`));
  if (!$("#diff-b").dataset.touched && ids.length > 1 && $("#diff-a").value === $("#diff-b").value) $("#diff-b").value = ids[1];
  const targets = [`<option value="">(none)</option>`].concat(S.runs.flatMap((r) => (r.checkpoints || []).flatMap((c) => [
    `<option value="${esc(r.id + "/" + c)}">${esc(r.id + "/" + c)}</option>`,
    `<option value="${esc("base:" + r.id + "/" + c)}">base of ${esc(r.id + "/" + c)}</option>`])));
  for (const sel of $$(".chat-target")) setOptions(sel, targets);
}

function setOptions(sel, options) {  // rebuilt only when they change: a choice being made is left alone
  const html = options.join("");
  if (sel.dataset.options === html) return;
  const keep = sel.value;
  sel.innerHTML = html;
  sel.dataset.options = html;
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
}

async function showDiff() {
  const a = $("#diff-a").value, b = $("#diff-b").value;
  const d = await getJSON(`/api/diff?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
  $("#diff-a-name").textContent = a;
  $("#diff-b-name").textContent = b;
  const show = (v) => esc(v === null || v === undefined ? "(absent)" : JSON.stringify(v));
  $("#diff-table tbody").innerHTML = d.diff.length ? d.diff.map((x) =>
    `<tr><td class="diff-key">${esc(x.key)}</td><td>${show(x.a)}</td><td>${show(x.b)}</td></tr>`).join("") :
    `<tr><td colspan="3">the recipes are the same</td></tr>`;
}

// ------------------------------------------------------------------ launch, stop, resume

function addOverride(key = "", value = "") {
  const tr = document.createElement("tr");
  tr.innerHTML = `<td><input class="ov-key" value="${esc(key)}" placeholder="training.max_steps"></td>
    <td><input class="ov-value" value="${esc(value)}" placeholder="10"></td><td class="ov-error error"></td>`;
  $("#overrides tbody").appendChild(tr);
}

async function loadRecipes() {
  const sel = $("#launch-recipe");
  const d = await getJSON("/api/recipes" + (sel.value ? `?id=${encodeURIComponent(sel.value)}` : ""));
  if (!sel.options.length || sel.options.length !== d.recipes.length) {
    const keep = sel.value;
    sel.innerHTML = d.recipes.map((id) => `<option>${esc(id)}</option>`).join("");
    if (keep) sel.value = keep;
    if (!keep && d.recipes.length) return loadRecipes();
  }
  $("#launch-recipe-text").textContent = d.text || "";
  $("#sweep-option").disabled = !d.sweep;
  $("#sweep-note").textContent = d.sweep ? "" : "finetune sweep: not available in this installation";
}

async function launch(ev) {
  ev.preventDefault();
  $$(".ov-error").forEach((td) => { td.textContent = ""; });
  $("#launch-error").textContent = "";
  const rows = $$("#overrides tbody tr").filter((tr) => $(".ov-key", tr).value.trim());
  const overrides = rows.map((tr) => `${$(".ov-key", tr).value.trim()}=${$(".ov-value", tr).value}`);
  const r = await api("/api/launch", {recipe: $("#launch-recipe").value, kind: $("#launch-kind").value, overrides});
  const d = await r.json();
  if (!r.ok) {
    for (const [key, messages] of Object.entries(d.errors || {})) {
      const tr = rows.find((x) => $(".ov-key", x).value.trim() === key);
      if (tr) $(".ov-error", tr).textContent = messages.join("\n");
      else d.general = (d.general || []).concat(messages);
    }
    $("#launch-error").textContent = (d.general || []).join("\n");
    return;
  }
  watchJob(d.id);
}

async function stopOrResume(ev) {
  const b = ev.target;
  if (!b.matches("button.stop, button.resume")) return;
  const what = b.classList.contains("stop") ? "stop" : "resume";
  b.disabled = true;
  const r = await api(`/api/${what}/${runPath(b.dataset.run)}`, {});
  const d = await r.json();
  if (what === "resume" && r.ok) watchJob(d.id);
  else if (!r.ok) alert(d.error || (d.general || []).join("\n"));
  refreshRuns();
}

function watchJob(id) {
  S.job = id;
  S.jobOffset = 0;
  $("#job-log").textContent = "";
  showTab("launch");
  refreshJobs();
}

async function refreshJobs() {
  const d = await getJSON("/api/jobs");
  $("#jobs").innerHTML = table(["job", "command", "state"], d.jobs.map((j) => [
    `<a class="job-link" data-job="${j.id}">#${j.id}</a>`, esc(j.argv.join(" ")),
    `<span class="job-state" data-job="${j.id}">${j.running ? "running" : `exit ${j.exit_code}`}</span>`]));
  if (S.job === null) return;
  const log = await getJSON(`/api/jobs/${S.job}/log?offset=${S.jobOffset}`);
  S.jobOffset = log.offset;
  if (log.text) {
    const pre = $("#job-log");
    pre.textContent += log.text;
    pre.scrollTop = pre.scrollHeight;
  }
}

// ------------------------------------------------------------------ chat

async function send(ev) {
  ev.preventDefault();
  const text = $("#chat-input").value;
  if (!text.trim()) return;
  $("#chat-input").value = "";
  await Promise.all($$(".chat-col").map((col) => sendOne(col, text)));
}

async function sendOne(col, text) {
  const target = $(".chat-target", col).value;
  if (!target) return;
  const side = col.dataset.side, base = target.startsWith("base:");
  const history = S.chat[side];
  const log = $(".chat-log", col);
  log.insertAdjacentHTML("beforeend", `<div class="user">${esc(text)}</div>`);
  const out = document.createElement("div");
  out.className = "assistant streaming";
  log.appendChild(out);
  const r = await api("/api/chat", {checkpoint: base ? target.slice(5) : target, base, prompt: text, history,
    temperature: parseFloat($("#chat-temperature").value) || 0, max_new_tokens: parseInt($("#chat-max").value) || 128});
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "", reply = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const item = JSON.parse(buffer.slice(0, nl));
      buffer = buffer.slice(nl + 1);
      if (item.text) { reply += item.text; out.textContent = reply; }
      if (item.error) out.innerHTML = `<span class="error">${esc(item.error)}</span>`;
    }
  }
  out.classList.remove("streaming");
  out.classList.add("done");
  history.push({role: "user", content: text}, {role: "assistant", content: reply.trim()});
}

// ------------------------------------------------------------------ wiring

function showTab(name) {
  $$(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  $$(".pane").forEach((p) => p.classList.toggle("hidden", p.id !== `tab-${name}`));
  if (name === "curves") $$(".chart").forEach((d) => Plotly.Plots.resize(d));
  if (name === "launch") loadRecipes();
}

document.addEventListener("DOMContentLoaded", () => {
  $$(".tab").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("#filter").addEventListener("input", (e) => { S.filter = e.target.value; renderRuns(); });
  $$("#runs-table th[data-key]").forEach((th) => th.addEventListener("click", () => {
    S.sort = {key: th.dataset.key, asc: S.sort.key === th.dataset.key ? !S.sort.asc : true};
    renderRuns();
  }));
  $("#runs-table").addEventListener("change", (e) => {
    if (!e.target.matches(".pick")) return;
    const id = e.target.closest("tr").dataset.run;
    if (e.target.checked) S.selected.add(id); else S.selected.delete(id);
    refreshCurves();
  });
  $("#runs-table").addEventListener("click", (e) => {
    if (e.target.matches(".run-link")) openRun(e.target.closest("tr").dataset.run);
  });
  document.body.addEventListener("click", stopOrResume);
  $$("input[name=xaxis]").forEach((r) => r.addEventListener("change", (e) => {
    S.xaxis = e.target.value;
    refreshCurves();
  }));
  $("#diff-go").addEventListener("click", showDiff);
  $("#diff-b").addEventListener("change", (e) => { e.target.dataset.touched = "1"; });
  $("#launch-recipe").addEventListener("change", loadRecipes);
  $("#add-override").addEventListener("click", () => addOverride());
  $("#launch-form").addEventListener("submit", launch);
  $("#jobs").addEventListener("click", (e) => { if (e.target.matches(".job-link")) watchJob(+e.target.dataset.job); });
  $("#chat-form").addEventListener("submit", send);
  $("#chat-reset").addEventListener("click", () => {
    S.chat = {left: [], right: []};
    $$(".chat-log").forEach((l) => { l.innerHTML = ""; });
  });
  addOverride();
  refreshRuns();
  setInterval(refreshRuns, 2000);
  setInterval(() => { if (!$("#tab-launch").classList.contains("hidden")) refreshJobs(); }, 1000);
});
