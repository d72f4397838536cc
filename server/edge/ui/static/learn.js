// The compose form's "learn from examples" section: a JSONL file read here into prompt/answer examples (the
// lines `mosaic compose --learn` reads), the learning options, and the job once started: its stage, step and
// losses, the stage's validation loss curve (drawn on a canvas), a cancel button, and the report when it ends
// (polled every second).

import { call, paths } from "./api.js";
import { attempt, errorBox, h, pct } from "./ui.js";

const POLL_MS = 1000;
const ROLES = ["system", "user", "assistant"];

/** One JSONL line's object -> {prompt, answer}, or throws the reason: {"prompt", "answer"}, or a chat
 * ({"messages": [...]} or {"prompt", "completion"}) with one user turn before the answer. */
function example(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) throw new Error("each line must be a JSON object");
  let prompt, answer;
  if ("messages" in obj) {
    const msgs = obj.messages;
    if (!Array.isArray(msgs) || !msgs.length) throw new Error("'messages' must be a non-empty list");
    if (!msgs.every((m) => m && typeof m === "object" && ROLES.includes(m.role) && typeof m.content === "string")) {
      throw new Error("every message needs a role (system/user/assistant) and a string content");
    }
    if (msgs[msgs.length - 1].role !== "assistant") throw new Error("the last message must be the assistant's answer");
    if (!msgs.slice(0, -1).some((m) => m.role === "user")) throw new Error("there must be a user message before the answer");
    if (msgs.length !== 2) {
      throw new Error(`a learning example is one user prompt and its answer; this chat has ${msgs.length - 1} messages before the answer`);
    }
    [prompt, answer] = [msgs[0].content, msgs[1].content];
  } else if ("completion" in obj) {
    if (typeof obj.prompt !== "string" || typeof obj.completion !== "string") throw new Error("'prompt' and 'completion' must be strings");
    [prompt, answer] = [obj.prompt, obj.completion];
  } else {
    const extra = Object.keys(obj).filter((k) => k !== "prompt" && k !== "answer");
    if (extra.length) throw new Error(`unexpected field ${extra[0]}: expected {"prompt", "answer"}`);
    [prompt, answer] = [obj.prompt, obj.answer];
  }
  for (const [field, value] of [["prompt", prompt], ["answer", answer]]) {
    if (typeof value !== "string") throw new Error(`${field}: a string is required`);
    if (!value) throw new Error(`${field} is empty`);
  }
  return { prompt, answer };
}

/** JSONL text -> {examples, bad}: the examples of every good line, and the first bad one ({line, why}, from 1). */
export function parseExamples(text) {
  const examples = [];
  const lines = text.split(/\r\n|\r|\n/);
  for (let i = 0; i < lines.length; i++) {
    if (!lines[i].trim()) continue;
    try {
      let obj;
      try { obj = JSON.parse(lines[i]); } catch (e) { throw new Error(`not JSON (${e.message})`); }
      examples.push(example(obj));
    } catch (e) {
      return { examples, bad: { line: i + 1, why: e.message } };
    }
  }
  return { examples, bad: null };
}

/** [[step, train, val], ...] -> the [x, y] of each step's validation loss in a width × height box (x: step
 * 0..steps, y: the curve's lowest loss at the bottom, its highest at the top). */
export function curvePoints(curve, steps, width, height, pad = 4) {
  const vals = curve.map((p) => p[2]);
  const lo = Math.min(...vals), hi = Math.max(...vals);
  const x = (s) => pad + (width - 2 * pad) * s / Math.max(steps, 1);
  const y = (v) => hi === lo ? height / 2 : pad + (height - 2 * pad) * (hi - v) / (hi - lo);
  return curve.map(([s, , v]) => [x(s), y(v)]);
}

