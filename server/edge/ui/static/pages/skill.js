// Skill: every version (content hash, created time), its config and examples, a composition's recipe
// and quality report (what it keeps of each input skill), download and delete (after the browser's own
// confirmation dialog naming what goes: drawn above every page, no other page can cover or answer it).

import { call, download, paths } from "../api.js";
import { attempt, bars, bytes, h, pct, short, storage, when } from "../ui.js";

const MAX_VERSIONS = 20;  // the newest ones get a row each

function kv(pairs) {
  return h("div", { class: "kv" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => [h("span", {}, k), v instanceof Node ? v : h("span", {}, String(v))]));
}

function composition(c) {
  const weights = Array.isArray(c.weights) ? c.weights : null;
  const q = c.quality;
  return h("div", { class: "card", id: "composition" },
    h("h2", {}, "Composition"),
    kv([["skills", c.skills.map((s, i) => weights ? `${s} × ${weights[i]}` : s).join(", ")],
        ["weights", c.weights === "auto" ? "auto (chosen per prompt by the router)" : null],
        ["method", c.method], ["rank", c.rank ?? "exact"],
        ["refactored", c.refactored ? `yes, relative error ${pct(c.relative_error, 3)}` : "no (exact)"]]),
    h("h2", {}, "Quality report"),
    q ? h("div", { id: "quality" },
      h("p", { class: "muted" }, `Share of each input skill's example prompts on which the composition gives the skill's own `
        + `greedy answer (${q.max_tokens} tokens, ${q.engine} engine, ${q.seconds} s).`),
      bars(Object.fromEntries(q.skills.map((s) => [`${s.skill} (${s.prompts} prompts)`, s.agreement])), { cls: "quality", sort: false }))
      : h("p", { class: "muted", id: "quality" }, "No quality report (it was stored with quality_prompts 0)."));
}

export async function render(root, name) {
  const info = await call("GET", paths.adapter(name));
  const status = h("div");
  const del = (ref, label) => h("button", { class: "danger", onclick: async () => {
    if (!window.confirm(`Delete ${label}? This cannot be undone.`)) return;
    const done = await attempt(status, () => call("DELETE", paths.adapter(ref)));
    if (!done) return;
    if (ref === info.name) location.hash = "#/library";
    else window.dispatchEvent(new HashChangeEvent("hashchange"));  // one version gone: this page again
  } }, "Delete");

  root.append(
    h("h1", {}, info.name, h("span", { class: "muted" }, `  v${info.version}`)),
    h("p", {}, info.description || h("span", { class: "muted" }, "no description")),
    h("div", { class: "row" },
      h("a", { href: `#/playground?model=${encodeURIComponent(info.name)}` }, "try it in the playground"),
      h("button", { class: "secondary", id: "download", onclick: () => attempt(status, () => download(paths.download(info.ref || `${info.name}@${info.version}`))) }, "Download .tar.gz"),
      h("span", { id: "delete-skill" }, del(info.name, `${info.name} (all ${info.versions.length} versions)`))),
    status);

  const config = h("div", { class: "card" }, h("h2", {}, "Latest version"), kv([
    ["rank", info.rank], ["target modules", info.target_modules.join(", ")], ["base model", info.base_model],
    ["size", bytes(info.size)], ["storage", storage(info)], ["origin", info.origin],
    ["content id", h("code", {}, info.content_id)], ["weights sha256", h("code", {}, info.sha256)],
    ["created", when(info.created)],
    ["tags", info.tags.length ? h("span", {}, info.tags.map((t) => h("span", { class: "tag" }, t))) : null]]),
  info.examples.length ? [h("h2", {}, "Example prompts"), h("ul", { class: "examples" }, info.examples.map((e) => h("li", {}, e)))] : null);
  root.append(info.composition ? h("div", { class: "grid2" }, config, composition(info.composition)) : config);

  const versions = [...info.versions].sort((a, b) => b - a).slice(0, MAX_VERSIONS);
  const rows = await Promise.all(versions.map((v) => call("GET", paths.adapter(`${info.name}@${v}`)).catch(() => null)));
  root.append(h("h2", {}, `Versions (${info.versions.length})`),
    h("table", { id: "versions" },
      h("thead", {}, h("tr", {}, ["version", "content id", "weights sha256", "created", "rank", "storage", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows.filter(Boolean).map((v) => h("tr", {},
        h("td", {}, `v${v.version}`), h("td", {}, h("code", {}, short(v.content_id))), h("td", {}, h("code", {}, short(v.sha256))),
        h("td", {}, when(v.created)), h("td", {}, v.rank), h("td", {}, storage(v)),
        h("td", {}, info.versions.length > 1 ? del(`${info.name}@${v.version}`, `${info.name}@${v.version}`) : null))))));
}
