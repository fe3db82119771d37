// The eclm fleet dashboard: reads only /api/v1/ with the token as a Bearer header, polls
// the open view every second, and builds every cell with textContent (device-supplied
// strings are never parsed as HTML). Timings go to performance marks and window.eclmTimings.
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "eclm-token";
const state = { view: "devices", device: "", query: { sort: "id", order: "asc", page: 1 },
  role: "", timer: 0, polling: false, first: true };
window.eclmTimings = { first: null, updates: [], fetches: [], renders: 0 };

function takeToken() {
  const hash = location.hash.slice(1);
  const found = new URLSearchParams(hash).get("token");
  if (found) {
    sessionStorage.setItem(TOKEN_KEY, found);
    history.replaceState(null, "", location.pathname + "#/devices"); // out of the address bar
  }
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  if (options.body) headers["Content-Type"] = "application/json";
  const reply = await fetch("/api/v1/" + path, { ...options, headers, cache: "no-store" });
  if (reply.status === 401) { showLogin("The token was refused."); throw new Error("401"); }
  const body = await reply.json();
  if (!reply.ok) throw new Error(body.error || reply.status);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v); // CSSOM: allowed by the page's CSP
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined)
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
const $ = (sel) => document.querySelector(sel);
const sub = (text) => el("span", { class: "sub" }, text);

function ago(ts, now) {
  if (ts === null || ts === undefined) return "never";
  const s = Math.max(0, (now || Date.now() / 1000) - ts);
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return (s / 60).toFixed(0) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
const when = (ts) => ts ? new Date(ts * 1000).toLocaleString() : "—";
const num = (v, unit, digits = 0) => v === null || v === undefined ? "—" : v.toFixed(digits) + unit;

function showLogin(message) {
  document.querySelectorAll(".view").forEach((v) => (v.hidden = true));
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  clearTimeout(state.timer);
}

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [view, ...rest] = hash.split("/");
  state.view = ["devices", "device", "rollouts", "learning"].includes(view) ? view : "devices";
  state.device = decodeURIComponent(rest.join("/"));
  document.querySelectorAll(".view").forEach((v) => (v.hidden = v.id !== "view-" + state.view));
  document.querySelectorAll("nav a").forEach((a) =>
    a.classList.toggle("on", a.dataset.view === state.view ||
      (state.view === "device" && a.dataset.view === "devices")));
  $("#login").hidden = true;
  state.first = state.view === "devices" && window.eclmTimings.first === null;
  poll(true);
}

async function poll(now) {
  clearTimeout(state.timer);
  if (state.polling && !now) return;
  state.polling = true;
  const started = performance.now();
  try {
    const view = state.view;
    let got = 0;
    if (view === "devices") {
      const data = await api("devices?" + new URLSearchParams(state.query));
      got = performance.now();
      renderDevices(data);
    }
    else if (view === "device") renderDevice(await api("devices/" + encodeURIComponent(state.device)));
    else if (view === "rollouts") renderRollouts(await api("rollouts"));
    else if (view === "learning") renderLearning(await api("rounds"), await api("versions"));
    document.body.offsetHeight; // layout now: the timing covers what the browser must do
    record(view, started, got);
    $("#live").textContent = "live · updated " + new Date().toLocaleTimeString();
    $("#live").classList.remove("down");
  } catch (err) {
    if (err.message === "401") { state.polling = false; return; }
    $("#live").textContent = "cannot reach the service: " + err.message;
    $("#live").classList.add("down");
  }
  state.polling = false;
  state.timer = setTimeout(poll, POLL_MS);
}

function record(view, started, got) {
  const end = performance.now();
  const t = window.eclmTimings;
  t.renders += 1;
  if (view !== "devices") return;
  if (state.first) {
    state.first = false;
    t.first = end; // since navigation started: fetch, parse, build, layout
    performance.mark("devices-first-render");
  } else {
    t.updates.push(end - started); // request, answer, parse, rows, layout
    t.fetches.push(got - started); // of which request, answer and parse
    if (t.updates.length > 1000) { t.updates.shift(); t.fetches.shift(); }
    performance.measure("devices-update", { start: started, end });
  }
}

// --- devices ---------------------------------------------------------------------------

