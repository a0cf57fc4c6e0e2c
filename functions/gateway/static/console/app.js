// TaskForge web console: plain JavaScript, no build step.
//
// Talks to the gateway (same origin) with fetch and follows every task of the user live
// through one EventSource on the status stream (another origin: its URL comes from the
// page's <meta name="taskforge-stream">). EventSource cannot send headers, so the access
// token travels as ?access_token=; when the token is refreshed the stream is reopened
// with ?last_event_id= so no change is missed. All data reaches the page through
// textContent, never innerHTML.
"use strict";

const STREAM = document.querySelector('meta[name="taskforge-stream"]').content.replace(/\/$/, "");
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const KEY = "taskforge.console.tokens";
const $ = (id) => document.getElementById(id);

let tokens = JSON.parse(sessionStorage.getItem(KEY) || "null");
let source = null; // the EventSource
let lastEventId = null;
let refreshTimer = null;
let reconnectTimer = null;
let nextCursor = null;
let payloadSchemas = {}; // task type -> JSON Schema of its payload
const rows = new Map(); // task id -> <tr>

// --- messages ------------------------------------------------------------------------
function say(text, bad = false) {
  const el = $("message");
  el.textContent = text;
  el.classList.toggle("bad", bad);
}

function explain(err) {
  const details = Array.isArray(err.details) ? err.details.map((d) => `${d.field}: ${d.message}`).join("; ") : "";
  return details ? `${err.message} (${details})` : err.message;
}

// --- the gateway ---------------------------------------------------------------------
async function api(method, path, { json, body, headers = {}, auth = true, retry = true } = {}) {
  const h = { Accept: "application/json", ...headers };
  let payload = body;
  if (json !== undefined) {
    payload = JSON.stringify(json);
    h["Content-Type"] = "application/json";
  }
  if (auth && tokens) h.Authorization = `Bearer ${tokens.access_token}`;
  const resp = await fetch(path, { method, headers: h, body: payload });
  if (resp.status === 401 && auth && retry && tokens && (await refresh())) {
    return api(method, path, { json, body, headers, auth, retry: false });
  }
  if (!resp.ok) {
    let err = { message: `${resp.status} ${resp.statusText}` };
    try {
      err = (await resp.json()).error || err;
    } catch (_) { /* not JSON */ }
    throw Object.assign(new Error(err.message), { status: resp.status, code: err.code, details: err.details });
  }
  return resp;
}

function saveTokens(pair, email) {
  tokens = {
    access_token: pair.access_token,
    refresh_token: pair.refresh_token,
    expires_at: Date.now() + pair.expires_in * 1000,
    email: email || (tokens && tokens.email),
  };
  sessionStorage.setItem(KEY, JSON.stringify(tokens));
  scheduleRefresh();
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  if (!tokens) return;
  const wait = Math.max(5000, tokens.expires_at - Date.now() - 60000);
  refreshTimer = setTimeout(async () => {
    if (await refresh()) openStream(); // the open stream still carries the old token
  }, wait);
}

async function refresh() {
  if (!tokens || !tokens.refresh_token) return false;
  try {
    const resp = await api("POST", "/auth/refresh", { json: { refresh_token: tokens.refresh_token }, auth: false });
    saveTokens(await resp.json());
    return true;
  } catch (err) {
    signedOut("Your session ended: please log in again.");
    return false;
  }
}

// --- live status -----------------------------------------------------------------------
function streamState(text, live) {
  const badge = $("stream-state");
  badge.textContent = text;
  badge.classList.toggle("live", live);
}

function openStream() {
  closeStream();
  if (!tokens) return;
  const params = new URLSearchParams({ access_token: tokens.access_token });
  if (lastEventId) params.set("last_event_id", lastEventId);
  source = new EventSource(`${STREAM}/events?${params}`);
  source.addEventListener("open", () => streamState("live", true));
  source.addEventListener("task", (e) => {
    if (e.lastEventId) lastEventId = e.lastEventId;
    upsert(JSON.parse(e.data));
  });
  source.addEventListener("reset", () => {
    // Our position was older than the server keeps: reload the history, then carry on.
    loadTasks(true);
  });
  source.addEventListener("error", () => {
    if (!source || source.readyState !== EventSource.CLOSED) {
      streamState("reconnecting", false); // EventSource retries by itself
      return;
    }
    // Closed for good: usually an expired token (401). Refresh and resume from our position.
    streamState("offline", false);
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(async () => {
      if (tokens && (await refresh())) openStream();
    }, 1000);
  });
}

function closeStream() {
  clearTimeout(reconnectTimer);
  if (source) source.close();
  source = null;
  streamState("offline", false);
}

