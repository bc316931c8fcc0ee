// saescope atlas: a single-page app over the JSON API (no framework, no build step).
//
// Every piece of data (user text, labels, model tokens) reaches the page through
// textContent or a DOM property, never innerHTML: see el() and svg() below.
"use strict";

// ------------------------------------------------------------------ DOM helpers

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "href") node.href = safeHref(v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv;
    else if (k.startsWith("aria-") || k === "role" || k === "scope") node.setAttribute(k, String(v));
    else node[k] = v;  // DOM properties (value, title, type, ...): never parsed as HTML
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function safeHref(v) {
  // Links are built by this file only: in-app routes and same-origin paths.
  const s = String(v);
  return s.startsWith("#/") || s.startsWith("/") ? s : "#/";
}

const SVGNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en");
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
  return x.toFixed(digits);
}

function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(x < 0.001 ? 4 : 2) + "%"; }

function featureHref(saeId, idx) { return "#/feature/" + encodeURIComponent(saeId) + "/" + idx; }

function layerOf(saeId) { const m = /layer_(\d+)/.exec(saeId); return m ? Number(m[1]) : null; }

// A token inside running text: line breaks and tabs visible, spaces as spaces.
function contextToken(t) {
  if (t === null || t === undefined) return "�";
  return String(t).replace(/\r\n|\n|\r/g, "↵").replace(/\t/g, "⇥");
}

// A token shown on its own (promoted tokens, the inspector's token column): edge spaces as ␣,
// as saescope.tokens.visible does for the command line.
function showToken(t) {
  const s = contextToken(t), core = s.replace(/^ +| +$/g, "");
  if (!core) return "␣".repeat(s.length);
  const lead = s.length - s.replace(/^ +/, "").length, trail = s.length - s.replace(/ +$/, "").length;
  return "␣".repeat(lead) + core + "␣".repeat(trail);
}

// ------------------------------------------------------------------ API

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const res = await fetch(path, {credentials: "same-origin", ...opts});
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const msg = data && data.detail ? data.detail : `${res.status} ${res.statusText}`;
    throw new Error(typeof msg === "string" ? msg : JSON.stringify(msg));
  }
  return data;
}

function errorBox(err) { return el("p", {class: "error", role: "alert", text: String(err.message || err)}); }

const view = () => document.getElementById("view");
function render(...nodes) { view().replaceChildren(...nodes); }

// ------------------------------------------------------------------ routing

const routes = {overview: pageOverview, inspect: pageInspect, feature: pageFeature, search: pageSearch,
                steer: pageSteer, sae: pageSae};

function parseHash() {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, query] = h.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return {name: parts[0] || "overview", parts: parts.slice(1), params: new URLSearchParams(query || "")};
}

async function route() {
  const r = parseHash();
  document.querySelectorAll("header nav a").forEach(a => a.classList.toggle("active", a.dataset.route === r.name));
  const page = routes[r.name] || pageOverview;
  try { await page(r); } catch (err) { render(errorBox(err)); }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", async () => {
  try {
    const info = await api("/api/run");
    document.getElementById("run-name").textContent = `run ${info.name} · ${info.model}`;
    window.RUN = info;
  } catch (err) { /* the page shows the error */ }
  route();
});

// ------------------------------------------------------------------ overview

const METRICS = [["l0", "L0 (held-out)"], ["fvu", "FVU"], ["delta_lm_loss", "ΔLM loss (nats)"],
                 ["kl", "KL to the clean model (nats)"], ["ce_recovered", "CE loss recovered"],
                 ["dead_fraction", "dead fraction"], ["dense_fraction", "dense fraction"]];
const COLORS = ["#1f6feb", "#e8590c", "#2f9e44", "#9c36b5", "#c2255c", "#0c8599", "#5c940d", "#495057"];

async function pageOverview() {
  const [info, saes] = await Promise.all([api("/api/run"), api("/api/saes")]);
  let ev = null;
  if (info.has_eval) ev = await api("/api/eval");
  const facts = el("table", {},
    ...[["model", info.model], ["corpus", info.corpus && (info.corpus.source || JSON.stringify(info.corpus))],
        ["SAEs", info.n_saes], ["held-out eval tokens", info.eval_tokens],
        ["stages", Object.entries(info.stages || {}).map(([k, v]) => `${k}: ${v.status}`).join(" · ")],
        ["saescope", info.versions && info.versions.saescope]]
      .map(([k, v]) => el("tr", {}, el("th", {text: k}), el("td", {text: v === undefined || v === null ? "–" : String(v)}))));

  const rows = saes.saes.map(s => {
    const e = s.eval || {};
    return el("tr", {},
      el("td", {}, el("a", {href: "#/sae/" + encodeURIComponent(s.id), text: s.id})),
      el("td", {class: "num", text: s.layer}), el("td", {text: s.site}), el("td", {class: "num", text: fmt(s.width)}),
      el("td", {class: "num", text: fmt(e.l0, 1)}), el("td", {class: "num", text: fmt(s.l0_target, 0)}),
      el("td", {class: "num", text: fmt(e.fvu)}), el("td", {class: "num", text: fmt(e.dead_fraction)}),
      el("td", {class: "num", text: fmt(e.dense_fraction)}), el("td", {class: "num", text: fmt(e.delta_lm_loss) +
        (typeof e.delta_lm_loss_se === "number" ? ` ± ${fmt(e.delta_lm_loss_se, 2)}` : "")}),
      el("td", {class: "num", text: fmt(e.ce_recovered)}), el("td", {text: s.status}));
  });
  const table = el("table", {id: "sae-table"},
    el("tr", {}, ...["SAE", "layer", "site", "width", "L0", "target", "FVU", "dead", "dense", "ΔLM", "CE rec.", "analysis"]
      .map(h => el("th", {text: h}))), ...rows);

  const charts = el("div", {class: "grid", id: "charts"});
  if (ev) for (const [key, title] of METRICS) charts.append(metricChart(ev, key, title));
  render(
    el("h1", {text: `Run ${info.name}`}),
    el("div", {class: "card"}, scroller(facts)),
    el("h2", {text: "Fidelity by layer"}),
    ev ? el("div", {}, legend(ev), charts,
            info.has_eval_png ? el("p", {}, el("a", {href: "/eval.png", text: "eval.png (static plot)"})) : null)
       : el("p", {class: "muted", text: "No eval.json yet: run `saescope eval` to see metrics by layer."}),
    el("h2", {text: "SAEs"}), el("div", {class: "card"}, scroller(table)));
}

function groupsOf(ev) {
  const groups = new Map();
  for (const m of Object.values(ev.saes || {})) {
    const name = `${m.site} w${m.width} L0*${m.l0_target}`;
    if (!groups.has(name)) groups.set(name, []);
    groups.get(name).push(m);
  }
  for (const ms of groups.values()) ms.sort((a, b) => a.layer - b.layer);
  return [...groups.entries()];
}

