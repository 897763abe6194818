// The operator dashboard: every shard's health, circuit, latency, objects and bytes against
// its share of the ring; the replication queue, live; copies by state; failing tasks; the ring.
// Everything comes from two admin-only routes: /api/v1/admin/storage and
// /api/v1/admin/replication.

import { ApiError, api, clear, el, formatAge, formatBytes, formatPercent, serverInfo, whoAmI } from "./api.js";
import { renderAccount, renderSignIn } from "./signin.js";

/// How often the figures are refreshed.
const REFRESH_MS = 2000;
/// How much queue history the chart keeps.
const HISTORY_MS = 5 * 60 * 1000;
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

const state = { info: { enabled: false }, account: null, timer: null, history: [] };

async function start() {
  try {
    state.info = await serverInfo();
  } catch (_) {
    $("updated").textContent = "the server cannot be reached";
  }
  state.account = await whoAmI();
  render();
}

function show(section) {
  for (const id of ["signin-area", "forbidden", "dashboard"]) $(id).hidden = id !== section;
}

function render() {
  clearTimeout(state.timer);
  renderAccount($("account"), state.account, state.info, () => {
    state.account = null;
    render();
  });
  if (state.info.enabled && !state.account) {
    show("signin-area");
    renderSignIn($("signin-area"), state.info, (account) => {
      state.account = account;
      render();
    }, "The dashboard is for admins: sign in with an admin account or the admin API key.");
    return;
  }
  if (state.info.enabled && state.account.role !== "admin") {
    show("forbidden");
    return;
  }
  show("dashboard");
  refresh();
}

