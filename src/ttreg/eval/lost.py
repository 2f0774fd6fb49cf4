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
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import wrap
from ..sizes import dynamic_size
from .arms import control_rows, make_arms, summarize_random
from .backbone import accepts_any_size, patch_keys, preprocessing
from .datasets import BoxSample, load_rgb, resize as resize_image, to_tensor
from .metrics import corloc_hits
from .report import format_table


def lost(keys: torch.Tensor, grid: tuple[int, int], k_patches: int = 100) -> dict[str, Any]:
    """LOST on one image's patch keys ``(P, D)`` laid out on ``grid`` = (rows, cols).

    Returns ``seed`` (patch index), ``seed_set`` (indices), ``mask`` ``(rows, cols)`` bool (the
    positive-similarity map), ``component`` (bool, the seed's connected component) and ``box``
    = (row0, col0, row1, col1) in patches, end-exclusive. The degree counts positive
    similarities to the *other* patches (``patch_scoring`` zeroes the diagonal); ties in degree go
    to the lowest index (LOST's ``argsort`` leaves them to the sort kernel).
    """
    from scipy import ndimage
    h, w = grid
    k = keys.float()
    A = k @ k.T                                                    # (P, P)
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


def evaluate_lost(model, samples: Sequence[BoxSample], neurons, *, k_patches: int = 100,
                  resize: bool = False, control_seeds: Sequence[int] = (0, 1, 2),
                  num_registers: int = 1, preset: str = "paper", batch_size: int = 16,
                  keep_boxes: bool = False, progress: bool = False,
                  print_table: bool = True) -> dict[str, Any]:
    """CorLoc of LOST for each arm (plain, test-time registers, random-neuron control).

    Images run at full resolution, zero-padded to a multiple of the patch size (LOST's
    protocol; batched by padded size), or, with ``resize``, squashed to the model's input size
    with the box scaled back (a deviation, for models that take one size only).
    """
    ad = wrap(model)
    if not resize:
        check_native(model)
    size, mean, std = preprocessing(model)
    patch = ad.patch_size
    p = ad.parameter()
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=num_registers,
                     preset=preset)
    boxes: dict[str, list] = {a.name: [None] * len(samples) for a in arms}
    shape = (lambda s: tuple(size)) if resize else (lambda s: _image_shape(s, patch))
    batches = _batches(samples, shape, batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="LOST", unit="batch")
    with torch.no_grad(), dynamic_size(model):
        for idx in batches:
            loaded = [_load(samples[i], size, mean, std, patch, resize) for i in idx]
            x = torch.stack([l[0] for l in loaded]).to(p.device, p.dtype)
            for arm in arms:
                with arm.context(model):
                    keys, grid = patch_keys(model, x)
                for j, (i, (_, scale, orig)) in enumerate(zip(idx, loaded)):
                    res = lost(keys[j], grid, k_patches)
                    box = box_to_pixels(res["box"], patch, scale, orig)
                    boxes[arm.name][i] = box if resize else box.astype(np.int64)  # LOST: integers
    gts = [s.boxes for s in samples]
    per_arm = {}
    for arm in arms:
        hits = corloc_hits(boxes[arm.name], gts)
        per_arm[arm.name] = {"images": len(hits), "corloc": float(hits.mean()), "setup": arm.describe()}
        if keep_boxes:
            per_arm[arm.name]["boxes"] = [b.tolist() for b in boxes[arm.name]]
            per_arm[arm.name]["hits"] = hits.tolist()
    result = {
        "experiment": "lost",
        "protocol": {"reference": "valeoai/LOST main_lost.py, object_discovery.lost",
                     "deviations": ([f"images resized to {size[0]}x{size[1]} (LOST: full resolution, "
                                     "zero-padded to a multiple of the patch size)"] if resize else [])},
        "config": {"k_patches": k_patches, "resize": resize, "num_registers": num_registers,
                   "preset": preset, "control_seeds": list(control_seeds),
                   "input_size": list(size) if resize else "native, zero-padded to the patch size"},
        "neurons": arms[1].describe()["neurons"],
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
    title = "LOST object discovery (CorLoc, IoU >= 0.5" + \
        (", images resized: a deviation)" if result["config"]["resize"] else ", native resolution)")
    return format_table(rows, [("arm", "arm"), ("images", "images"), ("corloc_pct", "CorLoc %")],
                        title=title, digits=1)