function legend(ev) {
  const hasOther = ev.distributions && ev.distributions.other;
  const hasSe = Object.values(ev.saes || {}).some(m => typeof m.delta_lm_loss_se === "number");
  return el("div", {class: "legend"}, ...groupsOf(ev).map(([name], i) => {
    const sw = el("i"); sw.style.background = COLORS[i % COLORS.length];
    return el("span", {}, sw, name);
  }), el("span", {class: "muted", text: "solid: the corpus's held-out split" +
    (hasSe ? " (bars: ± one standard error)" : "") + (hasOther ? ` · dashed, hollow: ${otherName(ev)}` : "")}));
}

function otherName(ev) {
  const o = ev.distributions && ev.distributions.other;
  const c = o && o.corpus;
  return "text never trained on" + (c ? `: ${typeof c === "string" ? c : (c.source || c.name || "")}` : "");
}

// A line chart of one metric by layer (one line per site/width/target group), inline SVG that scales
// with its card (viewBox; CSS width 100%).

function metricChart(ev, key, title) {
  const W = 330, H = 190, L = 46, R = 18, T = 22, B = 28;
  const groups = groupsOf(ev);
  // each point: the held-out split, ± its standard error (bars) where eval.json has one, and the never-trained-on
  // text ("other", dashed, hollow points)
  const se = m => (typeof m[key] === "number" && typeof m[key + "_se"] === "number") ? m[key + "_se"] : 0;
  const other = m => m.other && typeof m.other[key] === "number" ? m.other[key] : null;
  const pts = groups.flatMap(([, ms]) => ms.flatMap(m => [[m.layer, m[key] - se(m)], [m.layer, m[key] + se(m)],
                                                           [m.layer, other(m)]]))
    .filter(p => typeof p[1] === "number" && !Number.isNaN(p[1]));
  if (key === "l0") groups.forEach(([, ms]) => ms.forEach(m => pts.push([m.layer, m.l0_target])));
  const s = svg("svg", {class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title,
                        "data-metric": key});
  s.append(svg("text", {x: W / 2, y: 14, "text-anchor": "middle", "font-weight": "600"}, title));
  if (!pts.length) { s.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no data")); return wrapChart(s); }
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys, 0), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y1 = y0 + 1; }
  const yt = niceTicks(y0, y1, 4);
  [y0, y1] = [yt[0], yt[yt.length - 1]];
  const px = x => L + 6 + (x - x0) / (x1 - x0) * (W - L - R - 6), py = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const y of yt) {
    s.append(svg("line", {class: "grid", x1: L, x2: W - R, y1: py(y), y2: py(y)}));
    s.append(svg("text", {class: "ytick", x: L - 4, y: py(y) + 3, "text-anchor": "end"}, +y.toPrecision(6)));
  }
  s.append(svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  s.append(svg("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
  for (const x of axisTicks([...new Set(xs)].sort((a, b) => a - b), 10)) {
    s.append(svg("line", {class: "axis", x1: px(x), x2: px(x), y1: H - B, y2: H - B + 3}));
    s.append(svg("text", {class: "xtick", x: px(x), y: H - B + 13, "text-anchor": "middle"}, x));
  }
  s.append(svg("text", {x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle"}, "layer"));
  groups.forEach(([name, ms], gi) => {
    const color = COLORS[gi % COLORS.length];
    if (key === "l0") s.append(svg("polyline", {class: "target", points: ms.map(m => `${px(m.layer)},${py(m.l0_target)}`).join(" ")}));
    const good = ms.filter(m => typeof m[key] === "number");
    s.append(svg("polyline", {stroke: color, points: good.map(m => `${px(m.layer)},${py(m[key])}`).join(" ")}));
    const far = ms.filter(m => other(m) !== null);
    if (far.length) s.append(svg("polyline", {class: "other", stroke: color,
                                              points: far.map(m => `${px(m.layer)},${py(other(m))}`).join(" ")}));
    for (const m of good) {
      if (se(m) > 0) s.append(svg("line", {class: "se", stroke: color, x1: px(m.layer), x2: px(m.layer),
                                           y1: py(m[key] - se(m)), y2: py(m[key] + se(m))}));
      const c = svg("circle", {cx: px(m.layer), cy: py(m[key]), r: 3, fill: color});
      const pm = se(m) > 0 ? ` ± ${fmt(se(m), 3)}` : "";
      c.append(svg("title", {}, `${name} · layer ${m.layer}: ${title} = ${fmt(m[key], 4)}${pm} (held-out split)`));
      s.append(c);
    }
    for (const m of far) {
      const c = svg("circle", {class: "other", cx: px(m.layer), cy: py(other(m)), r: 3, stroke: color});
      c.append(svg("title", {}, `${name} · layer ${m.layer}: ${title} = ${fmt(other(m), 4)} (${otherName(ev)})`));
      s.append(c);
    }
  });
  return wrapChart(s);
}

// Round axis values (steps of 1, 2, 2.5 or 5 × 10^k) covering [lo, hi] in about `n` steps.
function niceTicks(lo, hi, n) {
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = mag * ([1, 2, 2.5, 5, 10].find(m => m * mag >= raw) || 10);
  const out = [];
  for (let v = Math.floor(lo / step) * step; v < hi + step * 0.999; v += step) out.push(v);
  if (out[out.length - 1] < hi) out.push(out[out.length - 1] + step);
  return out;
}

// At most `most` of the sorted values, evenly spaced, always the first and the last.
function axisTicks(values, most) {
  if (values.length <= most) return values;
  const step = Math.ceil((values.length - 1) / (most - 1));
  const out = values.filter((_, i) => i % step === 0);
  if (out[out.length - 1] !== values[values.length - 1]) {
    if ((values.length - 1) % step < 0.7 * step) out.pop();  // too close to the last: make room for it
    out.push(values[values.length - 1]);
  }
  return out;
}

function wrapChart(s) { return el("div", {class: "card chart-card"}, s); }

// A wide table in a box that scrolls sideways on a narrow screen (the page itself never does).
function scroller(...nodes) { return el("div", {class: "scroll-x"}, ...nodes); }

// ------------------------------------------------------------------ one SAE: its features, a page at a time

const SAE_ORDERS = [["frequency", "frequency"], ["max_act", "max activation"], ["mean_act", "mean activation"],
                    ["score", "label score"], ["idx", "index"]];
const PAGE = 50;

function saeQuery(r) {
  const p = r.params;
  return {order_by: p.get("order") || "frequency", desc: p.get("dir") !== "asc", offset: Math.max(0, Number(p.get("offset")) || 0),
          n: Math.min(500, Math.max(1, Number(p.get("n")) || PAGE)),
          state: p.get("state") || "sparse", min_freq: p.get("min_freq") || "", max_freq: p.get("max_freq") || "",
          min_score: p.get("min_score") || ""};
}

function saeHash(saeId, q) {
  const p = new URLSearchParams({order: q.order_by, dir: q.desc ? "desc" : "asc", offset: String(q.offset), state: q.state});
  for (const k of ["min_freq", "max_freq", "min_score"]) if (q[k] !== "") p.set(k, q[k]);
  if (q.n !== PAGE) p.set("n", String(q.n));
  return `#/sae/${encodeURIComponent(saeId)}?${p}`;
}

async function pageSae(r) {
  const saeId = r.parts.join("/");
  const q = saeQuery(r);
  const api_q = new URLSearchParams({order_by: q.order_by, desc: String(q.desc), offset: String(q.offset), limit: String(q.n), state: q.state});
  // the form takes percentages; the API fractions
  if (q.min_freq !== "") api_q.set("min_freq", String(Number(q.min_freq) / 100));
  if (q.max_freq !== "") api_q.set("max_freq", String(Number(q.max_freq) / 100));
  if (q.min_score !== "") api_q.set("min_score", q.min_score);
  const data = await api(`/api/features/${encodeURI(saeId)}?${api_q}`);
  const go = changes => { location.hash = saeHash(data.sae.id, {...q, offset: 0, ...changes}); };
  const order = el("select", {id: "sae-order", onchange: e => go({order_by: e.target.value})},
    ...SAE_ORDERS.map(([o, t]) => el("option", {value: o, text: t, selected: o === q.order_by})));
  const dir = el("button", {id: "sae-dir", type: "button", text: q.desc ? "largest first ↓" : "smallest first ↑",
    title: "reverse the order", onclick: () => go({desc: !q.desc})});
  const state = el("select", {id: "sae-state", onchange: e => go({state: e.target.value})},
    ...[["sparse", "alive, not dense"], ["all", "all"], ["alive", "alive (fired)"], ["dead", "dead (never fired)"],
        ["dense", "dense (> 10% of tokens)"]]
      .map(([v, t]) => el("option", {value: v, text: t, selected: v === q.state})));
  const num = (id, value, ph, max) => el("input", {type: "number", id, value, placeholder: ph, min: 0, max, step: "any"});
  const minF = num("sae-minfreq", q.min_freq, "0", 100), maxF = num("sae-maxfreq", q.max_freq, "100", 100);
  const minS = num("sae-minscore", q.min_score, "0–1", 1);
  const filters = el("form", {class: "row", id: "sae-filters", onsubmit: e => {
    e.preventDefault(); go({min_freq: minF.value, max_freq: maxF.value, min_score: minS.value}); }},
    el("label", {}, "order by", order), el("label", {}, "direction", dir), el("label", {}, "show", state),
    el("label", {}, "frequency from %", minF), el("label", {}, "to %", maxF), el("label", {}, "label score at least", minS),
    el("button", {id: "sae-filter-go", text: "Apply"}));
  const first = data.total ? q.offset + 1 : 0, last = q.offset + data.features.length;
  const pager = el("div", {class: "row pager"},
    el("button", {id: "sae-prev", type: "button", text: "← previous", disabled: q.offset === 0,
                  onclick: () => { location.hash = saeHash(data.sae.id, {...q, offset: Math.max(0, q.offset - q.n)}); }}),
    el("span", {id: "sae-range", text: `features ${fmt(first)}–${fmt(last)} of ${fmt(data.total)}`}),
    el("button", {id: "sae-next", type: "button", text: "next →", disabled: last >= data.total,
                  onclick: () => { location.hash = saeHash(data.sae.id, {...q, offset: q.offset + q.n}); }}));
  const rows = data.features.map(f => el("tr", {},
    el("td", {}, el("a", {class: "feat-link", href: featureHref(data.sae.id, f.idx), text: `#${f.idx}`})),
    f.dead ? el("td", {class: "dead", text: "dead (never fired)"})
           : el("td", {class: "label-text", text: (f.label || "") + (f.dense ? "  [dense]" : "")}),
    el("td", {class: "num", text: fmt(f.score, 2)}),
    el("td", {class: "num", text: pct(f.frequency)}), el("td", {class: "num", text: fmt(f.max_act)}),
    el("td", {class: "num", text: fmt(f.mean_act)})));
  render(el("h1", {text: `SAE ${data.sae.id}`}),
    el("p", {class: "muted", text: `layer ${data.sae.layer} · ${data.sae.site} · width ${fmt(data.sae.width)}`}),
    el("div", {class: "card"}, filters), pager,
    data.features.length ? scroller(el("table", {id: "sae-features"}, el("tr", {},
      ...["feature", "label", "label score", "frequency", "max act", "mean act"].map(h => el("th", {text: h}))), ...rows))
      : el("p", {class: "muted", text: data.total === 0 && ["all", "sparse"].includes(q.state) && !q.min_freq && !q.max_freq && !q.min_score
          ? "No analysed features yet: run `saescope analyze`." : "No feature matches these filters."}));
}

// ------------------------------------------------------------------ inspector

const inspectState = {text: "The city of Paris is the capital of France.", top: 5, exact: false, result: null, highlight: null};

async function pageInspect() {
  const ta = el("textarea", {id: "inspect-text", value: inspectState.text, maxLength: 2000, rows: 3,
                             "aria-label": "text to inspect"});
  const top = el("input", {id: "inspect-top", type: "number", min: 1, max: 20, value: inspectState.top});
  const exact = el("input", {id: "inspect-exact", type: "checkbox", checked: inspectState.exact,
    title: "Run the model's matrix products in its own precision (fp32 on a CPU) instead of bf16: slower, and the same numbers as the feature pages"});
  const btn = el("button", {id: "inspect-go", text: "Inspect"});
  const out = el("div", {id: "inspect-out"});
  const go = async () => {
    inspectState.text = ta.value; inspectState.top = Number(top.value) || 5; inspectState.highlight = null;
    inspectState.exact = exact.checked;
    btn.disabled = true; out.replaceChildren(el("p", {class: "muted", text: "Running the model…"}));
    try {
      const t0 = performance.now();
      inspectState.result = await api("/api/inspect", {text: inspectState.text, top: inspectState.top, fast: !inspectState.exact});
      drawHeat(out, inspectState.result, performance.now() - t0);
    } catch (err) { out.replaceChildren(errorBox(err)); }
    btn.disabled = false;
  };
  btn.addEventListener("click", go);
  render(el("h1", {text: "Prompt inspector"}),
    el("p", {class: "muted", text: "Which features fire on each token, at every layer. A cell's number is the count of active features (L0) at that token; its colour is the strongest feature's activation relative to that feature's own maximum over the analysed text (pale: weak for that feature, dark: near its strongest). Click a cell, or move with the arrow keys and press Enter, to list its features; highlight one across the prompt."}),
    el("div", {class: "card"}, ta, el("div", {class: "row"}, el("label", {}, "features per token", top), el("label", {class: "check"}, exact, "exact"), btn)), out);
  if (inspectState.result) drawHeat(out, inspectState.result);
}

function tokenText(token) { return typeof token === "object" && token !== null ? token.text : token; }

function drawHeat(out, res, ms) {
  const layers = res.layers || [], tokens = res.tokens || [];
  const details = el("div", {class: "card details", id: "inspect-details"},
    el("p", {class: "muted", text: "Select a cell to list the features active on that token at that layer."}));
  const strip = el("div", {id: "highlight", class: "card", hidden: true});
  const head = el("tr", {}, el("th", {class: "tok", text: "token"}),
    ...layers.map(L => el("th", {title: L.sae_id, text: `L${L.layer}`, scope: "col"})));
  const table = el("table", {class: "heat", id: "heat", role: "grid", "aria-label": "features per token and layer"}, head);
  const grid = [];  // grid[t][li] = cell
  const select = cell => {
    table.querySelectorAll("td.sel").forEach(c => c.classList.remove("sel"));
    cell.classList.add("sel");
    const t = Number(cell.dataset.t), li = Number(cell.dataset.li);
    showCell(details, strip, res, t, li);
  };
  tokens.forEach((token, t) => {
    const tr = el("tr", {class: token && token.bos ? "bos" : null},
      el("th", {class: "tok", scope: "row", text: showToken(tokenText(token)),
                title: token && token.id !== undefined ? `token id ${token.id}` : null}));
    grid.push(layers.map((L, li) => {
      const ids = L.idx[t] || [], acts = L.act[t] || [], rel = L.rel[t];
      const names = (res.labels || {})[L.sae_id] || {};
      const cell = el("td", {class: "cell", tabIndex: -1, role: "gridcell", data: {t: String(t), li: String(li), layer: String(L.layer)},
        title: ids.length ? `${L.l0[t]} active features\n` + ids.map((i, k) => `#${i} ${fmt(acts[k], 2)}${names[i] ? " — " + names[i] : ""}`).join("\n")
                          : "no active feature",
        text: token && token.bos ? "" : String(L.l0[t])});
      cell.style.backgroundColor = `rgba(255, 110, 20, ${Math.min(1, rel || 0).toFixed(3)})`;
      if ((rel || 0) > 0.6) cell.classList.add("hot");
      cell.addEventListener("click", () => { cell.focus(); select(cell); });
      tr.append(cell);
      return cell;
    }));
    table.append(tr);
  });
  keyboardGrid(table, grid, select);
  out.replaceChildren(
    ms !== undefined ? el("p", {class: "muted", text: `${tokens.length} tokens × ${layers.length} SAEs in ${(ms / 1000).toFixed(2)} s (${res.precision || "exact"})`}) : "",
    pickFeatureForm(strip, res), strip, el("div", {class: "inspect-layout"}, el("div", {class: "heat-wrap"}, table), details));
  if (inspectState.highlight) highlightFeature(strip, res, inspectState.highlight.saeId, inspectState.highlight.idx);
}

// Roving focus: one cell is in the tab order; arrow keys, Home/End and PageUp/PageDown move, Enter/Space select.
function keyboardGrid(table, grid, select) {
  if (!grid.length || !grid[0].length) return;
  const start = grid[Math.min(1, grid.length - 1)][0];
  start.tabIndex = 0;
  table.addEventListener("keydown", e => {
    const cell = e.target.closest && e.target.closest("td.cell");
    if (!cell) return;
    let t = Number(cell.dataset.t), li = Number(cell.dataset.li);
    const moves = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1], PageUp: [-10, 0],
                   PageDown: [10, 0], Home: [0, -1e9], End: [0, 1e9]};
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(cell); return; }
    if (!(e.key in moves)) return;
    e.preventDefault();
    t = Math.max(0, Math.min(grid.length - 1, t + moves[e.key][0]));
    li = Math.max(0, Math.min(grid[0].length - 1, li + moves[e.key][1]));
    cell.tabIndex = -1;
    const next = grid[t][li];
    next.tabIndex = 0;
    next.focus();
  });
}

function showCell(details, strip, res, t, li) {
  const L = res.layers[li], ids = L.idx[t] || [], acts = L.act[t] || [];
  const names = (res.labels || {})[L.sae_id] || {};
  details.replaceChildren(
    el("h2", {}, "Token ", el("code", {text: showToken(tokenText(res.tokens[t]))}), ` · layer ${L.layer}`),
    el("p", {class: "muted", text: `${L.sae_id} · ${L.l0[t]} active features${L.l0[t] > ids.length ? `, the top ${ids.length} shown` : ""}`}),
    ids.length ? el("ol", {class: "feat-list"}, ...ids.map((i, k) => el("li", {},
      el("a", {class: "feat-link", href: featureHref(L.sae_id, i), text: `#${i}`}),
      ` act ${fmt(acts[k], 2)} `, names[i] ? el("span", {class: "label-text", text: "— " + names[i]}) : el("span", {class: "muted", text: "(unlabelled)"}),
      " ", el("button", {type: "button", class: "small hl-btn", text: "highlight", title: "show this feature's activation on every token",
                         onclick: () => highlightFeature(strip, res, L.sae_id, i)}))))
      : el("p", {class: "muted", text: "No feature fires here."}));
}

// "LAYER:INDEX" (or "SAE_ID:INDEX") typed by the user → highlight that feature across the prompt.
function pickFeatureForm(strip, res) {
  const input = el("input", {type: "text", id: "hl-spec", placeholder: "e.g. 6:123", maxLength: 200});
  return el("form", {class: "row", id: "hl-form", onsubmit: e => {
    e.preventDefault();
    const m = /^\s*(.+):(\d+)\s*$/.exec(input.value);
    const L = m && res.layers.find(x => x.sae_id === m[1] || String(x.layer) === m[1]);
    if (!L) { strip.hidden = false; strip.replaceChildren(errorBox(`cannot read '${input.value}': write LAYER:INDEX, e.g. ${res.layers[0] ? res.layers[0].layer : 0}:123`)); return; }
    highlightFeature(strip, res, L.sae_id, Number(m[2]));
  }}, el("label", {}, "highlight one feature across the prompt", input), el("button", {id: "hl-go", text: "Highlight"}));
}

// One feature's activation on every token of the prompt: a coloured strip above the grid, and the cells of
// its layer where it fires outlined.
async function highlightFeature(strip, res, saeId, idx) {
  inspectState.highlight = {saeId, idx};
  strip.hidden = false;
  strip.replaceChildren(el("p", {class: "muted", text: `Highlighting feature #${idx}…`}));
  try {
    const a = await api(`/api/feature/${encodeURI(saeId)}/${idx}/activations`, {text: res.text});
    const scale = Math.max(1e-9, a.max_act_analysed || 0, a.max_act);
    const li = res.layers.findIndex(L => L.sae_id === saeId);
    document.querySelectorAll("#heat td.cell.hl").forEach(c => c.classList.remove("hl"));
    a.acts.forEach((v, t) => {
      const cell = document.querySelector(`#heat td.cell[data-t="${t}"][data-li="${li}"]`);
      if (cell && v > 0) cell.classList.add("hl");
    });
    strip.replaceChildren(
      el("h2", {}, "Feature ", el("a", {href: featureHref(saeId, idx), text: `#${idx}`}), ` of ${saeId} across the prompt`),
      el("p", {class: "muted", text: `fires on ${a.acts.filter(v => v > 0).length} of ${a.acts.length} tokens · max here ${fmt(a.max_act, 2)}` +
        (a.max_act_analysed ? ` · max over the analysed text ${fmt(a.max_act_analysed, 2)}` : "")}),
      actLine(a.tokens.map(tokenText), a.acts, scale, "highlight-tokens"),
      el("button", {type: "button", class: "small", id: "highlight-clear", text: "clear", onclick: () => {
        inspectState.highlight = null; strip.hidden = true;
        document.querySelectorAll("#heat td.cell.hl").forEach(c => c.classList.remove("hl")); }}));
  } catch (err) { strip.replaceChildren(errorBox(err)); }
}

// Tokens in running text, each coloured by its activation ÷ scale (hover: the value).
function actLine(toks, acts, scale, id) {
  const line = el("div", {class: "ctx", id});
  toks.forEach((t, i) => {
    const a = acts[i] || 0;
    const span = el("span", {class: "t" + (a > 0 ? " on" : ""), text: contextToken(t), title: `act ${fmt(a, 3)}`,
                             data: {act: String(a)}});
    if (a > 0) span.style.backgroundColor = `rgba(255, 110, 20, ${Math.min(1, a / scale).toFixed(3)})`;
    line.append(span);
  });
  return line;
}

// ------------------------------------------------------------------ feature page

async function pageFeature(r) {
  const idx = r.parts[r.parts.length - 1];
  const saeId = r.parts.slice(0, -1).join("/");
  const f = await api(`/api/feature/${encodeURI(saeId)}/${encodeURIComponent(idx)}`);
  const sae = f.sae;
  const parts = [
    el("h1", {}, `Layer ${sae.layer} · ${sae.site} · feature #${f.idx}`),
    el("p", {class: "muted"}, el("a", {href: "#/sae/" + encodeURIComponent(sae.id), text: sae.id}),
      " · ", el("a", {id: "steer-link", href: `#/steer?f=${encodeURIComponent(`${sae.id}:${f.idx}=2`)}`, text: "steer with this feature"}),
      f.idx > 0 ? el("span", {}, " · ", el("a", {href: featureHref(sae.id, f.idx - 1), text: "← previous"})) : "",
      f.idx < sae.width - 1 ? el("span", {}, " · ", el("a", {href: featureHref(sae.id, f.idx + 1), text: "next →"})) : ""),
    labelsCard(f),
  ];
  if (f.dead) {
    parts.push(el("p", {class: "dead", id: "dead-feature",
      text: "Dead feature: it never fired on the analysed held-out tokens, so there is nothing to label or steer."}));
  }
  const st = f.stats || f;
  parts.push(activationTestCard(f, st.max_act));
  if (!f.analysed) {
    parts.push(el("p", {class: "muted", text: "This feature has not been analysed yet: run `saescope analyze` on this run."}));
  } else {
    parts.push(el("div", {class: "two"},
      el("div", {class: "card"}, el("h2", {text: "Activation"}),
        el("table", {id: "feature-stats"},
          ...[["frequency", pct(st.frequency)], ["tokens fired", fmt(st.n_fired)], ["max activation", fmt(st.max_act)],
              ["mean activation (when firing)", fmt(st.mean_act)]]
            .map(([k, v]) => el("tr", {}, el("th", {text: k}), el("td", {class: "num", text: v})))),
        histogram(st.hist || f.hist)),
      logitsCard(f)));
    parts.push(...exampleCards(f.examples || [], st.max_act));
  }
  const similar = el("div", {class: "card", id: "similar"}, el("h2", {text: "Similar features (decoder cosine)"}),
    el("p", {class: "muted", text: "Loading…"}));
  parts.push(similar);
  render(...parts);
  loadSimilar(similar, sae.id, f.idx);
}

function exampleCards(ex, maxAct) {
  const top = ex.filter(e => e.kind === "top"), quant = ex.filter(e => e.kind === "quantile");
  const random = ex.filter(e => e.kind === "random");
  const cards = [el("div", {class: "card", id: "top-examples"}, el("h2", {text: "Top activating contexts"}),
    top.length ? top.map(e => context(e, maxAct)) : el("p", {class: "muted", text: "none"}))];
  if (quant.length) {
    const byQ = new Map();
    for (const e of quant) { if (!byQ.has(e.quantile)) byQ.set(e.quantile, []); byQ.get(e.quantile).push(e); }
    const nq = Math.max(...byQ.keys()) + 1;
    cards.push(el("div", {class: "card", id: "quantile-examples"}, el("h2", {text: "Contexts by activation quantile"}),
      el("p", {class: "muted", text: `A random sample of firing tokens cut into ${nq} equal-count bins (strongest first); the range is the activation of the examples shown.`}),
      ...[...byQ.entries()].sort((a, b) => b[0] - a[0]).map(([q, es]) => {
        const acts = es.map(e => e.max_act);
        return el("div", {class: "quantile"}, el("h3", {class: "muted q-range", text:
          `quantile ${q + 1} of ${nq}${q === nq - 1 ? " (strongest)" : q === 0 ? " (weakest)" : ""} · activation ${fmt(Math.min(...acts), 2)}–${fmt(Math.max(...acts), 2)}`}),
          es.map(e => context(e, maxAct)));
      })));
  }
  cards.push(el("div", {class: "card", id: "random-examples"}, el("h2", {text: "Random contexts where it is silent"}),
    el("p", {class: "muted", text: "Windows drawn at random from the analysed text in which the feature never fires: what it ignores."}),
    random.length ? random.map(e => context(e, maxAct)) : el("p", {class: "muted", text: "none stored"})));
  return cards;
}

function activationTestCard(f, maxAct) {
  const key = "saescope-act-text";
  const ta = el("textarea", {id: "act-text", rows: 2, maxLength: 2000, "aria-label": "text to test this feature on",
                             value: sessionStorage.getItem(key) || "", placeholder: "type text to see this feature's activation on every token"});
  const out = el("div", {id: "act-out"});
  const btn = el("button", {id: "act-go", text: "Test"});
  const form = el("form", {onsubmit: async e => {
    e.preventDefault();
    sessionStorage.setItem(key, ta.value);
    btn.disabled = true; out.replaceChildren(el("p", {class: "muted", text: "Running the model…"}));
    try {
      const a = await api(`/api/feature/${encodeURI(f.sae_id)}/${f.idx}/activations`, {text: ta.value});
      const scale = Math.max(1e-9, maxAct || 0, a.max_act);
      out.replaceChildren(el("p", {class: "muted", id: "act-summary",
        text: `fires on ${a.acts.filter(v => v > 0).length} of ${a.acts.length} tokens · max here ${fmt(a.max_act, 2)}` +
              (maxAct ? ` (${(100 * a.max_act / maxAct).toFixed(0)}% of its analysed max ${fmt(maxAct, 2)})` : "")}),
        actLine(a.tokens.map(tokenText), a.acts, scale, "act-tokens"));
    } catch (err) { out.replaceChildren(errorBox(err)); }
    btn.disabled = false;
  }}, ta, el("div", {class: "row"}, btn));
  ta.addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit(); });
  return el("div", {class: "card", id: "act-test"}, el("h2", {text: "Test on your own text"}), form, out);
}

