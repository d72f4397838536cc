// Ops: the engine and Redis, requests and latency per skill (from the Prometheus metrics at /metrics),
// and the library's compression (MoS shard pools) with its progress. Refreshes every few seconds.
// Compressing (or storing every skill exact again) re-encodes the whole library: the browser's own
// confirmation dialog comes first (drawn above every page, no other page can cover or answer it).

import { call, paths } from "../api.js";
import { attempt, errorBox, h, pct } from "../ui.js";

const REFRESH_MS = 3000;
const COMPRESS_QUESTION = "Compress the whole library? Every skill's weights are re-encoded into shared shard "
  + "pools, within an error budget; the uploaded weights are not kept, so this cannot be undone exactly.";
const EXACT_QUESTION = "Store every skill exact again? Every skill of the library is re-encoded from its shards, "
  + "and uploads are no longer compressed.";

/** Prometheus text -> [{name, labels, value}]. */
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v.replace(/\\(.)/g, "$1");
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** The q-quantile of a histogram's cumulative buckets ({le: count}), interpolated as Prometheus does. */
function quantile(q, buckets) {
  const les = Object.keys(buckets).map((le) => [le === "+Inf" ? Infinity : Number(le), buckets[le]]).sort((a, b) => a[0] - b[0]);
  const total = les.length ? les[les.length - 1][1] : 0;
  if (!total) return null;
  const rank = q * total;
  let prevLe = 0, prevCount = 0;
  for (const [le, count] of les) {
    if (count >= rank) {
      if (le === Infinity) return prevLe;
      return prevLe + (le - prevLe) * (count > prevCount ? (rank - prevCount) / (count - prevCount) : 0);
    }
    prevLe = le; prevCount = count;
  }
  return prevLe;
}

function perTarget(samples) {
  const rows = {};
  const row = (t) => (rows[t] = rows[t] || { requests: 0, errors: 0, sum: 0, count: 0, buckets: {}, prompt: 0, completion: 0 });
  for (const s of samples) {
    const t = s.labels.target;
    if (t === undefined) continue;
    if (s.name === "mosaic_target_requests_total") {
      row(t).requests += s.value;
      if (s.labels.outcome !== "ok") row(t).errors += s.value;
    } else if (s.name === "mosaic_target_request_seconds_sum") row(t).sum = s.value;
    else if (s.name === "mosaic_target_request_seconds_count") row(t).count = s.value;
    else if (s.name === "mosaic_target_request_seconds_bucket") row(t).buckets[s.labels.le] = s.value;
    else if (s.name === "mosaic_target_tokens_total") row(t)[s.labels.kind] = s.value;
  }
  return Object.entries(rows).sort((a, b) => b[1].requests - a[1].requests);
}

const total = (samples, name, label) => {
  const out = {};
  for (const s of samples) if (s.name === name) out[s.labels[label]] = (out[s.labels[label]] || 0) + s.value;
  return out;
};
const ms = (s) => s === null || s === undefined || Number.isNaN(s) ? "–" : `${(1000 * s).toFixed(0)} ms`;
const kv = (pairs) => h("div", { class: "kv" }, pairs.map(([k, v]) => [h("span", {}, k), h("span", {}, String(v))]));

async function engineCard() {
  const t0 = performance.now();
  const health = await call("GET", paths.health, { allow: [503] });
  const b = health.body;
  const card = h("div", { class: "card", id: "ops-engine" }, h("h2", {}, "Engine"), kv([
    ["status", b.status], ["engine", b.engine], ["base model", b.base_model],
    ["started in", b.engine_start_seconds ? `${b.engine_start_seconds.toFixed(1)} s` : "–"], ["restarts", b.engine_restarts],
    ...(b.error ? [["error", b.error]] : [])]));
  let redis;
  try {
    const r0 = performance.now();
    await call("GET", paths.adapters, { query: { limit: 1 } });
    redis = ["answering", `${(performance.now() - r0).toFixed(0)} ms for a listing page`];
  } catch (err) {
    redis = err.status === 503 ? ["unavailable", err.message] : ["unknown", err.message];
  }
  card.append(h("h2", {}, "Redis (the skill registry)"), kv([["state", redis[0]], ["", redis[1]]]));
  card.append(h("p", { class: "muted" }, `checked in ${(performance.now() - t0).toFixed(0)} ms`));
  return card;
}

