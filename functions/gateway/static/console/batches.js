// TaskForge web console: the batches view (loaded after app.js and using its helpers:
// $, api, say, explain, button, cell, tokens, STREAM).
//
// Submit a manifest file (NDJSON, one task per line), watch each running batch's counts
// live through its own EventSource on the status stream (GET /batches/{id}/events,
// ?access_token= as for tasks), download the report, retry the failed lines, cancel.
"use strict";

const batchRows = new Map(); // batch id -> <tr>
const batchStreams = new Map(); // batch id -> EventSource

function batchFinished(b) {
  return b.status === "completed" || (b.status === "cancelled" && !b.in_flight);
}

function countsText(b) {
  return Object.entries(b.counts).filter(([, n]) => n).map(([k, n]) => `${k} ${n}`).join(" · ");
}

function batchRow(b) {
  const tr = document.createElement("tr");
  tr.dataset.id = b.id;
  const idCell = cell();
  const code = document.createElement("code");
  code.textContent = b.id.slice(0, 8);
  code.title = b.id;
  idCell.append(code);
  const bar = document.createElement("progress");
  const progressCell = cell();
  progressCell.append(bar, document.createTextNode(" "), document.createElement("span"));
  tr.append(idCell, cell("", "status"), progressCell, cell("", "counts"),
            cell(new Date(b.created_at).toLocaleString()), cell("", "actions"));
  return tr;
}

function upsertBatch(b) {
  if (!b || !b.id) return;
  let tr = batchRows.get(b.id);
  if (!tr) {
    tr = batchRow(b);
    batchRows.set(b.id, tr);
    const body = $("batches").tBodies[0];
    const after = [...body.rows].find((r) => r.dataset.created < b.created_at);
    tr.dataset.created = b.created_at;
    body.insertBefore(tr, after || null);
  }
  tr.dataset.status = b.status;
  tr.dataset.done = String(b.done);
  tr.dataset.failed = String(b.counts.failed);
  const status = tr.querySelector(".status");
  status.textContent = b.status;
  status.className = `status status-${b.status === "completed" ? "succeeded" : b.status}`;
  const bar = tr.querySelector("progress");
  bar.max = b.total;
  bar.value = b.done;
  tr.querySelector("progress + span").textContent = `${b.done}/${b.total}`;
  tr.querySelector(".counts").textContent = countsText(b);
  const actions = tr.querySelector(".actions");
  actions.replaceChildren(button("Report", () => downloadReport(b.id), "report"));
  if (b.counts.failed && b.status !== "cancelled") actions.append(button("Retry failed", () => retryBatch(b.id), "retry"));
  if (b.status === "running") actions.append(button("Cancel", () => cancelBatch(b.id), "cancel"));
  if (batchFinished(b)) closeBatchStream(b.id);
  else followBatch(b.id);
}

function followBatch(id) {
  if (batchStreams.has(id) || !tokens) return;
  const params = new URLSearchParams({ access_token: tokens.access_token });
  const es = new EventSource(`${STREAM}/batches/${encodeURIComponent(id)}/events?${params}`);
  batchStreams.set(id, es);
  const onBatch = (e) => upsertBatch(JSON.parse(e.data));
  es.addEventListener("progress", onBatch);
  es.addEventListener("done", (e) => {
    closeBatchStream(id);
    onBatch(e);
  });
  es.addEventListener("error", () => {
    if (es.readyState !== EventSource.CLOSED) return; // EventSource reconnects by itself
    closeBatchStream(id); // closed for good (an expired token): the next refresh of the list reopens it
  });
}

function closeBatchStream(id) {
  const es = batchStreams.get(id);
  if (es) es.close();
  batchStreams.delete(id);
}

async function loadBatches() {
  try {
    const page = await (await api("GET", "/batches?limit=20")).json();
    page.items.forEach(upsertBatch);
  } catch (err) {
    say(`Could not load batches: ${explain(err)}`, true);
  }
}

async function submitBatch(event) {
  event.preventDefault();
  const file = $("batch-file").files[0];
  if (!file) {
    say("Choose a manifest file (one JSON task per line).", true);
    return;
  }
  const params = new URLSearchParams();
  if ($("batch-max").value) params.set("max_in_flight", $("batch-max").value);
  const submit = $("batch-submit");
  submit.disabled = true;
  try {
    say(`Sending ${file.name}…`);
    const resp = await api("POST", `/batches?${params}`, { body: file, headers: { "Content-Type": "application/x-ndjson" } });
    const b = await resp.json();
    upsertBatch(b);
    say(`Batch ${b.id.slice(0, 8)} accepted: ${b.total} tasks`);
  } catch (err) {
    const lines = Array.isArray(err.details) ? err.details.find((d) => d.field === "failing_lines") : null;
    say(lines ? `The manifest was refused: ${lines.count} line(s) failed (${lines.lines.slice(0, 20).join(", ")}). ${explain(err)}`
      : `Could not submit the batch: ${explain(err)}`, true);
  } finally {
    submit.disabled = false;
  }
}

async function downloadReport(id) {
  try {
    const blob = await (await api("GET", `/batches/${encodeURIComponent(id)}/report`, { headers: { Accept: "application/x-ndjson" } })).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `batch-${id}.ndjson`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    say(`Downloaded ${a.download}`);
  } catch (err) {
    say(`Report failed: ${explain(err)}`, true);
  }
}

async function retryBatch(id) {
  try {
    const out = await (await api("POST", `/batches/${encodeURIComponent(id)}/retry`)).json();
    upsertBatch(out.batch);
    say(`Re-running ${out.retried} failed line(s)`);
  } catch (err) {
    say(`Retry failed: ${explain(err)}`, true);
  }
}

async function cancelBatch(id) {
  try {
    upsertBatch(await (await api("POST", `/batches/${encodeURIComponent(id)}/cancel`)).json());
  } catch (err) {
    say(`Cancel failed: ${explain(err)}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("batch-form").addEventListener("submit", submitBatch);
  // Load (and follow) the batches whenever the app panel is shown: after sign-in or a reload.
  new MutationObserver(() => {
    if (!$("app-panel").hidden) {
      loadBatches();
    } else {
      for (const id of [...batchStreams.keys()]) closeBatchStream(id);
      batchRows.clear();
      $("batches").tBodies[0].replaceChildren();
    }
  }).observe($("app-panel"), { attributes: true, attributeFilter: ["hidden"] });
});
