"""The feature browser's HTML: inline styles, embedded JSON and a small vanilla-JS renderer.

`write_page` streams the data into a `<script type="application/json">` tag, one
latent page at a time, so a large SAE's page is never held in memory as one
string. The script renders one view at a time from the URL hash (`#overview`,
`#latent-N`, `#expert-N`, `#prompt-N`), builds every element with
`textContent` (token strings are never parsed as HTML), and records any script
error in a red banner and in `<body data-errors>`; `<body data-rendered="ok">`
and `data-view` name the view once it rendered.
"""

import html
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

STYLE = """
:root { --fg: #1f2933; --muted: #66707c; --line: #e3e6ea; --bg: #f6f7f9;
  --card: #fff; --accent: #2563eb; --act: 234, 88, 12; --pos: #15803d;
  --neg: #b91c1c; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  sans-serif; color: var(--fg); background: var(--bg); }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
header { background: #111827; color: #f3f4f6; padding: 10px 24px; display: flex;
  align-items: center; gap: 28px; position: sticky; top: 0; z-index: 2; }
header h1 { font-size: 15px; margin: 0; font-weight: 600; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; max-width: 480px; }
header nav { display: flex; gap: 16px; }
header nav a { color: #cbd5e1; padding: 2px 0; }
header nav a.active { color: #fff; border-bottom: 2px solid #60a5fa; }
header form { margin-left: auto; }
header input { width: 150px; padding: 4px 8px; border-radius: 6px; border: 0;
  font: inherit; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 60px; }
#main > section { scroll-margin-top: 100vh; }  /* a view's id is the hash: stay on top */
h2.view-title { font-size: 22px; margin: 4px 0 4px; }
.sub { color: var(--muted); margin-bottom: 14px; }
.note { background: #fff7ed; border: 1px solid #fed7aa; color: #7c2d12;
  padding: 6px 12px; border-radius: 6px; margin-bottom: 14px; }
#errors { background: #fef2f2; border-bottom: 2px solid #dc2626; color: #7f1d1d;
  padding: 8px 24px; white-space: pre-wrap; font-family: ui-monospace, monospace; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 16px; margin-bottom: 16px; min-width: 0; }
.card h3 { font-size: 12px; text-transform: uppercase; letter-spacing: .05em;
  color: var(--muted); margin: 0 0 10px; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr));
  gap: 0 16px; }
.stats { display: flex; flex-wrap: wrap; gap: 10px 30px; }
.stat b { display: block; font-size: 18px; font-weight: 600;
  font-variant-numeric: tabular-nums; }
.stat span { color: var(--muted); font-size: 12px; }
.chip { display: inline-block; padding: 0 7px; border-radius: 10px; margin: 1px 2px;
  background: #eef2ff; color: #3730a3; font-size: 12px;
  font-variant-numeric: tabular-nums; white-space: nowrap; }
.chip.expert { background: #ecfdf5; color: #065f46; }
.chip.plain { background: #f1f5f9; color: var(--muted); }
.pager { display: flex; gap: 8px; align-items: center; margin: 8px 0; }
.pager button, .pager select, .pager input { font: inherit; padding: 2px 8px; }
.ctx { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px;
  white-space: pre-wrap; word-break: break-word; line-height: 1.7; }
.tok { border-radius: 3px; padding: 1px 0; }
.tok.centre { outline: 1.5px solid rgb(var(--act)); }
.token { font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
  background: #f1f5f9; border-radius: 3px; padding: 0 4px; white-space: pre; }
table { border-collapse: collapse; width: 100%; }
td, th { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 12px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.example { display: grid; grid-template-columns: 130px 1fr; gap: 12px;
  padding: 6px 0; border-bottom: 1px solid var(--line); }
.example:last-child { border-bottom: 0; }
.example .value { font-variant-numeric: tabular-nums; font-weight: 600; }
.example .where { color: var(--muted); font-size: 12px; }
.logits { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.logit { display: flex; justify-content: space-between; gap: 8px; padding: 1px 0; }
.logit .v { font-variant-numeric: tabular-nums; }
.pos .v { color: var(--pos); } .neg .v { color: var(--neg); }
svg { display: block; width: 100%; max-width: 640px; height: auto; }
svg text { font-size: 10px; fill: var(--muted); font-family: system-ui, sans-serif; }
svg .bar { fill: #3b82f6; } svg a:hover .bar { fill: #1d4ed8; }
svg .axis { stroke: #cbd5e1; } svg .uniform { stroke: #f59e0b; stroke-dasharray: 4 3; }
ul.plain { list-style: none; padding: 0; margin: 0; }
ul.plain li { padding: 3px 0; }
"""

SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("browser-data").textContent);
const META = DATA.meta, EXPERTS = DATA.experts;
const PER_EXPERT = EXPERTS ? EXPERTS.latents_per_expert : 0;
const PAGE_IDS = Object.keys(DATA.pages).map(Number);
DATA.density = DATA.fired.map((count) => count / Math.max(META.n_tokens, 1));
const SVGNS = "http://www.w3.org/2000/svg";
// reduce, not Math.max(...values): spreading d_sae arguments can overflow the stack
const maxOf = (values, start) => values.reduce((a, b) => (b > a ? b : a), start);
const minOf = (values, start) => values.reduce((a, b) => (b < a ? b : a), start);
const DENSEST = PAGE_IDS.reduce((a, b) => (DATA.density[b] > DATA.density[a] ? b : a), PAGE_IDS[0]);

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  return append(el, children);
}
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return append(el, children);
}
function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return String(Number(v.toPrecision(3)));
}
function pct(v) {
  if (v === null || v === undefined) return "–";
  if (v > 0 && v < 1e-4) return (100 * v).toExponential(1) + "%";
  return String(Number((100 * v).toPrecision(3))) + "%";
}
function tokenText(id) {
  const text = DATA.vocab[id];
  return (text === undefined ? "#" + id : text).replace(/\n/g, "↵");
}
const expertOf = (j) => (PER_EXPERT ? Math.floor(j / PER_EXPERT) : null);
const latentLink = (j, label) =>
  h("a", {class: "chip", href: "#latent-" + j}, label === undefined ? "#" + j : label);
const expertLink = (e, label) =>
  h("a", {class: "chip expert", href: "#expert-" + e}, label || "expert " + e);
const card = (title, ...body) => h("div", {class: "card"}, title ? h("h3", {}, title) : null, body);
const stat = (value, label) => h("div", {class: "stat"}, h("b", {}, value), h("span", {}, label));
const shade = (v, max) =>
  "background: rgba(var(--act), " + (max > 0 ? Math.min(1, v / max) * 0.85 : 0).toFixed(3) + ")";

