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
                 ["ce_recovered", "CE loss recovered"], ["dead_fraction", "dead fraction"],
                 ["dense_fraction", "dense fraction"]];
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
      el("td", {class: "num", text: fmt(e.dense_fraction)}), el("td", {class: "num", text: fmt(e.delta_lm_loss)}),
      el("td", {class: "num", text: fmt(e.ce_recovered)}), el("td", {text: s.status}));
  });
  const table = el("table", {id: "sae-table"},
    el("tr", {}, ...["SAE", "layer", "site", "width", "L0", "target", "FVU", "dead", "dense", "ΔLM", "CE rec.", "analysis"]
      .map(h => el("th", {text: h}))), ...rows);

  const charts = el("div", {class: "grid", id: "charts"});
  if (ev) for (const [key, title] of METRICS) charts.append(metricChart(ev, key, title));
  render(
    el("h1", {text: `Run ${info.name}`}),
    el("div", {class: "card"}, facts),
    el("h2", {text: "Fidelity by layer"}),
    ev ? el("div", {}, legend(ev), charts,
            info.has_eval_png ? el("p", {}, el("a", {href: "/eval.png", text: "eval.png (static plot)"})) : null)
       : el("p", {class: "muted", text: "No eval.json yet: run `saescope eval` to see metrics by layer."}),
    el("h2", {text: "SAEs"}), el("div", {class: "card"}, table));
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
  return el("div", {class: "legend"}, ...groupsOf(ev).map(([name], i) => {
    const sw = el("i"); sw.style.background = COLORS[i % COLORS.length];
    return el("span", {}, sw, name);
  }));
}