function fillSelect(select, counts) {
  const keep = select.value;
  const names = Object.keys(counts).filter((n) => n).sort();
  const have = [...select.options].slice(1).map((o) => o.value).join();
  if (have !== names.join()) {
    select.replaceChildren(el("option", { value: "" }, "any"),
      ...names.map((n) => el("option", { value: n }, n)));
    select.value = keep;
  }
}

// A row is rebuilt only when its device's data changed; the times since, which change
// every second, are set in place: a poll of 500 rows then costs a few changed rows.
let rowCache = new Map();

function deviceRow(d, key) {
  const seen = sub(""), since = sub("");
  const tr = el("tr", { "data-device": d.id, class: "st-" + d.status },
    el("td", {}, d.id, sub((d.labels || []).join(" "))),
    el("td", {}, d.profile || "—", sub(d.board || "")),
    el("td", { class: d.status }, d.status, seen),
    el("td", { class: d.phase }, d.phase, since),
    el("td", {}, d.serial ?? "—", sub(d.version === null ? "" : "model v" + d.version)),
    el("td", {}, d.modules || "—", sub(d.backend || "")),
    el("td", {}, num(d.available_mb, " MB free"),
      sub(num(d.cpu_percent, "% CPU") + " · " + num(d.temperature_c, " °C", 1))),
    el("td", {}, d.accuracy === null || d.accuracy === undefined ? "—" :
      (100 * d.accuracy).toFixed(1) + "%"),
    el("td", {}, d.domain || "—"));
  return { id: d.id, key, tr, seen, since };
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function placeRows(tbody, rows) {
  const now = tbody.children;
  if (now.length !== rows.length) { tbody.replaceChildren(...rows); return; }
  for (let i = 0; i < rows.length; i++) if (now[i] !== rows[i]) now[i].replaceWith(rows[i]);
}

function renderDevices(data) {
  const c = data.counts;
  $("#fleet-summary").textContent = `${data.total} devices: ` +
    ["online", "stale", "offline"].map((s) => `${c.status[s] || 0} ${s}`).join(", ") +
    " · " + Object.entries(c.phase).map(([p, n]) => `${n} ${p}`).join(", ") +
    (data.matched !== data.total ? ` · ${data.matched} match the filter` : "");
  fillSelect($("#filters [name=profile]"), c.profile);
  fillSelect($("#filters [name=phase]"), c.phase);
  const rows = data.devices.map((d) => {
    const key = JSON.stringify(d);
    let row = rowCache.get(d.id);
    if (!row || row.key !== key) row = deviceRow(d, key);
    setText(row.seen, ago(d.seen, data.now) + " ago");
    setText(row.since, "for " + ago(d.phase_since, data.now));
    return row;
  });
  rowCache = new Map(rows.map((r) => [r.id, r]));
  placeRows($("#devices tbody"), rows.map((r) => r.tr));
  $("#page").textContent = `page ${data.page} of ${data.pages} (${data.size} a page)`;
  $("#prev").disabled = data.page <= 1;
  $("#next").disabled = data.page >= data.pages;
  state.query.page = data.page;
  document.querySelectorAll("#devices th[data-sort]").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.sort === state.query.sort);
    th.classList.toggle("desc", state.query.order === "desc");
  });
}

// --- one device ------------------------------------------------------------------------

function plot(samples) {
  const W = 640, H = 160, P = 28, NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (samples.length < 2) {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", 10); t.setAttribute("y", 20);
    t.textContent = samples.length ? "one reading so far" : "no readings reported";
    svg.append(t);
    return svg;
  }
  const t0 = samples[0].ts, t1 = samples[samples.length - 1].ts || t0 + 1;
  const series = [["available_mb", "#1565c0", "MB free"], ["cpu_percent", "#ef6c00", "% CPU"],
    ["temperature_c", "#c62828", "°C"]];
  series.forEach(([key, color, label], i) => {
    const values = samples.map((s) => s[key]).filter((v) => v !== null);
    if (!values.length) return;
    const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
    const points = samples.filter((s) => s[key] !== null).map((s) =>
      [P + (W - 2 * P) * (s.ts - t0) / (t1 - t0 || 1),
       H - P - (H - 2 * P) * (s[key] - lo) / span].map((v) => v.toFixed(1)).join(","));
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color);
    line.setAttribute("data-series", key);
    const legend = document.createElementNS(NS, "text");
    legend.setAttribute("x", P + i * 200); legend.setAttribute("y", 14);
    legend.setAttribute("fill", color); legend.setAttribute("font-size", "12");
    legend.textContent = `${label} ${lo.toFixed(0)}–${hi.toFixed(0)}`;
    svg.append(line, legend);
  });
  return svg;
}

