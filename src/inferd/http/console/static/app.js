// inferd web console: vanilla JS, no build step. Everything shown comes from this origin's API:
// /console/api/* (models, jobs) and /v1/chat/completions (streamed with SSE).
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY_SLOT = "inferd-api-key"; // sessionStorage: kept in this tab only
const TERMINAL = ["completed", "failed", "stopped"];
const state = { messages: [], controller: null, models: [], needKey: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node; // text is always appended as text nodes: nothing from the server is parsed as HTML
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_SLOT);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (res.status === 401) { askKey(); throw new Error("API key required"); }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((body.error && body.error.message) || `HTTP ${res.status}`);
  return body;
}

function askKey() {
  state.needKey = true;
  $("#key-form").hidden = false;
  setConn("API key needed", "state-failed");
}

function setConn(text, cls = "") { const c = $("#conn"); c.textContent = text; c.className = `pill ${cls}`; }

const human = (n) => {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"]; let i = 0; let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i ? `${v.toFixed(1)} ${units[i]}` : `${v} B`;
};
const secs = (s) => (s === null || s === undefined ? "–" : s < 60 ? `${s.toFixed(0)}s`
  : s < 3600 ? `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s` : `${(s / 3600).toFixed(1)}h`);

function modelState(m) {
  if (m.state === "ready" && (m.in_flight > 0 || m.backend_state === "BUSY")) return "busy";
  return m.state;
}

// ---- models -------------------------------------------------------------------------------------
async function refreshModels() {
  if (state.needKey) return;
  try {
    const data = await api("/console/api/models");
    state.models = data.models;
    renderModels(data);
    fillModelSelects();
    setConn("live", "state-ready");
  } catch (e) { if (!state.needKey) setConn(`offline: ${e.message}`, "state-failed"); }
}

function renderModels(data) {
  const body = $("#models tbody");
  body.replaceChildren(...data.models.map((m) => {
    const st = modelState(m);
    const reason = (st === "failed" || st === "exited") && (m.last_error || m.last_event)
      ? el("span", { class: "reason" }, m.last_error || m.last_event) : null;
    const actions = el("td");
    if (data.managed) {
      const running = ["ready", "starting"].includes(m.state);
      actions.append(el("button", { type: "button", class: running ? "secondary" : "", "data-action": running ? "stop" : "start",
        onclick: () => modelAction(m.name, running ? "stop" : "start") }, running ? "Stop" : "Start"));
    }
    const mem = m.rss_bytes ?? m.backend_memory;
    const times = m.state === "ready" ? `${secs(m.busy_seconds)} / ${secs(m.idle_seconds)}` : "–";
    return el("tr", { "data-model": m.name, "data-state": st },
      el("td", {}, el("strong", {}, m.name)), el("td", {}, m.backend || "–"),
      el("td", {}, el("span", { class: `pill state-${st}` }, st), reason),
      el("td", {}, m.address || "–"), el("td", {}, human(mem)), el("td", {}, times),
      el("td", {}, String(m.restarts ?? 0)), actions);
  }));
}

async function modelAction(name, action) {
  try { await api(`/console/api/models/${encodeURIComponent(name)}/${action}`, { method: "POST" }); }
  catch (e) { alert(`${action} ${name}: ${e.message}`); }
  refreshModels();
}

function fillModelSelects() {
  for (const sel of [$("#chat-model"), $("#job-model")]) {
    const current = sel.value;
    const names = state.models.map((m) => m.name);
    if ([...sel.options].map((o) => o.value).join() === names.join()) continue;
    sel.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    const chatty = state.models.find((m) => m.backend === "llama-cpp");
    sel.value = names.includes(current) ? current : chatty ? chatty.name : names[0] || "";
  }
}

// ---- chat ---------------------------------------------------------------------------------------
function addMessage(role, text) {
  const content = el("span", { class: "content" }, text);
  const node = el("div", { class: `msg ${role}` }, content);
  $("#conversation").append(node);
  node.scrollIntoView({ block: "end" });
  return { node, content };
}

function* sseEvents(buffer) { // complete "data: ..." events of a buffer; the rest stays for later
  let idx;
  while ((idx = buffer.text.indexOf("\n\n")) >= 0) {
    const raw = buffer.text.slice(0, idx); buffer.text = buffer.text.slice(idx + 2);
    const data = raw.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
    if (data) yield data;
  }
}