// A line chart of one metric by layer (one line per site/width/target group), inline SVG.
function metricChart(ev, key, title) {
  const W = 330, H = 190, L = 46, R = 10, T = 22, B = 28;
  const groups = groupsOf(ev);
  const pts = groups.flatMap(([, ms]) => ms.map(m => [m.layer, m[key]])).filter(p => typeof p[1] === "number");
  if (key === "l0") groups.forEach(([, ms]) => ms.forEach(m => pts.push([m.layer, m.l0_target])));
  const s = svg("svg", {class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
                        "data-metric": key});
  s.append(svg("text", {x: W / 2, y: 14, "text-anchor": "middle", "font-weight": "600"}, title));
  if (!pts.length) { s.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no data")); return wrapChart(s); }
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys, 0), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y1 = y0 + 1; }
  const px = x => L + (x - x0) / (x1 - x0) * (W - L - R), py = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    s.append(svg("line", {class: "grid", x1: L, x2: W - R, y1: py(y), y2: py(y)}));
    s.append(svg("text", {x: L - 4, y: py(y) + 3, "text-anchor": "end"}, fmt(y, 2)));
  }
  s.append(svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  s.append(svg("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
  const layers = [...new Set(xs)].sort((a, b) => a - b);
  const step = Math.max(1, Math.ceil(layers.length / 9));
  layers.forEach((x, i) => { if (i % step === 0) s.append(svg("text", {x: px(x), y: H - B + 12, "text-anchor": "middle"}, x)); });
  s.append(svg("text", {x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle"}, "layer"));
  groups.forEach(([name, ms], gi) => {
    const color = COLORS[gi % COLORS.length];
    if (key === "l0") s.append(svg("polyline", {class: "target", points: ms.map(m => `${px(m.layer)},${py(m.l0_target)}`).join(" ")}));
    const good = ms.filter(m => typeof m[key] === "number");
    s.append(svg("polyline", {stroke: color, points: good.map(m => `${px(m.layer)},${py(m[key])}`).join(" ")}));
    for (const m of good) {
      const c = svg("circle", {cx: px(m.layer), cy: py(m[key]), r: 3, fill: color});
      c.append(svg("title", {}, `${name} · layer ${m.layer}: ${title} = ${fmt(m[key], 4)}`));
      s.append(c);
    }
  });
  return wrapChart(s);
}

function wrapChart(s) { return el("div", {class: "card"}, s); }

// ------------------------------------------------------------------ one SAE: its features

async function pageSae(r) {
  const saeId = r.parts.join("/");
  const order = r.params.get("order") || "frequency";
  const data = await api(`/api/top/${encodeURI(saeId)}?order_by=${encodeURIComponent(order)}&limit=100`);
  const sel = el("select", {onchange: e => { location.hash = `#/sae/${encodeURIComponent(saeId)}?order=${e.target.value}`; }},
    ...["frequency", "max_act", "mean_act", "idx"].map(o => el("option", {value: o, text: o, selected: o === order})));
  const rows = data.features.map(f => el("tr", {},
    el("td", {}, el("a", {href: featureHref(data.sae.id, f.idx), text: `#${f.idx}`})),
    f.dead ? el("td", {class: "dead", text: "dead (never fired)"}) : el("td", {class: "label-text", text: f.label || ""}),
    el("td", {class: "num", text: pct(f.frequency)}), el("td", {class: "num", text: fmt(f.max_act)}),
    el("td", {class: "num", text: fmt(f.mean_act)})));
  render(el("h1", {text: `SAE ${data.sae.id}`}),
    el("p", {class: "muted"}, `layer ${data.sae.layer} · ${data.sae.site} · width ${data.sae.width} · order by `, sel),
    data.features.length ? el("table", {}, el("tr", {}, ...["feature", "label", "frequency", "max act", "mean act"]
      .map(h => el("th", {text: h}))), ...rows)
      : el("p", {class: "muted", text: "No analysed features yet: run `saescope analyze`."}));
}

// ------------------------------------------------------------------ inspector

const inspectState = {text: "The city of Paris is the capital of France.", top: 5, result: null};

async function pageInspect() {
  const ta = el("textarea", {id: "inspect-text", value: inspectState.text, maxLength: 2000, rows: 3});
  const top = el("input", {id: "inspect-top", type: "number", min: 1, max: 20, value: inspectState.top});
  const btn = el("button", {id: "inspect-go", text: "Inspect"});
  const out = el("div", {id: "inspect-out"});
  const go = async () => {
    inspectState.text = ta.value; inspectState.top = Number(top.value) || 5;
    btn.disabled = true; out.replaceChildren(el("p", {class: "muted", text: "Running the model…"}));
    try {
      const t0 = performance.now();
      inspectState.result = await api("/api/inspect", {text: inspectState.text, top: inspectState.top});
      drawHeat(out, inspectState.result, performance.now() - t0);
    } catch (err) { out.replaceChildren(errorBox(err)); }
    btn.disabled = false;
  };
  btn.addEventListener("click", go);
  render(el("h1", {text: "Prompt inspector"}),
    el("p", {class: "muted", text: "Which features fire on each token, at every layer. Cells are coloured by the strongest activation (relative to the column's maximum); click one to see its features."}),
    el("div", {class: "card"}, ta, el("div", {class: "row"}, el("label", {}, "features per token", top), btn)), out);
  if (inspectState.result) drawHeat(out, inspectState.result);
}

function drawHeat(out, res, ms) {
  const layers = res.layers || [];
  const tokens = res.tokens || [];
  const colMax = layers.map(L => Math.max(1e-9, ...L.features.map(f => (f[0] ? f[0].act : 0))));
  const details = el("div", {class: "card details", id: "inspect-details"},
    el("p", {class: "muted", text: "Click a cell to list the features active on that token at that layer."}));
  const head = el("tr", {}, el("th", {class: "tok", text: "token"}),
    ...layers.map(L => el("th", {title: `${L.sae_id}`, text: `L${L.layer}`})));
  const table = el("table", {class: "heat", id: "heat"}, head);
  tokens.forEach((token, t) => {
    const tok = typeof token === "object" && token !== null ? token.text : token;
    const tr = el("tr", {class: token && token.bos ? "bos" : null},
      el("td", {class: "tok", text: showToken(tok), title: token && token.id !== undefined ? `token id ${token.id}` : null}));
    layers.forEach((L, li) => {
      const feats = L.features[t] || [];
      const top = feats[0] ? feats[0].act : 0;
      const cell = el("td", {class: "cell", data: {t: String(t), layer: String(L.layer)},
        title: feats.length ? feats.map(f => `#${f.idx} ${fmt(f.act, 2)}${f.label ? " — " + f.label : ""}`).join("\n")
                            : "no active feature"});
      const a = Math.min(1, top / colMax[li]);
      cell.style.backgroundColor = `rgba(255, 110, 20, ${a.toFixed(3)})`;
      cell.textContent = feats.length ? String(feats.length) : "";
      cell.addEventListener("click", () => {
        table.querySelectorAll("td.sel").forEach(c => c.classList.remove("sel"));
        cell.classList.add("sel");
        showCell(details, tok, L, feats);
      });
      tr.append(cell);
    });
    table.append(tr);
  });
  out.replaceChildren(
    ms !== undefined ? el("p", {class: "muted", text: `${tokens.length} tokens × ${layers.length} SAEs in ${(ms / 1000).toFixed(2)} s`}) : "",
    el("div", {class: "inspect-layout"}, el("div", {class: "heat-wrap"}, table), details));
}

function showCell(details, tok, L, feats) {
  details.replaceChildren(
    el("h2", {}, "Token ", el("code", {text: showToken(tok)}), ` · layer ${L.layer}`),
    el("p", {class: "muted", text: L.sae_id}),
    feats.length ? el("ol", {class: "feat-list"}, ...feats.map(f => el("li", {},
      el("a", {class: "feat-link", href: featureHref(L.sae_id, f.idx), text: `#${f.idx}`}),
      ` act ${fmt(f.act, 2)} `, f.label ? el("span", {class: "label-text", text: "— " + f.label}) : el("span", {class: "muted", text: "(unlabelled)"}))))
      : el("p", {class: "muted", text: "No feature fires here."}));
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
      " · ", el("a", {href: `#/steer?f=${encodeURIComponent(`${sae.id}:${f.idx}=2`)}`, text: "steer with this feature"}),
      f.idx > 0 ? el("span", {}, " · ", el("a", {href: featureHref(sae.id, f.idx - 1), text: "← previous"})) : "",
      f.idx < sae.width - 1 ? el("span", {}, " · ", el("a", {href: featureHref(sae.id, f.idx + 1), text: "next →"})) : ""),
    labelsCard(f),
  ];
  if (f.dead) {
    parts.push(el("p", {class: "dead", id: "dead-feature",
      text: "Dead feature: it never fired on the analysed held-out tokens, so there is nothing to label or steer."}));
  }
  if (!f.analysed) {
    parts.push(el("p", {class: "muted", text: "This feature has not been analysed yet: run `saescope analyze` on this run."}));
  } else {
    const st = f.stats || f;
    parts.push(el("div", {class: "two"},
      el("div", {class: "card"}, el("h2", {text: "Activation"}),
        el("table", {id: "feature-stats"},
          ...[["frequency", pct(st.frequency)], ["tokens fired", fmt(st.n_fired)], ["max activation", fmt(st.max_act)],
              ["mean activation (when firing)", fmt(st.mean_act)]]
            .map(([k, v]) => el("tr", {}, el("th", {text: k}), el("td", {class: "num", text: v})))),
        histogram(st.hist || f.hist)),
      logitsCard(f)));
    const ex = f.examples || [];
    const top = ex.filter(e => e.kind === "top"), quant = ex.filter(e => e.kind === "quantile");
    parts.push(el("div", {class: "card", id: "top-examples"}, el("h2", {text: "Top activating contexts"}),
      top.length ? top.map(e => context(e, st.max_act)) : el("p", {class: "muted", text: "none"})));
    if (quant.length) {
      const byQ = new Map();
      for (const e of quant) { if (!byQ.has(e.quantile)) byQ.set(e.quantile, []); byQ.get(e.quantile).push(e); }
      parts.push(el("div", {class: "card", id: "quantile-examples"}, el("h2", {text: "Contexts by activation quantile"}),
        ...[...byQ.entries()].sort((a, b) => b[0] - a[0]).map(([q, es]) =>
          el("div", {}, el("h3", {class: "muted", text: `quantile ${q}`}), es.map(e => context(e, st.max_act))))));
    }
  }
  render(...parts);
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
    const span = el("span", {class: "t" + (i === e.pos ? " peak" : ""), text: contextToken(t),
                             title: `act ${fmt(a, 3)}`});
    if (a > 0) span.style.backgroundColor = `rgba(255, 110, 20, ${Math.min(1, a / m).toFixed(3)})`;
    line.append(span);
  });
  return line;
}

function histogram(h) {
  if (!h || !h.counts || !h.counts.length) return el("p", {class: "muted", text: "no histogram"});
  const W = 320, H = 120, B = 18, n = h.counts.length;
  const s = svg("svg", {class: "chart", id: "histogram", width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  const top = Math.max(1, ...h.counts), bw = (W - 10) / n;
  h.counts.forEach((c, i) => {
    const bh = c > 0 ? Math.max(1, (Math.log1p(c) / Math.log1p(top)) * (H - B - 6)) : 0;
    const r = svg("rect", {class: "bar", x: 5 + i * bw, y: H - B - bh, width: Math.max(1, bw - 1), height: bh});
    const lo = h.edges ? h.edges[i] : i, hi = h.edges ? h.edges[i + 1] : i + 1;
    r.append(svg("title", {}, `${fmt(lo, 2)} – ${fmt(hi, 2)}: ${c}`));
    s.append(r);
  });
  s.append(svg("line", {class: "axis", x1: 5, x2: W - 5, y1: H - B, y2: H - B}));
  if (h.edges) {
    s.append(svg("text", {x: 5, y: H - 4}, fmt(h.edges[0], 2)));
    s.append(svg("text", {x: W - 5, y: H - 4, "text-anchor": "end"}, fmt(h.edges[h.edges.length - 1], 2)));
  }
  return el("div", {}, el("p", {class: "muted", text: "activation histogram (firing tokens, log count)"}), s);
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
    el("details", {open: f.label_history.length > 1}, el("summary", {text: `history (${f.label_history.length})`}), hist));
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
    out.replaceChildren(el("table", {id: "search-results"},
      el("tr", {}, ...["layer", "feature", "label", "detection", "output", "frequency", "steers toward it", "top context", "match"].map(h => el("th", {text: h}))),
      ...res.hits.map(h => el("tr", {},
        el("td", {class: "num", text: h.layer}),
        el("td", {}, el("a", {class: "feat-link", href: featureHref(h.sae_id, h.idx), text: `#${h.idx}`})),
        el("td", {class: "label-text", text: h.label},
          h.stale ? el("span", {class: "stale", text: " written for old weights"}) : null),
        el("td", {class: "num", text: fmt(h.score, 2)}), el("td", {class: "num", text: fmt(h.output, 2)}),
        el("td", {class: "num", text: h.frequency == null ? "–" : `${(100 * h.frequency).toFixed(2)}%`}),
        el("td", {text: h.steer ? `yes (${fmt(h.evidence.output, 2)})` : ""}),
        el("td", {class: "snippet", text: h.snippet || ""}), el("td", {class: "num", text: fmt(h.match, 3)})))));
  } catch (err) { out.replaceChildren(errorBox(err)); }
}

// ------------------------------------------------------------------ steering

const steerState = {features: "", concept: "", strength: 2, prompt: "The city of", max_new_tokens: 20, greedy: true, seed: 0};

async function pageSteer(r) {
  if (r.params.get("f")) steerState.features = r.params.get("f");
  const feats = el("textarea", {id: "steer-features", rows: 2, value: steerState.features,
                                placeholder: "one per line: LAYER:INDEX=STRENGTH, e.g. 6:123=4 (no =value: use the strength)"});
  const concept = el("input", {type: "text", id: "steer-concept", value: steerState.concept, maxLength: 200, placeholder: "or a concept, e.g. the sea"});
  const strength = el("input", {type: "number", id: "steer-strength", step: "any", value: steerState.strength});
  const prompt = el("textarea", {id: "steer-prompt", rows: 2, maxLength: 2000, value: steerState.prompt});
  const maxTok = el("input", {type: "number", id: "steer-max", min: 1, max: 200, value: steerState.max_new_tokens});
  const greedy = el("input", {type: "checkbox", id: "steer-greedy", checked: steerState.greedy});
  const seed = el("input", {type: "number", id: "steer-seed", min: 0, value: steerState.seed});
  const btn = el("button", {id: "steer-go", text: "Generate"});
  const out = el("div", {id: "steer-out"});
  btn.addEventListener("click", async () => {
    Object.assign(steerState, {features: feats.value, concept: concept.value, strength: Number(strength.value),
      prompt: prompt.value, max_new_tokens: Number(maxTok.value), greedy: greedy.checked, seed: Number(seed.value)});
    btn.disabled = true; out.replaceChildren(el("p", {class: "muted", text: "Generating twice (unsteered, steered)…"}));
    try {
      const res = await api("/api/steer", {prompt: steerState.prompt,
        features: steerState.features.split(/\n|;/).map(s => s.trim()).filter(Boolean),
        concept: steerState.concept.trim() || null, strength: steerState.strength,
        max_new_tokens: steerState.max_new_tokens, greedy: steerState.greedy, seed: steerState.seed});
      drawSteer(out, res);
    } catch (err) { out.replaceChildren(errorBox(err)); }
    btn.disabled = false;
  });
  render(el("h1", {text: "Steering playground"}),
    el("p", {class: "muted", text: "Add a feature's decoder direction while the model generates (strength × the feature's max activation), clamp it (…@clamp=V) or ablate it (…@ablate). Both continuations use the same seed."}),
    el("div", {class: "card"},
      el("div", {class: "two"}, el("label", {}, "features", feats), el("label", {}, "prompt", prompt)),
      el("div", {class: "row"}, el("label", {}, "concept (features that write it, strength calibrated)", concept), el("label", {}, "strength", strength),
        el("label", {}, "new tokens", maxTok), el("label", {}, "greedy", greedy), el("label", {}, "seed", seed), btn)),
    out);
}

function drawSteer(out, res) {
  const effects = el("table", {id: "steer-effects"},
    el("tr", {}, ...["intervention", "label", "act. in text (unsteered → steered)", "act. while steering",
                     "P(promoted tokens) unsteered → steered", "promoted tokens"].map(h => el("th", {text: h}))),
    ...res.effects.map((e, i) => el("tr", {},
      el("td", {}, el("a", {href: featureHref(e.sae_id, e.idx), text: res.interventions[i] ? res.interventions[i].spec : `${e.sae_id}:${e.idx}`})),
      el("td", {class: "label-text", text: e.label || ""}),
      el("td", {class: "num", text: `${fmt(e.act_unsteered)} → ${fmt(e.act_steered_text)} (Δ ${fmt(e.act_change)})`}),
      el("td", {class: "num", text: fmt(e.act_during)}),
      el("td", {class: "num", text: `${fmt(e.prob_unsteered)} → ${fmt(e.prob_steered)}`}),
      el("td", {text: (e.promoted_tokens || []).slice(0, 6).map(showToken).join(" ")}))));
  out.replaceChildren(...(res.concept ? [conceptCard(res.concept)] : []),
    el("div", {class: "two"},
      el("div", {class: "card"}, el("h2", {text: "unsteered"}),
        el("div", {class: "out", id: "steer-unsteered"}, el("span", {class: "prompt", text: res.prompt}), res.unsteered)),
      el("div", {class: "card"}, el("h2", {text: "steered"}),
        el("div", {class: "out", id: "steer-steered"}, el("span", {class: "prompt", text: res.prompt}), res.steered))),
    el("div", {class: "card"}, el("h2", {text: "Measured effect"}), effects,
      el("p", {id: "steer-ce", class: "muted",
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
