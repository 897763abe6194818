// The gallery: upload by drag and drop or by picking files, a grid of thumbnails loaded page
// by page as it scrolls (the list's cursor), and a detail view of each image.

import { ApiError, api, authHeaders, clear, el, errorFrom, formatBytes, serverInfo, token, whoAmI } from "./api.js";
import { renderAccount, renderSignIn } from "./signin.js";

/// Images per page of the list.
const PAGE_SIZE = 24;
/// Uploads sent at the same time.
const UPLOADS_AT_ONCE = 3;
/// Extreme aspect ratios are shown cropped, so that one panorama does not take a whole row.
const MIN_RATIO = 0.4;
const MAX_RATIO = 3;
/// How far below the window the next page starts loading.
const PREFETCH_PX = 200;

const $ = (id) => document.getElementById(id);

const state = {
  info: { enabled: false, open_registration: false },
  account: null,
  items: [],
  cursor: null,
  done: false,
  loading: false,
  current: -1,
  objectUrls: new Map(),
};

// ---- start -------------------------------------------------------------------------------

async function start() {
  try {
    state.info = await serverInfo();
  } catch (_) {
    $("status").textContent = "the server cannot be reached";
  }
  state.account = await whoAmI();
  render();
}

function render() {
  renderAccount($("account"), state.account, state.info, () => {
    state.account = null;
    render();
  });
  const signedIn = !state.info.enabled || state.account;
  $("admin-link").hidden = !(!state.info.enabled || (state.account && state.account.role === "admin"));
  $("signin-area").hidden = Boolean(signedIn);
  $("gallery").hidden = !signedIn;
  if (!signedIn) {
    renderSignIn($("signin-area"), state.info, (account) => {
      state.account = account;
      render();
    });
    return;
  }
  resetGrid();
  loadMore();
}

// ---- the grid ----------------------------------------------------------------------------

function resetGrid() {
  for (const url of state.objectUrls.values()) URL.revokeObjectURL(url);
  state.objectUrls.clear();
  state.items = [];
  state.cursor = null;
  state.done = false;
  clear($("grid"));
}

async function loadMore() {
  if (state.loading || state.done || $("gallery").hidden) return;
  state.loading = true;
  $("status").textContent = "Loading…";
  try {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (state.cursor) query.set("cursor", state.cursor);
    const page = await api(`/api/v1/images?${query}`);
    for (const image of page.items) {
      if (state.items.some((known) => known.id === image.id)) continue;
      state.items.push(image);
      $("grid").append(tile(image));
    }
    state.cursor = page.next_cursor;
    state.done = !page.next_cursor;
    $("status").textContent = state.done ? (state.items.length ? `${state.items.length} images` : "") : "";
    $("empty").hidden = state.items.length > 0;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      state.account = null;
      render();
      return;
    }
    $("status").textContent = error.message;
  } finally {
    state.loading = false;
  }
  // A short first page may leave the sentinel in view: keep filling the screen.
  if (!state.done && sentinelInView()) loadMore();
}

function sentinelInView() {
  return $("sentinel").getBoundingClientRect().top < window.innerHeight + PREFETCH_PX;
}

function ratioOf(image) {
  const ratio = image.width > 0 && image.height > 0 ? image.width / image.height : 1;
  return Math.min(MAX_RATIO, Math.max(MIN_RATIO, ratio));
}

function tile(image) {
  const img = el("img", { alt: image.filename, decoding: "async", loading: "lazy" });
  // The box has the image's shape before a byte of it arrives: nothing moves as they load.
  img.width = image.width;
  img.height = image.height;
  const button = el("button", { type: "button", class: "tile", "data-id": image.id, title: image.filename, onclick: () => openDetail(image.id) }, [
    img,
    el("span", { class: "caption", text: image.filename }),
    image.visibility === "private" ? el("span", { class: "badge private", text: "private" }) : null,
  ]);
  button.style.setProperty("--ratio", String(ratioOf(image)));
  showImage(img, image, "thumb");
  return button;
}

/// The sources to try for an image: the variant when there is one, then the file itself.
function sources(image, variant) {
  const urls = [];
  const wanted = image.variants && image.variants[variant];
  if (wanted && wanted.state !== "failed") urls.push(wanted.url);
  urls.push(image.url);
  return urls;
}

