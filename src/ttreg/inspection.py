"""``inspect_images``: figures and numbers for a few images, plain vs. test-time registers.

Runs two traces per batch (plain, and with the given register neurons), then writes the PNGs of
:mod:`ttreg.viz` and ``inspect.json`` with the same numbers. Used by ``ttreg inspect`` and
``ttreg demo``. Every file is staged in a :class:`ttreg.files.Outputs` and renamed into place at
the end, so an interrupted run leaves no figure behind.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import torch

from . import viz
from .adapters import wrap
from .data import ImageSource, display_name
from .files import Outputs, write_json
from .neurons import resolve_layer
from .outliers import norm_ratio
from .registers import test_time_registers
from .register_neurons import RegisterNeurons
from .tracing import Trace, trace


def inspect_images(model, transform, src: ImageSource, neurons: RegisterNeurons, out: Path, *,
                   layer: int = -1, num_registers: int = 1, preset: str = "paper",
                   num_neurons: int = 6, model_name: str = "", batch_size: int = 16,
                   outputs: Outputs | None = None, progress: bool = False,
                   page=None, attribution: dict | None = None) -> tuple[dict, list[Path]]:
    """Figures and ``inspect.json`` for the images of ``src`` in ``out``, ``batch_size`` images
    per forward pass (``progress``: a bar over the images). With ``outputs`` the files are
    staged there (the caller commits); otherwise they are all written at the end, or none on an
    error or Ctrl-C.

    ``page``: a :class:`ttreg.html_report.Page`; the attention of every block is then traced
    too (memory: batch x blocks x heads x tokens^2 floats per condition), each batch handed to
    it and the HTML page written with the other files (last in ``written``). ``attribution``: a
    VLM's attribution (:func:`ttreg.attribution_report.inspect_attribution`): its maps drawn in
    each image's overview figure, its numbers put into ``inspect.json`` beside each image's."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    viz.require_matplotlib()
    ad = wrap(model)
    p = ad.parameter()
    L = ad.num_layers
    det = resolve_layer(layer, L, "layer")
    top = list(neurons.neurons[:num_neurons])
    mean, std = ad.mean_std()
    results: dict[str, Any] = {"model": model_name or ad.describe(), "detection_layer": det,
                               "num_registers": num_registers if len(neurons) else 0,
                               "preset": preset, "neurons": [list(n) for n in neurons.neurons],
                               "note": neurons.note, "images": []}
    out = Path(out)
    written: list[Path] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(src), desc="inspecting images", unit="image")
    with contextlib.nullcontext(outputs) if outputs is not None else Outputs() as o, \
            (bar or contextlib.nullcontext()):
        for start in range(0, len(src), batch_size):
            idx = range(start, min(start + batch_size, len(src)))
            x = torch.stack([transform(src.image(i)) for i in idx]).to(p.device, p.dtype)
            att = list(range(L)) if page is not None else [L - 1]
            plain = trace(model, x, attention=att, neurons=top)
            if len(neurons):
                with test_time_registers(model, neurons, num_registers=num_registers, preset=preset,
                                         check=False):
                    reg = trace(model, x, attention=att, neurons=top)
            else:
                reg = plain
            imgs = []
            for b, i in enumerate(idx):
                name = display_name(src.names[i])
                stem = figure_stem(name, i)
                title = Path(name).name
                img = viz.denormalize(x[b], mean, std)
                imgs.append(img)
                panel = attribution["images"][i]["panel"] if attribution is not None else None
                figs = [viz.overview(img, plain, reg, b, det, title, out / f"{stem}_overview.png", outputs=o,
                                     attribution=panel)]
                if plain.attention and plain.num_prefix_tokens:
                    figs.append(viz.heads(img, plain, reg, b, title, out / f"{stem}_heads.png", outputs=o))
                if top:
                    figs.append(viz.neuron_maps(img, plain, reg, b, title, out / f"{stem}_neurons.png",
                                                outputs=o))
                written += figs
                results["images"].append({"image": name, "figures": [f.name for f in figs],
                                          "plain": arm_numbers(plain, b, det),
                                          "registers": arm_numbers(reg, b, det)})
            if bar is not None:
                bar.update(len(idx))
            if page is not None:
                page.add(imgs, plain, reg)
        if attribution is not None:
            results["attribution"] = attribution["config"]
            for entry, extra in zip(results["images"], attribution["images"]):
                entry["attribution"] = {k: extra[k] for k in ("plain", "registers")}
        written.append(write_json(out / "inspect.json", results, outputs=o))
        if page is not None:
            written.append(page.write(results, neurons, outputs=o))
    return results, written


def figure_stem(name: str, i: int) -> str:
    """The file-name stem of image ``i`` (shown as ``name``) in a report folder."""
    base = Path(name).stem if ("/" in name or "." in name) and ":" not in name else name.split(":")[-1]
    return f"{i:02d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[:60]


def arm_numbers(tr: Trace, i: int, det: int) -> dict[str, Any]:
    """Per-layer patch-norm statistics, the norm map and CLS-attention numbers of image ``i``."""
    pn = tr.norms[i, :, tr.patch_slice]
    d: dict[str, Any] = {
        "max_patch_norm": pn.amax(-1).tolist(),
        "median_patch_norm": pn.median(-1).values.tolist(),
        "norm_ratio": norm_ratio(tr.norms[i], tr.num_prefix_tokens, tr.num_registers).tolist(),
        "norm_map": tr.norm_map(det)[i].tolist(),
    }
    if tr.num_registers:
        d["register_norm"] = tr.norms[i, :, -tr.num_registers:].amax(-1).tolist()
    last = tr.norms.shape[1] - 1
    if last in tr.attention and tr.num_prefix_tokens:
        a = tr.attention[last][i, :, 0, :].mean(0)
        d["cls_attention_entropy"] = float(-(a * a.clamp_min(1e-12).log()).sum())
        d["cls_attention_top5_mass"] = float(a.topk(min(5, a.numel())).values.sum())
    return d
