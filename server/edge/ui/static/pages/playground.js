// Playground: a prompt answered by the base model, a skill (name or name@N), auto (the router), or a
// composition built here; the answer streams in and the plan is shown (for auto: the router's α per
// skill as bars and its reason; for a composition: cache hit/miss, rank, re-factoring error).

import { allSkills, call, paths, streamChat } from "../api.js";
import { attempt, compositionBuilder, h, planView } from "../ui.js";

export const keepsForm = true;

export async function render(root, _arg, query) {
  root.append(h("h1", {}, "Playground"));
  const [health, skills] = await Promise.all([call("GET", paths.health, { allow: [503] }), allSkills()]);
  const base = health.body.base_model;
  const wanted = query.get("model");

  const mode = h("select", { id: "mode", "aria-label": "what answers" },
    h("option", { value: "skill" }, "a skill"),
    h("option", { value: "auto" }, "auto (the router chooses)"),
    h("option", { value: "composition" }, "a composition"),
    h("option", { value: "base" }, `the base model (${base})`));
  const skill = h("select", { id: "skill", "aria-label": "skill" },
    skills.map((s) => h("option", { value: s.name, selected: s.name === wanted }, `${s.name} (v${s.version})`)));
  const version = h("input", { type: "number", min: "1", id: "version", placeholder: "latest", "aria-label": "version" });
  const builder = await compositionBuilder(skills, { weightsAuto: true });
  const prompt = h("textarea", { id: "prompt", rows: "3", "aria-label": "prompt" },
    (skills.find((s) => s.name === wanted) || skills[0] || { examples: [] }).examples[0] || "");
  const maxTokens = h("input", { type: "number", id: "max-tokens", min: "1", value: "48", "aria-label": "max tokens" });
  const temperature = h("input", { type: "number", id: "temperature", min: "0", max: "2", step: "0.1", value: "0", "aria-label": "temperature" });
  const skillRow = h("div", { class: "row" }, skill, h("label", {}, "version"), version);
  const compRow = h("div", { class: "card" }, builder.el);
  const answer = h("div", { class: "answer", id: "answer" });
  const plan = h("div", { id: "plan" });
  const status = h("div", { id: "status" });
  const send = h("button", { id: "send", type: "submit" }, "Send");
  const routeOnly = h("button", { id: "route-only", type: "button", class: "secondary" }, "Route only");

  const sync = () => {
    skillRow.hidden = mode.value !== "skill";
    compRow.hidden = mode.value !== "composition";
    routeOnly.hidden = mode.value !== "auto";
  };
  mode.addEventListener("change", sync);
  // a prompt from the chosen skill's examples, while the user has not typed one
  skill.addEventListener("change", () => {
    const s = skills.find((x) => x.name === skill.value);
    if (s && s.examples.length) prompt.value = s.examples[0];
  });
  sync();

  const request = () => {
    const body = { messages: [{ role: "user", content: prompt.value }], max_tokens: Number(maxTokens.value),
                   temperature: Number(temperature.value) };
    if (mode.value === "skill") body.model = version.value ? `${skill.value}@${version.value}` : skill.value;
    else if (mode.value === "auto") body.model = "auto";
    else if (mode.value === "base") body.model = base;
    else { body.model = base; body.composition = builder.value(); }
    return body;
  };

  const form = h("form", { id: "playground-form", onsubmit: async (e) => {
    e.preventDefault();
    send.disabled = true;
    answer.textContent = "";
    plan.replaceChildren(h("span", { class: "muted" }, "waiting for the first token…"));
    const t0 = performance.now();
    let pieces = 0;
    await attempt(status, () => streamChat(request(), {
      onPlan: (m) => plan.replaceChildren(planView(m)),
      onText: (t) => { answer.textContent += t; pieces++; },
    }));
    if (!status.childElementCount) status.replaceChildren(h("span", { class: "muted", id: "done" },
      `streamed in ${((performance.now() - t0) / 1000).toFixed(2)} s (${pieces} event${pieces === 1 ? "" : "s"} with text)`));
    else plan.replaceChildren();
    send.disabled = false;
  } },
  h("div", { class: "form" },
    h("label", {}, "answered by"), mode,
    h("label", {}, ""), h("div", {}, skillRow, compRow),
    h("label", {}, "prompt"), prompt,
    h("label", {}, "max tokens"), h("div", { class: "row" }, maxTokens, h("label", {}, "temperature"), temperature),
    h("span", {}), h("div", { class: "row" }, send, routeOnly)));

  routeOnly.addEventListener("click", async () => {
    const decision = await attempt(status, () => call("POST", paths.route, { json: { prompt: prompt.value } }));
    if (decision) plan.replaceChildren(h("p", { class: "muted" }, "The router's decision (nothing generated):"), planView(decision));
  });

  if (wanted === "auto") mode.value = "auto";
  else if (wanted && !skills.some((s) => s.name === wanted)) mode.value = "base";
  sync();
  root.append(form, status, h("div", { class: "grid2" },
    h("div", {}, h("h2", {}, "Answer"), answer), h("div", {}, h("h2", {}, "Plan"), plan)));
}
