"""``ttreg inspect --prompt``: text-to-image attribution figures and numbers for a VLM, plain vs
test-time registers.

For each image one figure, ``<stem>_attribution.png``: the image, the tower's patch-norm maps
(plain and with registers, same colour scale) beside the language model's attribution maps
(plain and with registers, same colour scale), each with a colour bar, the prompt and the
answer in the title. The numbers (:meth:`ttreg.attribution.Attribution.summary`: the answer, the
share of the answer's attention on the image, the share of that on the plain tower's outlier
patches, plain vs registers, and the maps) go into ``inspect.json`` under ``"attribution"``.
Nothing here is written directly: files are staged in the caller's :class:`ttreg.files.Outputs`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import viz
from .attribution import Attribution, attribution
from .data import ImageSource, display_name
from .files import Outputs
from .registers import test_time_registers
from .inspection import figure_stem
from .register_neurons import RegisterNeurons


def inspect_attribution(model, processor, src: ImageSource, neurons: RegisterNeurons, out: Path,
                        prompt: str, answer: str | None = None, *, num_registers: int = 1,
                        preset: str = "paper", layers=None, heads="mean", batch_size: int = 8,
                        outputs: Outputs) -> tuple[dict, list[Path]]:
    """Attribution figures for the images of ``src`` (staged in ``outputs``, named like
    ``inspect``'s other figures) and their numbers: ``({"config": ..., "images": [per image]},
    figure paths)``. The answer is ``answer``, or each image's greedy answer of the plain model,
    attributed in both arms."""
    viz.require_matplotlib()
    results: dict[str, Any] = {"config": {"prompt": prompt, "answer": answer, "num_registers": num_registers,
                                          "preset": preset, "heads": heads}, "images": []}
    written: list[Path] = []
    for start in range(0, len(src), batch_size):
        idx = list(range(start, min(start + batch_size, len(src))))
        images = [src.image(i).convert("RGB") for i in idx]
        plain = attribution(model, processor, images, prompt, answer, layers=layers, heads=heads)
        if len(neurons):
            with test_time_registers(model, neurons, num_registers=num_registers, preset=preset, check=False):
                reg = attribution(model, processor, images, prompt, plain.answer_ids, layers=layers, heads=heads)
        else:
            reg = plain
        results["config"].update(layers=plain.layers, tower_layer=plain.tower_layer)
        for b, i in enumerate(idx):
            name = display_name(src.names[i])
            stem = figure_stem(name, i)
            path = Path(out) / f"{stem}_attribution.png"
            written.append(figure(images[b], plain, reg, b, prompt, Path(name).name, path, outputs=outputs))
            results["images"].append({"image": name, "figure": path.name, "plain": plain.summary(b),
                                      "registers": reg.summary(b, reference=plain)})
    return results, written


def _first_view(a: Attribution, b: int) -> int:
    src = a.tokens.sources[b][a.tokens.valid[b]]
    src = src[src >= 0]
    return int(src.min()) // a.tokens.patches_per_view if len(src) else 0


def _overlay(ax, image: np.ndarray, heat: torch.Tensor, vmax: float, title: str):
    up = torch.nn.functional.interpolate(heat[None, None].float(), size=image.shape[:2], mode="nearest")[0, 0]
    ax.imshow(image)
    im = ax.imshow(up.numpy(), cmap="inferno", alpha=0.65, vmin=0, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return im


def figure(image, plain: Attribution, reg: Attribution, b: int, prompt: str, name: str, path,
           outputs: Outputs) -> Path:
    """One image: the tower's norm maps and the attribution maps, plain vs registers."""
    import matplotlib.pyplot as plt
    img = np.asarray(image, dtype=np.float32) / 255.0
    fig = plt.figure(figsize=(16, 4.6))
    gs = fig.add_gridspec(1, 8, width_ratios=[1, 1, 1, 0.06, 0.25, 1, 1, 0.06], wspace=0.15)
    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(img)
    ax.set_title(name, fontsize=9)
    ax.axis("off")
    v = _first_view(plain, b)
    grid = plain.tokens.grid
    n_p, n_r = plain.tower_norms[v].reshape(grid), reg.tower_norms[v].reshape(grid)
    vmax = float(max(n_p.max(), n_r.max()))
    rp, rr = float(n_p.max() / n_p.median()), float(n_r.max() / n_r.median())
    im = None
    for k, (m, what) in enumerate(((n_p, f"plain (max/median {rp:.1f})"),
                                   (n_r, f"test-time register (max/median {rr:.1f})"))):
        a = fig.add_subplot(gs[0, 1 + k])
        im = a.imshow(m.numpy(), cmap="inferno", vmin=0, vmax=vmax)
        a.set_title(f"tower patch norms, block {plain.tower_layer}\n{what}", fontsize=9)
        a.axis("off")
    fig.colorbar(im, cax=fig.add_subplot(gs[0, 3]), label="token norm")
    m_p, m_r = plain.map()[b], reg.map()[b]
    hi = float(max(m_p.max(), m_r.max()))
    share_p = float(plain.outlier_share[b])
    share_r = float(reg.mass_on(plain.outlier_tokens)[b])
    im = _overlay(fig.add_subplot(gs[0, 5]), img, m_p, hi,
                  f"attribution, plain\n{100 * share_p:.0f}% of it on the outlier patches")
    _overlay(fig.add_subplot(gs[0, 6]), img, m_r, hi,
             f"attribution, test-time register\n{100 * share_r:.0f}% on the same patches")
    fig.colorbar(im, cax=fig.add_subplot(gs[0, 7]), label="attention from the answer")
    layers = plain.layers
    which = f"LM layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"LM layer {layers[0]}"
    fig.suptitle(f"\u201c{prompt}\u201d \u2192 \u201c{plain.answers[b]}\u201d   ({which}, "
                 f"{'mean of heads' if plain.heads == 'mean' else 'heads ' + str(plain.heads)})",
                 fontsize=10, y=1.02)
    return viz.save_figure(fig, path, outputs=outputs)


__all__ = ["inspect_attribution", "figure"]
