// The JSON API as the pages use it: the same routes and credentials as any client.
// Whatever a user supplied (filenames, usernames, error messages) reaches the page through
// `textContent` only: see `el`.

const TOKEN = "chitram.token";

export function token() {
  return sessionStorage.getItem(TOKEN);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN, value);
  else sessionStorage.removeItem(TOKEN);
}

export function authHeaders() {
  const value = token();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

/// An API answer that was not a success: its status, code and message.
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/// The error of a failed answer, from its `{"detail": {code, message}}` body.
export function errorFrom(status, body) {
  const detail = body && body.detail;
  if (detail && detail.code) return new ApiError(status, detail.code, detail.message || detail.code);
  return new ApiError(status, "HTTP_" + status, `the server answered ${status}`);
}

/// A JSON request; throws an `ApiError` on anything but 2xx.
export async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...authHeaders(), ...(options.headers || {}) };
  let body = options.body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method: options.method || "GET", headers, body });
  } catch (error) {
    throw new ApiError(0, "NETWORK", "the server cannot be reached");
  }
  if (response.status === 204) return null;
  let json = null;
  try {
    json = await response.json();
  } catch (_) {
    json = null;
  }
  if (!response.ok) {
    if (response.status === 401 && token()) setToken(null);
    throw errorFrom(response.status, json);
  }
  return json;
}

/// Whether accounts are on and registration is open (`/health` tells everyone).
export async function serverInfo() {
  const response = await fetch("/health", { headers: { Accept: "application/json" } });
  const health = await response.json();
  return health.accounts || { enabled: false, open_registration: false };
}

/// The signed-in account (`null` when anonymous or the token is no longer valid).
export async function whoAmI() {
  if (!token()) return null;
  try {
    return await api("/api/v1/auth/me");
  } catch (_) {
    return null;
  }
}

/// Builds an element. `text` is set through `textContent`, never parsed as HTML.
export function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of [].concat(children)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
}

/// 1536 → "1.5 KiB".
export function formatBytes(bytes) {
  if (!Number.isFinite(bytes)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

/// Seconds → "42 s", "3 min 5 s", "2 h 10 min".
export function formatAge(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function formatPercent(fraction) {
  return `${(fraction * 100).toFixed(1)}%`;
}