function lossCurve(curve, steps) {
  if (!curve || !curve.length) return h("p", { class: "muted" }, "no step yet");
  const canvas = h("canvas", { id: "learn-curve", width: 320, height: 90, role: "img", "aria-label": "validation loss per step" });
  const ctx = canvas.getContext("2d");
  ctx.strokeStyle = "#dde1e8";
  ctx.strokeRect(0.5, 0.5, canvas.width - 1, canvas.height - 1);
  ctx.strokeStyle = "#3b5bdb";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  curvePoints(curve, steps, canvas.width, canvas.height).forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
  ctx.stroke();
  const vals = curve.map((p) => p[2]);
  return h("figure", { class: "curve" }, canvas, h("figcaption", { class: "muted mono" },
    `validation loss ${vals[0].toFixed(4)} → ${vals[vals.length - 1].toFixed(4)} (best ${Math.min(...vals).toFixed(4)}), steps ${curve[0][0]}–${curve[curve.length - 1][0]}`));
}

/** The report's rows, scored on the held-out examples; the stored one marked. */
export function reportTable(report) {
  const cols = ["", "row", "kind", "val exact match", "val loss", "best step", "stopped", "seconds"];
  return h("div", { id: "learn-report" },
    h("p", { class: "muted" }, `${report.train_examples} examples trained on, ${report.val_examples} held out (${report.seconds} s).`),
    h("table", {},
      h("thead", {}, h("tr", {}, cols.map((t, i) => h("th", { class: i > 2 ? "num" : "" }, t)))),
      h("tbody", {}, report.rows.map((r) => h("tr", { class: "learn-row", dataset: { kind: r.kind, stored: r.name === report.stored } },
        h("td", {}, r.name === report.stored ? "→" : ""),
        h("td", { class: "mono" }, r.name === report.stored ? h("strong", {}, r.name) : r.name), h("td", {}, r.kind),
        h("td", { class: "num" }, pct(r.val_exact_match, 0)), h("td", { class: "num" }, r.val_loss.toFixed(4)),
        h("td", { class: "num" }, r.best_step ?? ""), h("td", { class: "num" }, r.stopped || ""),
        h("td", { class: "num" }, r.seconds.toFixed(1)))))));
}

/** The section: ``el`` to place in the form, ``value()`` the API's ``learn`` object (null: learning is off;
 * throws when the file has a bad line or too few examples); ``onToggle(on)`` when it is switched. */
export function learnSection({ onToggle } = {}) {
  const on = h("input", { type: "checkbox", id: "learn-on", "aria-label": "learn the weights from examples" });
  const info = h("span", { class: "muted", id: "learn-count" }, "JSONL: {\"prompt\", \"answer\"} or a one-turn chat per line");
  const bad = h("div");
  let parsed = { examples: [], bad: null };
  const file = h("input", { type: "file", id: "learn-file", accept: ".jsonl,.json,.txt", "aria-label": "examples (JSONL)",
    onchange: async () => {
      parsed = file.files.length ? parseExamples(await file.files[0].text()) : { examples: [], bad: null };
      const n = parsed.examples.length;
      info.textContent = parsed.bad ? `${n} good line${n === 1 ? "" : "s"} before line ${parsed.bad.line}` : `${n} example${n === 1 ? "" : "s"}`;
      bad.replaceChildren(parsed.bad ? h("div", { class: "error", id: "learn-bad-line" }, `line ${parsed.bad.line}: ${parsed.bad.why}`) : "");
    } });
  const granularity = h("select", { id: "learn-granularity", "aria-label": "granularity" },
    ["skill", "layer", "module"].map((g) => h("option", { value: g, selected: g === "layer" }, g)));
  const expand = h("input", { type: "number", id: "learn-expand-rank", min: "1", max: "64", placeholder: "none", "aria-label": "expand rank" });
  const steps = h("input", { type: "number", id: "learn-steps", min: "1", max: "2000", placeholder: "60", "aria-label": "steps" });
  const fields = h("div", { class: "form", hidden: true },
    h("label", {}, "examples"), h("div", { class: "row" }, file, info),
    h("span", {}), bad,
    h("label", {}, "granularity"), h("div", { class: "row" }, granularity, h("span", { class: "muted" }, "one weight per skill, per (skill, layer) or per (skill, module)")),
    h("label", {}, "steps"), h("div", { class: "row" }, steps, h("span", { class: "muted" }, "empty: 60 (early stopping on the held-out examples)")),
    h("label", {}, "expand rank"), h("div", { class: "row" }, expand, h("span", { class: "muted" }, "empty: none; else a residual LoRA of this rank trained on top, and stored")));
  on.addEventListener("change", () => {
    fields.hidden = !on.checked;
    if (onToggle) onToggle(on.checked);
  });
  return {
    el: h("div", { class: "card", id: "learn" },
      h("label", { class: "row" }, on, h("strong", {}, "Learn from examples"),
        h("span", { class: "muted" }, "fusion weights learned on a task's examples, with a report against baselines (runs as a job)")),
      fields),
    get on() { return on.checked; },
    value() {
      if (!on.checked) return null;
      if (parsed.bad) throw new Error(`the examples file, line ${parsed.bad.line}: ${parsed.bad.why}`);
      if (parsed.examples.length < 2) throw new Error("learning needs a file of at least 2 examples (one to train on, one to validate with)");
      const learn = { examples: parsed.examples, granularity: granularity.value };
      if (steps.value) learn.steps = Number(steps.value);
      if (expand.value) learn.expand = { rank: Number(expand.value) };
      return learn;
    },
  };
}

