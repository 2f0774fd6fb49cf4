"""Unsupervised object discovery with LOST (Simeoni et al., BMVC 2021), scored by CorLoc.

Reference: valeoai/LOST, ``main_lost.py`` (protocol), ``object_discovery.py`` (``lost``,
``patch_scoring``, ``detect_box``) and ``datasets.py`` (ground truth, ``bbox_iou``).

Each image runs at its full resolution, normalised and then zero-padded at the bottom and right
up to a multiple of the patch size (LOST's protocol; timm ViTs are switched to dynamic image
size for it, Hugging Face models interpolate their position embeddings). From the last layer's
keys of the *patch* tokens (CLS, trained registers and test-time registers excluded),
``A = K K^T``; the seed is the patch with the fewest positive similarities to the others; it is
expanded with those of the ``k`` lowest-degree patches that are positively similar to it; the
mask is the patches whose summed similarity to that set is positive; the box is the bounding
box of the mask's 4-connected component containing the seed, in pixels, its right and bottom
edges clipped to the image. CorLoc is the fraction of images whose box has IoU >= 0.5 with a
ground-truth box (LOST's IoU, :func:`ttreg.eval.metrics.box_iou`).

Deviations: ``resize=True`` squashes every image to the model's input size and scales the box
back (for models with a fixed position embedding, e.g. open_clip's own towers); LOST uses keys
of every token after CLS (its DINO models have no registers), here trained and test-time
registers are left out too; position embeddings are resampled by the host library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import wrap
from .arms import control_rows, make_arms, summarize_random
from .backbone import accepts_any_size, patch_features, preprocessing
from .datasets import BoxSample, load_rgb, resize as resize_image, to_tensor
from .metrics import corloc_hits
from .report import format_table


def lost(keys: torch.Tensor, grid: tuple[int, int], k_patches: int = 100,
         gram_bias: float = 0.0) -> dict[str, Any]:
    """LOST on one image's patch keys ``(P, D)`` laid out on ``grid`` = (rows, cols);
    ``gram_bias`` is added to every entry of the Gram matrix ``K K^T`` (the affinity bias Darcet
    et al. and the test-time-register authors sweep; 0 is LOST's own).

    Returns ``seed`` (patch index), ``seed_set`` (indices), ``mask`` ``(rows, cols)`` bool (the
    positive-similarity map), ``component`` (bool, the seed's connected component) and ``box``
    = (row0, col0, row1, col1) in patches, end-exclusive. The degree counts positive
    similarities to the *other* patches (``patch_scoring`` zeroes the diagonal); ties in degree go
    to the lowest index (LOST's ``argsort`` leaves them to the sort kernel).
    """
    k = keys.float()
    return lost_from_gram(k @ k.T + float(gram_bias), grid, k_patches)


def lost_from_gram(A: torch.Tensor, grid: tuple[int, int], k_patches: int = 100) -> dict[str, Any]:
    """:func:`lost` from the patches' affinity matrix ``A`` ``(P, P)`` (bias already added)."""
    from scipy import ndimage
    h, w = grid
    degree = (A > 0).sum(dim=1) - (A.diagonal() > 0).long()
    order = torch.sort(degree, stable=True).indices
    seed = int(order[0])
    potentials = order[: min(k_patches, len(order))]
    seed_set = potentials[A[seed, potentials] > 0]
    score = A[seed_set].sum(dim=0).reshape(h, w)
    mask = (score > 0).cpu().numpy()
    labels, _ = ndimage.label(mask)
    r, c = divmod(seed, w)
    comp = labels == labels[r, c] if labels[r, c] else np.zeros_like(mask)
    if not comp.any():                                            # seed outside the mask
        comp[r, c] = True
    rows, cols = np.nonzero(comp)
    box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    return {"seed": seed, "seed_set": seed_set.tolist(), "mask": mask, "component": comp,
            "box": box, "score": score.cpu().numpy()}


def box_to_pixels(box: Sequence[int], patch: tuple[int, int], scale: tuple[float, float] = (1.0, 1.0),
                  image_size: tuple[int, int] | None = None) -> np.ndarray:
    """A patch box (row0, col0, row1, col1) -> pixels (x1, y1, x2, y2), scaled by
    ``scale`` = (sy, sx) back to the original image and clipped to ``image_size`` = (h, w)."""
    r0, c0, r1, c1 = box
    ph, pw = patch
    sy, sx = scale
    out = np.array([c0 * pw * sx, r0 * ph * sy, c1 * pw * sx, r1 * ph * sy], dtype=np.float64)
    if image_size is not None:
        out[[0, 2]] = out[[0, 2]].clip(0, image_size[1])
        out[[1, 3]] = out[[1, 3]].clip(0, image_size[0])
    return out


def _load(sample: BoxSample, size, mean, std, patch, resize: bool):
    """(tensor (3, h, w), scale (sy, sx), original size (H, W)) for one image."""
    im = load_rgb(sample.path)
    H, W = im.height, im.width
    if resize:
        return to_tensor(resize_image(im, size), mean, std), (H / size[0], W / size[1]), (H, W)
    x = to_tensor(im, mean, std)                  # LOST: normalise, then pad with zeros
    ph, pw = patch
    x = F.pad(x, (0, math.ceil(W / pw) * pw - W, 0, math.ceil(H / ph) * ph - H))
    return x, (1.0, 1.0), (H, W)


def _batches(samples: Sequence[BoxSample], loaded_shape, batch_size: int) -> list[list[int]]:
    """Indices in batches of equal input shape (native sizes differ), in sample order within
    each shape."""
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(loaded_shape(s), []).append(i)
    return [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]


def _image_shape(sample: BoxSample, patch) -> tuple[int, int]:
    from PIL import Image
    with Image.open(sample.path) as im:
        W, H = im.size
    return math.ceil(H / patch[0]) * patch[0], math.ceil(W / patch[1]) * patch[1]


def check_native(model) -> None:
    """Raise a one-line ``ValueError`` if ``model`` cannot run images at their own size."""
    if not accepts_any_size(model):
        raise ValueError(f"{type(model).__name__} takes one input size only, and LOST runs each "
                         "image at its own size; pass --resize (resize=True) to squash images to "
                         "the model's input size (a deviation from LOST's protocol)")


#: the sweep the test-time-register authors ran (their README): key, query and value features of
#: each of the last four layers, L2-normalised, a bias on the Gram matrix over [-1, 0] (the grid
#: step is not stated; 0.1 here), the best configuration reported
AUTHORS_SWEEP = {"features": ("key", "query", "value"), "layers": (-4, -3, -2, -1), "normalize": True,
                 "gram_bias": tuple(round(-1 + 0.1 * i, 1) for i in range(11))}


@dataclass(frozen=True)
class LostConfig:
    """One configuration of a LOST sweep: which features of which block, L2-normalised or not,
    and the bias added to their Gram matrix."""

    feature: str
    layer: int
    normalize: bool = False
    gram_bias: float = 0.0

    def label(self) -> str:
        return f"{self.feature} @{self.layer}{' L2' if self.normalize else ''} bias {self.gram_bias:+g}"


def sweep_configs(num_layers: int, features: Sequence[str] = ("key",), layers: Sequence[int] = (-1,),
                  normalize: bool = False, gram_bias: Sequence[float] = (0.0,)) -> list[LostConfig]:
    """Every combination, in order (layers as block indexes); a one-line ``ValueError`` for a
    feature, block or bias that cannot be used."""
    from .backbone import QKV
    bad = [f for f in features if f not in QKV]
    if bad or not features:
        raise ValueError(f"features must be among {', '.join(QKV)}, got {', '.join(bad) or 'none'}")
    blocks = []
    for l in layers:
        if not -num_layers <= int(l) < num_layers:
            raise ValueError(f"layer {l} does not exist: the model has {num_layers} blocks")
        if int(l) % num_layers not in blocks:
            blocks.append(int(l) % num_layers)
    biases = [float(b) for b in gram_bias]
    if not biases or not all(math.isfinite(b) for b in biases):
        raise ValueError(f"gram_bias must be finite numbers, got {list(gram_bias)}")
    return [LostConfig(f, l, bool(normalize), b) for l in blocks for f in dict.fromkeys(features)
            for b in dict.fromkeys(biases)]


def evaluate_lost(model, samples: Sequence[BoxSample], neurons, *, k_patches: int = 100,
                  resize: bool = False, features: Sequence[str] = ("key",),
                  layers: Sequence[int] = (-1,), normalize: bool = False,
                  gram_bias: Sequence[float] = (0.0,), control_seeds: Sequence[int] = (0, 1, 2),
                  num_registers: int | Sequence[int] = 1, preset: str = "paper", bias=None, batch_size: int = 16,
                  keep_boxes: bool = False, progress: bool = False,
                  print_table: bool = True) -> dict[str, Any]:
    """CorLoc of LOST for each arm (plain, test-time registers, random-neuron control).

    Images run at full resolution, zero-padded to a multiple of the patch size (LOST's
    protocol; batched by padded size), or, with ``resize``, squashed to the model's input size
    with the box scaled back (a deviation, for models that take one size only).

    By default LOST's own features (last-layer keys, unnormalised, no bias). ``features``
    (``key``/``query``/``value``), ``layers``, ``normalize`` (L2 per patch) and ``gram_bias``
    (added to the Gram matrix) make a sweep over every combination (:data:`AUTHORS_SWEEP` is the
    authors'); each arm then reports every configuration's CorLoc and its best, **chosen on the
    evaluated images**, as the authors did.
    """
    ad = wrap(model)
    configs = sweep_configs(ad.num_layers, features, layers, normalize, gram_bias)
    if not resize:
        check_native(model)
    size, mean, std = preprocessing(model)
    patch = ad.patch_size
    p = ad.parameter()
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=num_registers,
                     preset=preset, bias=bias)
    blocks = list(dict.fromkeys(c.layer for c in configs))
    feats_used = list(dict.fromkeys(c.feature for c in configs))
    boxes = {a.name: [[None] * len(samples) for _ in configs] for a in arms}
    shape = (lambda s: tuple(size)) if resize else (lambda s: _image_shape(s, patch))
    batches = _batches(samples, shape, batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="LOST", unit="batch")
    with torch.no_grad(), ad.any_size():
        for idx in batches:
            loaded = [_load(samples[i], size, mean, std, patch, resize) for i in idx]
            x = torch.stack([l[0] for l in loaded]).to(p.device, p.dtype)
            for arm in arms:
                with arm.context(model):
                    feats, grid = patch_features(model, x, blocks, feats_used)
                for j, (i, (_, scale, orig)) in enumerate(zip(idx, loaded)):
                    grams = {}
                    for key, f in feats.items():
                        f = f[j].float()
                        f = F.normalize(f, dim=-1) if normalize else f
                        grams[key] = f @ f.T
                    for ci, c in enumerate(configs):
                        res = lost_from_gram(grams[(c.layer, c.feature)] + c.gram_bias, grid, k_patches)
                        box = box_to_pixels(res["box"], patch, scale, orig)
                        boxes[arm.name][ci][i] = box if resize else box.astype(np.int64)  # LOST: integers
    gts = [s.boxes for s in samples]
    per_arm = {}
    for arm in arms:
        hits = [corloc_hits(b, gts) for b in boxes[arm.name]]
        scores = [float(h.mean()) for h in hits]
        best = max(range(len(configs)), key=lambda ci: (scores[ci], -ci))   # first of equals
        per_arm[arm.name] = {"images": len(hits[best]), "corloc": scores[best], "setup": arm.describe()}
        if len(configs) > 1:
            per_arm[arm.name]["best"] = configs[best].label()
            per_arm[arm.name]["sweep"] = {c.label(): sc for c, sc in zip(configs, scores)}
        if keep_boxes:
            per_arm[arm.name]["boxes"] = [b.tolist() for b in boxes[arm.name][best]]
            per_arm[arm.name]["hits"] = hits[best].tolist()
    sweep = len(configs) > 1
    result = {
        "experiment": "lost",
        "protocol": {"reference": "valeoai/LOST main_lost.py, object_discovery.lost" + (
                         "; the sweep of nickjiang2378/test-time-registers' README" if sweep else ""),
                     "deviations": ([f"images resized to {size[0]}x{size[1]} (LOST: full resolution, "
                                     "zero-padded to a multiple of the patch size)"] if resize else []),
                     "selection": (f"each arm's CorLoc is the best of {len(configs)} configurations, "
                                   "chosen on the evaluated images (as the authors did; not a "
                                   "held-out choice)") if sweep else "one configuration (LOST's own)"},
        "config": {"k_patches": k_patches, "resize": resize, "num_registers": num_registers,
                   "preset": preset, "control_seeds": list(control_seeds),
                   "features": feats_used, "layers": blocks, "normalize": bool(normalize),
                   "gram_bias": list(dict.fromkeys(float(b) for b in gram_bias)),
                   "configurations": [c.label() for c in configs],
                   "input_size": list(size) if resize else "native, zero-padded to the patch size"},
        "neurons": arms[1].describe()["neurons"] if len(arms) > 1 else [],
        "arms": per_arm,
        "random": summarize_random(per_arm, ["corloc"]),
    }
    if print_table:
        print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    rows = control_rows(result)
    for r in rows:
        c = r["corloc"]
        r["corloc_pct"] = {**c, "mean": 100 * c["mean"], "ci95": 100 * c["ci95"]} if isinstance(c, dict) else 100 * c
    sweep = len(result["config"].get("configurations", [])) > 1
    title = "LOST object discovery (CorLoc, IoU >= 0.5" + \
        (", images resized: a deviation" if result["config"]["resize"] else ", native resolution") + \
        (f"; best of {len(result['config']['configurations'])} configurations per arm, chosen on the "
         "evaluated images)" if sweep else ")")
    cols = [("arm", "arm"), ("preset", "preset"), ("images", "images"), ("corloc_pct", "CorLoc %")]
    out = format_table(rows, cols + ([("best", "best configuration")] if sweep else []),
                       title=title, digits=1)
    if not sweep:
        return out
    arms = [k for k, v in result["arms"].items() if v["setup"]["kind"] != "random"]
    grid = [{"config": c, **{a: 100 * result["arms"][a]["sweep"][c] for a in arms}}
            for c in result["config"]["configurations"]]
    return out + "\n\n" + format_table(grid, [("config", "configuration")] + [(a, a) for a in arms],
                                        title="CorLoc % of every configuration", digits=1)
