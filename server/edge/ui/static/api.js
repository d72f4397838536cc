// The HTTP API as the console calls it: every path in one place, the user's key on every call, and
// errors kept in the API's own shape ({"error": {"message", "type", "param", "code"}}).

const KEY = "mosaic.key";

/** True when another page holds this one in a frame: the console then makes no request at all (a framing
 * site could otherwise click through it with the same-origin rights of this machine's browser). */
export const framed = () => window.top !== window.self;

const ref = (name) => name.split("/").map(encodeURIComponent).join("/"); // team/name stays a path

export const paths = {
  adapters: "/v1/adapters",
  adapter: (name) => `/v1/adapters/${ref(name)}`,
  download: (name) => `/v1/adapters/${ref(name)}/download`,
  compositions: "/v1/compositions",
  job: (id) => `/v1/compositions/jobs/${encodeURIComponent(id)}`,
  route: "/v1/route",
  chat: "/v1/chat/completions",
  models: "/v1/models",
  compress: "/v1/admin/compress",
  health: "/health",
  metrics: "/metrics",
  methods: "/ui/methods.json",
};

export const key = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (value) => value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY),
};

/** An answer other than 2xx: its status and the API's error object. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.error = error;
  }
  get needsKey() { return this.status === 401 || this.status === 403; }
  /** The upload's validation problems, one each, as the API lists them in its message. */
  get problems() {
    const m = /^adapter refused \((\d+) problems?\): ([\s\S]*)$/.exec(this.error.message || "");
    if (!m) return [];
    const parts = m[2].split("; ");
    return parts.length === Number(m[1]) ? parts : [m[2]];
  }
}

function refuseFramed() {
  if (framed()) throw new ApiError(0, { message: "the console does not run inside a frame", type: "framed" });
}

function headers(extra = {}) {
  const k = key.get();
  return k ? { ...extra, authorization: `Bearer ${k}` } : extra;
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const error = body && body.error && typeof body.error === "object"
    ? body.error : { message: `HTTP ${response.status} ${response.statusText}`, type: "http_error" };
  const err = new ApiError(response.status, error);
  if (err.needsKey) window.dispatchEvent(new CustomEvent("mosaic:needs-key", { detail: err }));
  return err;
}

/** Call the API; the parsed JSON answer (text for text answers), or throw an ApiError. */
export async function call(method, path, { json, form, query, allow = [] } = {}) {
  refuseFramed();
  let url = path;
  if (query) {
    const q = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== undefined && v !== null));
    if ([...q].length) url += `?${q}`;
  }
  const init = { method, headers: headers() };
  if (json !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, { message: `the server did not answer: ${e.message}`, type: "network_error" });
  }
  if (!response.ok && !allow.includes(response.status)) throw await failure(response);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  return allow.length ? { status: response.status, body } : body;
}

/** Every skill (latest versions), following the listing's pages. */
export async function allSkills() {
  const skills = [];
  let after;
  for (;;) {
    const page = await call("GET", paths.adapters, { query: { limit: 500, after } });
    skills.push(...page.data);
    if (!page.has_more) return skills;
    after = page.last_id;
  }
}

/** Fetch a file with the key and hand it to the browser as a download. */
export async function download(path) {
  refuseFramed();
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  const disposition = response.headers.get("content-disposition") || "";
  const name = (/filename="([^"]+)"/.exec(disposition) || [])[1] || "download";
  const url = URL.createObjectURL(await response.blob());
  const a = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** POST a streamed chat completion: onPlan(mosaic) once (the first event's plan), onText(piece) per
 * token; returns when the stream ends. An error event or a non-2xx answer throws an ApiError. */
export async function streamChat(body, { onPlan, onText }) {
  refuseFramed();
  const response = await fetch(paths.chat, {
    method: "POST", headers: headers({ "content-type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!response.ok) throw await failure(response);
  let planned = false;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.code && Number(chunk.error.code) || 500, chunk.error);
        if (!planned && chunk.mosaic) { planned = true; onPlan(chunk.mosaic); }
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) onText(choice.delta.content);
        }
      }
    }
  }
}
