// Upload: drop the PEFT files (adapter_config.json + adapter_model.safetensors) or one archive, with a
// name, description, example prompts and tags; every validation problem is listed as the API returns it.
// A mosaic.json among the dropped files (the demo skills have one) fills in the description and examples.

import { call, paths } from "../api.js";
import { attempt, bytes, h } from "../ui.js";

export const keepsForm = true;

export async function render(root) {
  let files = [];
  const list = h("ul", { id: "upload-files" });
  const name = h("input", { type: "text", id: "upload-name", placeholder: "skill name (letters, digits, _ - .)", "aria-label": "name" });
  const description = h("input", { type: "text", id: "upload-description", "aria-label": "description" });
  const examples = h("textarea", { id: "upload-examples", placeholder: "one example prompt per line (the router learns from them)",
    "aria-label": "examples" });
  const tags = h("input", { type: "text", id: "upload-tags", placeholder: "comma-separated", "aria-label": "tags" });
  const status = h("div", { id: "upload-status" });
  const submit = h("button", { id: "upload-submit", type: "submit" }, "Upload");

  const take = async (chosen) => {
    files = [];
    for (const f of chosen) {
      if (f.name === "mosaic.json") {
        try {
          const meta = JSON.parse(await f.text());
          if (!description.value && meta.description) description.value = meta.description;
          if (!examples.value && Array.isArray(meta.examples)) examples.value = meta.examples.join("\n");
        } catch { /* not ours: ignored */ }
      } else files.push(f);
    }
    list.replaceChildren(...files.map((f) => h("li", {}, h("span", { class: "mono" }, f.name), h("span", { class: "muted" }, `  ${bytes(f.size)}`))));
  };
  const picker = h("input", { type: "file", id: "upload-input", multiple: true, "aria-label": "files",
    onchange: () => take([...picker.files]) });
  const zone = h("div", { class: "dropzone", id: "dropzone",
    ondragover: (e) => { e.preventDefault(); zone.classList.add("over"); },
    ondragleave: () => zone.classList.remove("over"),
    ondrop: (e) => { e.preventDefault(); zone.classList.remove("over"); take([...e.dataTransfer.files]); } },
  h("p", {}, "Drop adapter_config.json + adapter_model.safetensors (or one .tar.gz / .zip) here, or "), picker, list);

  const form = h("form", { id: "upload-form", onsubmit: async (e) => {
    e.preventDefault();
    const body = new FormData();
    body.append("name", name.value.trim());
    for (const f of files) body.append("files", f, f.name);
    body.append("description", description.value);
    body.append("examples", JSON.stringify(examples.value.split("\n").map((x) => x.trim()).filter(Boolean)));
    body.append("tags", JSON.stringify(tags.value.split(",").map((x) => x.trim()).filter(Boolean)));
    submit.disabled = true;
    const stored = await attempt(status, () => call("POST", paths.adapters, { form: body }));
    submit.disabled = false;
    if (stored) {
      status.replaceChildren(h("p", { class: "success", id: "upload-done" }, `Stored `,
        h("a", { href: `#/skill/${stored.name}` }, `${stored.name} v${stored.version}`),
        ` (rank ${stored.rank}, ${bytes(stored.size)}).`));
    }
  } },
  h("h1", {}, "Upload a skill"), zone,
  h("div", { class: "form", style: "margin-top: 14px" },
    h("label", {}, "name"), name,
    h("label", {}, "description"), description,
    h("label", {}, "example prompts"), examples,
    h("label", {}, "tags"), tags,
    h("span", {}), h("div", {}, submit)));
  root.append(form, status);
}