function histogram(counts, x0, x1, opts) {
  const W = 560, H = 150, L = 44, R = 16, B = 22, T = 8;
  const n = counts.length, top = maxOf(counts, 1);
  const bw = (W - L - R) / Math.max(n, 1);
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img"});
  counts.forEach((c, i) => {
    const y = T + (H - B - T) * (1 - c / top);
    const lo = x0 + (x1 - x0) * i / n, hi = x0 + (x1 - x0) * (i + 1) / n;
    const bar = s("rect", {class: "bar", x: L + i * bw + 0.5, y: y, width: Math.max(bw - 1, 0.5),
      height: H - B - y}, s("title", {}, opts.tip ? opts.tip(i, c)
        : `${opts.label(lo)} – ${opts.label(hi)}: ${c}`));
    svg.append(opts.href ? s("a", {href: opts.href(i)}, bar) : bar);
  });
  svg.append(s("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  svg.append(s("text", {x: L - 6, y: T + 8, "text-anchor": "end"}, (opts.count || String)(top)));
  svg.append(s("text", {x: L - 6, y: H - B, "text-anchor": "end"}, "0"));
  for (const [x, label] of opts.ticks || [[x0, opts.label(x0)], [x1, opts.label(x1)]]) {
    const px = L + (W - L - R) * (x - x0) / ((x1 - x0) || 1);
    svg.append(s("text", {x: px, y: H - 6, "text-anchor": "middle"}, label));
  }
  if (opts.line !== undefined) {
    const y = T + (H - B - T) * (1 - opts.line / top);
    svg.append(s("line", {class: "uniform", x1: L, x2: W - R, y1: y, y2: y}));
  }
  return svg;
}

function densityHistogram(densities) {
  const logs = densities.filter((d) => d > 0).map(Math.log10);
  if (!logs.length) return h("p", {class: "sub"}, "No latent fired.");
  const lo = Math.floor(minOf(logs, 0)), step = 0.25, n = Math.round(-lo / step) || 1;
  const counts = new Array(n).fill(0);
  for (const v of logs) counts[Math.min(n - 1, Math.floor((v - lo) / step))] += 1;
  const ticks = [];
  for (let d = lo; d <= 0; d++) ticks.push([d, "1e" + d]);
  return histogram(counts, lo, 0, {label: (x) => "1e" + x.toFixed(2), ticks: ticks});
}

const promptText = (prompt) => prompt.tokens.map(tokenText).join("");

function notFound(text) {
  return h("section", {}, h("h2", {class: "view-title"}, "Not found"), h("p", {}, text));
}

// ------------------------------------------------------------------- overview
function renderOverview() {
  const dens = DATA.density, dead = dens.filter((d) => d === 0).length;
  const stats = [
    stat(META.architecture, "architecture"), stat(META.d_sae, "latents"),
    stat(META.d_in, "d_in"), stat(META.k === null ? "–" : META.k, "k"),
    EXPERTS ? stat(`${META.n_experts} × ${PER_EXPERT}`, "experts × latents") : null,
    EXPERTS ? stat(META.n_active_experts, "experts per token") : null,
    stat(META.n_tokens.toLocaleString(), META.has_tokens ? "tokens" : "samples"),
    stat(dead, "never fired"), stat(PAGE_IDS.length, "latent pages"),
  ];
  const where = [META.model_name, META.hook_name].filter(Boolean).join(" · ");
  return h("section", {},
    h("h2", {class: "view-title"}, "Overview"), h("div", {class: "sub"}, where),
    card(null, h("div", {class: "stats"}, stats)),
    h("div", {class: "grid"},
      card("Latent density (log10 share of tokens)", densityHistogram(dens)),
      EXPERTS ? card("Expert load (share of tokens selecting each expert)", expertLoadChart()) : null),
    DATA.prompts.length ? card("Prompts", h("ul", {class: "plain"}, DATA.prompts.map((p, i) =>
      h("li", {}, h("a", {href: "#prompt-" + i}, `Prompt ${i}`), " — ",
        h("span", {class: "ctx"}, promptText(p)))))) : null,
    EXPERTS ? card("Experts", expertTable()) : null,
    card("Latents", latentTable()));
}

function expertTable() {
  const rows = EXPERTS.selected_share.map((share, e) => {
    const dens = DATA.density.slice(e * PER_EXPERT, (e + 1) * PER_EXPERT);
    return h("tr", {}, h("td", {}, expertLink(e)),
      h("td", {class: "num"}, pct(share)), h("td", {class: "num"}, pct(EXPERTS.first_choice_share[e])),
      h("td", {class: "num"}, EXPERTS.omega ? fmt(EXPERTS.omega[e]) : "–"),
      h("td", {class: "num"}, dens.filter((d) => d === 0).length),
      h("td", {class: "num"}, pct(dens.reduce((a, b) => a + b, 0) / PER_EXPERT)));
  });
  return h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "expert"),
    h("th", {class: "num"}, "tokens selecting it"), h("th", {class: "num"}, "first choice"),
    h("th", {class: "num"}, "omega"), h("th", {class: "num"}, "latents never fired"),
    h("th", {class: "num"}, "mean latent density"))), h("tbody", {}, rows));
}

