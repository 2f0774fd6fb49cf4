"""Linear probes on frozen features, plain vs test-time registers: image classification,
semantic segmentation and monocular depth, mean ± 95% CI over seeds.

Default protocol: DINOv2's (facebookresearch/dinov2).

* classification -- ``dinov2/eval/linear.py``: inputs are ``create_linear_input``'s: the class
  token of the last 1 or 4 blocks (each through the final norm, ``get_intermediate_layers``),
  with or without the mean patch token of the last block; one linear layer per (blocks,
  avgpool, learning rate) -- weights N(0, 0.01), bias 0 -- trained with SGD, momentum 0.9, no
  weight decay, cosine schedule to 0, learning rates ``lr * batch / 256`` from the 13-value grid;
  the head with the best top-1 on the selection split wins (first on ties);
* segmentation -- ``dinov2/eval/segmentation/models/decode_heads/linear_head.py`` (``BNHead``):
  BatchNorm + a 1x1 linear layer on the last block's patch tokens (final norm applied), logits
  upsampled bilinearly to the label and trained with cross-entropy at pixel level; the best mIoU
  wins;
* depth -- ``dinov2/hub/depthers.py`` + ``dinov2/hub/depth/decode_heads.py`` (linear ``BNHead``):
  the last block's patch tokens with the class token concatenated to each (no final norm),
  upsampled x4, a 1x1 linear layer to 256 depth bins spread uniformly over ``(min, max)``, the
  "linear" bin normalisation (ReLU + 0.1, divide by the sum), depth = expected bin centre,
  clamped to the range, trained with the scale-invariant log loss of
  ``dinov2/eval/depth/models/losses/sigloss.py``; the lowest RMSE wins.

Differences, stated in every result's ``protocol``: features are computed once per arm and cached
(no training augmentation, except ``geometry="dinov2"``'s cached RandomResizedCrop + flip views;
segmentation images resized to the model's input size and trained on labels resized alike,
nearest; depth images at their own size, centre-padded, when they share one size; dense scores
always at label resolution); the dense heads are trained with the same SGD and learning-rate grid as the
classifier (DINOv2's dense schedules live in configs outside its repository); the head is chosen
on the evaluation split by default as ``linear.py`` does (``select_on="holdout"`` chooses on
part of the training split instead). ``quick=True`` keeps ttreg's fast probe: one linear layer
on standardised features (class token + mean patch token of the last block; patch tokens for
dense tasks) trained with AdamW. ``protocol="dvt"``: the Denoising-ViT dense protocol the
paper's ADE20k / NYUd numbers come from, in :mod:`ttreg.eval.dense` (augmented crops through the
frozen backbone, metrics at label resolution, native-size depth).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters import wrap
from ..sizes import at_size
from .arms import Arm, make_arms
from .backbone import block_tokens, model_fingerprint, preprocessing
from .heads import DEPTH_BINS, DepthHead, SegmentationHead
from .datasets import (load_depth, load_mask, load_rgb, resize, resize_center_crop, resize_target,
                       split_indices, to_tensor)
from .metrics import confusion_matrix, mean_iou, pixel_accuracy
from .report import format_table, mean_ci

TASKS = ("classification", "segmentation", "depth")
#: dinov2/eval/linear.py's grid (before scaling by batch / 256)
LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
#: at most this many augmented views per training image by default (``--geometry dinov2``)
MAX_TRAIN_VIEWS = 10


# --- ttreg's quick probe ---------------------------------------------------------------------------
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
    """The quick probe: a linear classifier (cross-entropy) or regressor (squared error) trained
    with AdamW on mini-batches; ``seed`` fixes the initialisation and the batch order."""
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


# --- DINOv2's protocol: training with a learning-rate grid ------------------------------------------
def batch_indices(n: int, batch_size: int, iterations: int, seed: int) -> torch.Tensor:
    """``(iterations, batch_size)`` sample indices from an endless stream of shuffled epochs
    (DINOv2's infinite sampler with ``drop_last``)."""
    g = torch.Generator().manual_seed(int(seed))
    need = iterations * batch_size
    epochs = [torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))]
    return torch.cat(epochs)[:need].reshape(iterations, batch_size)


