"""``ttreg inspect --prompt``: text-to-image attribution of a VLM for the inspect report, plain
vs test-time registers.

:func:`inspect_attribution` runs :func:`ttreg.attribution` on each image twice (plain, and with
the register neurons in the tower, the plain run's answer attributed in both) and returns, per
image, the numbers for ``inspect.json`` (:meth:`ttreg.attribution.Attribution.summary`: the
answer, the share of the answer's attention on the image, the share of that on the plain tower's
outlier patches, plain vs registers, and the maps) and an :class:`AttributionPanel`: what
:func:`ttreg.viz.overview` draws in the overview figure's attribution row, beside the tower's norm
maps. Nothing here writes a file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .attribution import Attribution, attribution
from .data import ImageSource, display_name
from .registers import test_time_registers
from .register_neurons import RegisterNeurons


@dataclass
class AttributionPanel:
    """One image's attribution row of the overview figure: the image as the VLM's processor
    got it, the maps (mean over the answer tokens, layers and heads) plain and with registers,
    the share of each on the plain tower's outlier patches (and what a uniform map would put
    there), and the texts of the title."""

    image: np.ndarray                 # (H, W, 3) in [0, 1]
    plain: torch.Tensor               # (rows, cols)
    registers: torch.Tensor
    share_plain: float
    share_registers: float
    uniform_share: float
    image_mass_plain: float
    image_mass_registers: float
    outlier_tokens: int               # image tokens carrying the plain tower's outlier patches
    prompt: str
    answer: str
    what: str                         # "LM layers 0-3, mean of heads"


def _what(a: Attribution) -> str:
    which = f"LM layers {a.layers[0]}-{a.layers[-1]}" if len(a.layers) > 1 else f"LM layer {a.layers[0]}"
    return f"{which}, {'mean of heads' if a.heads == 'mean' else 'heads ' + str(a.heads)}"


def panel(image, plain: Attribution, reg: Attribution, b: int, prompt: str) -> AttributionPanel:
    """Row ``b`` of the two runs as an :class:`AttributionPanel` (``image``: the PIL image)."""
    out = plain.outlier_tokens
    return AttributionPanel(
        image=np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0,
        plain=plain.map()[b], registers=reg.map()[b],
        share_plain=float(plain.mass_on(out)[b]), share_registers=float(reg.mass_on(out)[b]),
        uniform_share=float(out[b].sum() / plain.tokens.valid[b].sum().clamp_min(1)),
        image_mass_plain=float(plain.image_mass()[b]), image_mass_registers=float(reg.image_mass()[b]),
        outlier_tokens=int(out[b].sum()), prompt=prompt, answer=plain.answers[b], what=_what(plain))


def inspect_attribution(model, processor, src: ImageSource, neurons: RegisterNeurons, prompt: str,
                        answer: str | None = None, *, num_registers: int = 1, preset: str = "paper",
                        layers=None, heads="mean", batch_size: int = 8) -> dict[str, Any]:
    """``{"config": ..., "images": [{"image", "plain", "registers", "panel"}]}`` for the images
    of ``src``: ``plain``/``registers`` the numbers for ``inspect.json``, ``panel`` the
    :class:`AttributionPanel` of the overview figure. The answer is ``answer``, or each image's
    greedy answer of the plain model, attributed in both arms."""
    results: dict[str, Any] = {"config": {"prompt": prompt, "answer": answer, "num_registers": num_registers,
                                          "preset": preset, "heads": heads}, "images": []}
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
            results["images"].append({"image": display_name(src.names[i]), "plain": plain.summary(b),
                                      "registers": reg.summary(b, reference=plain),
                                      "panel": panel(images[b], plain, reg, b, prompt)})
    return results


__all__ = ["inspect_attribution", "AttributionPanel", "panel"]
