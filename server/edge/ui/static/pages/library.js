// Library: every skill (latest version) with rank, target modules, size, storage form, description,
// tags and example prompts; a text filter; links to each skill's page.

import { allSkills } from "../api.js";
import { bytes, h, storage } from "../ui.js";

function matches(s, text) {
  if (!text) return true;
  const hay = [s.name, s.description, s.origin, ...(s.tags || []), ...(s.examples || []), ...(s.target_modules || [])]
    .join(" ").toLowerCase();
  return text.toLowerCase().split(/\s+/).every((word) => hay.includes(word));
}

function row(s) {
  return h("tr", { class: "skill-row", dataset: { name: s.name } },
    h("td", {}, h("a", { href: `#/skill/${s.name}`, class: "skill-link" }, s.name),
      h("div", { class: "muted" }, s.origin === "composition" ? "composition" : "")),
    h("td", { class: "num" }, `v${s.version}`),
    h("td", { class: "num" }, s.rank),
    h("td", {}, h("span", { class: "mono" }, (s.target_modules || []).join(", "))),
    h("td", { class: "num" }, bytes(s.size)),
    h("td", {}, storage(s)),
    h("td", {}, s.description, h("div", {}, (s.tags || []).map((t) => h("span", { class: "tag" }, t))),
      s.examples && s.examples.length
        ? h("details", {}, h("summary", {}, `${s.examples.length} example prompt${s.examples.length > 1 ? "s" : ""}`),
          h("ul", { class: "examples" }, s.examples.map((e) => h("li", {}, e))))
        : null),
    h("td", {}, h("a", { href: `#/playground?model=${encodeURIComponent(s.name)}` }, "try")));
}

export async function render(root) {
  root.append(h("h1", {}, "Skill library"));
  const skills = await allSkills();
  const count = h("span", { class: "muted", id: "library-count" });
  const filter = h("input", { type: "search", id: "library-filter", placeholder: "filter by name, description, tag, example…",
    "aria-label": "filter" });
  const body = h("tbody");
  const show = () => {
    const shown = skills.filter((s) => matches(s, filter.value.trim()));
    body.replaceChildren(...shown.map(row));
    count.textContent = `${shown.length} of ${skills.length} skill${skills.length === 1 ? "" : "s"}`;
  };
  filter.addEventListener("input", show);
  root.append(
    h("div", { class: "row", style: "margin-bottom: 10px" }, h("div", { style: "flex: 1" }, filter), count,
      h("a", { href: "#/upload" }, "upload a skill"), h("a", { href: "#/compose" }, "compose")),
    h("table", { id: "library-table" },
      h("thead", {}, h("tr", {}, ["name", "version", "rank", "target modules", "size", "storage", "description", ""]
        .map((t, i) => h("th", { class: [1, 2, 4].includes(i) ? "num" : "" }, t)))),
      body));
  show();
}