async function refresh() {
  clearTimeout(state.timer);
  try {
    const [storage, replication] = await Promise.all([api("/api/v1/admin/storage"), api("/api/v1/admin/replication")]);
    draw(storage, replication);
    $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}; refreshed every ${REFRESH_MS / 1000} s`;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      state.account = null;
      render();
      return;
    }
    if (error instanceof ApiError && error.status === 403) {
      show("forbidden");
      return;
    }
    $("updated").textContent = `Not updated: ${error.message}`;
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

function draw(storage, replication) {
  drawSummary(storage, replication);
  drawShards(storage);
  drawQueue(replication);
  drawCopies(storage.replicas);
  drawFailing(replication);
  drawRing(storage);
}

function card(label, value, tone, id) {
  return el("div", { class: `card ${tone || ""}`, id }, [el("span", { class: "label", text: label }), el("span", { class: "value", text: value })]);
}

function drawSummary(storage, replication) {
  const up = storage.shards.filter((shard) => shard.status === "ok").length;
  const open = storage.shards.filter((shard) => shard.circuit !== "closed").length;
  const copies = storage.replicas;
  const unsafe = copies.pending + copies.missing;
  const summary = $("summary");
  clear(summary);
  summary.append(
    card("Shards up", `${up} / ${storage.shards.length}`, up === storage.shards.length ? "good" : "bad", "shards-up"),
    card("Open circuits", String(open), open ? "bad" : "good", "open-circuits"),
    card("Copies below target", String(unsafe), unsafe ? "warn" : "good", "below-target"),
    card("Queue depth", String(replication.queue_depth), replication.queue_depth ? "warn" : "good"),
  );
}

function bar(kind, fraction, title) {
  const fill = el("span", { class: `fill ${kind}` });
  fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  return el("span", { class: "bar", title }, [fill, el("span", { class: "bar-label", text: formatPercent(fraction) })]);
}

function drawShards(storage) {
  const body = $("shards").tBodies[0];
  clear(body);
  for (const shard of storage.shards) {
    const health = el("span", { class: `pill ${shard.status === "ok" ? "good" : "bad"}`, text: shard.status });
    const circuit = el("span", { class: `pill circuit ${shard.circuit === "closed" ? "good" : "bad"}`, text: shard.circuit.replace("_", "-") });
    const row = el("tr", { "data-shard": shard.name, class: shard.status === "ok" ? "" : "down" }, [
      el("th", { scope: "row" }, [el("span", { class: "shard-name", text: shard.name }), el("span", { class: "backend", text: shard.backend })]),
      el("td", { class: "health" }, [health, shard.error ? el("span", { class: "error-text", text: shard.error }) : null]),
      el("td", { class: "circuit-cell" }, [circuit, shard.consecutive_failures ? el("span", { class: "muted", text: ` ${shard.consecutive_failures} failures` }) : null]),
      el("td", { class: "num", text: `${shard.latency_ms.toFixed(1)} ms` }),
      el("td", { class: "num objects", text: String(shard.objects) }),
      el("td", { class: "num", text: formatBytes(shard.bytes) }),
      el("td", { class: "bars" }, [
        bar("data", shard.data_share, "share of the stored bytes"),
        bar("weight", shard.weight_share, "share of the ring's weight"),
      ]),
    ]);
    body.append(row);
  }
}

function drawQueue(replication) {
  const queue = $("queue");
  clear(queue);
  queue.append(
    card("Depth", String(replication.queue_depth), replication.queue_depth ? "warn" : "good", "queue-depth"),
    card("Oldest task", formatAge(replication.oldest_task_age_secs), "", "queue-age"),
    card("Copy tasks", String(replication.copy_tasks)),
    card("Delete tasks", String(replication.delete_tasks)),
    card("Workers here", String(replication.workers)),
  );
  const now = Date.now();
  state.history.push({ at: now, depth: replication.queue_depth });
  state.history = state.history.filter((sample) => now - sample.at <= HISTORY_MS);
  drawChart(now);
}

/// Queue depth over the last minutes, as an SVG line.
function drawChart(now) {
  const chart = $("queue-chart");
  clear(chart);
  const width = 300;
  const height = 80;
  const peak = Math.max(1, ...state.history.map((sample) => sample.depth));
  const x = (at) => width - ((now - at) / HISTORY_MS) * width;
  const y = (depth) => height - 4 - (depth / peak) * (height - 8);
  const points = state.history.map((sample) => `${x(sample.at).toFixed(1)},${y(sample.depth).toFixed(1)}`);
  const base = document.createElementNS(SVG, "line");
  for (const [name, value] of Object.entries({ x1: 0, x2: width, y1: y(0), y2: y(0), class: "axis" })) base.setAttribute(name, String(value));
  chart.append(base);
  if (points.length) {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("class", "line");
    chart.append(line);
  }
  $("queue-chart-caption").textContent = `last ${HISTORY_MS / 60000} minutes; peak ${peak === 1 && !state.history.some((s) => s.depth) ? 0 : peak} tasks`;
}

function drawCopies(copies) {
  const states = ["stored", "pending", "missing", "deleting"];
  const total = states.reduce((sum, name) => sum + copies[name], 0);
  const stack = $("copies-bar");
  clear(stack);
  const list = $("copies");
  clear(list);
  for (const name of states) {
    if (total > 0 && copies[name] > 0) {
      const part = el("span", { class: `part state-${name}`, title: `${name}: ${copies[name]}` });
      part.style.width = `${(copies[name] / total) * 100}%`;
      stack.append(part);
    }
    list.append(el("li", { class: `state-${name}`, id: `copies-${name}` }, [el("span", { class: "swatch" }), el("span", { text: name }), el("strong", { text: String(copies[name]) })]));
  }
}

function drawFailing(replication) {
  const body = $("failing").tBodies[0];
  clear(body);
  const failing = replication.shards.filter((shard) => shard.failing_tasks > 0);
  for (const shard of failing) {
    body.append(el("tr", {}, [
      el("th", { scope: "row", text: shard.name }),
      el("td", { class: "num", text: String(shard.failing_tasks) }),
      el("td", { class: "num", text: String(shard.failed_attempts) }),
      el("td", {}, [el("span", { class: "error-text", text: shard.last_error || "" })]),
    ]));
  }
  $("failing").hidden = failing.length === 0;
  $("no-failing").hidden = failing.length > 0;
}

function drawRing(storage) {
  const ring = storage.ring;
  const facts = $("ring");
  clear(facts);
  const fact = (name, value) => facts.append(el("div", {}, [el("dt", { text: name }), el("dd", { text: value })]));
  fact("Shards", String(ring.shards));
  fact("Tokens", String(ring.tokens));
  fact("Vnodes per unit of weight", String(ring.vnodes_per_weight));
  fact("Replication factor", String(ring.replication_factor));
  fact("Peak-to-mean", ring.peak_to_mean.toFixed(3));
  fact("Coefficient of variation", formatPercent(ring.coefficient_of_variation));
  const body = $("ring-shares").tBodies[0];
  clear(body);
  for (const shard of storage.shards) {
    body.append(el("tr", {}, [
      el("th", { scope: "row", text: shard.name }),
      el("td", { class: "num", text: String(shard.weight) }),
      el("td", { class: "num", text: String(shard.vnodes) }),
      el("td", { class: "num", text: formatPercent(shard.weight_share) }),
      el("td", { class: "num", text: formatPercent(shard.simulated_share) }),
    ]));
  }
}

start();
