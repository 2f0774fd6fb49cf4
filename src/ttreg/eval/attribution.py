"""Text-to-image attribution of a vision-language model, scored against object boxes.

The paper shows this result qualitatively only (LLaVA-Llama-3-8B, 100 register neurons in its
CLIP tower: attribution maps without the artifact tokens, benchmark average unchanged); it gives
no protocol or number. ttreg scores the maps with the two standard localisation scores of
attribution maps:

* **pointing game** (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016):
  a hit when the map's maximum falls inside a box of the named object (no tolerance margin here,
  the map is at patch resolution: the centre of the maximal cell is tested);
* **energy in box** (Wang et al., "Score-CAM", CVPR-W 2020): the share of the map's mass inside
  the union of the object's boxes.

For every image and every object class in it (VOC ``<name>`` / COCO category), the prompt
``template`` names the object and the answer ``answer_template`` is attributed (given, so every
arm attributes the same tokens; ``answer_template=None`` attributes each arm's own greedy
answer). Maps are :func:`ttreg.attribution` maps (mean over the answer tokens, the chosen
language-model layers and heads) on the image's patch grid. Arms: ``plain``, ``registers``
(test-time registers in the tower), ``zeroed`` (register neurons zeroed, nothing appended) and
``bias`` (the attention-bias form, when a fitted bias is given or the neuron set carries one),
and the random-neuron control ``random-<s>`` (:mod:`ttreg.eval.arms`: the registers edit on
random neurons of the same layers, same per-layer counts, one arm per seed ``s``). Each arm also
reports the share of its attribution mass on the plain tower's outlier patches. Means over the
(image, object) pairs with a 95% percentile bootstrap interval over the pairs, and the paired
difference of every arm to ``plain``; the control summarised as ``random``: each pair's scores
averaged over the draws, bootstrapped over the pairs the same way, with the draws' own means and
their t interval under ``draws``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..attribution import attribution
from ..register_neurons import as_register_neurons
from .arms import control_rows, make_arms
from .datasets import BoxSample, load_rgb
from .report import bootstrap_ci, format_table, mean_ci

DEFAULT_TEMPLATE = "Where is the {name} in the image?"
DEFAULT_ANSWER = "The {name}."
METRICS = ("pointing", "energy", "outlier_share")


def pairs_of(samples: Sequence[BoxSample]) -> list[tuple[BoxSample, str, np.ndarray]]:
    """``(sample, class name, boxes of that class)`` for every class named in every image."""
    out = []
    for s in samples:
        if len(s.labels) != len(s.boxes):
            raise ValueError(f"{s.path}: the annotations name no class for its boxes; attribution "
                             "needs the object's name for the prompt (VOC <name>, COCO categories)")
        for name in dict.fromkeys(s.labels):
            keep = [i for i, l in enumerate(s.labels) if l == name]
            out.append((s, name, np.asarray(s.boxes, dtype=np.float64)[keep]))
    if not out:
        raise ValueError("no annotated objects to prompt for")
    return out


def box_coverage(boxes: np.ndarray, size: tuple[int, int], grid: tuple[int, int], sub: int = 8) -> torch.Tensor:
    """``(rows, cols)``: the share of each grid cell inside the union of ``boxes`` (pixels
    ``x1, y1, x2, y2`` on an image of ``size`` = (h, w)), from ``sub x sub`` points a cell."""
    rows, cols = grid
    H, W = size
    ys = (torch.arange(rows * sub, dtype=torch.float64) + 0.5) / (rows * sub) * H
    xs = (torch.arange(cols * sub, dtype=torch.float64) + 0.5) / (cols * sub) * W
    b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    inside = ((xs[None, None, :] >= b[:, 0, None, None]) & (xs[None, None, :] <= b[:, 2, None, None])
              & (ys[None, :, None] >= b[:, 1, None, None]) & (ys[None, :, None] <= b[:, 3, None, None]))
    union = inside.any(0).double()                                       # (rows*sub, cols*sub)
    return union.reshape(rows, sub, cols, sub).mean((1, 3))


def localisation(heat: torch.Tensor, boxes: np.ndarray, size: tuple[int, int]) -> dict[str, float]:
    """Pointing-game hit (the maximal cell's centre inside a box) and energy in box of one map."""
    rows, cols = heat.shape
    r, c = divmod(int(heat.flatten().argmax()), cols)
    H, W = size
    cy, cx = (r + 0.5) / rows * H, (c + 0.5) / cols * W
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    hit = bool(((b[:, 0] <= cx) & (cx <= b[:, 2]) & (b[:, 1] <= cy) & (cy <= b[:, 3])).any())
    cover = box_coverage(b, size, (rows, cols))
    total = float(heat.double().sum())
    energy = float((heat.double() * cover).sum()) / total if total > 0 else float("nan")
    return {"pointing": float(hit), "energy": energy}


def _boot(vals: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    """``{metric: {"mean", "ci95": [lo, hi], "n"}}`` of ``(pairs, len(METRICS))`` values."""
    boot = bootstrap_ci(np.nan_to_num(vals, nan=0.0), resamples=resamples, seed=seed)
    return {m: {"mean": boot["mean"][k], "ci95": [boot["ci95"][0][k], boot["ci95"][1][k]], "n": len(vals)}
            for k, m in enumerate(METRICS)}


def evaluate_attribution(model, processor, samples: Sequence[BoxSample], neurons, *,
                         template: str = DEFAULT_TEMPLATE, answer_template: str | None = DEFAULT_ANSWER,
                         layers=None, heads="mean", num_registers: int | Sequence[int] = 1,
                         preset: str = "paper", bias=None, control_seeds: Sequence[int] = (),
                         batch_size: int = 8, max_new_tokens: int = 8,
                         resamples: int = 1000, seed: int = 0, progress: bool = False,
                         print_table: bool = True) -> dict[str, Any]:
    """Pointing game and energy in box of ``model``'s text-to-image attribution on ``samples``
    (images with named boxes), for the arms plain, registers, zeroed, (with a fitted attention
    ``bias``, or a neuron set that carries one) bias, and ``random-<s>`` for ``s`` in
    ``control_seeds`` (:func:`ttreg.eval.arms.make_arms`: the registers edit on random neurons of
    the same layers, same per-layer counts); see the module docstring. ``num_registers`` a list
    of counts: one registers arm per count, no zeroed arm or controls (the ablation)."""
    for t, what in ((template, "template"), (answer_template, "answer_template")):
        if t is not None and "{name}" not in t:
            raise ValueError(f"{what} {t!r} must name the object with {{name}}")
    pairs = pairs_of(samples)
    rn = as_register_neurons(neurons)
    bias = bias if bias is not None else rn.attention_bias
    ablation = not isinstance(num_registers, int)
    arms = make_arms(model, rn, control_seeds=control_seeds, num_registers=num_registers, preset=preset,
                     zeroed=not ablation, random_zeroed=False, bias=bias if len(rn) else None)
    scores: dict[str, list[dict[str, float]]] = {a.name: [] for a in arms}
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="attribution", unit="batch")
    config_layers = None
    for batch in batches:
        images = [load_rgb(s.path) for s, _, _ in batch]
        prompts = [template.format(name=n) for _, n, _ in batch]
        answers = None if answer_template is None else [answer_template.format(name=n) for _, n, _ in batch]
        plain_out = None
        for arm in arms:
            with arm.context(model):
                a = attribution(model, processor, images, prompts, answers, layers=layers, heads=heads,
                                max_new_tokens=max_new_tokens)
            plain_out = a.outlier_tokens if plain_out is None else plain_out
            config_layers = a.layers
            share = a.mass_on(plain_out)
            maps = a.map()
            for j, (im, (_, _, boxes)) in enumerate(zip(images, batch)):
                row = localisation(maps[j], boxes, (im.height, im.width))
                row["outlier_share"] = float(share[j])
                if answer_template is None:
                    row["answer"] = a.answers[j]
                scores[arm.name].append(row)
    values = {a.name: np.array([[r[m] for m in METRICS] for r in scores[a.name]], dtype=np.float64)
              for a in arms}
    per_arm = {a.name: {"pairs": len(values[a.name]), "setup": a.describe(),
                        **_boot(values[a.name], resamples, seed)} for a in arms}
    base = values["plain"]
    differences = {a.name: _boot(values[a.name] - base, resamples, seed) for a in arms[1:]}
    random = [a.name for a in arms if a.kind == "random"]
    summary = None
    if random:
        # the control as one arm: each pair's scores averaged over the draws, bootstrapped over the
        # pairs like every arm; "draws": the draws' means with a t interval over the draws
        pooled = np.mean([values[n] for n in random], axis=0)
        summary = {**_boot(pooled, resamples, seed),
                   "draws": {m: mean_ci([per_arm[n][m]["mean"] for n in random]) for m in METRICS}}
        differences["random"] = _boot(pooled - base, resamples, seed)
    result = {
        "experiment": "attribution",
        "protocol": {"reference": "pointing game (Zhang et al., ECCV 2016) and energy in box "
                                  "(Wang et al., Score-CAM, CVPR-W 2020) on ttreg.attribution maps",
                     "paper": "reported qualitatively only (LLaVA-Llama-3-8B figure); no protocol to follow",
                     "deviations": ["maps at patch resolution: the pointing game tests the centre of "
                                    "the maximal cell, with no tolerance margin"]},
        "config": {"template": template, "answer_template": answer_template,
                   "layers": config_layers, "heads": heads, "num_registers": num_registers,
                   "preset": preset, "control_seeds": [int(s) for s in control_seeds],
                   "bootstrap_resamples": resamples, "seed": seed,
                   "images": len(samples), "pairs": len(pairs)},
        "neurons": [list(p) for p in rn.neurons],
        "arms": per_arm,
        "random": summary,
        "differences_to_plain": differences,
    }
    if answer_template is None:
        result["answers"] = {name: [r["answer"] for r in rows] for name, rows in scores.items()}
    if print_table:
        print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    rows = control_rows(result, first="pairs")
    return format_table(rows, [("arm", "arm"), ("pairs", "pairs"), ("pointing", "pointing game"),
                               ("energy", "energy in box"), ("outlier_share", "mass on outliers")],
                        title="text-to-image attribution (means, 95% bootstrap interval over pairs)")


__all__ = ["evaluate_attribution", "localisation", "box_coverage", "pairs_of", "table",
           "DEFAULT_TEMPLATE", "DEFAULT_ANSWER"]
