// Talking to the server: fetch with the API key, JSON errors, and server-sent events read over fetch
// (EventSource cannot send an Authorization header).

const KEY_STORAGE = "leansd.apiKey";

/** An HTTP error with the server's JSON message and the request field it names, if any. */
export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || null;
  }
}

let askKey = async () => null; // replaced by the page: shows a dialog, resolves to the key or null
let pendingKey = null; // one dialog at a time, whatever the number of requests that got a 401

/** Let the page decide how to ask for a key (a function returning a promise of the key, or null if declined). */
export function setKeyPrompt(fn) {
  askKey = fn;
}

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

function withKey(options, key) {
  const headers = new Headers(options.headers || {});
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return { ...options, headers };
}

async function keyAfter401(rejectedKey) {
  if (!pendingKey) {
    pendingKey = (async () => {
      const key = await askKey(rejectedKey !== null);
      if (key) localStorage.setItem(KEY_STORAGE, key);
      return key;
    })().finally(() => {
      pendingKey = null;
    });
  }
  return pendingKey;
}

/** fetch() with the stored API key; on 401 asks for a key once and retries. Throws ApiError on other errors. */
export async function apiFetch(path, options = {}) {
  let key = storedKey();
  let response = await fetch(path, withKey(options, key));
  while (response.status === 401) {
    if (storedKey() === key) {
      // Nobody replaced the key meanwhile: ask (the stored one, if any, was refused).
      if (key !== null) localStorage.removeItem(KEY_STORAGE);
      const entered = await keyAfter401(key);
      if (!entered) throw new ApiError(401, "this server needs an API key");
    }
    key = storedKey();
    response = await fetch(path, withKey(options, key));
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let field = null;
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") message = body.error;
    else if (body && typeof body.detail === "string") message = body.detail;
    if (body && typeof body.field === "string") field = body.field;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, field);
}

export async function getJSON(path) {
  return (await apiFetch(path)).json();
}

export async function postJSON(path, body) {
  const response = await apiFetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return response.json();
}

/** The bytes of a server file (an image) as a Blob, fetched with the key. */
export async function getBlob(path) {
  return (await apiFetch(path)).blob();
}

/**
 * Read a text/event-stream and call onEvent(name, data) for each event, data parsed as JSON.
 * Resolves when the stream ends or `signal` aborts.
 */
export async function readEvents(path, onEvent, signal) {
  const response = await apiFetch(path, { signal, headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        dispatch(block, onEvent);
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") throw err;
  } finally {
    reader.releaseLock();
  }
}

function dispatch(block, onEvent) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments keep the connection alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return;
  const text = data.join("\n");
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = text;
  }
  onEvent(name, parsed);
}