// --- the task table --------------------------------------------------------------------
function cell(text, cls) {
  const td = document.createElement("td");
  if (text !== undefined) td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function newRow(task) {
  const tr = document.createElement("tr");
  tr.dataset.id = task.id;
  tr.dataset.created = task.created_at || "";
  const idCell = cell();
  const code = document.createElement("code");
  code.textContent = task.id.slice(0, 8);
  code.title = task.id;
  idCell.append(code);
  const bar = document.createElement("progress");
  bar.max = 100;
  const progressCell = cell();
  progressCell.append(bar, document.createTextNode(" "), document.createElement("span"));
  tr.append(idCell, cell(task.type), cell("", "status"), progressCell,
            cell(new Date(task.created_at).toLocaleString()), cell("", "actions"));
  return tr;
}

function upsert(task) {
  if (!task || !task.id) return;
  let tr = rows.get(task.id);
  const known = tr && tr.dataset.updated;
  if (known && task.updated_at && Date.parse(task.updated_at) < Date.parse(known)) return; // stale
  if (!tr) {
    tr = newRow(task);
    rows.set(task.id, tr);
    // Keep the table newest first, whichever way a task arrives (history page or live).
    const created = Date.parse(task.created_at);
    const after = [...$("tasks").tBodies[0].rows].find((r) => Date.parse(r.dataset.created) < created);
    $("tasks").tBodies[0].insertBefore(tr, after || null);
  }
  tr.dataset.updated = task.updated_at || "";
  tr.dataset.status = task.status;
  const status = tr.querySelector(".status");
  status.textContent = task.status;
  status.className = `status status-${task.status}`;
  if (task.error) {
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = `${task.error.code}: ${task.error.message}`;
    status.append(err);
  }
  tr.querySelector("progress").value = task.progress || 0;
  tr.querySelector("progress + span").textContent = `${task.progress || 0}%`;
  const actions = tr.querySelector(".actions");
  actions.replaceChildren();
  if (task.status === "succeeded") actions.append(button("Download", () => download(task.id), "download"));
  if (!TERMINAL.has(task.status)) actions.append(button("Cancel", () => cancel(task.id), "cancel"));
}

function button(label, onClick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

async function loadTasks(reset = false) {
  if (reset) {
    rows.clear();
    $("tasks").tBodies[0].replaceChildren();
    nextCursor = null;
  }
  const params = new URLSearchParams({ limit: "20" });
  if (nextCursor) params.set("cursor", nextCursor);
  try {
    const page = await (await api("GET", `/tasks?${params}`)).json();
    page.items.forEach(upsert);
    nextCursor = page.next_cursor;
    $("more").hidden = !nextCursor;
  } catch (err) {
    say(`Could not load tasks: ${explain(err)}`, true);
  }
}

async function download(taskId) {
  try {
    const resp = await api("GET", `/tasks/${encodeURIComponent(taskId)}/result`, { headers: { Accept: "*/*" } });
    const blob = await resp.blob();
    const disposition = resp.headers.get("Content-Disposition") || "";
    const match = /filename\*=UTF-8''([^;]+)/i.exec(disposition) || /filename="?([^";]+)"?/i.exec(disposition);
    const name = match ? decodeURIComponent(match[1]) : `${taskId}.out`;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name.split(/[\\/]/).pop();
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    say(`Downloaded ${a.download}`);
  } catch (err) {
    say(`Download failed: ${explain(err)}`, true);
  }
}

async function cancel(taskId) {
  try {
    upsert(await (await api("POST", `/tasks/${encodeURIComponent(taskId)}/cancel`)).json());
  } catch (err) {
    say(`Cancel failed: ${explain(err)}`, true);
  }
}

// --- the task form (generated from the payload schemas) --------------------------------
async function loadSchemas() {
  const doc = await (await fetch("/openapi.json")).json();
  const all = doc.components.schemas;
  const select = $("task-type");
  select.replaceChildren();
  for (const alt of all.TaskSubmission.oneOf) {
    const type = alt.properties.type.const;
    payloadSchemas[type] = all[alt.properties.payload.$ref.split("/").pop()];
    const opt = document.createElement("option");
    opt.value = opt.textContent = type;
    select.append(opt);
  }
  renderOptions();
}