def train_sgd(head: nn.Module, loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
              batches: torch.Tensor, lr: float) -> nn.Module:
    """Train ``head`` as DINOv2's linear eval does: SGD (momentum 0.9, no weight decay) with a
    cosine schedule from ``lr`` to 0 over ``len(batches)`` steps; ``loss_fn(head, idx)`` gives the
    loss of one batch of sample indices. Returns the head in eval mode, frozen."""
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0, foreach=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(batches), eta_min=0)
    head.train()
    for idx in batches:
        loss = loss_fn(head, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval().requires_grad_(False)


def select_best(scores: dict[str, float], higher_is_better: bool = True) -> str:
    """The key of the best score; the first one wins a tie (``evaluate_linear_classifiers``
    keeps a head only if it beats the best so far)."""
    best = None
    for k, v in scores.items():
        if best is None or (v > scores[best] if higher_is_better else v < scores[best]):
            best = k
    return best


def linear_input(feats: torch.Tensor, n_blocks: int, avgpool: bool) -> torch.Tensor:
    """DINOv2's ``create_linear_input`` on cached features ``(N, n + 1, D)`` (class tokens of
    the last ``n`` blocks, oldest first, then the last block's mean patch token): the class
    tokens of the last ``n_blocks`` concatenated, then the mean patch token if ``avgpool``."""
    n = feats.shape[1] - 1
    out = feats[:, n - n_blocks:n].reshape(len(feats), -1)
    if avgpool:
        out = torch.cat([out, feats[:, n]], dim=-1)
    return out.float()


def _scaled(lr: float, batch_size: int) -> float:
    return lr * batch_size / 256.0


def _name(lr: float, batch_size: int, **kw) -> str:
    """DINOv2's head name (``classifier_{n}_blocks_avgpool_{pool}_lr_...``) without its prefix,
    with the scaled rate written in full (``.5f`` merges 1e-5 and 2e-5 at batch 128)."""
    return "_".join([*(f"{k}_{v}" for k, v in kw.items()), f"lr_{_scaled(lr, batch_size):.6g}"])


def classify_grid(ftr, ytr, fsel, ysel, num_classes: int, *, seed: int = 0, iterations: int = 12500,
                  batch_size: int = 128, learning_rates: Sequence[float] = LEARNING_RATES,
                  n_last_blocks: Sequence[int] = (1, 4), avgpool: Sequence[bool] = (False, True)):
    """Train DINOv2's grid of linear classifiers on cached features ``ftr`` ``(N, n + 1, D)``
    (or ``(V, N, n + 1, D)``: ``V`` augmented views, pass ``k`` over the data reading view
    ``k mod V``) and choose by top-1 on ``(fsel, ysel)``. Returns ``(best name, {name: (head, n_blocks, avgpool)},
    {name: selection top-1})``."""
    views = ftr.dim() == 4                       # (V, N, n + 1, D): one augmented view per pass
    V, N = (ftr.shape[0], ftr.shape[1]) if views else (1, len(ftr))
    idx = batch_indices(N, batch_size, iterations, seed)
    # pass k over the training set reads view k mod V (a fresh crop per pass, as linear.py's
    # loader draws one per sample)
    view = (torch.arange(idx.numel()) // N % V).reshape(idx.shape)
    batches = torch.stack([idx, view], dim=1)    # (iterations, 2, batch)
    ce = nn.CrossEntropyLoss()
    heads, scores = {}, {}
    usable = [n for n in n_last_blocks if n <= ftr.shape[-2] - 1]
    for n in usable:
        for pool in avgpool:
            x = (torch.stack([linear_input(f, n, pool) for f in ftr]) if views
                 else linear_input(ftr, n, pool)[None])
            xs = linear_input(fsel, n, pool)
            for lr in learning_rates:
                g = torch.Generator().manual_seed(int(seed))
                head = nn.Linear(x.shape[-1], num_classes)
                with torch.no_grad():
                    head.weight.normal_(0.0, 0.01, generator=g)
                    head.bias.zero_()
                train_sgd(head, lambda h, b: ce(h(x[b[1], b[0]]), ytr[b[0]]), batches, _scaled(lr, batch_size))
                name = _name(lr, batch_size, blocks=n, avgpool=pool)
                with torch.no_grad():
                    scores[name] = float((head(xs).argmax(-1) == ysel).float().mean())
                heads[name] = (head, n, pool)
    return select_best(scores), heads, scores


def sig_loss(pred: torch.Tensor, target: torch.Tensor, max_depth: float | None = None) -> torch.Tensor:
    """DINOv2's ``SigLoss``: over valid pixels (target > 0, <= ``max_depth``),
    ``g = log(pred + 1e-3) - log(target + 1e-3)``, loss ``sqrt(var(g) + 0.15 * mean(g)^2)``."""
    valid = target > 0
    if max_depth is not None:
        valid &= target <= max_depth
    g = torch.log(pred[valid] + 1e-3) - torch.log(target[valid] + 1e-3)
    return torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)


def _seg_confusion(head, feats, masks, num_classes, ignore_index, chunk: int = 16) -> np.ndarray:
    """Confusion of ``head``'s predictions upsampled (bilinear) to the labels: ``masks`` an
    ``(N, H, W)`` array, or a list of label maps at their native sizes (label resolution, as
    mmseg scores)."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    with torch.no_grad():
        for i in range(0, len(feats), chunk):
            logits = head(feats[i:i + chunk])
            if isinstance(masks, np.ndarray):
                up = F.interpolate(logits, size=masks.shape[1:], mode="bilinear", align_corners=False)
                conf += confusion_matrix(up.argmax(1).numpy(), masks[i:i + chunk], num_classes, ignore_index)
                continue
            for j, m in enumerate(masks[i:i + chunk]):
                up = F.interpolate(logits[j:j + 1], size=np.shape(m), mode="bilinear", align_corners=False)
                conf += confusion_matrix(up.argmax(1).numpy(), m, num_classes, ignore_index)
    return conf


def segment_grid(ftr, mtr, fsel, msel, num_classes: int, *, ignore_index: int = 255, seed: int = 0,
                 iterations: int = 1000, batch_size: int = 16,
                 learning_rates: Sequence[float] = LEARNING_RATES):
    """Train one :class:`SegmentationHead` per learning rate (pixel-level cross-entropy on
    labels ``(N, H, W)``) and choose by mIoU on the selection split."""
    batches = batch_indices(len(ftr), batch_size, iterations, seed)
    labels = torch.from_numpy(np.asarray(mtr)).long()

    def loss(head, idx):
        logits = F.interpolate(head(ftr[idx]), size=labels.shape[1:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, labels[idx], ignore_index=ignore_index)
    heads, scores = {}, {}
    for lr in learning_rates:
        head = SegmentationHead(ftr.shape[-1], num_classes, torch.Generator().manual_seed(int(seed)))
        train_sgd(head, loss, batches, _scaled(lr, batch_size))
        name = _name(lr, batch_size)
        scores[name] = mean_iou(_seg_confusion(head, fsel, msel, num_classes, ignore_index))
        heads[name] = head
    return select_best(scores), heads, scores


def _depth_rmse(pred_fn, feats, cls, depths, min_depth, max_depth, clamp: bool = False,
                chunk: int = 16) -> float:
    """Mean over images of the RMSE over valid pixels (min < depth < max) of ``pred_fn``'s maps
    resized bilinearly to the targets (then clamped to the range with ``clamp``); ``depths`` an
    ``(N, H, W)`` array or a list of maps at their native sizes (label resolution)."""
    errs = []
    with torch.no_grad():
        for i in range(0, len(feats), chunk):
            pred = pred_fn(feats[i:i + chunk], None if cls is None else cls[i:i + chunk])
            groups = ([(pred, depths[i:i + chunk])] if isinstance(depths, np.ndarray) else
                      [(pred[j:j + 1], np.asarray(d)[None]) for j, d in enumerate(depths[i:i + chunk])])
            for pr, d in groups:
                pr = F.interpolate(pr, size=d.shape[1:], mode="bilinear", align_corners=False)[:, 0]
                if clamp:
                    pr = pr.clamp(min_depth, max_depth)
                d = np.asarray(d, dtype=np.float64)                           # (B, H, W), per image
                valid = (d > min_depth) & (d < max_depth) & np.isfinite(d)
                sq = np.where(valid, pr.numpy().astype(np.float64) - np.where(valid, d, 0.0), 0.0) ** 2
                count = valid.sum(axis=(1, 2))
                errs.append(np.sqrt(sq.sum(axis=(1, 2))[count > 0] / count[count > 0]))
    errs = np.concatenate(errs) if errs else np.zeros(0)
    return float(errs.mean()) if len(errs) else float("nan")


def depth_grid(ftr, ctr, dtr, fsel, csel, dsel, *, min_depth: float = 1e-3, max_depth: float = 10.0,
               seed: int = 0, iterations: int = 1000, batch_size: int = 16,
               learning_rates: Sequence[float] = LEARNING_RATES):
    """Train one :class:`DepthHead` per learning rate (SigLoss on depth ``(N, H, W)`` at full
    resolution) and choose by RMSE on the selection split."""
    batches = batch_indices(len(ftr), batch_size, iterations, seed)
    target = torch.from_numpy(np.asarray(dtr)).float()

    def loss(head, idx):
        pred = F.interpolate(head(ftr[idx], ctr[idx]), size=target.shape[1:], mode="bilinear",
                             align_corners=False)[:, 0]
        return sig_loss(pred, target[idx], max_depth)
    heads, scores = {}, {}
    for lr in learning_rates:
        torch.manual_seed(int(seed))                       # the 1x1 layer's default init
        head = DepthHead(ftr.shape[-1], min_depth, max_depth)
        train_sgd(head, loss, batches, _scaled(lr, batch_size))
        name = _name(lr, batch_size)
        scores[name] = _depth_rmse(head, fsel, csel, dsel, min_depth, max_depth)
        heads[name] = head
    return select_best(scores, higher_is_better=False), heads, scores


def _image_size(path) -> tuple[int, int]:
    """An image file's (width, height) from its header."""
    from PIL import Image
    with Image.open(path) as im:
        return im.size


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


#: feature kinds: what each task's heads read (one cache file per kind and arm)
FEATURE_KINDS = {
    "global": "class token of the last 4 blocks + mean patch token of the last, final norm: (N, 5, D)",
    "patch": "patch tokens of the last block, final norm: (N, rows, cols, D) float16",
    "patch+cls": "patch tokens and class token of the last block, no final norm: "
                 "{'patches': (N, rows, cols, D) float16, 'cls': (N, D)}",
    "token:<name>": "one token of the last block (single_token), final norm, twice: (N, 2, D)",
}


#: single tokens a classification probe can read (the paper's Table 1)
TOKENS = ("cls", "center", "outlier", "register", "trained-register")


def single_token(model, x: torch.Tensor, token: str) -> torch.Tensor:
    """One token per image from the last block, through the final norm (DINOv2 normalises CLS,
    patches and registers alike): ``(B, D)``. ``cls``; ``center``: the patch at the grid's centre
    (row ``rows // 2``, column ``cols // 2``); ``outlier``: the patch of largest norm before the
    norm; ``register``: the first test-time register; ``trained-register``: the first trained
    register (the prefix token after CLS). A one-line ``ValueError`` where the token is missing."""
    if token not in TOKENS:
        raise ValueError(f"token must be one of {', '.join(TOKENS)}, got {token!r}")
    ad = wrap(model)
    L, npre = ad.num_layers, ad.num_prefix_tokens
    rows, cols = ad.grid_size(x)
    y = ad.intermediates(x, [L - 1], split=False, registers=token == "register")[0]
    P = rows * cols
    if token == "register":
        if y.shape[1] <= npre + P:
            raise ValueError("--token register needs test-time registers: this arm has none")
        i = torch.full((len(x),), npre + P)
    elif token == "trained-register":
        if npre < 2:
            raise ValueError(f"--token trained-register needs a model with trained registers; "
                             f"{type(model).__name__} has {npre} prefix token(s)")
        i = torch.full((len(x),), 1)
    elif token == "cls":
        if npre < 1:
            raise ValueError(f"--token cls needs a class token; {type(model).__name__} has none")
        i = torch.zeros(len(x), dtype=torch.long)
    elif token == "center":
        i = torch.full((len(x),), npre + (rows // 2) * cols + cols // 2)
    else:
        i = npre + y[:, npre:npre + P].float().norm(dim=-1).argmax(dim=1).cpu()
    picked = y[torch.arange(len(x)), i.to(y.device)]
    return ad.final_norm()(picked)


def _features_of(model, x: torch.Tensor, kind: str, grid: tuple[int, int]):
    L = wrap(model).num_layers
    if kind.startswith("token:"):
        t = single_token(model, x, kind[len("token:"):]).float().cpu()
        return torch.stack([t, t], dim=1)                 # (N, 2, D): linear_input's layout, 1 block
    if kind == "global":
        layers = list(range(max(0, L - 4), L))
        toks = block_tokens(model, x, layers, norm=True)
        cls = [toks[l][0][:, 0] for l in layers]
        return torch.stack([*cls, toks[L - 1][1].mean(1)], dim=1).float().cpu()
    prefix, patches = block_tokens(model, x, [L - 1], norm=kind == "patch")[L - 1]
    patches = patches.reshape(len(x), *grid, -1).half().cpu()
    return patches if kind == "patch" else {"patches": patches, "cls": prefix[:, 0].float().cpu()}


#: DINOv2's evaluation geometry for classification (``dinov2/data/transforms.py``
#: ``make_classification_eval_transform``): Resize(256) (shorter side), CenterCrop(224)
DINOV2_RESIZE, DINOV2_CROP = 256, 224


def dinov2_eval_crop(im, resize_to: int = DINOV2_RESIZE, crop: int = DINOV2_CROP):
    """Resize the shorter side to ``resize_to`` (bicubic), then the central ``crop`` square."""
    im = resize_center_crop(im, (resize_to, resize_to))       # shorter side to 256, centre 256 x 256
    off = (resize_to - crop) // 2
    return im.crop((off, off, off + crop, off + crop))


def dinov2_train_crop(im, seed: int, crop: int = DINOV2_CROP):
    """DINOv2's training transform for linear probes (``dinov2/data/transforms.py``
    ``make_classification_train_transform``): torchvision's ``RandomResizedCrop(224,
    bicubic)`` (scale 0.08-1, ratio 3/4-4/3) then ``RandomHorizontalFlip(0.5)``, drawn from
    torch's generator seeded with ``seed`` (forked: the caller's random state is untouched)."""
    from torchvision import transforms as T
    tf = T.Compose([T.RandomResizedCrop(crop, interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(0.5)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return tf(im)


def view_seed(view: int, index: int) -> int:
    """The seed of training view ``view`` of image ``index`` (one fresh crop per pass)."""
    return 1_000_003 * (int(view) + 1) + int(index)


def extract_features(model, arm: Arm, paths: Sequence[Path], kind: str, *,
                     cache_dir=None, batch_size: int = 16, transform: Callable | None = None,
                     geometry: str = "model", view: int | None = None, progress: bool = False):
    """Frozen features of ``paths`` under ``arm``, of a kind in :data:`FEATURE_KINDS` (images
    resized to the model's input size for dense kinds, resized and centre-cropped -- or
    ``transform`` -- for ``global``; with ``geometry="dinov2"`` DINOv2's Resize(256) +
    CenterCrop(224), the model run at 224 px; with ``view`` as well, training view ``view``:
    :func:`dinov2_train_crop` seeded with :func:`view_seed` of the view and the image's index). Loaded from ``cache_dir`` when there, written
    there atomically otherwise."""
    ad = wrap(model)
    size, mean, std = preprocessing(model)
    if kind not in FEATURE_KINDS and not (kind.startswith("token:") and kind[6:] in TOKENS):
        raise ValueError(f"unknown feature kind {kind!r}")
    run_size = None
    if geometry == "dinov2" and view is not None and kind != "patch" and kind != "patch+cls":
        seeds = {Path(q): view_seed(view, i) for i, q in enumerate(paths)}
        tf = lambda im, q: to_tensor(dinov2_train_crop(im, seeds[Path(q)]), mean, std)
        geometry, run_size = ["dinov2-train", int(view), DINOV2_CROP, mean, std], (DINOV2_CROP, DINOV2_CROP)
    elif geometry == "dinov2" and kind != "patch" and kind != "patch+cls":
        tf = lambda im: to_tensor(dinov2_eval_crop(im), mean, std)
        geometry, run_size = ["dinov2", DINOV2_RESIZE, DINOV2_CROP, mean, std], (DINOV2_CROP, DINOV2_CROP)
    elif geometry == "native" and kind == "patch+cls":
        from .dense import center_pad
        tf = lambda im: center_pad(to_tensor(im, mean, std), ad.patch_size)
        run_size = tuple(tf(load_rgb(paths[0])).shape[-2:]) if len(paths) else None
        geometry = ["native-center-pad", mean, std]
    elif kind == "global" or kind.startswith("token:"):
        tf = transform or (lambda im: to_tensor(resize_center_crop(im, size), mean, std))
        geometry = ["center-crop", size, mean, std] if transform is None else transform_digest(transform)
    else:
        tf = lambda im: to_tensor(resize(im, size), mean, std)
        geometry = ["resize", size, mean, std]
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
    with torch.no_grad(), at_size(ad, run_size), arm.context(model):
        for i in starts:
            x = torch.stack([tf(load_rgb(q), q) if view is not None and geometry[0] == "dinov2-train"
                             else tf(load_rgb(q)) for q in paths[i:i + batch_size]]).to(p.device, p.dtype)
            chunks.append(_features_of(model, x, kind, tuple(ad.grid_size(x))))
    feats = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]} if isinstance(chunks[0], dict) \
        else torch.cat(chunks)
    if path is not None:
        from ..files import atomic_write
        atomic_write(path, lambda tmp: torch.save(feats, tmp))
    return feats


# --- dense targets at patch level (quick probe) -----------------------------------------------------
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
def _quick_classification(ftr, ytr, fva, yva, num_classes, seed, **fit) -> dict[str, float]:
    take = lambda f: torch.cat([f[:, -2], f[:, -1]], dim=-1)        # last class token + mean patch
    probe = fit_linear(take(ftr), ytr, num_outputs=num_classes, seed=seed, **fit)
    return {"top1": float((probe(take(fva)).argmax(-1) == yva).float().mean())}


def _quick_segmentation(ftr, mtr, fva, mva, num_classes, seed, ignore_index=255, **fit) -> dict[str, float]:
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


def _quick_depth(ftr, dtr, fva, dva, seed, min_depth=1e-3, max_depth=10.0, **fit) -> dict[str, float]:
    grid = tuple(ftr.shape[1:3])
    valid = lambda d: (d > min_depth) & (d < max_depth) & np.isfinite(d)
    target, has = patch_means(dtr, valid(dtr), grid)
    x = ftr.reshape(-1, ftr.shape[-1])
    keep = torch.from_numpy(has.reshape(-1))
    y = torch.from_numpy(target.reshape(-1)).float()
    probe = fit_linear(x[keep], y[keep], num_outputs=1, regression=True, seed=seed, **fit)

    def predict(f, _):
        return probe(f.reshape(-1, f.shape[-1])).reshape(*f.shape[:3], 1).permute(0, 3, 1, 2)
    return {"rmse": _depth_rmse(predict, fva, None, dva, min_depth, max_depth, clamp=True)}


def _dinov2_seed(task, feats, targets, tr, se, ev, num_classes, seed, opts,
                 train_views: torch.Tensor | None = None, native: Sequence | None = None) -> dict[str, Any]:
    """One seed of DINOv2's protocol: train the grid on ``tr`` (on ``train_views`` ``(V, N, ...)``,
    augmented, where given), choose on ``se``, score on ``ev`` -- dense tasks against ``native``
    (the targets at their own sizes) where given."""
    at = (lambda idx: targets[idx]) if native is None else (lambda idx: [native[i] for i in idx])
    grid = {k: opts[k] for k in ("iterations", "batch_size", "learning_rates")}
    ti, si, ei = (torch.from_numpy(i) for i in (tr, se, ev))
    if task == "classification":
        y = torch.from_numpy(targets)
        best, heads, sel = classify_grid(feats[ti] if train_views is None else train_views[:, ti], y[ti], feats[si], y[si], num_classes, seed=seed,
                                         n_last_blocks=opts["n_last_blocks"],
                                         avgpool=opts.get("avgpool", (False, True)), **grid)
        head, n, pool = heads[best]
        with torch.no_grad():
            top1 = float((head(linear_input(feats[ei], n, pool)).argmax(-1) == y[ei]).float().mean())
        out = {"top1": top1}
    elif task == "segmentation":
        best, heads, sel = segment_grid(feats[ti], targets[tr], feats[si], at(se), num_classes,
                                        ignore_index=opts["ignore_index"], seed=seed, **grid)
        conf = _seg_confusion(heads[best], feats[ei], at(ev), num_classes, opts["ignore_index"])
        out = {"miou": mean_iou(conf), "pixel_accuracy": pixel_accuracy(conf)}
    else:
        p, c = feats["patches"], feats["cls"]
        lo, hi = opts["min_depth"], opts["max_depth"]
        best, heads, sel = depth_grid(p[ti], c[ti], targets[tr], p[si], c[si], at(se),
                                      min_depth=lo, max_depth=hi, seed=seed, **grid)
        out = {"rmse": _depth_rmse(heads[best], p[ei], c[ei], at(ev), lo, hi)}
    return {**out, "selected": best, "selection_scores": sel}


def _splits(task, targets, n_train, n_items, has_val, val_fraction, select_on, holdout, seed):
    """(train, selection, evaluation) index arrays for one seed."""
    if has_val:
        tr, ev = np.arange(n_train), np.arange(n_train, n_items)
    elif task == "classification":
        tr, ev = split_indices(targets, val_fraction, seed)
    else:
        perm = np.random.default_rng(seed).permutation(n_items)
        nv = max(1, int(round(n_items * val_fraction)))
        tr, ev = np.sort(perm[nv:]), np.sort(perm[:nv])
    if select_on == "eval":
        return tr, ev, ev
    perm = np.random.default_rng(seed + 7919).permutation(tr)
    ns = max(1, int(round(len(tr) * holdout)))
    return np.sort(perm[ns:]), np.sort(perm[:ns]), ev


# --- the experiment -----------------------------------------------------------------------------------------------
def evaluate_probe(model, task: str, train: Sequence[tuple], val: Sequence[tuple] | None = None, *,
                   neurons, num_classes: int | None = None, seeds: Sequence[int] = (0, 1, 2),
                   val_fraction: float = 0.25, cache_dir=None, control_seeds: Sequence[int] = (),
                   num_registers: int = 1, preset: str = "paper", bias=None, batch_size: int = 16,
                   transform: Callable | None = None, ignore_index: int = 255,
                   reduce_zero_label: bool = False, depth_png_scale: float = 1000.0,
                   min_depth: float = 1e-3, max_depth: float = 10.0, quick: bool = False,
                   select_on: str = "eval", holdout: float = 0.1,
                   learning_rates: Sequence[float] = LEARNING_RATES, iterations: int | None = None,
                   probe_batch_size: int | None = None, n_last_blocks: Sequence[int] = (1, 4),
                   steps: int = 300, lr: float = 3e-2, weight_decay: float = 1e-4,
                   token: str | None = None, geometry: str = "model", train_views: int | None = None,
                   protocol: str = "dinov2",
                   crop_size: tuple[int, int] | None = None, progress: bool = False,
                   print_table: bool = True) -> dict[str, Any]:
    """Linear probe ``task`` for each arm; mean ± 95% CI over ``seeds`` (see the module
    docstring for the protocol).

    ``train``/``val``: ``[(image path, target)]`` where target is a class index
    (classification), a mask file (segmentation) or a depth file (depth). Without ``val``, each
    seed draws its own ``val_fraction`` split of ``train``. ``reduce_zero_label``: label 0 is
    "ignore" and classes are shifted down by one (ADE20k). DINOv2 protocol: ``iterations``
    (default 12500 for classification -- ``linear.py``'s 10 epochs of 1250 -- and 2000 for the
    dense heads), ``probe_batch_size`` (128 / 16), ``learning_rates``, ``select_on``
    (``"eval"``: choose on the reported split, as ``linear.py``; ``"holdout"``: on a ``holdout``
    share of the training split). ``quick``: ttreg's AdamW probe (``steps``, ``lr``,
    ``weight_decay``). ``token`` (classification, one of :data:`TOKENS`): a linear probe on that
    single token (the paper's Table 1); ``register`` runs only the arms that have one.
    ``geometry`` (classification): ``model`` (resize and centre-crop to the model's input size)
    or ``dinov2`` (DINOv2's Resize(256) + CenterCrop(224), the model run at 224 px; the heads
    train on augmented views, RandomResizedCrop(224) + flip as ``linear.py``'s training
    transform: ``train_views`` of them per image, by default one per pass the schedule makes over
    the training images, at most :data:`MAX_TRAIN_VIEWS`).
    ``protocol="dvt"`` (segmentation, depth): the Denoising-ViT configs the paper's ADE20k and
    NYUd numbers come from (:mod:`ttreg.eval.dense`): the frozen backbone on augmented crops,
    AdamW, sliding-window / flip-averaged testing, metrics at label resolution; ``iterations``
    shortens it, ``crop_size`` changes its crop (scales and windows in proportion).
    """
    if protocol not in ("dinov2", "dvt"):
        raise ValueError(f"protocol must be 'dinov2' or 'dvt', got {protocol!r}")
    if protocol == "dvt":
        if task == "classification" or quick or token is not None:
            raise ValueError("--protocol dvt is for segmentation and depth (without --quick or --token)")
        return _evaluate_dvt(model, task, train, val, neurons=neurons, num_classes=num_classes,
                             seeds=seeds, val_fraction=val_fraction, control_seeds=control_seeds,
                             num_registers=num_registers, preset=preset, bias=bias,
                             ignore_index=ignore_index, reduce_zero_label=reduce_zero_label,
                             depth_png_scale=depth_png_scale, min_depth=min_depth, max_depth=max_depth,
                             iterations=iterations, batch_size=probe_batch_size, crop_size=crop_size,
                             progress=progress, print_table=print_table)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if token is not None and (task != "classification" or token not in TOKENS):
        raise ValueError(f"token must be one of {', '.join(TOKENS)} and is for classification only")
    if geometry not in ("model", "dinov2") or (geometry == "dinov2" and task != "classification"):
        raise ValueError(f"geometry must be 'model', or 'dinov2' for classification, got {geometry!r}")
    if select_on not in ("eval", "holdout"):
        raise ValueError(f"select_on must be 'eval' or 'holdout', got {select_on!r}")
    items = list(train) + list(val or [])
    n_train = len(train)
    paths = [Path(p) for p, _ in items]
    size = preprocessing(model)[0]
    native, pad_native = None, False
    if task == "classification":
        targets = np.asarray([int(t) for _, t in items])
        num_classes = num_classes or int(targets.max()) + 1
    elif task == "segmentation":
        native = []
        for _, t in items:
            m = load_mask(t)
            if reduce_zero_label:
                m = np.where(m == 0, ignore_index, m - 1)
            native.append(m)
        targets = np.stack([resize_target(m, size) for m in native])   # training (nearest)
        if num_classes is None:
            present = targets[targets != ignore_index]
            num_classes = int(present.max()) + 1 if present.size else 1
    else:
        native = [load_depth(t, depth_png_scale) for _, t in items]
        # DINOv2's depther runs each image at its own size, centre-padded to the patch size
        # (CenterPadding): possible with cached features when the images share one size
        pad_native = not quick and len({_image_size(p) for p in paths}) == 1
        targets = np.stack(native if pad_native else [resize_target(d, size) for d in native])
    kind = {"classification": "global", "segmentation": "patch",
            "depth": "patch" if quick else "patch+cls"}[task]
    if token is not None:
        kind = f"token:{token}"
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=num_registers,
                     preset=preset, bias=bias)
    if token == "register":
        arms = [a for a in arms if a.kind in ("registers", "random") and a.num_registers > 0]
        if not arms:
            raise ValueError("--token register needs test-time registers (--num-registers >= 1)")
    dense = task != "classification"
    opts = {"iterations": iterations or (2000 if dense else 12500),
            "batch_size": probe_batch_size or (16 if dense else 128),
            "learning_rates": list(learning_rates),
            "n_last_blocks": [1] if token else list(n_last_blocks),
            "avgpool": [False] if token else [False, True],
            "ignore_index": ignore_index, "min_depth": min_depth, "max_depth": max_depth}
    fit = {"steps": steps, "lr": lr, "weight_decay": weight_decay}
    augment = geometry == "dinov2" and not quick
    n_views = 0
    if augment:
        n_fit = n_train if val else max(1, round(len(items) * (1 - val_fraction)))
        passes = math.ceil(opts["iterations"] * opts["batch_size"] / n_fit)
        n_views = int(train_views) if train_views else min(passes, MAX_TRAIN_VIEWS)
        opts["train_views"] = n_views
    per_arm: dict[str, Any] = {}
    for arm in arms:
        feats = extract_features(model, arm, paths, kind, cache_dir=cache_dir, batch_size=batch_size,
                                 transform=transform if kind == "global" or token else None,
                                 geometry="native" if pad_native else geometry, progress=progress)
        views = None
        if augment:
            # DINOv2's training transform: one fresh RandomResizedCrop + flip per pass over the
            # training images (the images a split can train on: the train split, or all)
            train_paths = paths[:n_train] if val else paths
            views = torch.stack([extract_features(model, arm, train_paths, kind, cache_dir=cache_dir,
                                                  batch_size=batch_size, geometry="dinov2", view=v,
                                                  progress=progress) for v in range(n_views)])
        runs = []
        for seed in seeds:
            tr, se, ev = _splits(task, targets, n_train, len(items), bool(val), val_fraction,
                                 "eval" if quick else select_on, holdout, seed)
            if not quick:
                runs.append(_dinov2_seed(task, feats, targets, tr, se, ev, num_classes, seed, opts,
                                         train_views=views, native=native if dense else None))
            elif task == "classification":
                y = torch.from_numpy(targets)
                ti, ei = torch.from_numpy(tr), torch.from_numpy(ev)
                runs.append(_quick_classification(feats[ti], y[ti], feats[ei], y[ei], num_classes, seed, **fit))
            elif task == "segmentation":
                runs.append(_quick_segmentation(feats[torch.from_numpy(tr)], targets[tr],
                                                feats[torch.from_numpy(ev)], targets[ev],
                                                num_classes, seed, ignore_index, **fit))
            else:
                runs.append(_quick_depth(feats[torch.from_numpy(tr)], targets[tr],
                                         feats[torch.from_numpy(ev)], targets[ev], seed,
                                         min_depth=min_depth, max_depth=max_depth, **fit))
        metrics = [k for k in runs[0] if k not in ("selected", "selection_scores")]
        per_arm[arm.name] = {k: mean_ci([r[k] for r in runs]) for k in metrics}
        if not quick:
            per_arm[arm.name]["selected"] = [r["selected"] for r in runs]
            per_arm[arm.name]["selection_scores"] = [r["selection_scores"] for r in runs]
        per_arm[arm.name]["setup"] = arm.describe()
    protocol = {"name": "quick" if quick else "dinov2",
                "reference": "ttreg (AdamW on standardised features)" if quick else {
                    "classification": "facebookresearch/dinov2 dinov2/eval/linear.py",
                    "segmentation": "facebookresearch/dinov2 dinov2/eval/segmentation/models/"
                                    "decode_heads/linear_head.py (BNHead)",
                    "depth": "facebookresearch/dinov2 dinov2/hub/depthers.py, dinov2/hub/depth/"
                             "decode_heads.py (BNHead), dinov2/eval/depth/models/losses/sigloss.py"}[task],
                "deviations": (["features cached: no training augmentation"] if not augment else [])
                + [("images at their own size, centre-padded to the patch size (DINOv2's "
                    "CenterPadding)" if pad_native else "images resized to the model's input size")
                   if geometry == "model" else
                   (f"training augmentation (RandomResizedCrop 224 + flip) as {n_views} cached "
                    f"views, pass k reading view k mod {n_views} (linear.py draws a fresh crop for "
                    "every sample)" if augment else
                    "evaluation geometry (Resize 256, CenterCrop 224) for training images too: "
                    "--quick reads cached evaluation features")]
                + ([] if quick or not dense else ["scored at label resolution (predictions upsampled "
                                                  "to each label's native size); trained on labels "
                                                  "resized to the features' input (nearest)"
                                                  if not pad_native else "scored at label resolution"])
                + ([] if quick or not dense else ["dense heads trained with linear.py's SGD and "
                                                  "learning-rate grid (DINOv2's dense schedules "
                                                  "are not in its repository)"])
                + ([] if quick or select_on == "eval" else [f"head chosen on {holdout:.0%} of the "
                                                            "training split"])}
    result = {
        "experiment": "probe", "task": task, "protocol": protocol,
        "config": {"seeds": list(seeds), "num_classes": num_classes, "images": len(items),
                   "train_images": n_train if val else None, "val_fraction": None if val else val_fraction,
                   "num_registers": num_registers, "preset": preset, "control_seeds": list(control_seeds),
                   "token": token, "geometry": geometry, **({"fit": fit} if quick else {"select_on": select_on, **opts})},
        "neurons": next((a.describe()["neurons"] for a in arms if a.kind == "registers"), []),
        "arms": per_arm,
    }
    if print_table:
        print(table(result))
    return result


def _evaluate_dvt(model, task, train, val, *, neurons, num_classes, seeds, val_fraction, control_seeds,
                  num_registers, preset, bias, ignore_index, reduce_zero_label, depth_png_scale,
                  min_depth, max_depth, iterations, batch_size, crop_size, progress,
                  print_table) -> dict[str, Any]:
    """:func:`evaluate_probe` with ``protocol="dvt"``: one head per arm and seed, trained on the
    training split and scored on the evaluation split (no learning-rate grid: the configs fix
    one rate)."""
    from dataclasses import replace
    from . import dense
    items = list(train) + list(val or [])
    paths = [Path(p) for p, _ in items]
    targets = dense.load_targets(task, items, reduce_zero_label=reduce_zero_label,
                                 ignore_index=ignore_index, depth_png_scale=depth_png_scale)
    if task == "segmentation" and num_classes is None:
        present = np.concatenate([t[t != ignore_index].reshape(-1) for t in targets])
        num_classes = int(present.max()) + 1 if present.size else 1
    ref = dense.CONFIGS[task]
    cfg = ref.at_crop(crop_size).for_iterations(iterations)
    if batch_size:
        cfg = replace(cfg, batch_size=int(batch_size))
    if task == "depth":
        cfg = replace(cfg, min_depth=float(min_depth), max_depth=float(max_depth))
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=num_registers,
                     preset=preset, bias=bias)
    per_arm: dict[str, Any] = {}
    for arm in arms:
        runs = []
        for seed in seeds:
            tr, _, ev = _splits(task, None, len(train), len(items), bool(val), val_fraction, "eval", 0.1, seed)
            head = dense.train_dvt(model, arm, task, [paths[i] for i in tr], [targets[i] for i in tr], cfg,
                                   num_classes=num_classes or 0, ignore_index=ignore_index, seed=seed,
                                   progress=progress)
            runs.append(dense.score_dvt(model, arm, task, head, [paths[i] for i in ev],
                                        [targets[i] for i in ev], cfg, num_classes=num_classes or 0,
                                        ignore_index=ignore_index))
        per_arm[arm.name] = {k: mean_ci([r[k] for r in runs]) for k in runs[0]}
        per_arm[arm.name]["setup"] = arm.describe()
    protocol = {"name": "dvt", "reference": dense.REFERENCE[task], "deviations": dense.describe(cfg, ref)}
    config = {k: v for k, v in cfg.__dict__.items()
              if task == "segmentation" or k not in ("scale", "ratio_range", "cat_max_ratio", "stride")}
    if task == "segmentation":
        for k in ("rotate", "sig_warmup", "gradient_weight", "min_depth", "max_depth", "bins"):
            config.pop(k)
    result = {
        "experiment": "probe", "task": task, "protocol": protocol,
        "config": {"seeds": list(seeds), "num_classes": num_classes, "images": len(items),
                   "train_images": len(train) if val else None, "val_fraction": None if val else val_fraction,
                   "num_registers": num_registers, "preset": preset, "control_seeds": list(control_seeds),
                   "dvt": config},
        "neurons": next((a.describe()["neurons"] for a in arms if a.kind == "registers"), []),
        "arms": per_arm,
    }
    if print_table:
        print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    depth = [("rmse", "RMSE (lower is better)")]
    if result["protocol"]["name"] == "dvt":
        depth += [("abs_rel", "AbsRel"), ("delta1", "δ1")]
    cols = {"classification": [("top1", "top-1")],
            "segmentation": [("miou", "mIoU"), ("pixel_accuracy", "pixel acc")],
            "depth": depth}[result["task"]]
    rows = [{"arm": k, **v, "preset": (v.get("setup") or {}).get("preset") or "-"}
            for k, v in result["arms"].items()]
    n = len(result["config"]["seeds"])
    return format_table(rows, [("arm", "arm"), ("preset", "preset"), *cols], digits=4,
                        title=f"Linear probe: {result['task']}, {result['protocol']['name']} protocol "
                              f"(mean ± 95% CI over {n} seeds)")