function metricsCard(samples) {
  const rows = perTarget(samples);
  const cache = total(samples, "mosaic_composition_cache_total", "result");
  const router = total(samples, "mosaic_router_decisions_total", "decision");
  const registry = total(samples, "mosaic_registry_operations_total", "outcome");
  return h("div", { class: "card", id: "ops-metrics" },
    h("h2", {}, "Requests per skill (since the server started)"),
    rows.length ? h("table", { id: "ops-targets" },
      h("thead", {}, h("tr", {}, ["served by", "requests", "errors", "mean", "p50", "p95", "prompt tokens", "completion tokens"]
        .map((t, i) => h("th", { class: i ? "num" : "" }, t)))),
      h("tbody", {}, rows.map(([t, r]) => h("tr", {},
        h("td", { class: "mono" }, t), h("td", { class: "num" }, r.requests), h("td", { class: "num" }, r.errors),
        h("td", { class: "num" }, ms(r.count ? r.sum / r.count : null)), h("td", { class: "num" }, ms(quantile(0.5, r.buckets))),
        h("td", { class: "num" }, ms(quantile(0.95, r.buckets))), h("td", { class: "num" }, r.prompt), h("td", { class: "num" }, r.completion)))))
      : h("p", { class: "muted" }, "No inference requests yet."),
    h("div", { class: "grid2" },
      h("div", {}, h("h2", {}, "Composition cache"), kv(Object.entries(cache).length ? Object.entries(cache) : [["lookups", 0]])),
      h("div", {}, h("h2", {}, "Router decisions"), kv(Object.entries(router).length ? Object.entries(router) : [["decisions", 0]]))),
    h("h2", {}, "Registry operations"), kv(Object.entries(registry)));
}

function compressionCard(job, refresh) {
  const p = job.progress || {};
  const status = h("div");
  const start = (body, question) => {
    if (!window.confirm(question)) return undefined;
    return attempt(status, async () => { await call("POST", paths.compress, { json: body }); refresh(); });
  };
  return h("div", { class: "card", id: "ops-compression" }, h("h2", {}, "Compression (MoS shard pools)"),
    kv([["state", job.state], ...(p.step ? [["step", `${p.step}: ${p.done} of ${p.total}`]] : []),
        ...(job.report && job.report.ratio ? [["ratio", `${job.report.ratio.toFixed(2)}×`]] : []),
        ...(job.error ? [["error", job.error]] : [])]),
    p.total ? h("div", { class: "progress", title: pct(p.done / p.total) }, h("div", { style: `width: ${100 * p.done / p.total}%` })) : null,
    job.report ? h("details", {}, h("summary", {}, "report"), h("pre", { class: "mono" }, JSON.stringify(job.report, null, 2))) : null,
    h("div", { class: "row", style: "margin-top: 10px" },
      h("button", { class: "secondary", id: "compress", disabled: job.state === "running",
        onclick: () => start({}, COMPRESS_QUESTION) }, "Compress the library"),
      h("button", { class: "secondary", id: "store-exact", disabled: job.state === "running",
        onclick: () => start({ off: true }, EXACT_QUESTION) }, "Store every skill exact")),
    status);
}

export async function render(root) {
  root.append(h("h1", {}, "Ops"));
  const body = h("div");
  root.append(body);
  let timer = null, gone = false;
  const refresh = async () => {
    clearTimeout(timer);
    const parts = await Promise.all([
      engineCard().catch(errorBox),
      call("GET", paths.metrics).then((text) => metricsCard(parseMetrics(text))).catch(errorBox),
      call("GET", paths.compress).then((job) => compressionCard(job, refresh)).catch(errorBox),
    ]);
    if (gone) return;
    body.replaceChildren(h("div", { class: "grid2" }, parts[0], parts[2]), parts[1]);
    timer = setTimeout(refresh, REFRESH_MS);
  };
  await refresh();
  return () => { gone = true; clearTimeout(timer); };
}