function expertLoadChart() {
  const share = EXPERTS.selected_share, n = share.length;
  const ticks = [];
  const every = Math.max(1, Math.ceil(n / 16));
  for (let e = 0; e < n; e += every) ticks.push([e + 0.5, String(e)]);
  const scaled = share.map((v) => Math.round(v * 1e4));
  return h("div", {},
    histogram(scaled, 0, n, {label: (x) => "expert " + Math.floor(x), ticks: ticks,
      href: (i) => "#expert-" + i, line: Math.round(1e4 * META.n_active_experts / n),
      count: (c) => pct(c / 1e4), tip: (i, c) => `expert ${i}: ${pct(c / 1e4)} of tokens`}),
    h("div", {class: "sub"}, `Dashed: uniform (e / N). Normalised entropy `,
      `${fmt(EXPERTS.selected_entropy)}. Click a bar for the expert.`));
}

function latentTable() {
  const state = {sort: "density", expert: "", page: 0};
  const size = 50, body = h("tbody"), info = h("span", {class: "sub"});
  const sorters = {
    density: (a, b) => DATA.density[b] - DATA.density[a],
    max: (a, b) => DATA.max[b] - DATA.max[a],
    id: (a, b) => a - b,
  };
  function rows() {
    let ids = PAGE_IDS;
    if (state.expert !== "") ids = ids.filter((j) => expertOf(j) === Number(state.expert));
    return ids.slice().sort(sorters[state.sort]);
  }
  function draw() {
    const ids = rows(), pages = Math.max(1, Math.ceil(ids.length / size));
    state.page = Math.min(state.page, pages - 1);
    body.replaceChildren(...ids.slice(state.page * size, (state.page + 1) * size).map((j) =>
      h("tr", {},
        h("td", {}, latentLink(j)),
        EXPERTS ? h("td", {}, expertLink(expertOf(j), String(expertOf(j)))) : null,
        h("td", {class: "num"}, pct(DATA.density[j])),
        h("td", {class: "num"}, fmt(DATA.max[j])),
        h("td", {class: "ctx"}, snippet(j)))));
    info.textContent = `${ids.length} latents · page ${state.page + 1} of ${pages}`;
  }
  const select = h("select", {onchange: (e) => { state.sort = e.target.value; draw(); }},
    h("option", {value: "density"}, "by density"), h("option", {value: "max"}, "by max activation"),
    h("option", {value: "id"}, "by index"));
  const filter = EXPERTS ? h("input", {type: "number", min: 0, placeholder: "expert",
    style: "width: 90px", oninput: (e) => { state.expert = e.target.value; state.page = 0; draw(); }}) : null;
  const controls = h("div", {class: "pager"}, select, filter,
    h("button", {onclick: () => { state.page = Math.max(0, state.page - 1); draw(); }}, "‹ prev"),
    h("button", {onclick: () => { state.page += 1; draw(); }}, "next ›"), info);
  draw();
  return h("div", {}, controls, h("table", {},
    h("thead", {}, h("tr", {}, h("th", {}, "latent"), EXPERTS ? h("th", {}, "expert") : null,
      h("th", {class: "num"}, "density"), h("th", {class: "num"}, "max"),
      h("th", {}, "top example"))), body));
}

function snippet(j) {
  const ex = (DATA.pages[j] || {examples: []}).examples[0];
  if (!ex) return "";
  if (!ex.tokens) return `sample ${ex.context}`;
  const from = Math.max(0, ex.centre - 4), to = ex.centre + 3;
  return ex.tokens.slice(from, to).map((t, i) => h("span",
    {class: from + i === ex.centre ? "tok centre" : "tok"}, tokenText(t)));
}

