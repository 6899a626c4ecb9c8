// fedrad dashboard: read-only views of the coordinator's run directories, polled every few seconds.
// Everything is served by the dashboard itself (plotly.min.js included): no request leaves this origin.
"use strict";
const POLL_MS = 2000;
let timer = null;
let lastJson = "";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}
const num = (v, d = 4) => (v == null ? "-" : Number(v).toFixed(d));
function dur(s) {
  if (s == null) return "-";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`;
}
const iso = (t) => (t == null ? "-" : new Date(t * 1000).toISOString().replace(/\.\d+Z$/, "Z"));

async function getJson(url) {
  const res = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (res.status === 401 || res.status === 403) { location.reload(); throw new Error("signed out"); }
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

function table(id, header, rows) {
  return el("table", { id }, el("thead", {}, el("tr", {}, ...header.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => (c instanceof Node ? el("td", {}, c)
      : el("td", typeof c === "number" ? { class: "num" } : {}, c)))))));
}

function layout(title, ytitle, extra) {
  return Object.assign({
    title: { text: title, font: { size: 14 } }, margin: { l: 60, r: 20, t: 40, b: 90 },
    xaxis: { title: { text: "round" }, tickformat: "d", dtick: 1 },
    yaxis: { title: { text: ytitle } }, legend: { orientation: "h", x: 0, y: -0.32, yanchor: "top" }, font: { size: 12 },
  }, extra || {});
}

function plot(id, traces, lay) {
  const node = document.getElementById(id);
  if (!node) return;
  if (!traces.length) {
    if (node.data) Plotly.purge(node);
    node.replaceChildren(el("p", { class: "muted empty" }, `${lay.title.text}: not recorded in this run (yet)`));
    return;
  }
  if (!node.data) node.replaceChildren();
  Plotly.react(node, traces, lay, { displayModeBar: false, responsive: true });
}

async function showRuns(view) {
  const data = await getJson("/api/runs");
  const json = JSON.stringify(data);
  if (json === lastJson) return;
  lastJson = json;
  const rows = data.runs.map((r) => [
    el("a", { href: `#/run/${encodeURIComponent(r.name)}`, class: "run-link" }, r.name), r.run_id || "-",
    r.status, `${r.round}/${r.rounds_planned || "?"}`, dur(r.elapsed_seconds),
    r.sites_answered == null ? "-" : `${r.sites_answered} / ${r.sites_aggregated}`,
    num(r.train_loss), num(r.eval_loss), r.eta_seconds == null ? "-" : dur(r.eta_seconds)]);
  view.replaceChildren(el("h1", {}, "Runs"), data.runs.length
    ? table("runs-table", ["run", "Flower id", "status", "round", "elapsed", "sites answered / aggregated",
      "train loss", "held-out loss", "ETA"], rows)
    : el("p", { class: "muted" }, `no run directory under ${data.runs_dir} yet`));
}

function lines(rounds, series, names) {
  return Object.entries(names).filter(([k]) => series[k] && series[k].some((v) => v != null))
    .map(([k, label]) => ({ x: rounds, y: series[k], name: label, mode: "lines+markers", type: "scatter" }));
}
function perSite(sites, key) {
  return Object.entries(sites).filter(([, s]) => s[key]).map(([name, s]) => ({
    x: s[key].map((p) => p[0]), y: s[key].map((p) => p[1]), name, mode: "lines+markers", type: "scatter" }));
}

