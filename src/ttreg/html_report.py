"""``ttreg inspect --html``: one self-contained HTML page to look at the outliers of a few images.

:class:`Page` collects, batch by batch, what :func:`ttreg.report.inspect_images` has already
traced (plain and with test-time registers: token norms after every block, the first token's
attention in every block, the register neurons' activations) and writes one HTML file with no
external resource: the data are float32 arrays in base64 drawn on canvases, the images PNG data
URIs, the script plain JavaScript inlined in the page. It opens from disk in any current browser.

On the page, per image: a registers on/off switch that swaps every view; a layer slider for the
patch-norm map with the per-layer max/median curve (emergence and detection layers marked); the
attention of the first token to the patches for a chosen layer and head (and its share on the
register); the register neurons' activation maps, picked from a list; hover information (norm,
row, column and rank of a patch); a colour bar on every map with one scale shared by the two
conditions (a robust range, see :func:`robust_range`; outliers ringed); a strip of thumbnails;
the neuron set's summary. The page is staged with the run's other files (:mod:`ttreg.files`).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .files import Outputs, write_text
from .outliers import thresholds
from .register_neurons import RegisterNeurons
from .tracing import Trace

__all__ = ["Page", "robust_range", "neuron_summary"]

#: thumbnails and map backgrounds are at most this many pixels on their longer side
IMAGE_SIDE = 320


def robust_range(values: torch.Tensor, from_zero: bool = False) -> torch.Tensor:
    """``(..., 2)`` colour-scale ends over the last dimension of ``values`` (the patches of both
    conditions): from the smallest value (0 with ``from_zero``) to the largest that is not an
    outlier by ttreg's ``auto`` rule (:func:`ttreg.outliers.thresholds`: mean + 3 std, at
    least 2x the median), so one outlier does not leave every other patch in the darkest colour.
    The upper end is kept above the lower one."""
    flat = values.detach().float().reshape(-1, values.shape[-1])
    thr = thresholds(flat, "auto")
    hi = torch.where(flat <= thr[:, None], flat, torch.full_like(flat, -torch.inf)).amax(-1)
    lo = torch.zeros_like(hi) if from_zero else flat.amin(-1)
    hi = torch.maximum(torch.where(torch.isfinite(hi), hi, flat.amax(-1)),
                       lo + torch.clamp(lo.abs(), min=1.0) * 1e-6)
    return torch.stack([lo, hi], dim=-1).reshape(*values.shape[:-1], 2)


def _b64(t: torch.Tensor) -> str:
    """Little-endian float32 bytes of ``t`` in base64 (read by the page as a Float32Array)."""
    return base64.b64encode(t.detach().float().contiguous().numpy().astype("<f4").tobytes()).decode("ascii")


def _png_uri(image: np.ndarray) -> str:
    """An ``(H, W, 3)`` float image in [0, 1] as a PNG data URI, at most :data:`IMAGE_SIDE` pixels."""
    from PIL import Image
    im = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    if max(im.size) > IMAGE_SIDE:
        s = IMAGE_SIDE / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _arm(tr: Trace) -> dict[str, torch.Tensor]:
    """What the page draws of one condition, for the whole batch (batch first)."""
    ps = tr.patch_slice
    L = tr.norms.shape[1]
    d: dict[str, torch.Tensor] = {"norms": tr.norms[:, :, ps]}                    # (B, L, P)
    if tr.num_registers:
        d["register_norms"] = tr.norms[:, :, ps.stop:]                           # (B, L, R)
    if tr.num_prefix_tokens and len(tr.attention) == L:
        cls = torch.stack([tr.attention[l][:, :, 0] for l in range(L)], dim=1)   # (B, L, h, keys)
        cls = torch.cat([cls, cls.mean(2, keepdim=True)], dim=2)                 # heads + mean
        d["attention"] = cls[..., ps]                                            # (B, L, h+1, P)
        d["attention_register"] = cls[..., ps.stop:].sum(-1)                      # (B, L, h+1)
    if tr.activations is not None:
        d["activations"] = tr.activations[:, :, ps]                              # (B, N, P)
        d["activation_register"] = (tr.activations[:, :, ps.stop:].amax(-1) if tr.num_registers
                                    else torch.zeros(tr.activations.shape[:2]))  # (B, N)
    return d


class Page:
    """The HTML page of one ``inspect`` run.

    Give it to :func:`ttreg.report.inspect_images` (``page=``): it records the attention of
    every block, passes each batch to :meth:`add` and stages the page with its other files
    (:meth:`write`). ``neuron_source``: where the neuron set came from (a file, a published name,
    ``auto``), shown in the summary. ``caption``: a line shown under the title (e.g. that the
    model is synthetic)."""

    def __init__(self, path: str | os.PathLike, *, neuron_source: str | None = None,
                 caption: str = "") -> None:
        self.path = Path(path)
        self.neuron_source = neuron_source
        self.caption = caption
        self.bytes = 0
        self._images: list[dict[str, Any]] = []
        self._meta: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._images)

    def add(self, images: Sequence[np.ndarray], plain: Trace, registers: Trace) -> None:
        """One batch: the input images as ``(H, W, 3)`` floats in [0, 1] and the two traces
        (with norms after every block, attention of every block and the neurons' activations)."""
        p, r = _arm(plain), _arm(registers)
        B = len(images)
        scale = {"norms": robust_range(torch.cat([p["norms"], r["norms"]], -1))}       # (B, L, 2)
        if "attention" in p:
            scale["attention"] = robust_range(torch.cat([p["attention"], r["attention"]], -1), True)
        if "activations" in p:
            scale["activations"] = robust_range(
                torch.cat([p["activations"], r["activations"]], -1).abs(), True)       # (B, N, 2)
        self._meta.setdefault("grid", list(plain.grid))
        self._meta.setdefault("num_layers", int(plain.norms.shape[1]))
        self._meta.setdefault("num_heads", int(p["attention"].shape[2] - 1) if "attention" in p else 0)
        self._meta.setdefault("num_registers", int(registers.num_registers))
        self._meta.setdefault("neurons", [list(n) for n in plain.neurons])
        for b in range(B):
            self._images.append({
                "image": _png_uri(images[b]),
                "plain": {k: _b64(v[b]) for k, v in p.items()},
                "registers": {k: _b64(v[b]) for k, v in r.items()},
                "scale": {k: v[b].tolist() for k, v in scale.items()},
            })

    # --- the page ---------------------------------------------------------------------------
    def data(self, results: dict[str, Any], neurons: RegisterNeurons) -> dict[str, Any]:
        """What the page's script reads: the run's numbers (``inspect.json``'s, without the norm
        maps it draws from its own arrays), the arrays of :meth:`add` and the neuron summary."""
        if len(results["images"]) != len(self._images):
            raise ValueError(f"the page holds {len(self._images)} images, the results "
                             f"{len(results['images'])}")
        images = []
        for res, arrays in zip(results["images"], self._images):
            nums = {arm: {k: v for k, v in res[arm].items() if k != "norm_map"}
                    for arm in ("plain", "registers")}
            images.append({"name": res["image"], **nums, "arrays": arrays})
        scores = neurons.scores or [None] * len(neurons)
        score = dict(zip(neurons.neurons, scores))
        return {
            "model": results["model"], "caption": self.caption,
            "detection_layer": results["detection_layer"],
            "emergence_layer": neurons.statistics.get("emergence_layer"),
            "num_registers": results["num_registers"], "preset": results["preset"],
            **self._meta,
            "neuron_scores": [score.get(tuple(n)) for n in self._meta.get("neurons", [])],
            "summary": neuron_summary(neurons, self.neuron_source),
            "images": images,
        }

    def html(self, results: dict[str, Any], neurons: RegisterNeurons) -> str:
        blob = json.dumps(self.data(results, neurons), separators=(",", ":"), allow_nan=False)
        blob = blob.replace("</", "<\\/")   # no "</script>" inside the data block
        title = html.escape(f"ttreg inspect: {results['model']}")
        return (_TEMPLATE.replace("@TITLE@", title).replace("@STYLE@", _STYLE)
                .replace("@SCRIPT@", _SCRIPT).replace("@DATA@", blob))

    def write(self, results: dict[str, Any], neurons: RegisterNeurons,
              outputs: Outputs | None = None) -> Path:
        """Write the page (all or nothing; staged in ``outputs`` when given)."""
        text = self.html(results, neurons)
        self.bytes = len(text.encode("utf-8"))
        return write_text(self.path, text, outputs=outputs)

    def summary(self) -> str:
        return f"wrote {self.path} ({len(self)} images, {self.bytes / 1e6:.1f} MB)"


def neuron_summary(neurons: RegisterNeurons, source: str | None = None) -> dict[str, Any]:
    """The neuron set in a few numbers: count per layer, how it was found, the held-out effect."""
    st, hp = neurons.statistics or {}, neurons.hyperparameters or {}
    held = {}
    for key in ("heldout_before", "heldout_after"):
        if isinstance(st.get(key), dict):
            held[key] = {k: st[key].get(k) for k in ("mean_norm_ratio", "fraction_with_outliers")}
    return {
        "count": len(neurons),
        "by_layer": {str(l): len(ns) for l, ns in neurons.by_layer().items()},
        "source": source, "note": neurons.note, "found_for": neurons.found_for(),
        "method": (neurons.provenance or {}).get("method"),
        "num_images": neurons.num_images, "num_images_with_outliers": neurons.num_images_with_outliers,
        "top_layer": hp.get("top_layer"), "top_k": hp.get("top_k"), "threshold": hp.get("threshold"),
        "top_k_rule": st.get("top_k_rule"), **held,
    }


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>@STYLE@</style></head>
<body>
<header><h1 id="title"></h1><div id="caption"></div></header>
<nav id="thumbs" aria-label="images"></nav>
<main>
<section id="controls">
  <label class="switch"><input type="checkbox" id="registers"><span class="slider"></span>
    <span id="registers-label">test-time registers: off</span></label>
  <span id="image-name"></span>
</section>
<section class="views">
  <figure class="view"><figcaption>input</figcaption><canvas id="input-map" width="256" height="256"></canvas></figure>
  <figure class="view"><figcaption>patch norms after block <b id="layer-label"></b></figcaption>
    <canvas id="norm-map" width="256" height="256"></canvas><div class="bar" id="norm-bar"></div>
    <div class="readout">max/median <b id="ratio"></b> (max <span id="max"></span>,
      median <span id="median"></span>)<span id="register-norm-box">; register <span id="register-norm"></span></span></div></figure>
  <figure class="view" id="attention-view"><figcaption>attention of the first token, block
    <select id="att-layer"></select> head <select id="att-head"></select></figcaption>
    <canvas id="att-map" width="256" height="256"></canvas><div class="bar" id="att-bar"></div>
    <div class="readout">on the register <b id="att-register"></b></div></figure>
  <figure class="view" id="neuron-view"><figcaption>register neuron <b id="neuron-label"></b></figcaption>
    <canvas id="neuron-map" width="256" height="256"></canvas><div class="bar" id="neuron-bar"></div>
    <div class="readout">|activation| max on patches <b id="neuron-patch-max"></b>; on the register
      <b id="neuron-register"></b></div></figure>
</section>
<div id="hover">hover a patch for its norm, row, column and rank</div>
<section class="lower">
  <div id="curve-box"><div class="row"><label for="layer">block</label>
    <input type="range" id="layer" min="0" max="0" step="1"><span id="layer-value"></span></div>
    <svg id="curve" viewBox="0 0 560 220" role="img" aria-label="max/median patch norm per block"></svg></div>
  <div id="neurons-box"><h2>register neurons</h2><ul id="neuron-list"></ul></div>
  <div id="summary-box"><h2>neuron set</h2><dl id="summary"></dl></div>
</section>
</main>
<footer>Written by <code>ttreg inspect --html</code>: one file, no network. Each map's colour
scale is shared by the plain model and test-time registers: from the smallest value (0 for
attention and activations) to the largest that is not an outlier (ttreg's auto rule: above the
mean + 3 std and at least twice the median of both); outliers are drawn in the top colour and
ringed.</footer>
<script type="application/json" id="ttreg-data">@DATA@</script>
<script>@SCRIPT@</script>
</body></html>
"""

_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f6f8}
header{padding:12px 20px 4px}h1{font-size:19px;margin:0}#caption{color:#8a1c1c;font-weight:600}
h2{font-size:14px;margin:0 0 6px}
#thumbs{display:flex;gap:6px;padding:6px 20px;overflow-x:auto}
#thumbs img{width:56px;height:56px;object-fit:cover;border:3px solid transparent;border-radius:4px;cursor:pointer}
#thumbs img.on{border-color:#2060c0}
main{padding:0 20px}
#controls{display:flex;align-items:center;gap:18px;margin:8px 0}
#image-name{font-weight:600}
.switch{display:flex;align-items:center;gap:8px;cursor:pointer;user-select:none}
.switch input{display:none}.slider{width:42px;height:22px;border-radius:11px;background:#c23b22;position:relative;transition:.15s}
.slider:after{content:"";position:absolute;left:3px;top:3px;width:16px;height:16px;border-radius:50%;background:#fff;transition:.15s}
.switch input:checked+.slider{background:#2060c0}.switch input:checked+.slider:after{left:23px}
.switch input:disabled+.slider{background:#aaa}
.views{display:flex;flex-wrap:wrap;gap:14px}
.view{margin:0;background:#fff;border-radius:8px;padding:8px;box-shadow:0 1px 3px #0002;width:256px}
.view figcaption{font-size:12.5px;margin-bottom:4px;min-height:34px}
canvas{display:block;image-rendering:pixelated}
.bar{position:relative;height:30px;margin-top:4px}.bar canvas{width:100%;height:10px}
.bar span{position:absolute;top:12px;font-size:11px;color:#444}.bar .hi{right:0}.bar .lo{left:0}
.readout{font-size:12.5px;margin-top:2px}
#hover{margin:10px 0;padding:6px 10px;background:#fff;border-radius:6px;min-height:20px;font-size:13px}
.lower{display:flex;flex-wrap:wrap;gap:14px;margin-bottom:14px}
.lower>div{background:#fff;border-radius:8px;padding:8px 12px;box-shadow:0 1px 3px #0002}
#curve-box{width:560px}.row{display:flex;gap:8px;align-items:center}#layer{flex:1}
#neuron-list{list-style:none;padding:0;margin:0;max-height:230px;overflow-y:auto}
#neuron-list li{padding:2px 6px;border-radius:4px;cursor:pointer;font-size:12.5px}
#neuron-list li.on{background:#2060c0;color:#fff}
#summary{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:1px 10px;margin:0;font-size:12.5px;max-width:440px}
#summary dt{color:#666}#summary dd{margin:0}
footer{padding:4px 20px 16px;color:#666;font-size:12px}
svg text{font-size:11px;fill:#333}
"""

_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("ttreg-data").textContent);
const $ = (id) => document.getElementById(id);
const L = D.num_layers, H = D.num_heads, [ROWS, COLS] = D.grid, P = ROWS * COLS;
const S = {image: 0, arm: "plain", layer: D.detection_layer, attLayer: L - 1, head: H,
           neuron: 0, hover: null};