// --------------------------------------------------------------------- latent
function renderLatent(j) {
  const page = DATA.pages[j];
  if (j < 0 || j >= META.d_sae) return notFound(`There is no latent ${j} (d_sae ${META.d_sae}).`);
  if (!page) return notFound(`Latent ${j} has no page: rerun with --latents including it.`);
  const e = expertOf(j), max = DATA.max[j];
  const prev = PAGE_IDS.filter((i) => i < j).pop(), next = PAGE_IDS.find((i) => i > j);
  return h("section", {},
    h("h2", {class: "view-title"}, `Latent ${j} `, e !== null ? expertLink(e) : null),
    h("div", {class: "sub"},
      prev !== undefined ? h("a", {href: "#latent-" + prev}, `‹ latent ${prev}`) : null,
      prev !== undefined && next !== undefined ? " · " : null,
      next !== undefined ? h("a", {href: "#latent-" + next}, `latent ${next} ›`) : null),
    card(null, h("div", {class: "stats"},
      stat(pct(DATA.density[j]), "firing density"), stat(fmt(DATA.mean[j]), "mean when firing"),
      stat(fmt(max), "max activation"),
      e !== null ? stat(`${e} (latents ${e * PER_EXPERT}–${(e + 1) * PER_EXPERT - 1})`, "expert") : null)),
    h("div", {class: "grid"},
      card("Activation histogram (nonzero activations)", activationHistogram(page)),
      page.logits ? card("Logits of the decoder direction (W_dec · W_U)", logitTables(page.logits)) : null),
    card(`Top activations (${page.examples.length}, one per ${META.has_tokens ? "context" : "sample"})`,
      page.examples.length ? page.examples.map((ex) => example(ex, max))
        : h("p", {class: "sub"}, "This latent never fired.")));
}

function activationHistogram(page) {
  if (!page.hist.length) return h("p", {class: "sub"}, "No activations.");
  const width = page.hist_top / META.n_bins, x1 = width * page.hist.length;
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => [f * x1, fmt(f * x1)]);
  return histogram(page.hist, 0, x1, {label: fmt, ticks: ticks});
}

function logitTables(logits) {
  const column = (rows, cls, title) => h("div", {class: cls}, h("h3", {}, title),
    rows.map(([t, v]) => h("div", {class: "logit"}, h("span", {class: "token"}, tokenText(t)),
      h("span", {class: "v"}, (v > 0 ? "+" : "") + fmt(v)))));
  return h("div", {class: "logits"}, column(logits.top, "pos", "positive"),
    column(logits.bottom, "neg", "negative"));
}

function example(ex, max) {
  const where = META.has_tokens ? `context ${ex.context}, token ${ex.position}` : `sample ${ex.context}`;
  const body = ex.tokens
    ? h("div", {class: "ctx"}, ex.tokens.map((t, i) => h("span", {
        class: i === ex.centre ? "tok centre" : "tok", style: shade(ex.acts[i], max),
        title: `${JSON.stringify(tokenText(t))}: ${fmt(ex.acts[i])}`}, tokenText(t))))
    : valueBar(ex.value, max);
  return h("div", {class: "example"},
    h("div", {}, h("div", {class: "value"}, fmt(ex.value)), h("div", {class: "where"}, where)), body);
}

function valueBar(v, max) {
  return h("div", {style: `height: 12px; margin-top: 4px; width: ${(100 * v / (max || 1)).toFixed(1)}%;
    background: rgba(var(--act), 0.7); border-radius: 3px`});
}