/// Shows `image` in `img`. A public image loads by URL; a private one is fetched with the
/// credentials (an `<img>` cannot send them) and shown from an object URL. A source that fails
/// (a variant that cannot be made) gives way to the next.
async function showImage(img, image, variant) {
  const wanted = `${image.id}/${variant}`;
  img.dataset.showing = wanted;
  const urls = sources(image, variant);
  if (image.visibility !== "private" || !token()) {
    let next = 0;
    img.onerror = () => {
      if (img.dataset.showing === wanted && next < urls.length) img.src = urls[next++];
    };
    img.src = urls[next++];
    return;
  }
  img.onerror = null;
  for (const url of urls) {
    let objectUrl = state.objectUrls.get(url);
    if (!objectUrl) {
      try {
        const response = await fetch(url, { headers: authHeaders() });
        if (!response.ok) continue;
        objectUrl = URL.createObjectURL(await response.blob());
        state.objectUrls.set(url, objectUrl);
      } catch (_) {
        continue;
      }
    }
    // Another image may have been asked for meanwhile (the detail view moves on).
    if (img.dataset.showing === wanted) img.src = objectUrl;
    return;
  }
}

function replaceTile(image) {
  const old = $("grid").querySelector(`[data-id="${CSS.escape(image.id)}"]`);
  if (old) old.replaceWith(tile(image));
}

// ---- uploads -----------------------------------------------------------------------------

const queue = [];
let running = 0;

function upload(files) {
  for (const file of files) {
    const progress = el("progress", { max: 100, value: 0 });
    const result = el("span", { class: "result", text: "waiting" });
    const row = el("li", { class: "upload" }, [el("span", { class: "name", text: file.name }), progress, result]);
    $("uploads").prepend(row);
    queue.push({ file, row, progress, result });
  }
  pump();
}

function pump() {
  while (running < UPLOADS_AT_ONCE && queue.length) {
    const job = queue.shift();
    running += 1;
    send(job).finally(() => {
      running -= 1;
      pump();
    });
  }
}

/// The file's SHA-256 in hex, or null where the browser cannot compute it (`crypto.subtle`
/// exists on HTTPS and localhost only). Declared with the upload, it lets the server refuse
/// bytes that are not the file's, and stream a large file to its shard as it arrives.
async function sha256Hex(file) {
  if (!globalThis.crypto || !crypto.subtle) return null;
  try {
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await file.arrayBuffer()));
    return Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join("");
  } catch (_) {
    return null;
  }
}

/// One file, one request: its own progress and its own answer.
async function send({ file, row, progress, result }) {
  result.textContent = "reading";
  const checksum = await sha256Hex(file);
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/v1/images/upload");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.setRequestHeader("Accept", "application/json");
    if (checksum) xhr.setRequestHeader("X-Checksum-SHA256", checksum);
    result.textContent = "uploading";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) progress.value = Math.round((event.loaded / event.total) * 100);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch (_) {
        body = null;
      }
      if (xhr.status === 201 && body) {
        progress.value = 100;
        row.classList.add("ok");
        result.textContent = "stored";
        added(body);
      } else {
        const error = errorFrom(xhr.status, body);
        row.classList.add("failed");
        result.textContent = `${error.code}: ${error.message}`;
        if (xhr.status === 401) {
          state.account = null;
          render();
        }
      }
      resolve();
    });
    xhr.addEventListener("error", () => {
      row.classList.add("failed");
      result.textContent = "the server cannot be reached";
      resolve();
    });
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

/// A new image goes first, as the list (newest first) would show it.
function added(image) {
  if (state.items.some((known) => known.id === image.id)) return;
  state.items.unshift(image);
  $("grid").prepend(tile(image));
  $("empty").hidden = true;
}

function wireUploads() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    upload([...input.files]);
    input.value = "";
  });
  const zone = $("dropzone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    upload([...event.dataTransfer.files]);
  });
  // A file dropped beside the zone must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

// ---- the detail view ---------------------------------------------------------------------

function mayChange(image) {
  if (!state.info.enabled) return true;
  const account = state.account;
  return Boolean(account && (account.role === "admin" || account.id === image.owner));
}

function openDetail(id) {
  const index = state.items.findIndex((image) => image.id === id);
  if (index < 0) return;
  showDetail(index);
  const dialog = $("detail");
  if (!dialog.open) dialog.showModal();
  // Fresh facts: replicas change as copies are made.
  api(`/api/v1/images/${encodeURIComponent(id)}`)
    .then((image) => {
      const at = state.items.findIndex((known) => known.id === image.id);
      if (at < 0) return;
      state.items[at] = image;
      if (state.current === at) showDetail(at);
    })
    .catch(() => {});
}