const cache = new Map();
// colour maps: anchors of matplotlib's inferno and viridis, interpolated linearly
const ANCHORS = {
  inferno: [[0,0,4],[40,11,84],[101,21,110],[159,42,99],[212,72,66],[245,125,21],[250,193,39],[252,255,164]],
  viridis: [[68,1,84],[70,50,127],[54,92,141],[39,127,142],[31,161,135],[74,194,109],[159,218,58],[253,231,37]]};
function lut(name) {
  const a = ANCHORS[name], out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = i / 255 * (a.length - 1), k = Math.min(Math.floor(t), a.length - 2), f = t - k;
    for (let c = 0; c < 3; c++) out[i * 3 + c] = a[k][c] + f * (a[k + 1][c] - a[k][c]);
  }
  return out;
}
const LUT = {inferno: lut("inferno"), viridis: lut("viridis")};
function floats(b64) {
  if (!b64) return null;
  const s = atob(b64), u = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
  return new Float32Array(u.buffer);
}
function arrays(i, arm) {   // decoded on first use
  const key = i + arm;
  if (!cache.has(key)) {
    const src = D.images[i].arrays[arm], out = {};
    for (const k in src) out[k] = floats(src[k]);
    cache.set(key, out);
  }
  return cache.get(key);
}
const fmt = (v) => v === null || v === undefined ? "n/a" : (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(2));
const fmtScale = (v) => Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(2);
const img = new Image();
function drawMap(id, vals, range, cmap, background, abs) {
  const cv = $(id), ctx = cv.getContext("2d"), W = cv.width, Hh = cv.height;
  ctx.clearRect(0, 0, W, Hh);
  if (background && img.complete) ctx.drawImage(img, 0, 0, W, Hh);
  const [lo, hi] = range, lt = LUT[cmap], cw = W / COLS, ch = Hh / ROWS;
  ctx.globalAlpha = background ? 0.62 : 1;
  for (let p = 0; p < P; p++) {
    const v = abs ? Math.abs(vals[p]) : vals[p];
    const k = Math.max(0, Math.min(255, Math.round((v - lo) / (hi - lo) * 255)));
    ctx.fillStyle = `rgb(${lt[k * 3]},${lt[k * 3 + 1]},${lt[k * 3 + 2]})`;
    const r = Math.floor(p / COLS), c = p % COLS;
    ctx.fillRect(Math.floor(c * cw), Math.floor(r * ch), Math.ceil(cw), Math.ceil(ch));
  }
  ctx.globalAlpha = 1;
  for (let p = 0; p < P; p++) {   // above the colour scale (outliers): a ring
    const v = abs ? Math.abs(vals[p]) : vals[p];
    if (v > hi) {
      const r = Math.floor(p / COLS), c = p % COLS, rad = Math.max(2, Math.min(cw, ch) * 0.3);
      ctx.beginPath(); ctx.arc((c + 0.5) * cw, (r + 0.5) * ch, rad, 0, 2 * Math.PI);
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 2.5; ctx.stroke();
      ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.stroke();
    }
  }
  if (S.hover !== null) {
    const r = Math.floor(S.hover / COLS), c = S.hover % COLS;
    ctx.strokeStyle = "#00e5ff"; ctx.lineWidth = 2;
    ctx.strokeRect(c * cw + 1, r * ch + 1, cw - 2, ch - 2);
  }
}
function drawBar(id, range, cmap, vals, abs) {
  const box = $(id);
  if (!box.firstChild) box.innerHTML = '<canvas width="256" height="1"></canvas><span class="lo"></span><span class="hi"></span>';
  const cv = box.querySelector("canvas"), ctx = cv.getContext("2d"), lt = LUT[cmap];
  const im = ctx.createImageData(256, 1);
  for (let i = 0; i < 256; i++) { im.data.set([lt[i * 3], lt[i * 3 + 1], lt[i * 3 + 2], 255], i * 4); }
  ctx.putImageData(im, 0, 0);
  let vmin = Infinity, vmax = -Infinity;
  for (const x of vals) { const v = abs ? Math.abs(x) : x; vmin = Math.min(vmin, v); vmax = Math.max(vmax, v); }
  box.querySelector(".lo").textContent = (vmin < range[0] ? "\u2264 " : "") + fmtScale(range[0]);
  box.querySelector(".hi").textContent = (vmax > range[1] ? "\u2265 " : "") + fmtScale(range[1]);
  box.dataset.lo = range[0]; box.dataset.hi = range[1];
}
function normsAt(a, layer) { return a.norms.subarray(layer * P, (layer + 1) * P); }
function drawNorms() {
  const im = D.images[S.image], a = arrays(S.image, S.arm), n = im[S.arm], l = S.layer;
  const vals = normsAt(a, l), range = im.arrays.scale.norms[l];
  drawMap("norm-map", vals, range, "inferno", false, false);
  drawBar("norm-bar", range, "inferno", vals, false);
  $("layer-label").textContent = l + (l === D.detection_layer ? " (detection)" : "")
    + (l === D.emergence_layer ? " (emergence)" : "");
  $("layer-value").textContent = l;
  $("ratio").textContent = n.norm_ratio[l].toFixed(2);
  $("max").textContent = fmt(n.max_patch_norm[l]);
  $("median").textContent = fmt(n.median_patch_norm[l]);
  const reg = n.register_norm;
  $("register-norm-box").style.display = reg ? "" : "none";
  if (reg) $("register-norm").textContent = fmt(reg[l]);
}
function drawAttention() {
  if (!H) return;
  const im = D.images[S.image], a = arrays(S.image, S.arm), l = S.attLayer, h = S.head;
  const off = (l * (H + 1) + h) * P, vals = a.attention.subarray(off, off + P);
  const range = im.arrays.scale.attention[l][h];
  drawMap("att-map", vals, range, "viridis", true, false);
  drawBar("att-bar", range, "viridis", vals, false);
  $("att-register").textContent = D.num_registers && S.arm === "registers" && a.attention_register
    ? a.attention_register[l * (H + 1) + h].toFixed(3) : "none (off)";
}
function drawNeuron() {
  if (!D.neurons.length) return;
  const im = D.images[S.image], a = arrays(S.image, S.arm), k = S.neuron;
  const vals = a.activations.subarray(k * P, (k + 1) * P), range = im.arrays.scale.activations[k];
  drawMap("neuron-map", vals, range, "inferno", false, true);
  drawBar("neuron-bar", range, "inferno", vals, true);
  let m = 0; for (const v of vals) m = Math.max(m, Math.abs(v));
  $("neuron-patch-max").textContent = fmt(m);
  $("neuron-register").textContent = S.arm === "registers" && D.num_registers
    ? fmt(a.activation_register[k]) : "none (off)";
  const [nl, nn] = D.neurons[k];
  $("neuron-label").textContent = `(${nl}, ${nn})`;
  document.querySelectorAll("#neuron-list li").forEach((li, j) => li.classList.toggle("on", j === k));
}
function ticks(lo, hi) {   // the finest of these steps between 10^lo and 10^hi with at most 7
  for (const steps of [[1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8], [1, 2, 5], [1, 3], [1]]) {
    const out = [];
    for (let e = Math.floor(lo) - 1; e <= Math.ceil(hi); e++)
      for (const m of steps) { const v = m * Math.pow(10, e), g = Math.log10(v); if (g >= lo && g <= hi) out.push(v); }
    if (out.length <= 7) return out;
  }
  return [];
}
function drawCurve() {
  const svg = $("curve"), W = 560, Hh = 220, m = {l: 46, r: 14, t: 30, b: 34};
  const arms = ["plain", "registers"], im = D.images[S.image];
  let lo = Infinity, hi = -Infinity;
  for (const arm of arms) for (const v of im[arm].norm_ratio) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  lo = Math.log10(Math.max(lo / 1.15, 1e-6)); hi = Math.log10(hi * 1.15);
  if (hi - lo < 0.1) { hi = lo + 0.1; }
  const x = (l) => m.l + (L > 1 ? l / (L - 1) : 0.5) * (W - m.l - m.r);
  const y = (v) => Hh - m.b - (Math.log10(v) - lo) / (hi - lo) * (Hh - m.t - m.b);
  let s = "";
  for (const v of ticks(lo, hi)) {
    const yy = y(v);
    s += `<line x1="${m.l}" y1="${yy}" x2="${W - m.r}" y2="${yy}" stroke="#eee"/><text x="${m.l - 4}" y="${yy + 4}" text-anchor="end">${v >= 1 ? +v.toPrecision(3) : v.toPrecision(2)}</text>`;
  }
  s += `<line x1="${m.l}" y1="${Hh - m.b}" x2="${W - m.r}" y2="${Hh - m.b}" stroke="#999"/>`;
  s += `<line x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${Hh - m.b}" stroke="#999"/>`;
  for (let l = 0; l < L; l++) s += `<text x="${x(l)}" y="${Hh - m.b + 14}" text-anchor="middle">${l}</text>`;
  s += `<text x="${(W + m.l) / 2}" y="${Hh - 4}" text-anchor="middle">block \u2014 max/median patch norm (log scale)</text>`;
  const marks = [[D.emergence_layer, "emergence", "#a06000"], [D.detection_layer, "detection", "#555"]];
  marks.forEach(([l, name, col], j) => {
    if (l === null || l === undefined) return;
    const xx = x(l), anchor = xx > W - 80 ? "end" : xx < m.l + 40 ? "start" : "middle";
    s += `<line x1="${xx}" y1="${m.t - 2}" x2="${xx}" y2="${Hh - m.b}" stroke="${col}" stroke-dasharray="4 3"/>`
      + `<text x="${xx}" y="${j ? 24 : 12}" text-anchor="${anchor}" style="fill:${col}">${name} ${l}</text>`;
  });
  s += `<line x1="${x(S.layer)}" y1="${m.t}" x2="${x(S.layer)}" y2="${Hh - m.b}" stroke="#2060c0" stroke-width="8" stroke-opacity="0.14"/>`;
  const colour = {plain: "#c23b22", registers: "#2060c0"};
  for (const arm of arms) {
    const pts = im[arm].norm_ratio.map((v, l) => `${x(l)},${y(v)}`).join(" ");
    const w = arm === S.arm ? 2.6 : 1.3, op = arm === S.arm ? 1 : 0.5;
    s += `<polyline points="${pts}" fill="none" stroke="${colour[arm]}" stroke-width="${w}" stroke-opacity="${op}"/>`;
    im[arm].norm_ratio.forEach((v, l) => { s += `<circle cx="${x(l)}" cy="${y(v)}" r="${arm === S.arm ? 3.5 : 2.5}" fill="${colour[arm]}" fill-opacity="${op}" data-layer="${l}" style="cursor:pointer"><title>block ${l}: ${v.toFixed(2)}</title></circle>`; });
  }
  s += `<text x="${m.l + 8}" y="${m.t + 12}" style="fill:#c23b22">\u25cf plain</text>`
    + `<text x="${m.l + 62}" y="${m.t + 12}" style="fill:#2060c0">\u25cf test-time registers</text>`;
  svg.innerHTML = s;
}
function drawHover() {
  const box = $("hover");
  if (S.hover === null) { box.textContent = "hover a patch for its norm, row, column and rank"; return; }
  const a = arrays(S.image, S.arm), p = S.hover, vals = normsAt(a, S.layer), v = vals[p];
  let rank = 1; for (const x of vals) if (x > v) rank++;
  let s = `patch row ${Math.floor(p / COLS)}, column ${p % COLS}: norm ${fmt(v)} after block ${S.layer}, rank ${rank} of ${P}`;
  if (H) s += `; attention ${a.attention[(S.attLayer * (H + 1) + S.head) * P + p].toFixed(4)}`;
  if (D.neurons.length) s += `; neuron (${D.neurons[S.neuron].join(", ")}) ${fmt(a.activations[S.neuron * P + p])}`;
  box.textContent = s + ` (${S.arm === "plain" ? "plain" : "test-time registers"})`;
}
function draw() {
  const im = D.images[S.image];
  $("image-name").textContent = im.name;
  $("registers-label").textContent = "test-time registers: " + (S.arm === "registers" ? "on" : "off");
  document.querySelectorAll("#thumbs img").forEach((t, j) => t.classList.toggle("on", j === S.image));
  const cv = $("input-map"), ctx = cv.getContext("2d");
  if (img.complete) ctx.drawImage(img, 0, 0, cv.width, cv.height);
  drawNorms(); drawAttention(); drawNeuron(); drawCurve(); drawHover();
}
function selectImage(i) {
  S.image = i;
  img.onload = draw;
  img.src = D.images[i].arrays.image;
  draw();
}
function hoverHandler(ev) {
  const cv = ev.currentTarget, r = cv.getBoundingClientRect();
  const c = Math.floor((ev.clientX - r.left) / r.width * COLS), rr = Math.floor((ev.clientY - r.top) / r.height * ROWS);
  const p = rr >= 0 && rr < ROWS && c >= 0 && c < COLS ? rr * COLS + c : null;
  if (p !== S.hover) { S.hover = p; draw(); }
}
function init() {
  document.title = "ttreg inspect: " + D.model;
  $("title").textContent = "ttreg inspect \u2014 " + D.model;
  $("caption").textContent = D.caption || "";
  const sw = $("registers");
  if (!D.num_registers) { sw.disabled = true; $("registers-label").title = "no register neurons: both conditions are the plain model"; }
  sw.addEventListener("change", () => { S.arm = sw.checked ? "registers" : "plain"; draw(); });
  const sl = $("layer");
  sl.max = L - 1; sl.value = S.layer;
  sl.addEventListener("input", () => { S.layer = +sl.value; draw(); });
  $("curve").addEventListener("click", (ev) => {
    const l = ev.target.dataset && ev.target.dataset.layer;
    if (l !== undefined) { S.layer = +l; sl.value = l; draw(); }
  });
  if (H) {
    const ls = $("att-layer"), hs = $("att-head");
    for (let l = 0; l < L; l++) ls.add(new Option(String(l), l));
    for (let h = 0; h < H; h++) hs.add(new Option(String(h), h));
    hs.add(new Option("mean", H));
    ls.value = S.attLayer; hs.value = H;
    ls.addEventListener("change", () => { S.attLayer = +ls.value; draw(); });
    hs.addEventListener("change", () => { S.head = +hs.value; draw(); });
  } else $("attention-view").style.display = "none";
  if (D.neurons.length) {
    const ul = $("neuron-list");
    D.neurons.forEach(([l, n], k) => {
      const li = document.createElement("li"), sc = D.neuron_scores[k];
      li.textContent = `(${l}, ${n}) block ${l}, score ${sc === null ? "n/a" : sc.toPrecision(3)}`;
      li.dataset.index = k;
      li.addEventListener("click", () => { S.neuron = k; draw(); });
      ul.appendChild(li);
    });
  } else { $("neuron-view").style.display = "none"; $("neuron-list").innerHTML = "<li>none</li>"; }
  for (const id of ["norm-map", "att-map", "neuron-map", "input-map"]) {
    $(id).addEventListener("mousemove", hoverHandler);
    $(id).addEventListener("mouseleave", () => { S.hover = null; draw(); });
  }
  const th = $("thumbs");
  D.images.forEach((im, i) => {
    const t = document.createElement("img");
    t.src = im.arrays.image; t.alt = t.title = im.name;
    t.addEventListener("click", () => selectImage(i));
    th.appendChild(t);
  });
  const sm = D.summary, dl = $("summary"), pct = (v) => v === null || v === undefined ? "n/a" : Math.round(v * 100) + "%";
  const rows = [["neurons", sm.count + (sm.count ? " (" + Object.entries(sm.by_layer).map(([l, c]) => `block ${l}: ${c}`).join(", ") + ")" : "")],
    ["from", sm.source || "n/a"], ["found for", sm.found_for || "n/a"], ["method", sm.method || "n/a"],
    ["images", `${sm.num_images_with_outliers} of ${sm.num_images} with outliers`],
    ["top layer, top k", `${sm.top_layer ?? "n/a"}, ${sm.top_k ?? "n/a"}${sm.top_k_rule ? " (" + sm.top_k_rule + ")" : ""}`],
    ["threshold", String(sm.threshold ?? "n/a")]];
  if (sm.heldout_before) rows.push(["held out, max/median", `${fmt(sm.heldout_before.mean_norm_ratio)} \u2192 ${sm.heldout_after ? fmt(sm.heldout_after.mean_norm_ratio) : "n/a"}`],
    ["held out, with outliers", `${pct(sm.heldout_before.fraction_with_outliers)} \u2192 ${sm.heldout_after ? pct(sm.heldout_after.fraction_with_outliers) : "n/a"}`]);
  if (sm.note) rows.push(["note", sm.note]);
  for (const [k, v] of rows) { const dt = document.createElement("dt"), dd = document.createElement("dd"); dt.textContent = k; dd.textContent = v; dl.append(dt, dd); }
  selectImage(0);
  window.ttregReady = performance.now();
}
init();
"""
