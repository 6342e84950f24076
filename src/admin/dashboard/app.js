// mqbridge dashboard: reads the admin API with the admin token and draws what it reads.
// Every value from the API is set as text (never as HTML): topics, payloads and errors
// come from devices.
"use strict";

const POLL_MS = 2000;
const WINDOW_S = 300;
const COLORS = ["#2f6fdb", "#1f8a4c", "#c0392b", "#b7791f", "#7d3cb5", "#138d90", "#d35400", "#566573"];

let token = sessionStorage.getItem("mqbridge-token") || "";
let timer = null;
let tailAbort = null;
// Samples of the counters charted: [{t, rules: {name: matched}, sinks: {name: written}, in}]
const samples = [];

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "style") Object.assign(e.style, v); // CSSOM: the page's policy forbids style attributes
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c === null || c === undefined ? "" : c instanceof Node ? c : String(c));
  return e;
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) throw new Unauthorized("the admin token was refused");
  return resp;
}

async function json(path) {
  const resp = await api(path);
  if (resp.status === 404) return null;
  if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
  return resp.json();
}

// Prometheus text format → {name: [{labels, value}]}
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const l of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
    }
    (out[m[1]] = out[m[1]] || []).push({ labels, value: Number(m[4]) });
  }
  return out;
}

function metric(metrics, name, label, value) {
  const series = metrics[name] || [];
  let sum = 0;
  for (const s of series) if (label === undefined || s.labels[label] === value) sum += s.value;
  return sum;
}