function renderDevice(data) {
  const d = data.device, r = data.reported || {}, w = data.desired || {};
  $("#device-title").textContent = d.id;
  $("#device-row").replaceChildren(
    el("div", { class: d.status }, d.status, sub("seen " + ago(d.seen) + " ago")),
    el("div", { class: d.phase }, d.phase, sub("for " + ago(d.phase_since))),
    el("div", {}, (d.profile || "—"), sub(d.board || "")),
    el("div", {}, d.version === null ? "no model version" : "model v" + d.version, sub(d.modules || "")),
    el("div", {}, num(d.available_mb, " MB free"), sub(num(d.cpu_percent, "% CPU") + " · " +
      num(d.temperature_c, " °C", 1))));
  $("#device-plot").replaceChildren(plot(data.samples));
  const artifacts = (w.artifacts || []).map((a) => `${a.part || a.name} ${a.sha256.slice(0, 10)}`);
  const lines = [
    ["serial", w.serial ?? "—", r.serial ?? "—"],
    ["profile", w.target || "—", r.profile || "—"],
    ["programs", artifacts.join(", ") || "—", (r.active || []).map((s) => s.slice(0, 10)).join(", ") || "—"],
    ["phase", w.expires ? "expires " + when(w.expires) : "—", r.phase || "—"],
    ["detail", w.signed ? "signed" : "unsigned", r.detail || "—"],
  ];
  $("#device-states tbody").replaceChildren(...lines.map(([k, a, b]) =>
    el("tr", { class: String(a) === String(b) || k !== "serial" ? "" : "stale" },
      el("th", {}, k), el("td", {}, a), el("td", {}, b))));
  $("#device-timeline tbody").replaceChildren(...data.timeline.map((t) =>
    el("tr", { "data-kind": t.kind }, el("td", {}, when(t.ts)),
      el("td", {}, t.kind === "event" ? "event" : "phase"),
      el("td", { class: t.code }, t.code), el("td", {}, t.reason || ""))));
}

// --- rollouts --------------------------------------------------------------------------

function bar(w) {
  const pct = (n) => (100 * n / Math.max(w.devices, 1)).toFixed(1) + "%";
  const pending = Math.max(0, w.updated - w.succeeded - w.failed);
  return el("div", { class: "bar" }, el("span", { class: "ok", style: { width: pct(w.succeeded) } }),
    el("span", { class: "bad", style: { width: pct(w.failed) } }),
    el("span", { class: "given", style: { width: pct(pending) } }));
}

function renderRollouts(data) {
  $("#start-rollout").hidden = state.role !== "operate";
  if (!data.rollouts.length) {
    $("#rollouts").replaceChildren(el("p", {}, "No rollout yet."));
    return;
  }
  $("#rollouts").replaceChildren(...data.rollouts.map((r) => {
    const abort = state.role === "operate" && r.running ?
      el("button", { class: "abort", onclick: () => abortRollout(r.id) }, "Abort") : null;
    return el("div", { class: "rollout", "data-rollout": r.id, "data-state": r.state,
      "data-succeeded": r.succeeded, "data-total": r.total },
      el("h3", {}, r.id + " ", el("span", { class: "badge " + r.state }, r.state), " ", abort),
      el("p", {}, `wave ${r.wave} of ${r.waves.length - 1} · ${r.succeeded} succeeded, ` +
        `${r.failed} failed, ${r.returned} returned of ${r.total} · updated ${ago(r.ts, data.now)} ago`),
      r.reason ? el("p", { class: "error" }, "reason: " + r.reason) : null,
      ...r.waves.map((w) => el("div", { class: "wave", "data-wave": w.wave },
        el("span", {}, w.wave === 0 ? "canary" : "wave " + w.wave), bar(w),
        el("span", {}, `${w.succeeded}/${w.devices} ok, ${w.failed} failed, ${w.updated} given`))),
      el("details", {}, el("summary", {}, "devices"),
        el("table", { class: "grid" }, el("tbody", {}, ...r.devices.map((d) =>
          el("tr", {}, el("td", {}, d.id), el("td", { class: d.outcome }, d.outcome),
            el("td", { class: d.phase }, d.phase),
            el("td", {}, "for " + ago(d.phase_since, data.now))))))));
  }));
}

