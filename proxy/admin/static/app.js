// The dashboard: fetches dashboard/data for the chosen period and filters and draws it.
// No library and no build step; every text from the data goes in with textContent (model
// and key names are chosen by clients), and charts are plain SVG elements.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const TOKEN_KINDS = ["input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"];
const STAT_COLUMNS = [
  ["requests", "requests", "int"], ["input_tokens", "input", "int"],
  ["output_tokens", "output", "int"], ["cache_read_tokens", "cache read", "int"],
  ["cache_write_tokens", "cache write", "int"], ["cache_hit_ratio", "cache hit", "pct"],
  ["cost_usd", "cost USD", "usd"], ["failed_requests", "failed", "int"],
];
const DEPLOYMENT_COLUMNS = [
  ["requests", "requests", "int"], ["cost_usd", "cost USD", "usd"],
  ["ttft_p50_ms", "TTFT p50", "ms"], ["ttft_p95_ms", "TTFT p95", "ms"],
  ["retries", "retries", "int"], ["fallbacks", "fallbacks", "int"],
  ["continued_requests", "continued", "int"], ["failed_requests", "failed", "int"],
];
const RECENT_COLUMNS = [
  ["started_at", "started (UTC)", "time"], ["model", "model", "text"],
  ["deployment", "deployment", "text"], ["key_name", "key", "text"],
  ["end_reason", "end reason", "reason"], ["status", "status", "text"],
  ["ttft_ms", "TTFT", "ms"], ["input_tokens", "input", "int"],
  ["output_tokens", "output", "int"], ["cost_usd", "cost USD", "usd"],
];