async function loadSimilar(card, saeId, idx) {
  const title = card.firstChild;
  try {
    const res = await api(`/api/feature/${encodeURI(saeId)}/${idx}/similar?k=6`);
    const me = layerOf(saeId);
    card.replaceChildren(title, el("p", {class: "muted", text: "Features whose decoder direction points the same way (cosine of w_dec rows), in this SAE and the same site one layer above and below."}),
      el("div", {class: "similar-grid"}, ...res.groups.map(g => el("div", {class: "similar-group", data: {layer: String(g.layer)}},
        el("h3", {class: "muted", text: `layer ${g.layer}${g.sae_id === saeId ? " (this SAE)" : g.layer < me ? " (below)" : " (above)"}`}),
        el("ol", {class: "feat-list"}, ...g.features.map(x => el("li", {},
          el("a", {class: "feat-link", href: featureHref(g.sae_id, x.idx), text: `#${x.idx}`}),
          el("span", {class: "num", text: ` cos ${fmt(x.cosine, 2)} `}),
          x.label ? el("span", {class: "label-text", text: x.label}) : el("span", {class: "muted", text: "(unlabelled)"}))))))));
  } catch (err) { card.replaceChildren(title, errorBox(err)); }
}

function exampleTokens(e) {
  const toks = e.token_strs || e.strings || e.tokens || [];
  return toks.map(t => (typeof t === "number" ? `⟨${t}⟩` : t));
}