const fmt = (n) => (Number.isFinite(n) ? (Math.abs(n) >= 100 || Number.isInteger(n) ? Math.round(n).toLocaleString("en") : n.toFixed(1)) : "–");
const bytes = (n) => (n >= 1 << 30 ? (n / (1 << 30)).toFixed(1) + " GiB" : n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MiB" : (n / 1024).toFixed(0) + " KiB");

function rate(key, name) {
  if (samples.length < 2) return NaN;
  const a = samples[samples.length - 2], b = samples[samples.length - 1];
  const dt = (b.t - a.t) / 1000;
  const va = key ? (a[key][name] || 0) : a[name];
  const vb = key ? (b[key][name] || 0) : b[name];
  return dt > 0 ? Math.max(0, (vb - va) / dt) : NaN;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

async function refresh() {
  try {
    const [metricsResp, rules, sinks, letters, spool, clients, ready] = await Promise.all([
      api("/metrics").then((r) => r.text()),
      json("/api/v1/rules"),
      json("/api/v1/sinks"),
      json("/api/v1/dead-letters?limit=20"),
      json("/api/v1/spool"),
      json("/api/v1/clients"),
      fetch("/readyz").then((r) => r.json()),
    ]);
    const m = parseMetrics(metricsResp);
    const sample = { t: Date.now(), rules: {}, sinks: {}, in: metric(m, "mqbridge_source_messages_received_total"), written: metric(m, "mqbridge_sink_records_written_total") };
    for (const r of rules.rules) sample.rules[r.name] = metric(m, "mqbridge_rule_messages_matched_total", "rule", r.name);
    for (const s of sinks.sinks) sample.sinks[s.name] = metric(m, "mqbridge_sink_records_written_total", "sink", s.name);
    samples.push(sample);
    while (samples.length > 2 && samples[0].t < sample.t - WINDOW_S * 1000) samples.shift();

    drawReady(ready);
    drawTiles(m, spool, clients);
    drawRules(m, rules.rules);
    drawSinks(m, sinks.sinks, spool);
    drawClients(clients);
    drawLetters(letters ? letters.dead_letters : []);
    chart($("chart-rules"), $("legend-rules"), "rules", rules.rules.map((r) => r.name));
    chart($("chart-sinks"), $("legend-sinks"), "sinks", sinks.sinks.map((s) => s.name));
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e instanceof Unauthorized) return signOut(e.message);
    $("updated").textContent = "cannot reach mqbridge: " + e.message;
  }
}

function drawReady(ready) {
  const badge = $("ready");
  badge.className = "badge " + (ready.ready ? "ok" : "bad");
  const problems = (ready.not_ready || []).map((p) => p.component + ": " + p.reason);
  const warnings = (ready.warnings || []).map((p) => p.component + ": " + p.reason);
  badge.textContent = ready.ready ? (warnings.length ? "ready, with warnings" : "ready") : "not ready";
  badge.title = problems.concat(warnings).join("\n");
}

function drawTiles(m, spool, clients) {
  $("tile-in").textContent = fmt(rate(null, "in"));
  $("tile-written").textContent = fmt(rate(null, "written"));
  $("tile-dead").textContent = fmt(metric(m, "mqbridge_sink_records_dead_lettered_total") + metric(m, "mqbridge_rule_errors_total"));
  $("tile-spool").textContent = spool ? fmt(spool.records) : "no spool";
  $("tile-clients").textContent = clients ? fmt(clients.clients.filter((c) => c.connected).length) : "external broker";
  $("tile-rss").textContent = bytes(metric(m, "mqbridge_process_resident_memory_bytes"));
}

function drawRules(m, rules) {
  fill($("rules").tBodies[0], rules.map((r) =>
    el("tr", { dataset: { rule: r.name } },
      el("td", { class: "name" }, r.name),
      el("td", {}, r.from.join(", ")),
      el("td", {}, r.to.join(", ")),
      el("td", { class: "num matched" }, fmt(metric(m, "mqbridge_rule_messages_matched_total", "rule", r.name))),
      el("td", { class: "num rate" }, fmt(rate("rules", r.name))),
      el("td", { class: "num filtered" }, fmt(metric(m, "mqbridge_rule_messages_filtered_total", "rule", r.name))),
      el("td", { class: "num records" }, fmt(metric(m, "mqbridge_rule_records_total", "rule", r.name))),
      el("td", { class: "num errors" }, fmt(metric(m, "mqbridge_rule_errors_total", "rule", r.name))),
      el("td", {}, el("button", { type: "button", class: "tail", onclick: () => { $("tail-rule").value = r.name; startTail(); } }, "Tail")))));
  const select = $("tail-rule");
  const names = rules.map((r) => r.name);
  if ([...select.options].map((o) => o.value).join("\n") !== names.join("\n")) {
    const chosen = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (names.includes(chosen)) select.value = chosen;
  }
}

function drawSinks(m, sinks, spool) {
  fill($("sinks").tBodies[0], sinks.map((s) =>
    el("tr", { dataset: { sink: s.name } },
      el("td", { class: "name", title: s.description }, s.name + (s.dead_letter ? " (dead letters)" : "")),
      el("td", {}, s.type),
      el("td", { class: s.healthy ? "healthy" : "unhealthy", title: s.problem || "" }, s.healthy ? "healthy" : "retrying: " + (s.problem || "")),
      el("td", { class: "num queue" }, fmt(s.queue_depth) + " / " + fmt(s.queue_capacity)),
      el("td", { class: "num written" }, fmt(metric(m, "mqbridge_sink_records_written_total", "sink", s.name))),
      el("td", { class: "num rate" }, fmt(rate("sinks", s.name))),
      el("td", { class: "num retried" }, fmt(metric(m, "mqbridge_sink_records_retried_total", "sink", s.name))),
      el("td", { class: "num dead" }, fmt(metric(m, "mqbridge_sink_records_dead_lettered_total", "sink", s.name))))));
  $("spool").textContent = spool
    ? `Spool: ${fmt(spool.records)} records waiting${spool.oldest_record_age_seconds === null ? "" : ", the oldest for " + fmt(spool.oldest_record_age_seconds) + " s"}, ${bytes(spool.bytes)} of ${bytes(spool.max_bytes)}${spool.full ? " (full: acknowledgements paused)" : ""}.`
    : "";
}

function drawClients(clients) {
  $("clients-section").hidden = !clients;
  if (!clients) return;
  fill($("clients").tBodies[0], clients.clients.map((c) =>
    el("tr", { dataset: { client: c.client_id } },
      el("td", {}, c.client_id),
      el("td", {}, c.username || ""),
      el("td", {}, c.peer || "offline"),
      el("td", {}, c.protocol || ""),
      el("td", { class: "num" }, c.subscriptions.length),
      el("td", { class: "num" }, c.queued),
      el("td", {}, c.connected_since || ""))));
}

function drawLetters(letters) {
  fill($("dead-letters").tBodies[0], letters.map((l) =>
    el("tr", { dataset: { id: l.id } },
      el("td", {}, l.last_attempt_at),
      el("td", {}, l.rule),
      el("td", {}, l.sink || "(the rule)"),
      el("td", { class: "topic" }, l.topic),
      el("td", { class: "reason" }, (l.error_kind ? l.error_kind + ": " : "") + l.error + (l.dropped ? " (dropped: no dead_letter sink)" : "")),
      el("td", {}, l.replayed_at
        ? el("span", { class: "replayed muted" }, "replayed " + l.replayed_at)
        : el("button", { type: "button", class: "replay", onclick: (ev) => replay(l.id, ev.target) }, "Replay")))));
}

async function replay(id, button) {
  button.disabled = true;
  const out = $("replay-result");
  out.className = "";
  out.textContent = "replaying…";
  try {
    const resp = await api("/api/v1/dead-letters/" + encodeURIComponent(id) + "/replay", { method: "POST" });
    const body = await resp.json();
    if (resp.ok) {
      out.textContent = body.filtered_out ? "Replayed: the rule now filters the message out." : `Replayed: ${body.records} record(s) written.`;
    } else {
      out.className = "error";
      out.textContent = "Not replayed: " + body.error;
      button.disabled = false;
    }
  } catch (e) {
    if (e instanceof Unauthorized) return signOut(e.message);
    out.className = "error";
    out.textContent = "Not replayed: " + e.message;
    button.disabled = false;
  }
  refresh();
}

function chart(canvas, legend, key, names) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, w, h);
  const now = Date.now(), pad = { l: 48, r: 8, t: 8, b: 18 };
  const series = names.map((name) => {
    const points = [];
    for (let i = 1; i < samples.length; i++) {
      const a = samples[i - 1], b = samples[i], dt = (b.t - a.t) / 1000;
      if (dt > 0) points.push([b.t, Math.max(0, ((b[key][name] || 0) - (a[key][name] || 0)) / dt)]);
    }
    return { name, points };
  });
  const max = Math.max(1, ...series.flatMap((s) => s.points.map((p) => p[1]))) * 1.1;
  const x = (t) => pad.l + (w - pad.l - pad.r) * (1 - (now - t) / (WINDOW_S * 1000));
  const y = (v) => h - pad.b - (h - pad.t - pad.b) * (v / max);
  g.strokeStyle = "#e2e5ea";
  g.fillStyle = "#6b7385";
  g.font = "11px system-ui, sans-serif";
  for (let i = 0; i <= 4; i++) {
    const v = (max / 4) * i;
    g.beginPath();
    g.moveTo(pad.l, y(v));
    g.lineTo(w - pad.r, y(v));
    g.stroke();
    g.fillText(fmt(v), 4, y(v) + 4);
  }
  g.fillText("−5 min", pad.l, h - 4);
  g.fillText("now", w - pad.r - 22, h - 4);
  series.forEach((s, i) => {
    g.strokeStyle = COLORS[i % COLORS.length];
    g.lineWidth = 2;
    g.beginPath();
    s.points.forEach(([t, v], j) => (j ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
    g.stroke();
  });
  legend.replaceChildren(...series.map((s, i) => el("span", {}, el("i", { style: { background: COLORS[i % COLORS.length] } }), s.name)));
}

async function tryMessage(ev) {
  ev.preventDefault();
  const out = $("try-output");
  out.textContent = "…";
  try {
    const resp = await api("/api/v1/try", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ topic: $("try-topic").value, payload: $("try-payload").value }),
    });
    const body = await resp.json();
    if (!resp.ok) {
      out.textContent = "error: " + body.error;
      return;
    }
    const lines = [];
    if (!body.outcomes.length) lines.push("no rule matches topic " + JSON.stringify(body.topic));
    for (const o of body.outcomes) {
      const vars = Object.entries(o.vars).map(([k, v]) => k + "=" + v).join(", ");
      lines.push("rule " + o.rule + " matched" + (vars ? " (" + vars + ")" : ""));
      if (o.result === "filtered") lines.push("  filtered out: nothing is written");
      if (o.result === "failed") lines.push("  " + o.stage + " failed: " + o.error, "  -> " + o.then);
      if (o.result === "records") {
        if (!o.records.length) lines.push("  no records");
        for (const r of o.records) {
          lines.push("  record " + JSON.stringify(r.record));
          for (const s of r.sinks) lines.push("    -> " + s.sink + ": " + s.would);
        }
      }
    }
    out.textContent = lines.join("\n");
  } catch (e) {
    if (e instanceof Unauthorized) return signOut(e.message);
    out.textContent = "error: " + e.message;
  }
}