function showDetail(index) {
  state.current = index;
  const image = state.items[index];
  $("detail-name").textContent = image.filename;
  const preview = $("detail-image");
  preview.removeAttribute("src");
  preview.alt = image.filename;
  preview.width = image.width;
  preview.height = image.height;
  preview.style.aspectRatio = `${image.width} / ${image.height}`;
  showImage(preview, image, "preview");
  const facts = $("detail-facts");
  clear(facts);
  const fact = (name, value) => facts.append(el("dt", { text: name }), el("dd", { text: value }));
  fact("Dimensions", `${image.width} × ${image.height}`);
  fact("Size", formatBytes(image.file_size));
  fact("Type", image.content_type);
  fact("Created", new Date(image.created_at).toLocaleString());
  fact("Visibility", image.visibility);
  fact("Checksum", image.checksum.slice(0, 16) + "…");
  const replicas = $("detail-replicas");
  clear(replicas);
  for (const replica of image.replicas) {
    replicas.append(el("li", { class: `replica state-${replica.state}` }, [el("span", { class: "shard", text: replica.shard }), el("span", { class: "state", text: replica.state })]));
  }
  const changeable = mayChange(image);
  $("visibility-switch").hidden = !changeable;
  $("visibility").checked = image.visibility === "private";
  $("delete").hidden = !changeable;
  $("confirm").hidden = true;
  $("detail-message").textContent = "";
  $("detail-prev").disabled = index === 0;
  $("detail-next").disabled = index === state.items.length - 1 && state.done;
}

async function step(by) {
  const next = state.current + by;
  if (next < 0) return;
  if (next >= state.items.length) {
    if (state.done) return;
    await loadMore();
    if (next >= state.items.length) return;
  }
  showDetail(next);
}

function wireDetail() {
  const dialog = $("detail");
  $("detail-close").addEventListener("click", () => dialog.close());
  $("detail-prev").addEventListener("click", () => step(-1));
  $("detail-next").addEventListener("click", () => step(1));
  // A click on the backdrop (outside the panel) closes the view.
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close();
  });
  // On the document: the focused button may be disabled (first or last image) and lose focus.
  document.addEventListener("keydown", (event) => {
    if (!dialog.open || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "ArrowLeft") {
      event.preventDefault();
      step(-1);
    } else if (event.key === "ArrowRight") {
      event.preventDefault();
      step(1);
    }
  });
  dialog.addEventListener("close", () => {
    const image = state.items[state.current];
    if (image) $("grid").querySelector(`[data-id="${CSS.escape(image.id)}"]`)?.focus();
  });
  $("copy-link").addEventListener("click", copyLink);
  $("visibility").addEventListener("change", changeVisibility);
  $("delete").addEventListener("click", () => {
    $("confirm").hidden = false;
    $("cancel-delete").focus();
  });
  $("cancel-delete").addEventListener("click", () => {
    $("confirm").hidden = true;
  });
  $("confirm-delete").addEventListener("click", remove);
}

async function copyLink() {
  const image = state.items[state.current];
  const message = $("detail-message");
  try {
    let path = image.url;
    if (image.visibility === "private" && state.info.enabled) {
      path = (await api(`/api/v1/images/${image.id}/signed-url`, { method: "POST", body: {} })).url;
    }
    const link = new URL(path, location.origin).toString();
    try {
      await navigator.clipboard.writeText(link);
      message.textContent = image.visibility === "private" ? "Link copied (it works for one hour)" : "Link copied";
    } catch (_) {
      message.textContent = link;
    }
  } catch (error) {
    message.textContent = error.message;
  }
}

async function changeVisibility() {
  const image = state.items[state.current];
  const visibility = $("visibility").checked ? "private" : "public";
  try {
    const changed = await api(`/api/v1/images/${image.id}`, { method: "PATCH", body: { visibility } });
    state.items[state.current] = changed;
    replaceTile(changed);
    showDetail(state.current);
    $("detail-message").textContent = `Now ${visibility}`;
  } catch (error) {
    $("visibility").checked = image.visibility === "private";
    $("detail-message").textContent = error.message;
  }
}

async function remove() {
  const index = state.current;
  const image = state.items[index];
  try {
    await api(`/api/v1/images/${image.id}`, { method: "DELETE" });
  } catch (error) {
    $("detail-message").textContent = error.message;
    return;
  }
  state.items.splice(index, 1);
  $("grid").querySelector(`[data-id="${CSS.escape(image.id)}"]`)?.remove();
  $("empty").hidden = state.items.length > 0;
  $("detail").close();
}

// ---- wiring ------------------------------------------------------------------------------

wireUploads();
wireDetail();
// An entry describes the layout of the frame it was computed in; a page appended since may
// have pushed the sentinel away, so ask the layout of now before fetching another page.
new IntersectionObserver((entries) => {
  if (entries.some((entry) => entry.isIntersecting) && sentinelInView()) loadMore();
}, { rootMargin: `${PREFETCH_PX}px` }).observe($("sentinel"));
start();
