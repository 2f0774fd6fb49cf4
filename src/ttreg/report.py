"""``inspect_images``: figures and numbers for a few images, plain vs. test-time registers.

Runs two traces (plain, and with the given register neurons), then writes the PNGs of
:mod:`ttreg.viz` and ``inspect.json`` with the same numbers. Used by ``ttreg inspect`` and
``ttreg demo``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from . import viz
from .adapters import wrap
from .data import ImageSource
from .registers import test_time_registers
from .spec import RegisterNeurons, write_json_atomic
from .trace import Trace, trace


def inspect_images(model, transform, src: ImageSource, neurons: RegisterNeurons, out: Path, *,
                   layer: int = -1, num_registers: int = 1, preset: str = "paper",
                   num_neurons: int = 6, model_name: str = "") -> tuple[dict, list[Path]]:
    ad = wrap(model)
    p = ad.parameter()
    x = torch.stack([transform(src.image(i)) for i in range(len(src))]).to(p.device, p.dtype)
    L = ad.num_layers
    det = layer % L
    top = list(neurons.neurons[:num_neurons])
    plain = trace(model, x, attention=[L - 1], neurons=top)
    if len(neurons):
        with test_time_registers(model, neurons, num_registers=num_registers, preset=preset, check=False):
            reg = trace(model, x, attention=[L - 1], neurons=top)
    else:
        reg = plain
    mean, std = ad.mean_std()
    results: dict[str, Any] = {"model": model_name or ad.describe(), "detection_layer": det,
                               "num_registers": num_registers if len(neurons) else 0,
                               "preset": preset, "neurons": [list(n) for n in neurons.neurons],
                               "note": neurons.note, "images": []}
    out = Path(out)
    written: list[Path] = []
    for i, name in enumerate(src.names):
        stem = _stem(name, i)
        title = Path(name).name
        img = viz.denormalize(x[i], mean, std)
        written.append(viz.overview(img, plain, reg, i, det, title, out / f"{stem}_overview.png"))
        if plain.attention and plain.num_prefix_tokens:
            written.append(viz.heads(img, plain, reg, i, title, out / f"{stem}_heads.png"))
        if top:
            written.append(viz.neuron_maps(img, plain, reg, i, title, out / f"{stem}_neurons.png"))
        results["images"].append({"image": name, "figures": [w.name for w in written if w.name.startswith(stem)],
                                  "plain": arm_numbers(plain, i, det),
                                  "registers": arm_numbers(reg, i, det)})
    write_json_atomic(out / "inspect.json", results)
    return results, written


def _stem(name: str, i: int) -> str:
    base = Path(name).stem if ("/" in name or "." in name) and ":" not in name else name.split(":")[-1]
    return f"{i:02d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[:60]


def arm_numbers(tr: Trace, i: int, det: int) -> dict[str, Any]:
    """Per-layer patch-norm statistics, the norm map and CLS-attention numbers of image ``i``."""
    pn = tr.norms[i, :, tr.patch_slice]
    d: dict[str, Any] = {
        "max_patch_norm": pn.amax(-1).tolist(),
        "median_patch_norm": pn.median(-1).values.tolist(),
        "norm_ratio": (pn.amax(-1) / pn.median(-1).values).tolist(),
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
