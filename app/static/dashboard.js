// selflm dashboard: polls the JSON API and draws its charts as plain SVG (no libraries).
"use strict";

const STAGES = ["generate", "select", "update", "evaluate", "meta_step", "decide"];
const ACTIVE = ["queued", "running"];
const POLL_MS = 2000;
const KEY = "selflm-api-key";
const $ = (id) => document.getElementById(id);
let lastServing = null; // {t, tokens, requests} for tokens/s between polls
let activeRound = null;

// ---------------------------------------------------------------- helpers
function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);
const fmt = (v, digits = 4) => (num(v) === null ? "" : Number(v.toPrecision(digits)).toString());
const secs = (v) => (num(v) === null ? "" : v.toFixed(1) + " s");
function bytes(n) {
  if (num(n) === null) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}
function authHeaders() {
  const key = sessionStorage.getItem(KEY) || "";
  return key ? { authorization: "Bearer " + key } : {};
}
async function api(path, opts = {}) {
  const headers = Object.assign({ accept: "application/json" }, authHeaders(), opts.headers || {});
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = text; }
  if (!r.ok) {
    const err = body && body.error;
    const msg = typeof err === "string" ? err : err && err.message ? err.message : text;
    throw new Error(`HTTP ${r.status}: ${msg}`);
  }
  return body;
}
function message(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "muted";
}

// ---------------------------------------------------------------- round progress
function stageFractions(r) {
  const out = {};
  const done = r.status === "succeeded" || r.stage === "done";
  const current = STAGES.indexOf(r.stage);
  const inside = Math.min(1, Math.max(0, num(r.stage_progress) || 0));
  STAGES.forEach((s, i) => {
    out[s] = done ? 1 : i < current ? 1 : i === current ? inside : 0;
  });
  return out;
}
function detailText(r) {
  const d = r.progress_detail;
  if (!d || typeof d !== "object") return "";
  const parts = [];
  if (num(d.done) !== null && num(d.total) !== null) parts.push(`${d.done}/${d.total} ${d.unit || ""}`.trim());
  for (const [k, v] of Object.entries(d)) {
    if (!["done", "total", "unit"].includes(k) && num(v) !== null) parts.push(`${k} ${fmt(v)}`);
  }
  return parts.join(" · ");
}
function bar(label, fraction, detail, cls) {
  const pct = Math.round(fraction * 1000) / 10;
  return el("div", { class: "bar " + (cls || ""), "data-stage": label },
    el("span", {}, label),
    el("div", { class: "track" }, el("div", { class: "fill", style: `width:${pct}%` })),
    el("span", { class: "pct" }, pct + "%"),
    el("span", { class: "muted" }, detail || ""));
}
function drawRound(r) {
  const box = $("round-live");
  box.replaceChildren();
  $("cancel-round").disabled = !r;
  if (!r) {
    box.append(el("p", { class: "muted" }, "no round is running"));
    return;
  }
  const eta = num(r.eta_s) !== null ? ` · ETA ${Math.round(r.eta_s)} s` : "";
  box.append(el("p", { id: "round-status" }, `round ${r.id}: ${r.status}, stage ${r.stage || "-"}${eta}`));
  box.append(bar("overall", num(r.progress) || 0, "", "overall"));
  const fr = stageFractions(r);
  for (const s of STAGES) box.append(bar(s, fr[s], s === r.stage ? detailText(r) : ""));
}