async function abortRollout(id) {
  if (!confirm("Abort rollout " + id + "? Devices it updated go back to their previous state."))
    return;
  try { await api("rollouts/" + encodeURIComponent(id) + "/abort", { method: "POST", body: "{}" }); }
  catch (err) { alert("abort failed: " + err.message); }
  poll(true);
}

// --- learning --------------------------------------------------------------------------

function renderLearning(rounds, versions) {
  $("#versions tbody").replaceChildren(...versions.versions.map((v) => el("tr", {},
    el("td", {}, "v" + v.version + (v.version === versions.current ? " (serving)" : "")),
    el("td", {}, when(v.committed)), el("td", {}, v.round_id ?? "—"),
    el("td", {}, v.rollout_id || "—"))));
  if (!versions.versions.length)
    $("#versions tbody").replaceChildren(el("tr", {}, el("td", { colSpan: 4 }, "v0 (as trained)")));
  const refused = Object.entries(rounds.refused).map(([k, n]) => `${n} ${k}`).join(", ");
  $("#refused-total").textContent = `strategy ${rounds.strategy}, quorum ${rounds.quorum} · ` +
    "updates refused: " + (refused || "none");
  $("#rounds").replaceChildren(...rounds.domains.map((d) => el("div", { "data-domain": d.domain },
    el("h3", {}, "domain " + d.domain),
    el("p", {}, "refused: " + (Object.entries(d.refused).map(([k, n]) => `${n} ${k}`).join(", ") || "none")),
    el("table", { class: "grid" },
      el("thead", {}, el("tr", {}, ...["round", "state", "updates", "devices", "samples",
        "opened", "closed", "strategy"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...d.rounds.map((r) => el("tr", {}, el("td", {}, r.id),
        el("td", { class: r.state }, r.state), el("td", {}, r.updates), el("td", {}, r.devices),
        el("td", {}, r.samples ?? "—"), el("td", {}, when(r.opened)), el("td", {}, when(r.closed)),
        el("td", {}, r.strategy))))))));
}

// --- wiring ----------------------------------------------------------------------------

function wire() {
  $("#filters").addEventListener("input", (e) => {
    state.query[e.target.name] = e.target.value;
    state.query.page = 1;
    poll(true);
  });
  $("#devices thead").addEventListener("click", (e) => {
    const key = e.target.dataset.sort;
    if (!key) return;
    state.query.order = state.query.sort === key && state.query.order === "asc" ? "desc" : "asc";
    state.query.sort = key;
    poll(true);
  });
  $("#devices tbody").addEventListener("click", (e) => {
    const row = e.target.closest("tr[data-device]");
    if (row) location.hash = "#/device/" + encodeURIComponent(row.dataset.device);
  });
  $("#prev").onclick = () => { state.query.page -= 1; poll(true); };
  $("#next").onclick = () => { state.query.page += 1; poll(true); };
  $("#login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#login-token").value.trim());
    start();
  });
  $("#start-rollout").addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = Object.fromEntries(new FormData(e.target));
    try {
      const r = await api("rollouts", { method: "POST", body: JSON.stringify(body) });
      $("#start-result").textContent = `${r.rollout_id}: ${r.state}`;
    } catch (err) { $("#start-result").textContent = "refused: " + err.message; }
    poll(true);
  });
  window.addEventListener("hashchange", () => { if (!takeTokenFromHash()) route(); });
}

function takeTokenFromHash() {
  if (!location.hash.includes("token=")) return false;
  takeToken();
  start();
  return true;
}

async function start() {
  if (!takeToken()) { showLogin(""); return; }
  try { state.role = (await api("whoami")).role; } catch (err) { return; }
  route();
}

wire();
start();