async function showRun(view, name) {
  const r = await getJson(`/api/runs/${encodeURIComponent(name)}`);
  const json = JSON.stringify(r);
  if (json === lastJson) return;
  const first = !lastJson.startsWith('{"name"') || !document.getElementById("plot-loss");
  lastJson = json;
  if (first) {
    view.replaceChildren(el("h1", {}, `Run ${r.name}`), el("div", { class: "facts", id: "run-facts" }),
      el("h2", {}, "Sites"), el("div", { id: "run-sites" }),
      el("div", { class: "grid" }, ...["loss", "site-loss", "geometry", "auc", "timing", "epsilon"].map(
        (id) => el("div", { class: "plot", id: `plot-${id}` }))),
      el("h2", {}, "Capped or rejected updates"), el("div", { id: "run-screening" }),
      el("h2", {}, "Checkpoints and releases"), el("div", { id: "run-files" }));
  }
  document.getElementById("run-facts").replaceChildren(
    el("span", { id: "run-status" }, `status: ${r.status}`),
    el("span", { id: "run-round" }, `round ${r.round}/${r.rounds_planned || "?"}`),
    el("span", {}, `elapsed ${dur(r.elapsed_seconds)}`), el("span", {}, `ETA ${dur(r.eta_seconds)}`),
    el("span", {}, [r.strategy, r.objective, r.model].filter(Boolean).join(" · ")),
    el("span", {}, `Flower run ${r.run_id || "-"}`));
  document.getElementById("run-sites").replaceChildren(r.site_names.length
    ? el("ul", { id: "run-site-names" }, ...r.site_names.map((s) => el("li", {}, s)))
    : el("p", { class: "muted" }, "no site has answered yet"));
  plot("plot-loss", lines(r.rounds, r.series, { train_loss: "train loss (weighted mean)",
    eval_loss: "held-out loss (weighted mean)" }), layout("Loss per round", "loss"));
  plot("plot-site-loss", perSite(r.sites, "train_loss"), layout("Train loss per site", "loss"));
  plot("plot-geometry", lines(r.rounds, r.series, { alignment: "alignment", uniformity: "uniformity" }),
    layout("Held-out alignment and uniformity", "value"));
  plot("plot-auc", [...lines(r.rounds, r.series, { knn_auc: "k-NN AUC (mean)", probe_auc: "linear-probe AUC (mean)" }),
    ...perSite(r.sites, "probe_auc").map((t) => ({ ...t, name: `${t.name} probe`, line: { dash: "dot" } })),
    ...perSite(r.sites, "knn_auc").map((t) => ({ ...t, name: `${t.name} k-NN`, line: { dash: "dash" } }))],
  layout("Probe-monitor AUC per round", "AUC", { yaxis: { title: { text: "AUC" }, range: [0, 1] } }));
  const parts = { time_send: "send", time_site_compute_max: "site compute (slowest)", time_wait: "wait",
    time_aggregate: "aggregate", time_checkpoint: "checkpoint" };
  plot("plot-timing", Object.entries(parts).filter(([k]) => r.timing[k]).map(([k, label]) => ({
    x: r.rounds, y: r.timing[k], name: label, type: "bar" })),
  layout("Round time split", "seconds", { barmode: "group" }));
  plot("plot-epsilon", perSite(r.sites, "dp_epsilon"), layout("Privacy spent per site (ε)", "ε"));
  document.getElementById("run-screening").replaceChildren(r.screening.length
    ? table("screening-table", ["round", "site", "action", "code", "reason"],
      r.screening.map((s) => [s.round, s.site, s.action, s.code == null ? "-" : s.code, s.reason]))
    : el("p", { class: "muted" }, "none"));
  document.getElementById("run-files").replaceChildren(table("files-table", ["kind", "name", "when"], [
    ...r.checkpoints.map((c) => ["checkpoint", c.name, iso(c.time)]),
    ...r.releases.map((x) => ["release", `${x.folder} (#${x.sequence ?? "?"})`, x.created || "-"])]));
}

async function showSites(view) {
  const data = await getJson("/api/sites");
  const json = JSON.stringify(data);
  if (json === lastJson) return;
  lastJson = json;
  const rows = data.sites.map((s) => [s.name || s.label || "-", s.node_id, s.status,
    s.connected ? "now" : (s.last_seen || "-"), s.images_reported == null ? "-" : s.images_reported,
    s.last_round || "-", Object.entries(s.refusals || {}).map(([k, v]) => `${k} ×${v}`).join(", ") || "-"]);
  view.replaceChildren(el("h1", {}, "Sites"),
    el("p", { class: "muted" }, data.flower ? `enrolled at ${data.flower}` : "no --superlink: sites seen in the runs only"),
    table("sites-table", ["site", "node id", "status", "last seen", "images reported", "last round", "refusals"], rows));
}

async function tick() {
  const view = document.getElementById("view");
  const hash = location.hash || "#/runs";
  try {
    if (hash.startsWith("#/run/")) await showRun(view, decodeURIComponent(hash.slice(6)));
    else if (hash.startsWith("#/sites")) await showSites(view);
    else await showRuns(view);
    document.getElementById("updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
  } catch (err) {
    document.getElementById("updated").textContent = String(err.message || err);
  }
}

window.addEventListener("hashchange", () => { lastJson = ""; tick(); });
document.addEventListener("DOMContentLoaded", () => { tick(); timer = setInterval(tick, POLL_MS); });
