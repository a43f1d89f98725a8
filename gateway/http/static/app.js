// The dashboard: a small client of the JSON admin API. No framework, no build step.
// Every value from the node is put in the page as text (never as HTML): DICOM
// attributes and peer-supplied strings are untrusted.
"use strict";

const TOKEN_KEY = "dicom-gateway-token";
const REFRESH_MS = 2000;
let previous = null; // last status sample, for the live rate
let studyQuery = "";
let timer = null;

function $(id) { return document.getElementById(id); }

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  let payload = null;
  try { payload = await response.json(); } catch (ignored) { payload = null; }
  if (!response.ok) {
    const error = new Error((payload && payload.error) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return payload;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  return td;
}

function button(label, onClick, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

function fill(tableId, rows, build) {
  // Unchanged data leaves the table alone, so a button is never replaced under the cursor.
  const table = $(tableId);
  const signature = JSON.stringify(rows);
  if (table.dataset.signature === signature) return;
  table.dataset.signature = signature;
  const body = table.querySelector("tbody");
  const fresh = document.createElement("tbody");
  for (const row of rows) fresh.appendChild(build(row));
  body.replaceWith(fresh);
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return date.toLocaleString();
}

function age(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  return duration(seconds);
}

function duration(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function megabytes(bytes) { return (bytes / 1e6).toFixed(1); }

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function renderStatus(status) {
  $("node-name").textContent = status.node;
  const now = Date.now();
  if (previous) {
    const seconds = (now - previous.at) / 1000;
    const instances = status.received_last_5_minutes.instances - previous.instances;
    const bytes = status.received_last_5_minutes.bytes - previous.bytes;
    if (seconds > 0 && instances >= 0) {
      $("rate").textContent =
        `${(instances / seconds).toFixed(1)} inst/s · ${megabytes(Math.max(0, bytes) / seconds)} MB/s`;
    }
  }
  previous = {
    at: now,
    instances: status.received_last_5_minutes.instances,
    bytes: status.received_last_5_minutes.bytes,
  };
  $("recent").textContent =
    `${status.received_last_5_minutes.instances} inst · ${megabytes(status.received_last_5_minutes.bytes)} MB`;
  $("open-associations").textContent = status.open_associations;
  $("spool-backlog").textContent = status.spool_backlog;
  $("unrouted").textContent = status.unrouted;
  $("uptime").textContent = duration(status.uptime_seconds);
}

function renderQueues(queues) {
  fill("queues", queues, (q) => {
    const tr = document.createElement("tr");
    tr.dataset.destination = q.destination;
    const unhealthy = q.dead > 0 || q.retrying > 0;
    tr.append(
      cell(q.destination),
      cell(q.paused ? "paused" : (unhealthy ? "attention" : "ok"),
        q.paused ? "state paused" : (unhealthy ? "state warn" : "state ok")),
      cell(q.pending), cell(q.in_flight), cell(q.retrying),
      cell(q.dead, q.dead > 0 ? "warn" : ""), cell(q.done), cell(age(q.oldest_pending)),
    );
    const action = document.createElement("td");
    const verb = q.paused ? "resume" : "pause";
    action.appendChild(button(q.paused ? "Resume" : "Pause", () => act(
      `/api/destinations/${encodeURIComponent(q.destination)}/${verb}`, {})));
    if (q.dead > 0) {
      action.appendChild(button("Requeue all", () => act(
        "/api/dead-letters/requeue", { destination: q.destination })));
    }
    tr.appendChild(action);
    return tr;
  });
}

function renderDeadLetters(letters) {
  $("dead-empty").hidden = letters.length > 0;
  fill("dead-letters", letters, (d) => {
    const tr = document.createElement("tr");
    tr.dataset.job = d.id;
    tr.append(cell(d.id), cell(d.destination), cell(d.study_instance_uid, "uid"),
      cell(d.sop_instance_uid, "uid"), cell(d.attempts), cell(d.reason, "reason"),
      cell(when(d.completed_at)));
    const action = document.createElement("td");
    action.appendChild(button("Requeue", () => act("/api/dead-letters/requeue", { ids: [d.id] }),
      "requeue"));
    tr.appendChild(action);
    return tr;
  });
}

function renderAssociations(rows) {
  fill("associations", rows, (a) => {
    const tr = document.createElement("tr");
    const bad = a.outcome === "rejected" || a.outcome === "aborted" || a.outcome === "interrupted";
    tr.append(cell(when(a.requested_at)), cell(a.calling_ae), cell(`${a.peer_address}:${a.peer_port}`),
      cell(a.outcome, bad ? "state warn" : "state ok"), cell(a.instances_received),
      cell(a.instances_failed, a.instances_failed > 0 ? "warn" : ""), cell(a.duplicates),
      cell(megabytes(a.bytes_received)), cell(a.reject_reason || a.detail || "", "reason"));
    return tr;
  });
}

function deliveryText(deliveries) {
  const parts = [];
  for (const [destination, states] of Object.entries(deliveries)) {
    const counts = Object.entries(states).map(([state, n]) => `${n} ${state}`).join(", ");
    parts.push(`${destination}: ${counts}`);
  }
  return parts.join(" · ") || "not routed";
}

function renderStudies(studies) {
  fill("studies", studies, (s) => {
    const tr = document.createElement("tr");
    const dead = Object.values(s.deliveries).some((states) => states.dead > 0);
    tr.append(cell(when(s.last_received_at)), cell(s.patient_id), cell(s.accession_number),
      cell(s.study_date), cell(s.modalities.join(" ")), cell(s.instances),
      cell(deliveryText(s.deliveries), dead ? "warn" : ""));
    return tr;
  });
}

function renderEvents(events) {
  fill("events", events, (e) => {
    const tr = document.createElement("tr");
    const text = Object.entries(e.deliveries).map(([sink, state]) => `${sink}: ${state}`).join(" · ");
    tr.append(cell(when(e.created_at)), cell(e.kind), cell(e.study_instance_uid, "uid"),
      cell(e.version), cell(text));
    return tr;
  });
}

async function act(path, body) {
  try {
    await api(path, { method: "POST", body });
    showError("");
  } catch (error) {
    showError(`Action failed: ${error.message}`);
  }
  await refresh();
}

async function refresh() {
  if (!token()) return;
  try {
    const [status, queues, dead, associations, studies, events] = await Promise.all([
      api("/api/status"), api("/api/queues"), api("/api/dead-letters?limit=50"),
      api("/api/associations?limit=25"), api(`/api/studies?limit=20${studyQuery}`),
      api("/api/events?limit=15"),
    ]);
    renderStatus(status);
    renderQueues(queues);
    renderDeadLetters(dead);
    renderAssociations(associations);
    renderStudies(studies);
    renderEvents(events);
    $("dashboard").hidden = false;
    $("connection").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (!$("error").textContent.startsWith("Action failed")) showError("");
  } catch (error) {
    if (error.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showTokenForm();
      showError("The token was not accepted.");
    } else {
      $("connection").textContent = "not updating";
      showError(`Cannot reach the node: ${error.message}`);
    }
  }
}

function showTokenForm() {
  $("token-form").hidden = false;
  $("forget-token").hidden = true;
  $("dashboard").hidden = true;
  $("connection").textContent = "not connected";
}

function start() {
  $("token-form").hidden = true;
  $("forget-token").hidden = false;
  refresh();
  if (timer === null) timer = setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    start();
  });
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenForm();
  });
  $("study-search").addEventListener("submit", (event) => {
    event.preventDefault();
    const params = new URLSearchParams();
    for (const [key, value] of new FormData(event.target)) {
      if (String(value).trim()) params.set(key, String(value).trim());
    }
    studyQuery = params.toString() ? `&${params}` : "";
    refresh();
  });
  if (token()) start(); else showTokenForm();
});