// --------------------------------------------------------------------- expert
function renderExpert(e) {
  if (!EXPERTS) return notFound("This SAE has no experts.");
  if (e < 0 || e >= META.n_experts) return notFound(`There is no expert ${e}.`);
  const first = e * PER_EXPERT, ids = Array.from({length: PER_EXPERT}, (_, i) => first + i);
  const dens = ids.map((j) => DATA.density[j]), dead = dens.filter((d) => d === 0).length;
  const omega = EXPERTS.omega ? stat(fmt(EXPERTS.omega[e]), "omega (Feature Scaling)")
    : stat("–", "omega (folded into W_enc, or none)");
  const tokens = EXPERTS.tokens[e];
  const byDensity = ids.slice().sort((a, b) => DATA.density[b] - DATA.density[a]).slice(0, 60);
  return h("section", {},
    h("h2", {class: "view-title"}, `Expert ${e}`),
    h("div", {class: "sub"}, `latents ${first}–${first + PER_EXPERT - 1} · `,
      e > 0 ? h("a", {href: "#expert-" + (e - 1)}, `‹ expert ${e - 1}`) : null,
      e > 0 && e + 1 < META.n_experts ? " · " : null,
      e + 1 < META.n_experts ? h("a", {href: "#expert-" + (e + 1)}, `expert ${e + 1} ›`) : null),
    card(null, h("div", {class: "stats"},
      stat(pct(EXPERTS.selected_share[e]), `tokens selecting it (uniform ${pct(META.n_active_experts / META.n_experts)})`),
      stat(pct(EXPERTS.first_choice_share[e]), `first choice (uniform ${pct(1 / META.n_experts)})`),
      omega, stat(`${dead} / ${PER_EXPERT}`, "dead latents"),
      stat(pct(dens.reduce((a, b) => a + b, 0) / PER_EXPERT), "mean latent density"))),
    h("div", {class: "grid"},
      card("Its latents' densities (log10)", densityHistogram(dens)),
      card("Its latents by density", byDensity.map((j) =>
        DATA.pages[j] ? latentLink(j, `#${j} ${pct(DATA.density[j])}`)
          : h("span", {class: "chip plain"}, `#${j} ${pct(DATA.density[j])}`)))),
    META.has_tokens ? h("div", {class: "grid"},
      card("Tokens most often routed here", tokenTable(tokens.frequent)),
      card("Tokens most specific to it (share of their occurrences)", tokenTable(tokens.specific)))
      : null);
}

function tokenTable(rows) {
  if (!rows.length) return h("p", {class: "sub"}, "No tokens.");
  return h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "token"),
      h("th", {class: "num"}, "routed here"), h("th", {class: "num"}, "share of its occurrences"))),
    h("tbody", {}, rows.map(([t, c, share]) => h("tr", {},
      h("td", {}, h("span", {class: "token"}, tokenText(t))),
      h("td", {class: "num"}, c.toLocaleString()), h("td", {class: "num"}, pct(share))))));
}

// --------------------------------------------------------------------- prompt
function renderPrompt(p) {
  const prompt = DATA.prompts[p];
  if (!prompt) return notFound(`There is no prompt ${p}.`);
  const strongest = maxOf(prompt.latents.flat().map((pair) => pair[1]), 0);
  return h("section", {},
    h("h2", {class: "view-title"}, `Prompt ${p}`),
    h("div", {class: "sub ctx"}, promptText(prompt)),
    card("Each token's experts and kept latents", h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "token"),
        EXPERTS ? h("th", {}, "experts (router weight)") : null,
        h("th", {}, "kept latents (activation), strongest first"))),
      h("tbody", {}, prompt.tokens.map((t, i) => h("tr", {},
        h("td", {class: "num"}, i), h("td", {}, h("span", {class: "token"}, tokenText(t))),
        EXPERTS ? h("td", {}, prompt.experts[i].map(([e, w]) => expertLink(e, `${e} · ${fmt(w)}`))) : null,
        h("td", {}, prompt.latents[i].map(([j, v]) => h("a", {class: "chip", href: "#latent-" + j,
          style: shade(v, strongest) + "; color: #111"}, `#${j} ${fmt(v)}`)),
          prompt.n_kept[i] > prompt.latents[i].length
            ? h("span", {class: "sub"}, ` +${prompt.n_kept[i] - prompt.latents[i].length} more`) : null)))))));
}