function context(e, maxAct) {
  const toks = exampleTokens(e), acts = e.acts || [];
  const m = Math.max(1e-9, maxAct || 0, ...acts);
  const line = el("div", {class: "ctx"}, el("span", {class: "actnum", text: fmt(e.max_act, 2)}));
  toks.forEach((t, i) => {
    const a = acts[i] || 0;
    const span = el("span", {class: "t" + (i === e.pos && e.kind !== "random" ? " peak" : ""), text: contextToken(t),
                             title: `act ${fmt(a, 3)}`});
    if (a > 0) span.style.backgroundColor = `rgba(255, 110, 20, ${Math.min(1, a / m).toFixed(3)})`;
    line.append(span);
  });
  return line;
}

// Firing activations on log-spaced bins (x: activation, log scale; y: token count, log scale), with ticks.
function histogram(h) {
  if (!h || !h.counts || !h.counts.length) return el("p", {class: "muted", text: "no histogram"});
  const W = 320, H = 150, L = 34, R = 8, T = 8, B = 30, n = h.counts.length;
  const s = svg("svg", {class: "chart", id: "histogram", viewBox: `0 0 ${W} ${H}`, role: "img",
                        "aria-label": "histogram of firing activations"});
  const top = Math.max(1, ...h.counts), bw = (W - L - R) / n, ph = H - T - B;
  const y = c => H - B - (Math.log1p(c) / Math.log1p(top)) * ph;
  for (let p = 1; p <= top; p *= 10) {  // y ticks: 1, 10, 100, ...
    s.append(svg("line", {class: "grid", x1: L, x2: W - R, y1: y(p), y2: y(p)}));
    s.append(svg("text", {class: "ytick", x: L - 3, y: y(p) + 3, "text-anchor": "end"}, fmt(p)));
  }
  h.counts.forEach((c, i) => {
    const bh = c > 0 ? Math.max(1, H - B - y(c)) : 0;
    const r = svg("rect", {class: "bar", x: L + i * bw, y: H - B - bh, width: Math.max(1, bw - 1), height: bh});
    const lo = h.edges ? h.edges[i] : i, hi = h.edges ? h.edges[i + 1] : i + 1;
    r.append(svg("title", {}, `${fmt(lo, 2)} – ${fmt(hi, 2)}: ${c}`));
    s.append(r);
  });
  s.append(svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  s.append(svg("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
  if (h.edges) {
    const edges = h.edges, ticks = axisTicks(edges.map((_, i) => i), 5);
    for (const i of ticks) {
      const x = L + i * bw;
      s.append(svg("line", {class: "axis", x1: x, x2: x, y1: H - B, y2: H - B + 3}));
      s.append(svg("text", {class: "xtick", x, y: H - B + 13, "text-anchor": i === 0 ? "start" : i === n ? "end" : "middle"}, fmt(edges[i], 2)));
    }
  }
  s.append(svg("text", {x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle"}, "activation (log scale)"));
  return el("div", {}, el("p", {class: "muted", text: "activation histogram (firing tokens; count on a log scale)"}), s);
}

function logitsCard(f) {
  const pos = f.logits_pos || (f.logits && f.logits.pos) || [];
  const neg = f.logits_neg || (f.logits && f.logits.neg) || [];
  const list = (xs, id) => el("table", {id},
    ...xs.map(x => { const [t, v] = Array.isArray(x) ? x : [x.token, x.value];
      return el("tr", {}, el("td", {}, el("code", {text: showToken(t)})), el("td", {class: "num", text: fmt(v, 3)})); }));
  return el("div", {class: "card", id: "logits"}, el("h2", {text: "Logit effects"}),
    el("div", {class: "two"}, el("div", {}, el("h3", {class: "muted", text: "promoted"}), list(pos, "logits-pos")),
      el("div", {}, el("h3", {class: "muted", text: "suppressed"}), list(neg, "logits-neg"))));
}

function scoreOf(lab) {
  const s = (lab.scores || []).find(x => String(x.method).startsWith("detection")) || (lab.scores || [])[0];
  return s ? `${s.method} ${fmt(s.value, 2)}` : "unscored";
}

function labelsCard(f) {
  const current = el("ul", {id: "labels"}, ...(f.labels.length ? f.labels.map(lab => el("li", {},
    el("span", {class: `tag ${lab.source}`, text: lab.source}),
    el("span", {class: "label-text", text: lab.text}),
    lab.stale ? el("span", {class: "stale", title: "the SAE's weights were replaced after this label was written",
                            text: " written for old weights"}) : null,
    el("span", {class: "muted", text: `  · ${lab.model || lab.author || ""} · ${scoreOf(lab)}`})))
    : [el("li", {class: "muted", text: "no label yet"})]));
  const human = f.labels.find(l => l.source === "human");
  const input = el("input", {type: "text", id: "label-input", maxLength: 500, placeholder: "what does this feature respond to?",
                             value: human ? human.text : ""});
  const author = el("input", {type: "text", id: "label-author", maxLength: 100, placeholder: "your name (optional)",
                              value: localStorage.getItem("saescope-author") || ""});
  const msg = el("span", {id: "label-msg", class: "muted"});
  const save = el("button", {id: "label-save", text: "Save label"});
  const form = el("form", {class: "row", onsubmit: async e => {
    e.preventDefault();
    save.disabled = true;
    try {
      localStorage.setItem("saescope-author", author.value);
      await api(`/api/feature/${encodeURI(f.sae_id)}/${f.idx}/label`, {text: input.value, author: author.value || null});
      await pageFeature(parseHash());
      document.getElementById("label-msg").textContent = "saved";
    } catch (err) { msg.replaceChildren(errorBox(err)); save.disabled = false; }
  }}, el("label", {}, "label", input), el("label", {}, "author", author), save, msg);
  const hist = el("table", {id: "label-history"},
    el("tr", {}, ...["when", "source", "label", "by", "current"].map(h => el("th", {text: h}))),
    ...f.label_history.map(lab => el("tr", {},
      el("td", {text: new Date(lab.created * 1000).toLocaleString()}), el("td", {text: lab.source}),
      el("td", {class: "label-text", text: lab.text}), el("td", {text: lab.author || lab.model || ""}),
      el("td", {text: (lab.is_current ? "✓" : "") + (lab.stale ? " (old weights)" : "")}))));
  return el("div", {class: "card"}, el("h2", {text: "Labels"}), current, form,
    el("details", {open: f.label_history.length > 1}, el("summary", {text: `history (${f.label_history.length})`}), scroller(hist)));
}

// ------------------------------------------------------------------ search

async function pageSearch(r) {
  const q = r.params.get("q") || "";
  const mode = r.params.get("mode") || "concept";
  const input = el("input", {type: "search", id: "search-q", value: q, maxLength: 200, placeholder: "e.g. farm animals"});
  const sel = el("select", {id: "search-mode"}, ...["concept", "hybrid", "fts", "semantic"].map(m => el("option", {value: m, text: m, selected: m === mode})));
  const form = el("form", {class: "row", onsubmit: e => {
    e.preventDefault();
    location.hash = `#/search?q=${encodeURIComponent(input.value)}&mode=${sel.value}`;
  }}, el("label", {}, "query", input), el("label", {}, "mode", sel), el("button", {id: "search-go", text: "Search"}));
  const out = el("div", {id: "search-out"});
  render(el("h1", {text: "Search features"}),
    el("p", {class: "muted", text: "concept: ranks features by their labels, the text they fire on and the tokens they promote; the other modes search the labels only."}),
    el("div", {class: "card"}, form), out);
  if (!q.trim()) return;
  out.replaceChildren(el("p", {class: "muted", text: "Searching…"}));
  try {
    const res = await api(`/api/search?q=${encodeURIComponent(q)}&mode=${encodeURIComponent(mode)}&limit=50`);
    if (!res.hits.length) { out.replaceChildren(el("p", {class: "muted", text: "No feature matches."})); return; }
    out.replaceChildren(scroller(el("table", {id: "search-results"},
      el("tr", {}, ...["layer", "feature", "label", "detection", "output", "frequency", "steers toward it", "top context", "match"].map(h => el("th", {text: h}))),
      ...res.hits.map(h => el("tr", {},
        el("td", {class: "num", text: h.layer}),
        el("td", {}, el("a", {class: "feat-link", href: featureHref(h.sae_id, h.idx), text: `#${h.idx}`})),
        el("td", {class: "label-text", text: h.label},
          h.stale ? el("span", {class: "stale", text: " written for old weights"}) : null),
        el("td", {class: "num", text: fmt(h.score, 2)}), el("td", {class: "num", text: fmt(h.output, 2)}),
        el("td", {class: "num", text: h.frequency == null ? "–" : `${(100 * h.frequency).toFixed(2)}%`}),
        el("td", {text: h.steer ? `yes (${fmt(h.evidence.output, 2)})` : ""}),
        el("td", {class: "snippet", text: h.snippet || ""}), el("td", {class: "num", text: fmt(h.match, 3)}))))));
  } catch (err) { out.replaceChildren(errorBox(err)); }
}

// ------------------------------------------------------------------ steering

const steerState = {features: "", concept: "", strength: 2, prompt: "The city of", max_new_tokens: 20, greedy: true,
                    temperature: 1, n: 1, seed: 0};

async function pageSteer(r) {
  if (r.params.get("f")) steerState.features = r.params.get("f");
  const feats = el("textarea", {id: "steer-features", rows: 2, value: steerState.features,
                                placeholder: "one per line: LAYER:INDEX=STRENGTH, e.g. 6:123=4 (no =value: use the strength)"});
  const concept = el("input", {type: "text", id: "steer-concept", value: steerState.concept, maxLength: 200, placeholder: "or a concept, e.g. the sea"});
  const list = el("button", {type: "button", id: "steer-concept-list", text: "List its features"});
  const strength = el("input", {type: "number", id: "steer-strength", step: "any", value: steerState.strength});
  const prompt = el("textarea", {id: "steer-prompt", rows: 2, maxLength: 2000, value: steerState.prompt});
  const maxTok = el("input", {type: "number", id: "steer-max", min: 1, max: 200, value: steerState.max_new_tokens});
  const greedy = el("input", {type: "checkbox", id: "steer-greedy", checked: steerState.greedy});
  const temp = el("input", {type: "number", id: "steer-temp", min: 0.05, max: 10, step: "any", value: steerState.temperature});
  const n = el("input", {type: "number", id: "steer-n", min: 1, max: 4, value: steerState.n});
  const seed = el("input", {type: "number", id: "steer-seed", min: 0, value: steerState.seed});
  const sampling = () => { for (const x of [temp, n, seed]) x.disabled = greedy.checked; };
  greedy.addEventListener("change", sampling);
  sampling();
  const btn = el("button", {id: "steer-go", text: "Generate"});
  const cancel = el("button", {type: "button", id: "steer-cancel", class: "secondary", text: "Cancel", hidden: true});
  const cands = el("div", {id: "steer-candidates"});
  const out = el("div", {id: "steer-out", "aria-live": "polite"});
  list.addEventListener("click", () => listCandidates(cands, concept.value, feats, strength));
  const form = el("form", {onsubmit: e => {
    e.preventDefault();
    Object.assign(steerState, {features: feats.value, concept: concept.value, strength: Number(strength.value),
      prompt: prompt.value, max_new_tokens: Number(maxTok.value), greedy: greedy.checked, temperature: Number(temp.value),
      n: greedy.checked ? 1 : Number(n.value) || 1, seed: Number(seed.value)});
    runSteer(out, btn, cancel);
  }},
    el("div", {class: "two"}, el("label", {}, "features", feats), el("label", {}, "prompt", prompt)),
    el("div", {class: "row"}, el("label", {}, "concept (features that write it, strength calibrated)", concept), list,
      el("label", {}, "strength", strength), el("label", {}, "new tokens", maxTok), el("label", {class: "check"}, greedy, "greedy"),
      el("label", {}, "temperature", temp), el("label", {}, "samples", n), el("label", {}, "seed", seed), btn, cancel));
  render(el("h1", {text: "Steering playground"}),
    el("p", {class: "muted", text: "Add a feature's decoder direction while the model generates (strength × the feature's max activation), clamp it (…@clamp=V) or ablate it (…@ablate). The steered text streams first, then the unsteered one; each sample's pair uses the same seed."}),
    el("div", {class: "card"}, form, cands), out);
}

async function listCandidates(box, concept, feats, strength) {
  if (!concept.trim()) { box.replaceChildren(errorBox("type a concept first, e.g. the sea")); return; }
  box.replaceChildren(el("p", {class: "muted", text: "Looking for features that write it…"}));
  try {
    const res = await api(`/api/concept?q=${encodeURIComponent(concept)}`);
    box.replaceChildren(el("p", {class: "muted", text: `Features ranked by how well what they write matches '${res.concept}' (the concept steering picks from these; add any to steer it yourself):`}),
      scroller(el("table", {id: "steer-candidate-table"},
        el("tr", {}, ...["", "feature", "label", "output match", "context match"].map(h => el("th", {text: h}))),
        ...res.candidates.map(c => {
          const spec = c.features.map(([s, i]) => `${s}:${i}`).join("\n");
          return el("tr", {},
            el("td", {}, el("button", {type: "button", class: "small add-candidate", text: "add", onclick: () => {
              feats.value = (feats.value.trim() ? feats.value.trim() + "\n" : "") + spec.split("\n").map(x => `${x}=${strength.value || 2}`).join("\n");
            }})),
            el("td", {}, ...c.features.map(([s, i]) => el("a", {href: featureHref(s, i), text: `L${layerOf(s)} #${i} `}))),
            el("td", {class: "label-text", text: c.label}),
            el("td", {class: "num", text: fmt(c.output_match, 2)}), el("td", {class: "num", text: fmt(c.context_match, 2)}));
        }))));
  } catch (err) { box.replaceChildren(errorBox(err)); }
}

// POST /api/steer/stream and show tokens as they come; Cancel aborts the request and tells the server to stop.
async function runSteer(out, btn, cancel) {
  const s = steerState;
  const body = {prompt: s.prompt, features: s.features.split(/\n|;/).map(x => x.trim()).filter(Boolean),
    concept: s.concept.trim() || null, strength: s.strength, max_new_tokens: s.max_new_tokens, greedy: s.greedy,
    temperature: s.temperature, seed: s.seed, n: s.n};
  const total = 2 * s.max_new_tokens * s.n;
  const progress = el("progress", {id: "steer-progress", max: total, value: 0});
  const status = el("span", {id: "steer-status", class: "muted", text: s.concept.trim() ? "Choosing the concept's features…" : "Generating…"});
  const live = {steered: el("div", {class: "out", id: "steer-live-steered"}), unsteered: el("div", {class: "out", id: "steer-live-unsteered"})};
  const results = el("div", {id: "steer-results"});
  out.replaceChildren(el("div", {class: "row"}, progress, status),
    el("div", {class: "two", id: "steer-live"},
      el("div", {class: "card"}, el("h2", {text: "unsteered (generated second)"}), live.unsteered),
      el("div", {class: "card"}, el("h2", {text: "steered (generated first)"}), live.steered)), results);
  const abort = new AbortController();
  let cancelled = false, done = 0;
  cancel.hidden = false; btn.disabled = true;
  cancel.onclick = async () => {
    cancelled = true; abort.abort();
    status.textContent = "Cancelled.";
    try { await api("/api/steer/cancel", {}); } catch (err) { /* the stream ended already */ }
  };
  const onLine = msg => {
    if (msg.type === "token") {
      done += 1; progress.value = done;
      status.textContent = `sample ${msg.sample + 1} of ${s.n} · ${msg.which} · token ${msg.n} of ${s.max_new_tokens}`;
      live[msg.which].replaceChildren(el("span", {class: "prompt", text: s.prompt}), msg.text);
    } else if (msg.type === "result") {
      results.append(drawSteer(msg.result, msg.sample, s.n));
    } else if (msg.type === "done") {
      progress.value = total; status.textContent = "Done."; out.querySelector("#steer-live").hidden = true;
    } else if (msg.type === "cancelled") {
      status.textContent = "Cancelled.";
    } else if (msg.type === "error") {
      out.append(errorBox(msg.detail)); status.textContent = "Failed.";
    }
  };
  try {
    await streamLines("/api/steer/stream", body, abort.signal, onLine);
  } catch (err) {
    if (!cancelled) { out.replaceChildren(errorBox(err)); }
  }
  cancel.hidden = true; btn.disabled = false;
}

// POST a JSON body; call onLine with each JSON line of the (chunked) answer as it arrives.
async function streamLines(path, body, signal, onLine) {
  const res = await fetch(path, {method: "POST", credentials: "same-origin", signal,
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  if (!res.ok) {
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    throw new Error(data && typeof data.detail === "string" ? data.detail : `${res.status} ${res.statusText}`);
  }
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += decoder.decode(value, {stream: true});
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (line) onLine(JSON.parse(line));
    }
  }
}

function drawSteer(res, sample, n) {
  const sfx = sample ? `-${sample}` : "";
  const effects = el("table", {id: "steer-effects" + sfx},
    el("tr", {}, ...["intervention", "label", "act. in text (unsteered → steered)", "act. while steering",
                     "P(promoted tokens) unsteered → steered", "promoted tokens"].map(h => el("th", {text: h}))),
    ...res.effects.map((e, i) => el("tr", {},
      el("td", {}, el("a", {href: featureHref(e.sae_id, e.idx), text: res.interventions[i] ? res.interventions[i].spec : `${e.sae_id}:${e.idx}`})),
      el("td", {class: "label-text", text: e.label || ""}),
      el("td", {class: "num", text: `${fmt(e.act_unsteered)} → ${fmt(e.act_steered_text)} (Δ ${fmt(e.act_change)})`}),
      el("td", {class: "num", text: fmt(e.act_during)}),
      el("td", {class: "num", text: `${fmt(e.prob_unsteered)} → ${fmt(e.prob_steered)}`}),
      el("td", {text: (e.promoted_tokens || []).slice(0, 6).map(showToken).join(" ")}))));
  return el("section", {class: "sample", data: {sample: String(sample)}},
    n > 1 ? el("h2", {text: `Sample ${sample + 1} of ${n}`}) : "",
    ...(res.concept && !sample ? [conceptCard(res.concept)] : []),
    el("div", {class: "two"},
      el("div", {class: "card"}, el("h2", {text: "unsteered"}),
        el("div", {class: "out", id: "steer-unsteered" + sfx}, el("span", {class: "prompt", text: res.prompt}), res.unsteered)),
      el("div", {class: "card"}, el("h2", {text: "steered"}),
        el("div", {class: "out", id: "steer-steered" + sfx}, el("span", {class: "prompt", text: res.prompt}), res.steered))),
    el("div", {class: "card"}, el("h2", {text: "Measured effect"}), scroller(effects),
      el("p", {id: "steer-ce" + sfx, class: "muted",
               text: `cross-entropy under the unsteered model: unsteered text ${fmt(res.ce_unsteered)} · steered text ${fmt(res.ce_steered)} nats/token (cost ${fmt(res.ppl_cost)})`})));
}

function conceptCard(c) {
  const ch = c.choice;
  const chosen = JSON.stringify(ch.features);
  const others = ch.candidates.filter(k => JSON.stringify(k.features) !== chosen);
  return el("div", {class: "card", id: "steer-concept-choice"}, el("h2", {text: `Concept: ${ch.concept}`}),
    el("p", {text: ch.reason + (ch.cached ? " (calibration cached)" : ` (calibrated in ${ch.seconds.toFixed(0)} s)`)}),
    el("p", {class: "num", text: `concept words ${c.words_unsteered} → ${c.words_steered} · similarity to the concept ${fmt(c.similarity_unsteered, 2)} → ${fmt(c.similarity_steered, 2)}`}),
    ...(others.length ? [el("p", {class: "muted", text: "runners-up (steer one by its feature id):"}),
      el("ul", {}, ...others.map(k => el("li", {},
        el("a", {href: `#/steer?f=${encodeURIComponent(k.features.map(([s, i]) => `${s}:${i}=${k.strength || ch.strength}`).join("\n"))}`,
                 text: k.features.map(([s, i]) => `${s}:${i}`).join(" + ")}),
        ` output similarity ${fmt(k.output_match, 2)} · ${k.label} · ${k.why || ""}`)))] : []));
}
