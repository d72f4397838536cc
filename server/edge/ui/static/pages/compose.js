// Compose: pick skills, weights, method and rank; preview the composition on a prompt (streamed, with
// its plan: cache, rank, re-factoring error); save it as a new skill (its page shows the quality report),
// or learn its weights from examples (a job, followed here until it stores the skill with its report).

import { allSkills, call, paths, streamChat } from "../api.js";
import { followJob, learnSection } from "../learn.js";
import { attempt, compositionBuilder, h, planView } from "../ui.js";

export const keepsForm = true;

export async function render(root) {
  root.append(h("h1", {}, "Compose"));
  const [health, skills] = await Promise.all([call("GET", paths.health, { allow: [503] }), allSkills()]);
  const builder = await compositionBuilder(skills, { weightsAuto: true });
  const name = h("input", { type: "text", id: "compose-name", placeholder: "new skill name", "aria-label": "name" });
  const description = h("input", { type: "text", id: "compose-description", placeholder: "(default: the recipe)", "aria-label": "description" });
  const quality = h("input", { type: "number", id: "quality-prompts", min: "0", max: "64", value: "4", "aria-label": "quality prompts" });
  const minAgreement = h("input", { type: "number", id: "min-agreement", min: "0", max: "1", step: "0.05", placeholder: "none",
    "aria-label": "minimum agreement" });
  const prompt = h("input", { type: "text", id: "preview-prompt", "aria-label": "preview prompt",
    value: (skills[0] && skills[0].examples[0]) || "" });
  const answer = h("div", { class: "answer", id: "preview-answer" });
  const plan = h("div", { id: "preview-plan" });
  const status = h("div", { id: "compose-status" });
  const save = h("button", { id: "save", type: "submit" }, "Save as skill");
  const learn = learnSection({ onToggle: (on) => {  // a learned composition is measured by its own report
    save.textContent = on ? "Learn and save" : "Save as skill";
    quality.disabled = minAgreement.disabled = on;
  } });
  const job = h("div", { id: "learn-status" });
  let unfollow = null;

  const preview = h("button", { id: "preview", type: "button", class: "secondary", onclick: async () => {
    answer.textContent = "";
    plan.replaceChildren();
    await attempt(status, () => streamChat(
      { model: health.body.base_model, composition: builder.value(), max_tokens: 48, temperature: 0,
        messages: [{ role: "user", content: prompt.value }] },
      { onPlan: (m) => plan.replaceChildren(planView(m)), onText: (t) => { answer.textContent += t; } }));
  } }, "Preview");

  const form = h("form", { id: "compose-form", onsubmit: async (e) => {
    e.preventDefault();
    if (learn.on) return startLearning();
    save.disabled = true;
    status.replaceChildren(h("span", { class: "muted" }, "composing and measuring the quality report…"));
    const body = { ...builder.value(), name: name.value.trim(), description: description.value,
                   quality_prompts: Number(quality.value || 0) };
    if (minAgreement.value) body.min_agreement = Number(minAgreement.value);
    const stored = await attempt(status, () => call("POST", paths.compositions, { json: body }));
    save.disabled = false;
    if (stored) location.hash = `#/skill/${stored.name}`;
  } },
  h("div", { class: "card" }, builder.el),
  learn.el,
  h("div", { class: "form" },
    h("label", {}, "preview on"), h("div", { class: "row" }, h("div", { style: "flex: 1" }, prompt), preview),
    h("label", {}, "name"), name,
    h("label", {}, "description"), description,
    h("label", {}, "quality prompts"), h("div", { class: "row" }, quality, h("span", { class: "muted" }, "example prompts per input skill (0: no report)")),
    h("label", {}, "min agreement"), minAgreement,
    h("span", {}), h("div", { class: "row" }, save)));
  // learning: the weights come from the examples (the sliders' values are where they start) and the skill is
  // measured by its own report, so quality prompts and min agreement are not sent
  async function startLearning() {
    save.disabled = true;
    const started = await attempt(status, () => call("POST", paths.compositions, { json: {
      ...builder.value(), name: name.value.trim(), description: description.value, learn: learn.value() } }));
    if (!started) { save.disabled = false; return; }
    if (unfollow) unfollow();
    unfollow = followJob(job, started, { onEnd: () => { save.disabled = false; } });
  }

  root.append(form, status, job, h("div", { class: "grid2" },
    h("div", {}, h("h2", {}, "Preview answer"), answer), h("div", {}, h("h2", {}, "Plan"), plan)));
  return () => { if (unfollow) unfollow(); };
}
