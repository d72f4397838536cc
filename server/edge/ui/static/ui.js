// What the pages share: building DOM, formatting, errors as the API gives them, the α bars, the plan
// of a response, and the composition builder (skills with weight sliders, method, rank).

import { call, paths } from "./api.js";

/** h("div", {class: "x", onclick}, child, ...): an element; strings become text (never HTML). A ``style``
 * string is set through the CSSOM: the page's Content-Security-Policy refuses inline style attributes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") el.style.cssText = v;
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export function bytes(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export const when = (seconds) => seconds ? new Date(seconds * 1000).toLocaleString() : "";
export const pct = (x, digits = 1) => x === null || x === undefined ? "–" : `${(100 * x).toFixed(digits)}%`;
export const short = (hash) => hash ? hash.slice(0, 12) : "";

/** How a version's weights are stored: exact, or in shard form with its relative error. */
export function storage(info) {
  const mos = info.mos;
  if (!mos) return "exact";
  if (mos.pool_version === null || mos.pool_version === undefined) {
    return mos.error ? `exact (error ${pct(mos.error, 2)})` : "exact";
  }
  return `shards v${mos.pool_version} · error ${pct(mos.error, 2)} · ${bytes(mos.bytes)}`;
}

/** An error box: the API's message, its type/code/param, and each validation problem on its own line. */
export function errorBox(err) {
  const e = err.error || { message: String(err.message || err) };
  const problems = err.problems || [];
  const detail = [e.type, e.code, e.param && `param: ${e.param}`, err.status && `HTTP ${err.status}`].filter(Boolean);
  return h("div", { class: "error", role: "alert" },
    h("strong", {}, problems.length ? problems.length > 1 ? `${problems.length} problems` : "1 problem" : e.message),
    detail.length ? h("span", { class: "muted" }, ` (${detail.join(" · ")})`) : null,
    problems.length ? h("ul", { class: "problems" }, problems.map((p) => h("li", {}, p))) : null);
}

/** Run an async action, showing its error (as the API returned it) in ``where``. */
export async function attempt(where, action) {
  where.replaceChildren();
  try {
    return await action();
  } catch (err) {
    where.replaceChildren(errorBox(err));
    return undefined;
  }
}

/** A bar chart of {label: value in [0, 1]}, largest first. */
export function bars(values, { cls = "alpha", sort = true } = {}) {
  let rows = Object.entries(values || {});
  if (sort) rows = rows.sort((a, b) => b[1] - a[1]);
  return h("div", { class: `bars ${cls}-bars` }, rows.map(([label, v]) => [
    h("span", { class: "mono" }, label),
    h("div", { class: `bar ${cls}-bar`, title: String(v) }, h("div", { style: `width: ${Math.max(0, Math.min(1, v)) * 100}%` })),
    h("span", { class: "num mono" }, v === null ? "–" : v.toFixed(3)),
  ]));
}

/** What served a response (its ``mosaic`` field), or the router's decision (``/v1/route``'s plan). */
export function planView(m) {
  const skills = m.skills || (m.skill ? [m.skill] : m.composition ? m.composition.skills : []);
  const weights = m.weights && m.weights.length ? m.weights : m.composition && Array.isArray(m.composition.weights) ? m.composition.weights : [];
  const composed = (m.plan || m.kind) === "composition";
  const kv = [
    ["plan", m.plan || m.kind],
    ["skills", skills.map((s, i) => composed && weights[i] !== undefined ? `${s} × ${Number(weights[i]).toFixed(3)}` : s).join(", ") || "–"],
    m.method || (m.composition && m.composition.method) ? ["method", m.method || m.composition.method] : null,
    m.cache ? ["cache", m.cache] : null,
    m.rank !== undefined && m.rank !== null ? ["rank", m.rank] : null,
    m.relative_error !== undefined ? ["refactoring error", m.refactored ? pct(m.relative_error, 3) : "none (exact)"] : null,
    m.reason ? ["reason", m.reason] : null,
  ].filter(Boolean);
  const alpha = m.scores && Object.keys(m.scores).length ? m.scores : null;
  return h("div", { class: "plan" },
    h("div", { class: "kv" }, kv.map(([k, v]) => [h("span", {}, k), h("span", { class: `plan-${k.replace(/ /g, "-")}` }, String(v))])),
    alpha ? [h("h2", {}, "Router α per skill"), bars(alpha)] : null,
    m.alpha && !Array.isArray(m.alpha) ? [h("h2", {}, "α over the composition's skills"), bars(m.alpha)] : null,
    m.similarity && Object.keys(m.similarity).length ? [h("h2", {}, "Similarity to each skill's nearest example"), bars(m.similarity, { cls: "similarity" })] : null);
}

let methodsCache;
export async function methods() {
  methodsCache = methodsCache || call("GET", paths.methods);
  return methodsCache;
}

/** The composition builder: a checkbox and a weight slider per skill, method and rank. ``value()`` gives
 * the API's composition object (skills, weights, method, rank, params). */
export async function compositionBuilder(skills, { weightsAuto = false } = {}) {
  const all = await methods();
  const rows = skills.map((s) => {
    const check = h("input", { type: "checkbox", class: "pick", value: s.name, "aria-label": `use ${s.name}` });
    const shown = h("span", { class: "num mono" }, "1.00");
    const slider = h("input", { type: "range", min: "0", max: "2", step: "0.05", value: "1", class: "weight",
      "aria-label": `weight of ${s.name}`, oninput: () => { shown.textContent = Number(slider.value).toFixed(2); } });
    return { name: s.name, check, slider, els: [check, h("span", { class: "mono", title: s.description }, s.name), slider, shown] };
  });
  const method = h("select", { class: "method", "aria-label": "method" },
    all.map((m) => h("option", { value: m.name, selected: m.name === "linear", title: m.description }, m.name)));
  const about = h("div", { class: "muted" });
  const describe = () => {
    const m = all.find((x) => x.name === method.value);
    about.textContent = m ? `${m.description} — ${m.reference}` : "";
  };
  method.addEventListener("change", describe);
  describe();
  const rank = h("input", { type: "number", min: "1", max: "4096", placeholder: "exact", class: "rank", "aria-label": "rank" });
  const auto = weightsAuto ? h("input", { type: "checkbox", class: "weights-auto", "aria-label": "weights chosen per prompt" }) : null;
  const el = h("div", { class: "builder" },
    h("div", { class: "picker" }, rows.map((r) => r.els)),
    h("div", { class: "form", style: "margin-top: 10px" },
      h("label", {}, "method"), method,
      h("span", {}), about,
      h("label", {}, "rank"), h("div", { class: "row" }, rank, h("span", { class: "muted" }, "empty: exact (no re-factoring)")),
      auto ? [h("label", {}, "weights"), h("label", { class: "row" }, auto, "auto: chosen per prompt by the router (context-aware)")] : null));
  return {
    el,
    value() {
      const picked = rows.filter((r) => r.check.checked);
      const comp = { skills: picked.map((r) => r.name), method: method.value };
      comp.weights = auto && auto.checked ? "auto" : picked.map((r) => Number(r.slider.value));
      if (rank.value) comp.rank = Number(rank.value);
      return comp;
    },
  };
}