/** Follow the job in ``where`` every second until it ends; returns stop() (for leaving the page). */
export function followJob(where, job, { onEnd } = {}) {
  let timer = null, gone = false;
  const status = h("div");
  const cancel = h("button", { class: "danger", id: "learn-cancel", type: "button", onclick: async () => {
    if (!window.confirm(`Cancel learning ${job.name}? The steps done so far are lost and nothing is stored.`)) return;
    await attempt(status, () => call("DELETE", paths.job(job.id)));
  } }, "Cancel");
  const loss = (x) => (typeof x === "number" ? x.toFixed(4) : "not a number");  // a diverging loss arrives as null
  const show = (j) => {
    const p = j.progress || {};
    const stages = p.stages || [];
    const at = p.stage ? `stage ${stages.indexOf(p.stage) + 1} of ${stages.length}: ${p.stage}` : "starting (loading the base model)…";
    const step = p.stage && p.steps ? ` · step ${p.step} of ${p.steps} · train ${loss(p.train_loss)} · val ${loss(p.val_loss)}` : "";
    const report = j.result && j.result.composition && j.result.composition.learn ? j.result.composition.learn.report : null;
    where.replaceChildren(h("div", { class: "card", id: "learn-job", dataset: { state: j.state } },
      h("h2", {}, `Learning ${j.name}`),
      h("p", { id: "learn-stage" }, j.state === "running" ? at + step : j.state),
      j.state === "running" && p.stage && p.steps ? lossCurve((p.curves || {})[p.stage], p.steps) : null,
      j.state === "running" ? h("div", { class: "row" }, cancel) : null,
      j.state === "failed" ? errorBox({ message: j.error }) : null,
      j.state === "done" && j.result ? h("p", { class: "success" }, "stored ",
        h("a", { href: `#/skill/${j.result.name}` }, `${j.result.name} v${j.result.version}`)) : null,
      report ? reportTable(report) : null,
      status));
  };
  const poll = async () => {
    let j;
    try {
      j = await call("GET", paths.job(job.id));
    } catch (err) {  // shown, and tried again a second later (unless the job is gone)
      if (gone) return;
      status.replaceChildren(errorBox(err));
      if (err.status !== 404) timer = setTimeout(poll, POLL_MS);
      return;
    }
    if (gone) return;
    status.replaceChildren();
    show(j);
    if (j.state === "running") timer = setTimeout(poll, POLL_MS);
    else if (onEnd) onEnd(j);
  };
  show(job);
  timer = setTimeout(poll, POLL_MS);
  return () => { gone = true; clearTimeout(timer); };
}