// ---------------------------------------------------------------- charts (SVG)
function drawChart(svg, versions, series, rejected, promotedVersions) {
  const W = 640, H = 260, L = 56, R = 16, T = 14, B = 44;
  svg.replaceChildren();
  const values = [];
  for (const s of series) for (const v of versions) if (num(v.metrics[s.key]) !== null) values.push(v.metrics[s.key]);
  for (const m of rejected) for (const s of series) if (num(m.values[s.key]) !== null) values.push(m.values[s.key]);
  if (!values.length) {
    svg.append(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
      "no measurements yet: a round measures its parent and its candidate"));
    return;
  }
  const xs = versions.map((v) => v.version).concat(rejected.map((m) => m.x));
  const x0 = Math.min(...xs) - 0.5, x1 = Math.max(...xs) + 0.5;
  let y0 = Math.min(...values), y1 = Math.max(...values);
  const pad = (y1 - y0) * 0.1 || Math.abs(y1) * 0.1 || 1;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.append(el("svg:line", { class: "grid", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }));
    svg.append(el("svg:text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, fmt(y, 3)));
  }
  svg.append(el("svg:line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  svg.append(el("svg:line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  for (const v of versions) {
    svg.append(el("svg:text", { x: sx(v.version), y: H - B + 16, "text-anchor": "middle" }, "v" + v.version));
  }
  series.forEach((s, si) => {
    const pts = versions.filter((v) => num(v.metrics[s.key]) !== null);
    if (pts.length > 1) {
      svg.append(el("svg:polyline", { class: "line", stroke: s.color,
        points: pts.map((v) => `${sx(v.version)},${sy(v.metrics[s.key])}`).join(" ") }));
    }
    for (const v of pts) {
      const cx = sx(v.version), cy = sy(v.metrics[s.key]);
      if (promotedVersions.has(v.version)) svg.append(el("svg:circle", { class: "ring", cx, cy, r: 8 }));
      const c = el("svg:circle", { class: "pt", cx, cy, r: 5, fill: s.color,
        "data-series": s.key, "data-version": v.version });
      c.append(el("svg:title", {}, `v${v.version} ${s.label}: ${fmt(v.metrics[s.key])}`));
      svg.append(c);
    }
    for (const m of rejected) {
      const y = m.values[s.key];
      if (num(y) === null) continue;
      const cx = sx(m.x), cy = sy(y), d = 5;
      const g = el("svg:g", { class: "x-mark", "data-round": m.round, "data-series": s.key });
      g.append(el("svg:line", { x1: cx - d, y1: cy - d, x2: cx + d, y2: cy + d }));
      g.append(el("svg:line", { x1: cx - d, y1: cy + d, x2: cx + d, y2: cy - d }));
      g.append(el("svg:title", {}, `round ${m.round} rejected (parent v${m.x - 0.5}) ${s.label}: ${fmt(y)}`));
      svg.append(g);
    }
    // legend
    const lx = L + 10 + si * 150;
    svg.append(el("svg:circle", { cx: lx, cy: H - 10, r: 5, fill: s.color }));
    svg.append(el("svg:text", { x: lx + 9, y: H - 6 }, s.label));
  });
  const lx = L + 10 + series.length * 150;
  svg.append(el("svg:circle", { class: "ring", cx: lx, cy: H - 10, r: 6 }));
  svg.append(el("svg:text", { x: lx + 10, y: H - 6 }, "promoted"));
  const g = el("svg:g", { class: "x-mark" });
  g.append(el("svg:line", { x1: lx + 80, y1: H - 15, x2: lx + 90, y2: H - 5 }));
  g.append(el("svg:line", { x1: lx + 80, y1: H - 5, x2: lx + 90, y2: H - 15 }));
  svg.append(g);
  svg.append(el("svg:text", { x: lx + 95, y: H - 6 }, "rejected"));
}
function drawCharts(report) {
  const versions = report.checkpoints || [];
  const promoted = new Set();
  const rejected = [];
  for (const r of report.rounds || []) {
    if (r.decision === "promoted" && r.candidate_version != null) promoted.add(r.candidate_version);
    if (r.decision === "rejected" && r.base_version != null) {
      const values = {};
      for (const [k, v] of Object.entries(r.metrics || {})) {
        if (k.startsWith("candidate_")) values[k.slice(10)] = v;
      }
      rejected.push({ round: r.id, x: r.base_version + 0.5, values });
    }
  }
  drawChart($("chart-ppl"), versions, [
    { key: "dev_ppl", label: "dev perplexity", color: "#2f6fde" },
    { key: "test_ppl", label: "test perplexity", color: "#8a4fd8" },
  ], rejected, promoted);
  drawChart($("chart-div"), versions, [
    { key: "distinct_2", label: "distinct-2", color: "#1f9d6b" },
    { key: "repetition_rate", label: "repetition", color: "#d9822b" },
  ], rejected, promoted);
}

// ---------------------------------------------------------------- tables
function drawRounds(list) {
  const body = $("rounds").querySelector("tbody");
  body.replaceChildren();
  for (const r of list.items || []) {
    const m = r.metrics || {};
    const eps = (m.decide || {}).epsilon ?? (m.meta_step || {}).epsilon_chosen;
    const t = r.timings || {};
    const cls = r.decision === "promoted" ? "promoted" : r.decision === "rejected" ? "rejected" : "";
    const tr = el("tr", { "data-round-id": r.id },
      el("td", {}, r.id),
      el("td", {}, r.status),
      el("td", { class: cls }, r.decision || ""),
      el("td", {}, (r.base_version != null ? "v" + r.base_version : "") + (r.candidate_version != null ? " → v" + r.candidate_version : "")),
      el("td", { class: "num" }, num(eps) === null ? "" : eps));
    for (const s of STAGES) tr.append(el("td", { class: "num" }, secs(t[s])));
    tr.append(el("td", { class: "num" }, secs((m.round || {}).seconds)));
    tr.append(el("td", { class: "reason" }, r.reason || r.error || ""));
    body.append(tr);
  }
  if (!(list.items || []).length) body.append(el("tr", {}, el("td", { colspan: 13, class: "muted" }, "no rounds yet")));
}
function drawCheckpoints(report) {
  const body = $("checkpoints").querySelector("tbody");
  body.replaceChildren();
  const select = $("promote-version");
  const chosen = select.value;
  select.replaceChildren();
  for (const c of (report.checkpoints || []).slice().reverse()) {
    body.append(el("tr", { "data-version": c.version },
      el("td", {}, "v" + c.version),
      el("td", { class: c.status === "champion" ? "promoted" : "" }, c.status),
      el("td", {}, c.parent_version != null ? "v" + c.parent_version : ""),
      el("td", {}, c.produced_by_round ?? ""),
      el("td", { class: "num" }, bytes(c.size_bytes)),
      el("td", { class: "reason muted" }, c.path || "")));
    select.append(el("option", { value: c.version }, "v" + c.version + " (" + c.status + ")"));
  }
  if (chosen) select.value = chosen;
}

// ---------------------------------------------------------------- serving stats
function parseProm(text) {
  // Prometheus text: name{labels} value → [{name, labels, value}]
  const rows = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const p of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[p[1]] = p[2];
    rows.push({ name: m[1], labels, value: parseFloat(m[4]) });
  }
  return rows;
}
function quantile(buckets, q) {
  // buckets: [[le, cumulative count]] sorted by le
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (!total) return null;
  const target = q * total;
  let prevLe = 0, prevCount = 0;
  for (const [le, count] of buckets) {
    if (count >= target) {
      if (!isFinite(le)) return prevLe;
      return prevLe + (le - prevLe) * ((target - prevCount) / Math.max(1e-12, count - prevCount));
    }
    prevLe = le; prevCount = count;
  }
  return prevLe;
}
function histograms(rows) {
  const fams = {};
  for (const r of rows) {
    if (!r.name.endsWith("_bucket") || r.labels.le === undefined) continue;
    const fam = r.name.slice(0, -7);
    const le = r.labels.le === "+Inf" ? Infinity : parseFloat(r.labels.le);
    fams[fam] = fams[fam] || new Map();
    fams[fam].set(le, (fams[fam].get(le) || 0) + r.value); // summed over the other labels
  }
  return Object.entries(fams).map(([name, m]) => {
    const b = [...m.entries()].sort((a, c) => a[0] - c[0]);
    return { name, count: b.length ? b[b.length - 1][1] : 0, p50: quantile(b, 0.5), p95: quantile(b, 0.95), p99: quantile(b, 0.99) };
  });
}
function drawServing(health, promText) {
  const d = (health && health.details) || {};
  const now = Date.now() / 1000;
  let tps = null, rps = null;
  if (lastServing && num(d.generated_tokens_total) !== null && now > lastServing.t) {
    tps = (d.generated_tokens_total - lastServing.tokens) / (now - lastServing.t);
    rps = (d.requests_total - lastServing.requests) / (now - lastServing.t);
  }
  if (num(d.generated_tokens_total) !== null) {
    lastServing = { t: now, tokens: d.generated_tokens_total, requests: d.requests_total };
  }
  const kv = [
    ["status", health ? health.status : "unreachable"],
    ["requests served", d.requests_total ?? ""],
    ["requests/s (since last poll)", rps === null ? "" : rps.toFixed(2)],
    ["tokens generated", d.generated_tokens_total ?? ""],
    ["tokens/s (since last poll)", tps === null ? "" : tps.toFixed(1)],
    ["queue depth", d.queue_depth ?? ""],
    ["batches", d.batches_total ?? ""],
    ["hot swaps", d.swaps_total ?? ""],
    ["last swap", secs(d.last_swap_seconds)],
  ];
  const body = $("serving-stats").querySelector("tbody");
  body.replaceChildren(...kv.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))));
  const lat = $("latency").querySelector("tbody");
  const hs = promText ? histograms(parseProm(promText)) : [];
  lat.replaceChildren(...hs.map((h) => el("tr", {},
    el("td", {}, h.name), el("td", { class: "num" }, h.count),
    el("td", { class: "num" }, fmt(h.p50, 3)), el("td", { class: "num" }, fmt(h.p95, 3)), el("td", { class: "num" }, fmt(h.p99, 3)))));
  if (!hs.length) lat.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "this server exposes no latency histograms on /metrics")));
}
function drawHeader(health, lineage, info) {
  const pills = $("serving");
  const pill = (label, value) => el("span", { class: "pill" }, label + " ", el("b", {}, value));
  const items = [];
  if (lineage) {
    items.push(pill("lineage", lineage.lineage));
    items.push(pill("champion", lineage.champion_version != null ? "v" + lineage.champion_version : "none"));
  }
  if (health) {
    items.push(pill("this replica serves", health.serving_version != null ? "v" + health.serving_version : "nothing"));
    if (health.wanted_version != null && health.wanted_version !== health.serving_version) {
      items.push(pill("swapping to", "v" + health.wanted_version));
    }
    items.push(pill("health", health.status));
  }
  if (info) items.push(pill("source", info.model_id));
  if (lineage && lineage.lineage_versions) items.push(pill("ancestry", lineage.lineage_versions.map((v) => "v" + v).join(" → ")));
  pills.replaceChildren(...items);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

// ---------------------------------------------------------------- polling
const soft = (p) => p.catch(() => null);
async function refresh() {
  const [health, lineage, info, report, rounds, prom] = await Promise.all([
    soft(api("/health")), soft(api("/info/lineage")), soft(api("/info")),
    soft(api("/metrics?limit=200")), soft(api("/update-rounds?limit=50")),
    soft(fetch("/metrics", { headers: Object.assign({ accept: "text/plain;version=0.0.4" }, authHeaders()) }).then((r) => (r.ok ? r.text() : null))),
  ]);
  drawHeader(health, lineage, info);
  if (report) { drawCharts(report); drawCheckpoints(report); }
  if (rounds) {
    drawRounds(rounds);
    activeRound = (rounds.items || []).find((r) => ACTIVE.includes(r.status)) || null;
    drawRound(activeRound);
  }
  drawServing(health, prom);
}
async function loop() {
  try { await refresh(); } catch (e) { message(String(e), true); }
  setTimeout(loop, activeRound ? POLL_MS / 2 : POLL_MS);
}

// ---------------------------------------------------------------- actions
async function act(label, path, body) {
  try {
    const out = await api(path, { method: "POST", headers: Object.assign({ "content-type": "application/json" }, authHeaders()),
      body: body === undefined ? undefined : JSON.stringify(body) });
    message(label + ": ok" + (out && out.id ? ` (round ${out.id})` : ""), false);
    await refresh();
  } catch (e) {
    message(label + ": " + e.message, true);
  }
}
function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY) || "";
  key.addEventListener("input", () => sessionStorage.setItem(KEY, key.value.trim()));
  $("start-round").addEventListener("click", () => {
    let params;
    try { params = JSON.parse($("round-params").value || "{}"); } catch (e) { message("round parameters: not JSON: " + e.message, true); return; }
    act("start round", "/update-rounds", params);
  });
  $("cancel-round").addEventListener("click", () => {
    if (activeRound) act("cancel round " + activeRound.id, `/update-rounds/${activeRound.id}/cancel`);
  });
  $("promote").addEventListener("click", () => {
    const v = $("promote-version").value;
    if (v && confirm(`Make v${v} the champion? Every replica will hot-swap to it.`)) act("promote v" + v, `/checkpoints/${v}/promote`);
  });
  loop();
}
init();