async function startTail(ev) {
  if (ev) ev.preventDefault();
  if (tailAbort) tailAbort.abort();
  const rule = $("tail-rule").value, n = Math.max(1, Number($("tail-n").value) || 20);
  const out = $("tail-output"), button = $("tail-button");
  const abort = (tailAbort = new AbortController());
  out.textContent = "";
  button.textContent = "Restart";
  const line = (text) => { out.append(text + "\n"); out.scrollTop = out.scrollHeight; };
  try {
    const resp = await api("/api/v1/rules/" + encodeURIComponent(rule) + "/tail?n=" + n + "&timeout=600", { signal: abort.signal });
    if (!resp.ok) return line("error: " + (await resp.json()).error);
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buffered = "", seen = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffered.slice(0, nl));
        buffered = buffered.slice(nl + 1);
        if (event.kind === "watching") line(`watching rule ${event.rule} for its next ${event.n} outcomes…`);
        else if (event.kind === "record") line(`${++seen}. ${event.topic}  ${JSON.stringify(event.record)}`);
        else if (event.kind === "filtered") line(`${++seen}. ${event.topic}  filtered out`);
        else line(`${++seen}. ${event.topic}  failed: ${event.error}`);
      }
    }
    line(seen >= n ? "done." : "stopped (timeout).");
  } catch (e) {
    if (e instanceof Unauthorized) return signOut(e.message);
    if (e.name !== "AbortError") line("error: " + e.message);
  } finally {
    if (tailAbort === abort) button.textContent = "Start";
  }
}