async function sendChat(text) {
  const model = $("#chat-model").value;
  if (!model || !text.trim()) return;
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.node.classList.add("streaming");
  const system = $("#system").value.trim();
  const t = parseFloat($("#temperature").value);
  const temperature = Number.isFinite(t) ? Math.min(2, Math.max(0, t)) : 0.7;
  const messages = system ? [{ role: "system", content: system }, ...state.messages] : state.messages;
  const controller = new AbortController();
  state.controller = controller;
  $("#send").disabled = true; $("#stop").disabled = false;
  const t0 = performance.now(); let tFirst = null; let chunks = 0; let usage = null; let answer = ""; let note = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model, messages, temperature, stream: true, stream_options: { include_usage: true } }),
    });
    if (res.status === 401) askKey();
    if (!res.ok) { const b = await res.json().catch(() => ({})); throw new Error((b.error && b.error.message) || `HTTP ${res.status}`); }
    const reader = res.body.getReader(); const decoder = new TextDecoder(); const buffer = { text: "" };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer.text += decoder.decode(value, { stream: true });
      for (const data of sseEvents(buffer)) {
        if (data === "[DONE]") continue;
        const ev = JSON.parse(data);
        if (ev.error) throw new Error(ev.error.message);
        if (ev.usage) usage = ev.usage;
        const delta = ev.choices && ev.choices[0] && ev.choices[0].delta;
        if (delta && delta.content) {
          if (tFirst === null) tFirst = performance.now();
          chunks++; answer += delta.content; out.content.textContent = answer;
          out.node.scrollIntoView({ block: "end" });
        }
      }
    }
  } catch (e) {
    note = e.name === "AbortError" ? "stopped" : `error: ${e.message}`;
    if (note !== "stopped") out.node.classList.add("error");
  } finally {
    state.controller = null;
    $("#send").disabled = false; $("#stop").disabled = true;
    out.node.classList.remove("streaming");
  }
  const t1 = performance.now();
  const tokens = usage ? usage.completion_tokens : chunks;
  const rate = tFirst !== null && t1 > tFirst && tokens > 1 ? ((tokens - 1) / ((t1 - tFirst) / 1000)).toFixed(1) : "–";
  const ttft = tFirst !== null ? `${Math.round(tFirst - t0)} ms` : "–";
  out.node.append(el("span", { class: "stats" },
    `${tokens} tokens · ${rate} tok/s · first token ${ttft}${note ? ` · ${note}` : ""}`));
  out.node.dataset.done = note || "ok";
  if (answer) state.messages.push({ role: "assistant", content: answer });
}

// ---- jobs ---------------------------------------------------------------------------------------
async function refreshJobs() {
  if (state.needKey) return;
  try { renderJobs((await api("/console/api/jobs")).jobs); } catch (e) { /* shown by the models poll */ }
}

function jobEta(j) {
  if (j.eta_seconds) return j.eta_seconds;
  const p = j.progress_percent || 0; const elapsed = (j.updated || 0) - j.started;
  return p > 0 && p < 100 && elapsed > 0 ? elapsed * (100 - p) / p : null;
}

function renderJobs(jobs) {
  const box = $("#jobs");
  if (!jobs.length) { box.replaceChildren(el("p", { class: "muted" }, "No jobs yet.")); return; }
  box.replaceChildren(...jobs.map((j) => {
    const done = TERMINAL.includes(j.status);
    const bits = [`${j.kind} on ${j.model}`, j.status];
    if (j.current_step) bits.push(`step ${j.current_step}/${j.total_steps}`);
    if (j.loss) bits.push(`loss ${j.loss.toFixed(4)}`);
    const eta = done ? null : jobEta(j);
    if (eta) bits.push(`ETA ${secs(eta)}`);
    return el("div", { class: "job", "data-job": j.job_id, "data-status": j.status },
      el("div", { class: "row" }, el("strong", {}, j.job_id), el("span", { class: "muted" }, bits.join(" · ")),
        done ? null : el("button", { type: "button", class: "secondary", onclick: () => stopJob(j.job_id) }, "Stop")),
      el("progress", { max: "100", value: String(j.progress_percent || 0) }),
      el("div", { class: j.error || j.status === "failed" ? "error" : "muted" }, j.error || j.message || j.output_file || ""));
  }));
}

async function stopJob(id) {
  try { await api(`/console/api/jobs/${encodeURIComponent(id)}/stop`, { method: "POST" }); }
  catch (e) { alert(`stop ${id}: ${e.message}`); }
  refreshJobs();
}

async function startJob(ev) {
  ev.preventDefault();
  $("#job-error").textContent = "";
  try {
    const fields = JSON.parse($("#job-fields").value || "{}");
    await api("/console/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("#job-model").value, kind: $("#job-kind").value, fields }) });
    refreshJobs();
  } catch (e) { $("#job-error").textContent = e.message; }
}

// ---- wiring -------------------------------------------------------------------------------------
$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY_SLOT, $("#key").value);
  state.needKey = false; $("#key-form").hidden = true; $("#key").value = "";
  refreshModels(); refreshJobs();
});
$("#chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("#prompt").value; $("#prompt").value = "";
  sendChat(text);
});
$("#prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !$("#send").disabled) { ev.preventDefault(); $("#chat-form").requestSubmit(); }
});
$("#stop").addEventListener("click", () => state.controller && state.controller.abort());
$("#chat-reset").addEventListener("click", () => { state.messages = []; $("#conversation").replaceChildren(); });
$("#job-form").addEventListener("submit", startJob);

refreshModels(); refreshJobs();
setInterval(refreshModels, 1500);
setInterval(refreshJobs, 2000);