function renderOptions() {
  const schema = payloadSchemas[$("task-type").value];
  const box = $("options");
  box.replaceChildren(Object.assign(document.createElement("legend"), { textContent: "Options" }));
  $("source-fields").hidden = !schema.properties.source;
  for (const [name, spec] of Object.entries(schema.properties)) {
    if (name === "source") continue;
    const label = document.createElement("label");
    label.textContent = name.replace(/_/g, " ");
    let input;
    if (spec.enum) {
      input = document.createElement("select");
      input.append(Object.assign(document.createElement("option"), {
        value: "", textContent: spec.default !== undefined ? `(default: ${spec.default})` : "(default)" }));
      for (const v of spec.enum) input.append(Object.assign(document.createElement("option"), { value: v, textContent: v }));
    } else if (name === "html") {
      input = document.createElement("textarea");
      label.classList.add("wide");
    } else {
      input = document.createElement("input");
      if (spec.type === "integer" || spec.type === "number") {
        input.type = "number";
        input.step = spec.type === "integer" ? "1" : "any";
        if (spec.minimum !== undefined) input.min = spec.minimum;
        if (spec.maximum !== undefined) input.max = spec.maximum;
        if (spec.default !== undefined) input.placeholder = `default ${spec.default}`;
      } else {
        input.type = name === "url" ? "url" : "text";
        if (name === "url") label.classList.add("wide");
      }
    }
    input.name = name;
    input.id = `opt-${name}`;
    input.dataset.kind = spec.type || "string";
    if (spec.description) label.title = spec.description;
    label.append(input);
    box.append(label);
  }
}

async function submitTask(event) {
  event.preventDefault();
  const type = $("task-type").value;
  const schema = payloadSchemas[type];
  const payload = {};
  for (const input of $("options").querySelectorAll("input, select, textarea")) {
    if (input.value === "") continue;
    payload[input.name] = input.dataset.kind === "integer" ? parseInt(input.value, 10)
      : input.dataset.kind === "number" ? parseFloat(input.value) : input.value;
  }
  const submit = $("submit");
  submit.disabled = true;
  try {
    if (schema.properties.source) {
      const kind = document.querySelector('input[name="source-kind"]:checked').value;
      if (kind === "file") {
        const file = $("source-file").files[0];
        if (!file) throw new Error("choose a file to upload");
        say(`Uploading ${file.name}…`);
        const up = await (await api("POST", "/uploads", {
          body: file, headers: { "Content-Type": file.type || "application/octet-stream" } })).json();
        payload.source = { upload_id: up.id };
      } else {
        payload.source = { url: $("source-url").value };
      }
    }
    const task = await (await api("POST", "/tasks", { json: { type, payload } })).json();
    upsert(task);
    say(`Submitted ${type} task ${task.id.slice(0, 8)}`);
  } catch (err) {
    say(`Could not submit: ${explain(err)}`, true);
  } finally {
    submit.disabled = false;
  }
}

// --- signing in and out ----------------------------------------------------------------
async function signIn(mode) {
  const email = $("email").value.trim();
  const password = $("password").value;
  try {
    if (mode === "signup") await api("POST", "/auth/signup", { json: { email, password }, auth: false });
    const resp = await api("POST", "/auth/login", { json: { email, password }, auth: false });
    saveTokens(await resp.json(), email);
    $("password").value = "";
    await start();
  } catch (err) {
    say(explain(err), true);
  }
}

function signedOut(message) {
  tokens = null;
  sessionStorage.removeItem(KEY);
  clearTimeout(refreshTimer);
  closeStream();
  lastEventId = null;
  rows.clear();
  $("tasks").tBodies[0].replaceChildren();
  $("app-panel").hidden = true;
  $("who").hidden = true;
  $("auth-panel").hidden = false;
  if (message) say(message);
}

async function start() {
  const me = await (await api("GET", "/me")).json();
  $("who-email").textContent = me.email;
  $("who").hidden = false;
  $("auth-panel").hidden = true;
  $("app-panel").hidden = false;
  say("");
  await loadSchemas();
  openStream(); // first, so nothing that happens while the history loads is missed
  nextCursor = null;
  await loadTasks(false);
  scheduleRefresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("auth-form").addEventListener("submit", (e) => { e.preventDefault(); signIn("login"); });
  $("signup").addEventListener("click", () => {
    if ($("auth-form").reportValidity()) signIn("signup");
  });
  $("logout").addEventListener("click", async () => {
    try {
      await api("POST", "/auth/logout", { json: tokens ? { refresh_token: tokens.refresh_token } : {}, retry: false });
    } catch (_) { /* signing out locally anyway */ }
    signedOut("Logged out.");
  });
  $("task-type").addEventListener("change", renderOptions);
  $("task-form").addEventListener("submit", submitTask);
  $("more").addEventListener("click", () => loadTasks(false));
  for (const radio of document.querySelectorAll('input[name="source-kind"]')) {
    radio.addEventListener("change", () => {
      const file = document.querySelector('input[name="source-kind"]:checked').value === "file";
      $("source-file").hidden = !file;
      $("source-url").hidden = file;
    });
  }
  if (tokens) start().catch(() => signedOut());
});