function signOut(message) {
  clearInterval(timer);
  timer = null;
  if (tailAbort) tailAbort.abort();
  token = "";
  sessionStorage.removeItem("mqbridge-token");
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("login-token").focus();
}

function signedIn() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = !token;
  samples.length = 0;
  refresh();
  timer = setInterval(refresh, POLL_MS);
}

// A token is good when the API takes it; with no token configured (loopback only) the
// API answers without one and there is nothing to sign in to.
async function check(candidate) {
  const resp = await fetch("/api/v1/rules", { headers: candidate ? { Authorization: "Bearer " + candidate } : {} });
  return resp.ok;
}

async function login(ev) {
  ev.preventDefault();
  const candidate = $("login-token").value;
  $("login-error").textContent = "";
  try {
    if (!(await check(candidate))) {
      $("login-error").textContent = "The admin token was refused.";
      return;
    }
  } catch (e) {
    $("login-error").textContent = "Cannot reach mqbridge: " + e.message;
    return;
  }
  token = candidate;
  sessionStorage.setItem("mqbridge-token", token);
  $("login-token").value = "";
  signedIn();
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => signOut(""));
  $("try-form").addEventListener("submit", tryMessage);
  $("tail-form").addEventListener("submit", startTail);
  try {
    if (await check(token)) return signedIn();
  } catch (e) {
    $("login-error").textContent = "Cannot reach mqbridge: " + e.message;
  }
  signOut($("login-error").textContent);
});