function format(value, kind) {
  if (value === null || value === undefined) return "–";
  switch (kind) {
    case "int": return Math.round(value).toLocaleString("en-US");
    case "pct": return (100 * value).toFixed(1) + " %";
    case "usd": return "$" + Number(value).toFixed(value >= 100 ? 2 : 4);
    case "ms": return Math.round(value).toLocaleString("en-US") + " ms";
    case "time": return String(value).replace("T", " ").slice(0, 19);
    default: return String(value);
  }
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function fillTable(table, label, rows, columns, labelKey) {
  table.replaceChildren();
  const head = element("tr");
  head.append(element("th", label));
  for (const [, title] of columns) head.append(element("th", title));
  table.append(head);
  if (!rows.length) {
    const row = element("tr");
    const cell = element("td", "no requests", "empty");
    cell.colSpan = columns.length + 1;
    row.append(cell);
    table.append(row);
    return;
  }
  for (const data of rows) {
    const row = element("tr");
    const name = data[labelKey];
    row.append(element("td", name === null || name === undefined ? "(none)" : String(name)));
    for (const [key, , kind] of columns) row.append(element("td", format(data[key], kind)));
    table.append(row);
  }
}

function fillTiles(totals) {
  const tiles = document.getElementById("tiles");
  const spend = [
    ["Spend", format(totals.cost_usd, "usd")],
    ["Requests", format(totals.requests, "int")],
    ["Input tokens", format(totals.input_tokens, "int")],
    ["Output tokens", format(totals.output_tokens, "int")],
    ["Cache hit", format(totals.cache_hit_ratio, "pct")],
    ["TTFT p50", format(totals.ttft_p50_ms, "ms")],
    ["TTFT p95", format(totals.ttft_p95_ms, "ms")],
    ["Failed", format(totals.failed_requests, "int")],
    ["Fallbacks", format(totals.fallbacks, "int")],
    ["Continuations", format(totals.continued_requests, "int")],
    ["Dedup hits", format(totals.dedup_requests, "int")],
  ];
  tiles.replaceChildren();
  for (const [label, value] of spend) {
    const tile = element("div", undefined, "tile");
    tile.dataset.name = label;
    tile.append(element("div", label, "label"), element("div", value, "value"));
    tiles.append(tile);
  }
}

function svgNode(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

// Bars over time; `layers` stacks several fields (tokens) in one bar.
function drawBars(svg, series, layers) {
  svg.replaceChildren();
  const width = svg.clientWidth || 600, height = svg.clientHeight || 180;
  const left = 52, bottom = 18, top = 6;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const totals = series.map((point) => layers.reduce((sum, key) => sum + (point[key] || 0), 0));
  const most = Math.max(0, ...totals);
  const plot = height - bottom - top;
  for (const fraction of [0, 0.5, 1]) {
    const y = top + plot * (1 - fraction);
    svg.append(svgNode("line", {x1: left, x2: width, y1: y, y2: y, class: "grid"}));
    const text = svgNode("text", {x: left - 4, y: y + 3, "text-anchor": "end", class: "axis"});
    text.textContent = compact(most * fraction);
    svg.append(text);
  }
  if (!series.length || most <= 0) return;
  const step = (width - left) / series.length;
  series.forEach((point, index) => {
    let base = top + plot;
    for (const key of layers) {
      const value = point[key] || 0;
      if (value <= 0) continue;
      const h = Math.max(1, plot * value / most);
      const bar = svgNode("rect", {x: left + index * step + step * 0.1, y: base - h,
                                   width: Math.max(1, step * 0.8), height: h,
                                   class: "bar " + key.replace("_tokens", "")});
      const title = svgNode("title", {});
      title.textContent = `${point.t}: ${key.replace("_", " ")} ${format(value, key === "cost_usd" ? "usd" : "int")}`;
      bar.append(title);
      svg.append(bar);
      base -= h;
    }
  });
  const first = svgNode("text", {x: left, y: height - 4, class: "axis"});
  first.textContent = format(series[0].t, "time").slice(0, 13);
  const last = svgNode("text", {x: width, y: height - 4, "text-anchor": "end", class: "axis"});
  last.textContent = format(series[series.length - 1].t, "time").slice(0, 13);
  svg.append(first, last);
}

function compact(value) {
  if (value >= 1e6) return (value / 1e6).toFixed(1) + "M";
  if (value >= 1e3) return (value / 1e3).toFixed(1) + "k";
  return value >= 10 || value === 0 ? Math.round(value).toString() : value.toFixed(2);
}

function fillChoices(select, values, chosen) {
  const first = select.options[0];
  select.replaceChildren(first);
  for (const value of values) {
    const option = element("option", value);
    option.value = value;
    select.append(option);
  }
  select.value = values.includes(chosen) ? chosen : "";
}

function fillReasons(table, reasons) {
  table.replaceChildren();
  const head = element("tr");
  head.append(element("th", "end reason"), element("th", "requests"));
  table.append(head);
  const entries = Object.entries(reasons);
  if (!entries.length) {
    const row = element("tr");
    row.append(element("td", "no requests", "empty"), element("td", ""));
    table.append(row);
  }
  for (const [reason, count] of entries) {
    const row = element("tr");
    const ok = reason === "complete" || reason === "replay" || reason === "joined";
    row.append(element("td", reason, ok ? "reason-complete" : "reason-failed"),
               element("td", format(count, "int")));
    table.append(row);
  }
}

function fillRecent(table, rows) {
  table.replaceChildren();
  const head = element("tr");
  for (const [, title] of RECENT_COLUMNS) head.append(element("th", title));
  table.append(head);
  for (const data of rows) {
    const row = element("tr");
    for (const [key, , kind] of RECENT_COLUMNS) {
      if (kind === "reason") {
        const ok = data[key] === "complete";
        row.append(element("td", String(data[key]), ok ? "reason-complete" : "reason-failed"));
      } else {
        row.append(element("td", format(data[key], kind === "text" ? "text" : kind)));
      }
    }
    table.append(row);
  }
}

function render(data) {
  fillTiles(data.totals);
  drawBars(document.getElementById("chart-cost"), data.series, ["cost_usd"]);
  drawBars(document.getElementById("chart-requests"), data.series, ["requests"]);
  drawBars(document.getElementById("chart-tokens"), data.series, TOKEN_KINDS);
  fillTable(document.getElementById("by-model"), "model", data.by_model, STAT_COLUMNS, "model");
  fillTable(document.getElementById("by-deployment"), "deployment", data.by_deployment,
            DEPLOYMENT_COLUMNS, "deployment");
  fillTable(document.getElementById("by-key"), "key", data.by_key, STAT_COLUMNS, "key");
  fillReasons(document.getElementById("end-reasons"), data.end_reasons);
  fillRecent(document.getElementById("recent"), data.recent);
  fillChoices(document.getElementById("model"), data.choices.models, data.filters.model || "");
  fillChoices(document.getElementById("key"), data.choices.keys, data.filters.key || "");
}

let generation = 0;

async function load() {
  const mine = ++generation;
  const status = document.getElementById("status");
  const query = new URLSearchParams();
  for (const name of ["period", "model", "key"]) {
    const value = document.getElementById(name).value;
    if (value) query.set(name, value);
  }
  status.textContent = "loading…";
  try {
    const response = await fetch("dashboard/data?" + query.toString(),
                                 {credentials: "same-origin", cache: "no-store"});
    const data = await response.json();
    if (mine !== generation) return;  // a newer choice is on its way
    if (!response.ok) {
      status.textContent = "error: " + ((data.error && data.error.message) || response.status);
      return;
    }
    render(data);
    document.body.dataset.loaded = query.toString() || "default";
    status.textContent = `${data.since.slice(0, 16).replace("T", " ")} – ` +
      `${data.until.slice(0, 16).replace("T", " ")} UTC`;
  } catch (error) {
    if (mine === generation) status.textContent = "cannot load the data: " + error.message;
  }
}

for (const name of ["period", "model", "key"]) {
  document.getElementById(name).addEventListener("change", load);
}
load();
setInterval(load, 30000);
