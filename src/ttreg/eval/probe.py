"""Linear probes on frozen features, plain vs test-time registers: image classification
(CLS + mean patch token, DINOv2's protocol), semantic segmentation (a linear classifier per
patch, scored by mIoU at pixel level) and monocular depth (a linear regressor per patch, scored
by RMSE). Several seeds (training order and initialisation, and the split when no validation
set is given), reported as mean ± 95% CI. Features are cached on disk per model fingerprint,
arm and image list, so each arm runs the model once.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import wrap
from .arms import Arm, make_arms
from .backbone import model_fingerprint, preprocessing, token_features
from .datasets import (load_depth, load_mask, load_rgb, resize, resize_center_crop, resize_target,
                       split_indices, to_tensor)
from .metrics import confusion_matrix, mean_iou, pixel_accuracy
from .report import format_table, mean_ci

TASKS = ("classification", "segmentation", "depth")


# --- the probe ----------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """A linear map on standardised features (targets standardised too for regression)."""

    x_mean: torch.Tensor
    x_std: torch.Tensor
    linear: torch.nn.Linear
    y_mean: torch.Tensor | None = None
    y_std: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear((x.float() - self.x_mean) / self.x_std)
        if self.y_mean is not None:
            out = out * self.y_std + self.y_mean
        return out


def fit_linear(x: torch.Tensor, y: torch.Tensor, *, num_outputs: int, regression: bool = False,
               seed: int = 0, steps: int = 300, lr: float = 3e-2, weight_decay: float = 1e-4,
               batch_size: int = 4096) -> LinearProbe:
    """Train a linear classifier (cross-entropy) or regressor (squared error) with AdamW on
    mini-batches; ``seed`` fixes the initialisation and the batch order."""
    g = torch.Generator().manual_seed(int(seed))
    x = x.float()
    x_mean, x_std = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])
    xs = (x - x_mean) / x_std
    y_mean = y_std = None
    if regression:
        y = y.float().reshape(len(y), -1)
        y_mean, y_std = y.mean(0), y.std(0).clamp_min(1e-6) if len(y) > 1 else torch.ones(y.shape[1])
        y = (y - y_mean) / y_std
    lin = torch.nn.Linear(x.shape[1], num_outputs)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n = len(xs)
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=g) if n > batch_size else torch.arange(n)
        out = lin(xs[idx])
        loss = F.mse_loss(out, y[idx]) if regression else F.cross_entropy(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    lin.requires_grad_(False)
    return LinearProbe(x_mean, x_std, lin, y_mean, y_std)


# --- features, cached -------------------------------------------------------------------------------
def _files_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def transform_digest(transform: Callable) -> str:
    """What a transform does, as a hash of its output on a fixed test image (closures have no
    stable name)."""
    from PIL import Image
    yy, xx = np.mgrid[0:97, 0:131]
    arr = np.stack([xx * 255 // 130, yy * 255 // 96, (xx + yy) % 256], -1).astype(np.uint8)
    out = transform(Image.fromarray(arr))
    t = out.detach().float().cpu() if torch.is_tensor(out) else torch.as_tensor(np.asarray(out)).float()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.mul(1e4).round().numpy().tobytes()).hexdigest()[:16]


def feature_cache_key(model, arm: Arm, paths: Sequence[Path], kind: str, geometry: Any) -> str:
    """Model fingerprint + arm + image list (paths, sizes, mtimes) + feature kind + geometry."""
    blob = json.dumps([model_fingerprint(model), arm.key(), kind, geometry, _files_digest(paths)],
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def extract_features(model, arm: Arm, paths: Sequence[Path], kind: str, *,
                     cache_dir=None, batch_size: int = 16, transform: Callable | None = None,
                     progress: bool = False) -> torch.Tensor:
    """Frozen features of ``paths`` under ``arm``: ``kind="global"`` -> ``(N, 2D)`` (CLS and
    mean patch token), ``kind="patch"`` -> ``(N, rows, cols, D)`` float16 (images resized to
    the model's input size). Loaded from ``cache_dir`` when there."""
    ad = wrap(model)
    size, mean, std = preprocessing(model)
    if kind == "global":
        tf = transform or (lambda im: to_tensor(resize_center_crop(im, size), mean, std))
        geometry = ["center-crop", size, mean, std] if transform is None else transform_digest(transform)
    elif kind == "patch":
        tf = lambda im: to_tensor(resize(im, size), mean, std)
        geometry = ["resize", size, mean, std]
    else:
        raise ValueError(f"unknown feature kind {kind!r}")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{feature_cache_key(model, arm, paths, kind, geometry)}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
    p = ad.parameter()
    chunks = []
    starts = range(0, len(paths), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"features [{arm.name}]", unit="batch")
    with torch.no_grad(), arm.context(model):
        for i in starts:
            x = torch.stack([tf(load_rgb(q)) for q in paths[i:i + batch_size]]).to(p.device, p.dtype)
            prefix, patches = token_features(model, x)
            if kind == "global":
                chunks.append(torch.cat([prefix[:, 0], patches.mean(1)], dim=-1).float().cpu())
            else:
                rows, cols = ad.grid_size(x)
                chunks.append(patches.reshape(len(x), rows, cols, -1).half().cpu())
    feats = torch.cat(chunks)
    if path is not None:
        from ..files import atomic_write
        atomic_write(path, lambda tmp: torch.save(feats, tmp))
    return feats


# --- dense targets at patch level -----------------------------------------------------------------------
def patch_labels(masks: np.ndarray, grid: tuple[int, int], num_classes: int,
                 ignore_index: int = 255) -> np.ndarray:
    """Majority class of each patch ``(N, rows, cols)``; -1 where a patch has no valid pixel."""
    N, H, W = masks.shape
    rows, cols = grid
    pid = (np.arange(H)[:, None] * rows // H) * cols + (np.arange(W)[None, :] * cols // W)
    m = masks.reshape(N, -1).astype(np.int64)
    valid = (m != ignore_index) & (m >= 0) & (m < num_classes)
    P = rows * cols
    idx = (np.arange(N)[:, None] * P + pid.reshape(1, -1)) * num_classes + m
    counts = np.bincount(idx[valid], minlength=N * P * num_classes).reshape(N, P, num_classes)
    lab = counts.argmax(-1)
    lab[counts.sum(-1) == 0] = -1
    return lab.reshape(N, rows, cols)


def patch_means(depths: np.ndarray, valid: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the valid values in each patch ``(N, rows, cols)`` and whether it had any."""
    N, H, W = depths.shape
    rows, cols = grid
    pid = (np.arange(H)[:, None] * rows // H) * cols + (np.arange(W)[None, :] * cols // W)
    P = rows * cols
    idx = (np.arange(N)[:, None] * P + pid.reshape(1, -1)).reshape(-1)
    v = valid.reshape(-1)
    s = np.bincount(idx[v], weights=depths.reshape(-1)[v], minlength=N * P)
    c = np.bincount(idx[v], minlength=N * P)
    return (s / np.maximum(c, 1)).reshape(N, rows, cols), (c > 0).reshape(N, rows, cols)


def _upsample(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, rows, cols, K) patch predictions -> (N, K, H, W), bilinear."""
    return F.interpolate(pred.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False)


# --- one seed of each task -----------------------------------------------------------------------------------
def _score_classification(ftr, ytr, fva, yva, num_classes, seed, **fit) -> dict[str, float]:
    probe = fit_linear(ftr, ytr, num_outputs=num_classes, seed=seed, **fit)
    return {"top1": float((probe(fva).argmax(-1) == yva).float().mean())}


def _score_segmentation(ftr, mtr, fva, mva, num_classes, seed, ignore_index=255, **fit) -> dict[str, float]:
    grid = tuple(ftr.shape[1:3])
    lab = torch.from_numpy(patch_labels(mtr, grid, num_classes, ignore_index)).reshape(-1)
    x = ftr.reshape(-1, ftr.shape[-1])
    keep = lab >= 0
    probe = fit_linear(x[keep], lab[keep], num_outputs=num_classes, seed=seed, **fit)
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in range(0, len(fva), 64):
        f = fva[i:i + 64]
        logits = probe(f.reshape(-1, f.shape[-1])).reshape(*f.shape[:3], num_classes)
        pred = _upsample(logits, mva.shape[1:]).argmax(1).numpy()
        conf += confusion_matrix(pred, mva[i:i + 64], num_classes, ignore_index)
    return {"miou": mean_iou(conf), "pixel_accuracy": pixel_accuracy(conf)}


def _score_depth(ftr, dtr, fva, dva, seed, min_depth=1e-3, max_depth=10.0, **fit) -> dict[str, float]:
    grid = tuple(ftr.shape[1:3])
    valid = lambda d: (d > min_depth) & (d < max_depth) & np.isfinite(d)
    target, has = patch_means(dtr, valid(dtr), grid)
    x = ftr.reshape(-1, ftr.shape[-1])
    keep = torch.from_numpy(has.reshape(-1))
    y = torch.from_numpy(target.reshape(-1)).float()
    probe = fit_linear(x[keep], y[keep], num_outputs=1, regression=True, seed=seed, **fit)
    errs = []
    for i in range(0, len(fva), 64):
        f = fva[i:i + 64]
        pred = _upsample(probe(f.reshape(-1, f.shape[-1])).reshape(*f.shape[:3], 1), dva.shape[1:])[:, 0]
        pred = pred.clamp(min_depth, max_depth).numpy()
        for p, d in zip(pred, dva[i:i + 64]):
            v = valid(d)
            if v.any():
                errs.append(float(np.sqrt(np.mean((p[v] - d[v]) ** 2))))
    return {"rmse": float(np.mean(errs)) if errs else float("nan")}


# --- the experiment -----------------------------------------------------------------------------------------------
def evaluate_probe(model, task: str, train: Sequence[tuple], val: Sequence[tuple] | None = None, *,
                   neurons, num_classes: int | None = None, seeds: Sequence[int] = (0, 1, 2),
                   val_fraction: float = 0.25, cache_dir=None, control_seeds: Sequence[int] = (),
                   num_registers: int = 1, preset: str = "paper", batch_size: int = 16,
                   transform: Callable | None = None, ignore_index: int = 255,
                   reduce_zero_label: bool = False, depth_png_scale: float = 1000.0,
                   max_depth: float = 10.0, steps: int = 300, lr: float = 3e-2,
                   weight_decay: float = 1e-4, progress: bool = False,
                   print_table: bool = True) -> dict[str, Any]:
    """Linear probe ``task`` for each arm; mean ± 95% CI over ``seeds``.

    ``train``/``val``: ``[(image path, target)]`` where target is a class index
    (classification), a mask file (segmentation) or a depth file (depth). Without ``val``,
    each seed draws its own ``val_fraction`` split of ``train``. ``reduce_zero_label``: label 0
    is "ignore" and classes are shifted down by one (ADE20k).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    items = list(train) + list(val or [])
    n_train = len(train)
    paths = [Path(p) for p, _ in items]
    size = preprocessing(model)[0]
    if task == "classification":
        targets = np.asarray([int(t) for _, t in items])
        num_classes = num_classes or int(targets.max()) + 1
    elif task == "segmentation":
        masks = []
        for _, t in items:
            m = resize_target(load_mask(t), size)
            if reduce_zero_label:
                m = np.where(m == 0, ignore_index, m - 1)
            masks.append(m)
        targets = np.stack(masks)
        if num_classes is None:
            present = targets[targets != ignore_index]
            num_classes = int(present.max()) + 1 if present.size else 1
    else:
        targets = np.stack([resize_target(load_depth(t, depth_png_scale), size) for _, t in items])
    kind = "global" if task == "classification" else "patch"
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=num_registers,
                     preset=preset)
    fit = {"steps": steps, "lr": lr, "weight_decay": weight_decay}
    per_arm: dict[str, Any] = {}
    for arm in arms:
        feats = extract_features(model, arm, paths, kind, cache_dir=cache_dir, batch_size=batch_size,
                                 transform=transform if kind == "global" else None, progress=progress)
        runs = []
        for seed in seeds:
            if val:
                tr, va = np.arange(n_train), np.arange(n_train, len(items))
            elif task == "classification":
                tr, va = split_indices(targets, val_fraction, seed)
            else:
                perm = np.random.default_rng(seed).permutation(len(items))
                nv = max(1, int(round(len(items) * val_fraction)))
                tr, va = np.sort(perm[nv:]), np.sort(perm[:nv])
            ti, vi = torch.from_numpy(tr), torch.from_numpy(va)
            if task == "classification":
                y = torch.from_numpy(targets)
                runs.append(_score_classification(feats[ti], y[ti], feats[vi], y[vi], num_classes, seed, **fit))
            elif task == "segmentation":
                runs.append(_score_segmentation(feats[ti], targets[tr], feats[vi], targets[va],
                                                num_classes, seed, ignore_index, **fit))
            else:
                runs.append(_score_depth(feats[ti], targets[tr], feats[vi], targets[va], seed,
                                         max_depth=max_depth, **fit))
        per_arm[arm.name] = {k: mean_ci([r[k] for r in runs]) for k in runs[0]}
        per_arm[arm.name]["setup"] = arm.describe()
    result = {
        "experiment": "probe", "task": task,
        "config": {"seeds": list(seeds), "num_classes": num_classes, "images": len(items),
                   "train_images": n_train if val else None, "val_fraction": None if val else val_fraction,
                   "num_registers": num_registers, "preset": preset, "control_seeds": list(control_seeds),
                   **fit},
        "neurons": arms[1].describe()["neurons"],
        "arms": per_arm,
    }
    if print_table:
        print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    cols = {"classification": [("top1", "top-1")],
            "segmentation": [("miou", "mIoU"), ("pixel_accuracy", "pixel acc")],
            "depth": [("rmse", "RMSE (lower is better)")]}[result["task"]]
    rows = [{"arm": k, **v} for k, v in result["arms"].items()]
    n = len(result["config"]["seeds"])
    return format_table(rows, [("arm", "arm"), *cols], digits=4,
                        title=f"Linear probe: {result['task']} (mean ± 95% CI over {n} seeds)")
