"""Unsupervised object discovery with LOST (Simeoni et al., BMVC 2021), scored by CorLoc.

From the last layer's keys of the *patch* tokens (CLS, trained registers and test-time
registers excluded), ``A = K K^T``; the seed is the patch with the fewest positive similarities;
it is expanded with those of the ``k`` lowest-degree patches that are positively similar to it;
the mask is the patches whose summed similarity to that set is positive; the box is the
bounding box of the mask's 4-connected component containing the seed, in pixels. CorLoc is the
fraction of images whose box has IoU >= 0.5 with a ground-truth box.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..adapters import wrap
from .arms import make_arms, summarize_random
from .backbone import patch_keys, preprocessing
from .datasets import BoxSample, load_rgb, resize, to_tensor
from .metrics import corloc_hits
from .report import draws, format_table


def lost(keys: torch.Tensor, grid: tuple[int, int], k_patches: int = 100) -> dict[str, Any]:
    """LOST on one image's patch keys ``(P, D)`` laid out on ``grid`` = (rows, cols).

    Returns ``seed`` (patch index), ``seed_set`` (indices), ``mask`` ``(rows, cols)`` bool (the
    positive-similarity map), ``component`` (bool, the seed's connected component) and ``box``
    = (row0, col0, row1, col1) in patches, end-exclusive. Ties in degree go to the lowest index.
    """
    from scipy import ndimage
    h, w = grid
    k = keys.float()
    A = k @ k.T                                                    # (P, P)
    degree = (A > 0).sum(dim=1)
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


def _load(sample: BoxSample, size, mean, std, patch, native: bool):
    """(tensor (3, h, w), scale (sy, sx), original size (H, W))."""
    im = load_rgb(sample.path)
    H, W = im.height, im.width
    if native:                       # LOST's own protocol: full resolution, cropped to patches
        h, w = H - H % patch[0], W - W % patch[1]
        return to_tensor(im.crop((0, 0, w, h)), mean, std), (1.0, 1.0), (H, W)
    return to_tensor(resize(im, size), mean, std), (H / size[0], W / size[1]), (H, W)


def evaluate_lost(model, samples: Sequence[BoxSample], neurons, *, k_patches: int = 100,
                  native: bool = False, control_seeds: Sequence[int] = (0, 1, 2),
                  num_registers: int = 1, preset: str = "paper", batch_size: int = 16,
                  keep_boxes: bool = False, progress: bool = False,
                  print_table: bool = True) -> dict[str, Any]:
    """CorLoc of LOST for each arm (plain, test-time registers, random-neuron control).

    Images are resized to the model's input size and boxes scaled back (default), or, with
    ``native``, run at full resolution cropped to a multiple of the patch size (LOST's protocol;
    needs a model that accepts any size).
    """
    ad = wrap(model)
    if native and hasattr(model, "dynamic_img_size") and not model.dynamic_img_size:
        raise ValueError("native resolution needs a model that accepts any input size "
                         "(timm: dynamic_img_size=True); drop --native to resize instead")
    size, mean, std = preprocessing(model)
    patch = ad.patch_size
    p = ad.parameter()
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=num_registers,
                     preset=preset)
    boxes: dict[str, list] = {a.name: [] for a in arms}
    step = 1 if native else batch_size
    starts = range(0, len(samples), step)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="LOST", unit="batch")
    with torch.no_grad():
        for i in starts:
            chunk = samples[i:i + step]
            loaded = [_load(s, size, mean, std, patch, native) for s in chunk]
            x = torch.stack([l[0] for l in loaded]).to(p.device, p.dtype)
            for arm in arms:
                with arm.context(model):
                    keys, grid = patch_keys(model, x)
                for j, (_, scale, orig) in enumerate(loaded):
                    res = lost(keys[j], grid, k_patches)
                    boxes[arm.name].append(box_to_pixels(res["box"], patch, scale, orig))
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
        "config": {"k_patches": k_patches, "native": native, "num_registers": num_registers,
                   "preset": preset, "control_seeds": list(control_seeds),
                   "input_size": None if native else list(size)},
        "neurons": arms[1].describe()["neurons"],
        "arms": per_arm,
        "random": summarize_random(per_arm, ["corloc"]),
    }
    if print_table:
        print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    rows = [{"arm": k, **v} for k, v in result["arms"].items() if not k.startswith("random-")]
    if result.get("random"):
        rows.append({"arm": f"random ({draws(result)})",
                     "images": rows[0]["images"], **result["random"]})
    for r in rows:
        c = r["corloc"]
        r["corloc_pct"] = {**c, "mean": 100 * c["mean"], "ci95": 100 * c["ci95"]} if isinstance(c, dict) else 100 * c
    return format_table(rows, [("arm", "arm"), ("images", "images"), ("corloc_pct", "CorLoc %")],
                        title="LOST object discovery (CorLoc, IoU >= 0.5)", digits=1)