// --------------------------------------------------------------------- router
const VIEWS = {latent: renderLatent, expert: renderExpert, prompt: renderPrompt};
function route() {
  const key = decodeURIComponent(location.hash.slice(1)) || "overview";
  const match = /^(latent|expert|prompt)-(\d+)$/.exec(key);
  try {
    const view = match ? VIEWS[match[1]](Number(match[2])) : key === "overview"
      ? renderOverview() : notFound(`Unknown view "${key}".`);
    view.id = match || key === "overview" ? key : "not-found";
    document.getElementById("main").replaceChildren(view);
    for (const a of document.querySelectorAll("header nav a"))
      a.classList.toggle("active", a.dataset.view === (match ? match[1] : key));
    document.title = `${key} · ${META.title}`;
    window.scrollTo(0, 0);
    document.body.dataset.view = view.id;
    document.body.dataset.rendered = "ok";
  } catch (error) {
    document.body.dataset.rendered = "error";
    reportError(error && error.stack ? error.stack : String(error));
  }
}

function header() {
  const nav = h("nav", {}, h("a", {href: "#overview", "data-view": "overview"}, "Overview"),
    EXPERTS ? h("a", {href: "#expert-0", "data-view": "expert"}, "Experts") : null,
    PAGE_IDS.length ? h("a", {href: "#latent-" + DENSEST, "data-view": "latent"}, "Latents") : null,
    DATA.prompts.length ? h("a", {href: "#prompt-0", "data-view": "prompt"}, "Prompts") : null);
  const input = h("input", {type: "search", placeholder: "latent #, or e3",
    title: "a latent's index, or e<N> for expert N"});
  const form = h("form", {onsubmit: (event) => {
    event.preventDefault();
    const text = input.value.trim(), m = /^e(\d+)$/i.exec(text);
    location.hash = m ? "#expert-" + m[1] : "#latent-" + Number(text);
  }}, input);
  document.getElementById("top").replaceChildren(h("h1", {title: META.title}, META.title), nav, form);
  if (META.note) document.getElementById("note").replaceChildren(h("div", {class: "note"}, META.note));
}

header();
window.addEventListener("hashchange", route);
route();
"""

ERROR_CATCHER = """
window.browserErrors = [];
function reportError(message) {
  window.browserErrors.push(String(message));
  document.body.dataset.errors = String(window.browserErrors.length);
  const box = document.getElementById("errors");
  box.hidden = false;
  box.textContent = "Script errors:\\n" + window.browserErrors.join("\\n");
}
window.addEventListener("error", (event) =>
  reportError(event.message + (event.filename ? " (line " + event.lineno + ")" : "")));
"""

HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>@STYLE@</style>
</head>
<body data-errors="0">
<div id="errors" hidden></div>
<script>@ERRORS@</script>
<header id="top"></header>
<main><div id="note"></div><div id="main">Loading…</div></main>
<script type="application/json" id="browser-data">"""

TAIL = """</script>
<script>@SCRIPT@</script>
</body>
</html>
"""


def embedded_json(value: Any) -> str:
    """JSON that cannot end its <script> element: '<', '>' and '&' as escapes."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_page(
    path: Path,
    data: dict[str, Any],
    pages: Iterable[tuple[int, dict[str, Any]]],
    finish: Callable[[], dict[str, Any]],
) -> Path:
    """Write the page: `data`, then "pages" streamed, then the keys `finish` returns.

    `finish` runs after every page was written (e.g. to list the tokens they used).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    head = HEAD.replace("@TITLE@", html.escape(str(data["meta"]["title"])))
    head = head.replace("@STYLE@", STYLE).replace("@ERRORS@", ERROR_CATCHER)
    with path.open("w", encoding="utf-8") as file:
        file.write(head)
        file.write(embedded_json(data)[:-1] + ',"pages":{')
        for index, (latent, page) in enumerate(pages):
            file.write(f'{"," if index else ""}"{latent}":{embedded_json(page)}')
        file.write("}")
        for key, value in finish().items():
            file.write(f",{embedded_json(key)}:{embedded_json(value)}")
        file.write("}" + TAIL.replace("@SCRIPT@", SCRIPT))
    return path
