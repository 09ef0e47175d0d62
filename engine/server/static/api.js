// The branch server's JSON API as the page uses it: the token (sessionStorage,
// sent as a Bearer header, never in a URL), one error shape, and the status
// event stream read with fetch() + ReadableStream.

const TOKEN_KEY = "branchline.token";
const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function failure(resp) {
  let code = `http_${resp.status}`;
  let message = `The branch server answered ${resp.status} ${resp.statusText}.`;
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // not our error body (a proxy in front, say): keep the status line
  }
  return new ApiError(resp.status, code, message);
}

/** JSON of `method path` (path under /api/v1); throws ApiError. */
export async function call(method, path, body) {
  let resp;
  try {
    resp = await fetch(API + path, {
      method,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "unreachable", "The branch server does not answer; is it running?");
  }
  if (!resp.ok) throw await failure(resp);
  if (resp.status === 204) return null;
  return resp.json();
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body ?? {});

/**
 * Follow /api/v1/events until `signal` aborts: `onStatus(json)` for every
 * `event: status`, `onLive(bool)` when the stream opens or drops. A dropped
 * stream is opened again after a delay that grows to 10 s; a 401 stops and
 * calls `onAuth()`.
 */
export async function follow({ signal, onStatus, onLive, onAuth }) {
  let delay = 500;
  while (!signal.aborted) {
    try {
      const resp = await fetch(`${API}/events`, {
        headers: headers({ Accept: "text/event-stream" }),
        cache: "no-store",
        signal,
      });
      if (resp.status === 401) {
        onLive(false);
        onAuth();
        return;
      }
      if (!resp.ok || !resp.body) throw await failure(resp);
      onLive(true);
      delay = 500;
      await readEvents(resp.body, (event, data) => {
        if (event === "status") onStatus(JSON.parse(data));
      });
    } catch (err) {
      if (signal.aborted) return;
    }
    onLive(false);
    await new Promise((done) => {
      const timer = setTimeout(done, delay);
      signal.addEventListener("abort", () => { clearTimeout(timer); done(); }, { once: true });
    });
    delay = Math.min(delay * 2, 10000);
  }
}

const MAX_EVENT = 1 << 20; // one status event is small: a runaway stream is cut

/** Parse a text/event-stream body; `emit(event, data)` per dispatched event. */
export async function readEvents(body, emit) {
  const reader = body.pipeThrough(new TextDecoderStream("utf-8")).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    if (buffer.length > MAX_EVENT) throw new Error("event stream line too long");
    let nl;
    while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
      if (nl === buffer.length - 1 && buffer[nl] === "\r") break; // its \n may follow
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") {
        if (data.length) emit(event, data.join("\n"));
        event = "message";
        data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
      }
    }
  }
}
