"""The report's single HTML page: static sections (protocol card, problems, per-class table, confusion
heatmap) rendered here, the per-image rows rendered by the inline script from the embedded JSON, one page
of rows at a time, so 10,000 images stay responsive. No external script, style, font or request: the page
works from ``file://``, a copied folder or a file share."""

from __future__ import annotations

import html
import json

# Score keys of a row: page label, and whether a higher value is better (sets "worst first").
SCORES = {
    "pred_miou": ("pseudo-mask mIoU", True),
    "seeds_miou": ("seeds mIoU", True),
    "pred_vs_seeds_miou": ("mIoU against the seeds", True),
    "seed_agreement": ("agreement with seeds %", True),
    "unsure": ("unsure (255) %", False),
}

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 1.5em 2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.card td:first-child{font-weight:600;white-space:nowrap}.card td{font-family:monospace;word-break:break-all}
.chip{display:inline-block;padding:0 4px;margin:1px;border-radius:3px;font-size:11px;color:#fff;text-shadow:0 0 2px #000}
.controls{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ccc;z-index:2}
.controls>*{margin-right:10px}
.stack{position:relative;display:inline-block;cursor:zoom-in;line-height:0;background:#eee}
.stack img{display:block}.stack img.ov{position:absolute;left:0;top:0;width:100%;height:100%;opacity:.6;image-rendering:pixelated}
.stack img.solo{opacity:1;position:static}
.problem{color:#a00;font-size:12px}.missing{color:#888;font-size:12px}
#confusion td{width:14px;height:14px;padding:0;border:1px solid #fff;font-size:9px;text-align:center}
#confusion th{font-size:10px;font-weight:normal;white-space:nowrap}
#confusion th.col{writing-mode:vertical-rl;transform:rotate(180deg)}
#viewer{display:none;position:fixed;top:0;left:0;right:0;bottom:0;background:#111;z-index:10;color:#fff;overflow:auto}
#viewer.open{display:block}#viewer .bar{padding:8px;background:#222;position:sticky;top:0}
#viewer .bar>*{margin-right:12px}#viewer .bar button{cursor:pointer}
#viewer .frame{position:relative;display:inline-block;margin:12px;line-height:0}
#viewer .frame img{display:block;max-width:none}#full-overlay{position:absolute;left:0;top:0;width:100%;height:100%;image-rendering:pixelated}
"""

_JS = r"""
(function(){
"use strict";
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const SCORES = JSON.parse(document.getElementById("report-scores").textContent);
const rows = DATA.rows, classes = DATA.classes, layers = DATA.layers;
const $ = id => document.getElementById(id);
const url = p => p.split("/").map(encodeURIComponent).join("/");
const present = Object.keys(SCORES).filter(k => rows.some(r => r.scores[k] !== undefined && r.scores[k] !== null));
const state = {sort: present[0] || "problems", worstFirst: true, cls: -1, text: "", page: 0, size: 50};

function el(tag, attrs, text){
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function higherBetter(key){
  if (key === "problems") return false;
  if (key === "id") return true;  // "worst first" on ids: alphabetical
  if (key.startsWith("iou:")) return true;
  return SCORES[key][1];
}
function value(row, key){
  if (key === "id") return row.id;
  if (key === "problems") return row.problems.length;
  if (key.startsWith("iou:")) { const v = row.class_iou[key.slice(4)]; return v === undefined ? null : v; }
  const v = row.scores[key]; return v === undefined ? null : v;
}
function label(key){
  if (key === "id") return "image id";
  if (key === "problems") return "problems";
  if (key.startsWith("iou:")) return "IoU of " + classes[+key.slice(4)];
  return SCORES[key][0];
}
function sortOptions(){
  const sel = $("sort"); sel.textContent = "";
  const keys = [...present, "problems", "id"];
  if (state.sort.startsWith("iou:")) keys.unshift(state.sort);
  for (const k of keys) { const o = el("option", {value: k}, label(k)); if (k === state.sort) o.selected = true; sel.appendChild(o); }
}
function visible(){
  const text = state.text.toLowerCase();
  let out = rows.filter(r => (state.cls < 0 || r.classes.includes(state.cls)) &&
    (!text || r.id.toLowerCase().includes(text) || r.classes.some(c => classes[c].toLowerCase().includes(text)) ||
     r.problems.some(p => p.text.toLowerCase().includes(text))));
  const key = state.sort, sign = (higherBetter(key) === state.worstFirst) ? 1 : -1;
  out = out.slice().sort((a, b) => {
    const va = value(a, key), vb = value(b, key);
    if (va === null && vb === null) return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
    if (va === null) return 1;
    if (vb === null) return -1;
    if (va < vb) return -sign;
    if (va > vb) return sign;
    return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
  });
  return out;
}
function thumb(row, key){
  const box = el("span", {"class": "stack", "data-layer": key});
  if (row.thumb) box.appendChild(el("img", {src: url(row.thumb), loading: "lazy", alt: row.id}));
  if (key !== "image") {
    const l = row.layers[key];
    if (!l) return el("span", {"class": "missing"}, "(none)");
    box.appendChild(el("img", {src: url(l.thumb), loading: "lazy", alt: key, "class": row.thumb ? "ov" : "ov solo"}));
  } else if (!row.thumb) return el("span", {"class": "missing"}, "(no image)");
  box.addEventListener("click", () => openViewer(row, key === "image" ? null : key));
  return box;
}
function fmt(v){ return v === null || v === undefined ? "-" : v.toFixed(1); }
function render(){
  const list = visible(), pages = Math.max(1, Math.ceil(list.length / state.size));
  state.page = Math.min(state.page, pages - 1);
  const body = $("rows"); body.textContent = "";
  for (const row of list.slice(state.page * state.size, (state.page + 1) * state.size)) {
    const tr = el("tr", {"data-id": row.id});
    const idCell = el("td", {"class": "id"}); idCell.appendChild(el("div", {}, row.id));
    for (const c of row.classes) { const chip = el("span", {"class": "chip"}, classes[c]); chip.style.background = DATA.colors[c]; idCell.appendChild(chip); }
    tr.appendChild(idCell);
    for (const key of ["image", ...layers.map(l => l.key)]) { const td = el("td"); td.appendChild(thumb(row, key)); tr.appendChild(td); }
    for (const k of present) tr.appendChild(el("td", {"class": "num score", "data-score": k}, fmt(value(row, k))));
    if (state.sort.startsWith("iou:")) tr.appendChild(el("td", {"class": "num score", "data-score": state.sort}, fmt(value(row, state.sort))));
    const pc = el("td");
    for (const p of row.problems) pc.appendChild(el("div", {"class": "problem"}, p.text));
    tr.appendChild(pc);
    body.appendChild(tr);
  }
  const head = $("rows-head"); head.textContent = "";
  const hr = el("tr");
  hr.appendChild(el("th", {}, "image id / classes"));
  hr.appendChild(el("th", {}, "image"));
  for (const l of layers) hr.appendChild(el("th", {}, l.title));
  for (const k of present) hr.appendChild(el("th", {"class": "num"}, label(k)));
  if (state.sort.startsWith("iou:")) hr.appendChild(el("th", {"class": "num"}, label(state.sort)));
  hr.appendChild(el("th", {}, "problems"));
  head.appendChild(hr);
  $("count").textContent = list.length + " of " + rows.length + " images";
  $("page").textContent = "page " + (state.page + 1) + " of " + pages;
  $("prev").disabled = state.page === 0; $("next").disabled = state.page >= pages - 1;
  $("order").textContent = state.worstFirst ? "worst first" : "best first";
}
function openViewer(row, key){
  const v = $("viewer"); v.classList.add("open");
  $("viewer-title").textContent = row.id;
  const img = $("full-image");
  if (row.image) { img.src = url(row.image); img.style.display = ""; } else { img.removeAttribute("src"); img.style.display = "none"; }
  const sel = $("overlay-layer"); sel.textContent = "";
  for (const l of layers) if (row.layers[l.key]) sel.appendChild(el("option", {value: l.key}, l.title));
  if (key) sel.value = key;
  v.dataset.row = rows.indexOf(row);
  showOverlay();
}
function showOverlay(){
  const row = rows[+$("viewer").dataset.row], key = $("overlay-layer").value, ov = $("full-overlay");
  const on = $("overlay-on").checked && key && row.layers[key];
  if (on) { ov.src = url(row.layers[key].full); ov.style.display = ""; } else ov.style.display = "none";
  if (!row.image && on) { ov.style.position = "static"; ov.style.opacity = 1; }
  else { ov.style.position = ""; ov.style.opacity = $("opacity").value / 100; }
}
function closeViewer(){ $("viewer").classList.remove("open"); }

$("sort").addEventListener("change", e => { state.sort = e.target.value; state.worstFirst = true; state.page = 0; sortOptions(); render(); });
$("order").addEventListener("click", () => { state.worstFirst = !state.worstFirst; render(); });
$("class-filter").addEventListener("change", e => { state.cls = +e.target.value; state.page = 0; render(); });
$("text-filter").addEventListener("input", e => { state.text = e.target.value; state.page = 0; render(); });
$("page-size").addEventListener("change", e => { state.size = +e.target.value; state.page = 0; render(); });
$("prev").addEventListener("click", () => { state.page--; render(); });
$("next").addEventListener("click", () => { state.page++; render(); });
$("overlay-layer").addEventListener("change", showOverlay);
$("overlay-on").addEventListener("change", showOverlay);
$("opacity").addEventListener("input", showOverlay);
$("close").addEventListener("click", closeViewer);
document.addEventListener("keydown", e => { if (e.key === "Escape") closeViewer(); });
for (const a of document.querySelectorAll("a.worst")) a.addEventListener("click", e => {
  e.preventDefault();
  const c = +a.dataset.class;
  state.cls = c; state.sort = "iou:" + c; state.worstFirst = true; state.page = 0;
  $("class-filter").value = String(c); sortOptions(); render();
  $("images").scrollIntoView();
});
const cf = $("class-filter");
cf.appendChild(el("option", {value: "-1"}, "all classes"));
classes.forEach((name, c) => { const n = rows.filter(r => r.classes.includes(c)).length; if (n) cf.appendChild(el("option", {value: String(c)}, name + " (" + n + ")")); });
sortOptions(); render();
})();
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _card(card: dict | None) -> str:
    if not card:
        return "<p>No protocol card recorded.</p>"
    rows = []
    for key, value in card.items():
        text = value if isinstance(value, str) else json.dumps(value)
        rows.append(f"<tr><td>{_e(key)}</td><td>{_e(text)}</td></tr>")
    return f'<table class="card" id="card">{"".join(rows)}</table>'


def _problems(data: dict) -> str:
    counts = data["problems"]
    if not counts:
        return "<p>None: every listed file was found, readable, of its image's size and within the classes.</p>"
    items = "".join(f"<li>{_e(kind)}: {n}</li>" for kind, n in counts.items())
    texts = "".join(f'<li class="problem">{_e(p["text"])}</li>' for row in data["rows"] for p in row["problems"])
    return f'<ul id="problem-counts">{items}</ul><details><summary>every problem</summary><ul>{texts}</ul></details>'


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _class_table(data: dict) -> str:
    table = data["class_table"]
    if table is None:
        return "<p>No reference to score against (give ground truth or seeds).</p>"
    ref = "ground truth" if table["reference"] == "gt" else "the seeds"
    seeds = table["seeds_miou"] is not None
    head = ("<tr><th>class</th><th class=num>IoU</th><th class=num>precision</th><th class=num>recall</th>"
            + ("<th class=num>seeds IoU</th>" if seeds else "") + "<th class=num>pixels</th></tr>")
    body = []
    for c in table["classes"]:
        color = data["colors"][c["index"]]
        body.append(
            f'<tr><td><span class="chip" style="background:{color}">&nbsp;</span> '
            f'<a href="#images" class="worst" data-class="{c["index"]}" title="its worst images">{_e(c["name"])}</a></td>'
            f'<td class=num>{_fmt(c["iou"])}</td><td class=num>{_fmt(c["precision"])}</td>'
            f'<td class=num>{_fmt(c["recall"])}</td>' + (f'<td class=num>{_fmt(c["seeds_iou"])}</td>' if seeds else "")
            + f'<td class=num>{c["pixels"]}</td></tr>')
    foot = (f'<tr><th>mIoU</th><th class=num id="miou">{_fmt(table["miou"])}</th><th></th><th></th>'
            + (f'<th class=num>{_fmt(table["seeds_miou"])}</th>' if seeds else "") + "<th></th></tr>")
    return (f"<p>Pseudo masks against {ref}, over all images (a prediction of 255 counts as a miss). "
            f"Click a class for its worst images.</p><table id=\"class-table\">{head}{''.join(body)}{foot}</table>")


def _confusion(data: dict) -> str:
    table = data["class_table"]
    if table is None:
        return ""
    names = data["classes"]
    head = "<tr><th></th>" + "".join(f'<th class="col">{_e(n)}</th>' for n in [*names, "255"]) + "</tr>"
    body = []
    for t, counts in enumerate(table["confusion"]):
        total = sum(counts)
        cells = []
        for p, n in enumerate(counts):
            share = n / total if total else 0.0
            ink = "#fff" if share > 0.5 else "#000"
            label = f"{100 * share:.0f}" if share >= 0.01 else ""
            cells.append(f'<td style="background:rgba(31,90,180,{share:.3f});color:{ink}" '
                         f'title="{_e(names[t])} -> {_e(([*names, "255"])[p])}: {n} px ({100 * share:.1f}%)">{label}</td>')
        body.append(f"<tr><th>{_e(names[t])}</th>{''.join(cells)}</tr>")
    ref = "ground truth" if table["reference"] == "gt" else "seeds"
    return (f"<h2>Confusion</h2><p>Rows: {ref} class; columns: pseudo-mask class (last: 255); "
            f"each row's share of its pixels, in %.</p><table id=\"confusion\">{head}{''.join(body)}</table>")


def render_page(data: dict) -> str:
    """The complete ``index.html`` for ``data`` (see :func:`weakclip.report.build.build_report`)."""
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no early </script>
    scores = json.dumps(SCORES)
    n = len(data["rows"])
    problems = sum(data["problems"].values())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>weakclip report ({n} images)</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,"><style>{_CSS}</style></head>
<body>
<h1>weakclip report: {n} images, {problems} problems</h1>
<h2>Protocol</h2>{_card(data.get("card"))}
<h2>Problems</h2>{_problems(data)}
<h2>Per class</h2>{_class_table(data)}
{_confusion(data)}
<h2 id="images">Images</h2>
<div class="controls">
<label>sort <select id="sort"></select></label><button id="order" type="button">worst first</button>
<label>class <select id="class-filter"></select></label>
<label>text <input id="text-filter" type="search" placeholder="id, class or problem"></label>
<label>rows per page <select id="page-size"><option value="25">25</option><option value="50" selected>50</option><option value="100">100</option><option value="500">500</option></select></label>
<button id="prev" type="button">&larr;</button><span id="page"></span><button id="next" type="button">&rarr;</button>
<span id="count"></span>
</div>
<table id="image-table"><thead id="rows-head"></thead><tbody id="rows"></tbody></table>
<div id="viewer" role="dialog"><div class="bar"><strong id="viewer-title"></strong>
<label>overlay <select id="overlay-layer"></select></label>
<label><input id="overlay-on" type="checkbox" checked> show</label>
<label>opacity <input id="opacity" type="range" min="0" max="100" value="60"></label>
<button id="close" type="button">close (Esc)</button></div>
<div class="frame"><img id="full-image" alt="full-size image"><img id="full-overlay" alt="overlay"></div></div>
<script type="application/json" id="report-data">{blob}</script>
<script type="application/json" id="report-scores">{scores}</script>
<script>{_JS}</script>
</body></html>
"""
