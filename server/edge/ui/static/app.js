// The console's shell: hash routes (#/library, #/skill/NAME, #/playground, #/compose, #/upload, #/ops),
// the navigation, and the API key bar (shown when a call answers 401/403; the key stays in this tab).
// Inside a frame (another site's page holding this one) it shows a notice and does nothing else.

import { framed, key } from "./api.js";
import { errorBox, h } from "./ui.js";
import * as library from "./pages/library.js";
import * as skill from "./pages/skill.js";
import * as playground from "./pages/playground.js";
import * as compose from "./pages/compose.js";
import * as upload from "./pages/upload.js";
import * as ops from "./pages/ops.js";

const PAGES = { library, skill, playground, compose, upload, ops };
const main = document.getElementById("main");
let current = { page: null, failedForKey: false, leave: null };

function parse() {
  const raw = location.hash.replace(/^#\/?/, "") || "library";
  const [path, query = ""] = raw.split("?");
  const [page, ...rest] = path.split("/");
  return { page: PAGES[page] ? page : "library", arg: rest.map(decodeURIComponent).join("/"),
           query: new URLSearchParams(query) };
}

async function render() {
  const { page, arg, query } = parse();
  if (current.leave) current.leave();  // e.g. stop polling
  current = { page, failedForKey: false, leave: null };
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.getAttribute("href") === `#/${page}`);
  const root = h("div", { id: `page-${page}` });
  main.replaceChildren(root);
  const mine = current;
  try {
    mine.leave = (await PAGES[page].render(root, arg, query)) || null;
  } catch (err) {
    if (err.needsKey) mine.failedForKey = true;
    root.append(errorBox(err));
  }
}

// ---- the API key ---------------------------------------------------------------------------
const bar = document.getElementById("keybar");
const input = document.getElementById("key-input");
const state = document.getElementById("key-state");

function showKeyState() {
  state.replaceChildren(key.get()
    ? h("span", {}, "API key set", h("button", { class: "secondary", id: "key-forget", onclick: () => { key.set(""); showKeyState(); } }, "Forget"))
    : h("span", {}, "no API key", h("button", { class: "secondary", id: "key-ask", onclick: () => askKey("Enter an API key.") }, "Enter")));
}

function askKey(reason) {
  document.getElementById("key-reason").textContent = reason;
  bar.hidden = false;
  input.focus();
}

function start() {
  window.addEventListener("mosaic:needs-key", (e) => {
    const err = e.detail;
    askKey(err.status === 403
      ? `This key may not do that: ${err.message} Enter another key:`
      : `This server needs an API key: ${err.message}`);
    current.failedForKey = true;
  });

  bar.addEventListener("submit", (e) => {
    e.preventDefault();
    key.set(input.value.trim());
    input.value = "";
    bar.hidden = true;
    showKeyState();
    // a page that could not load without a key loads again; a form keeps what the user typed
    if (current.failedForKey && !PAGES[current.page].keepsForm) render();
  });

  window.addEventListener("hashchange", render);
  showKeyState();
  render();
}

if (framed()) {
  // the server forbids framing (X-Frame-Options, frame-ancestors); a browser that ignores both ends here
  document.body.replaceChildren(h("main", {}, h("p", { class: "error", id: "framed" },
    "The Mosaic console does not run inside a frame: open it in a tab of its own.")));
} else {
  start();
}
