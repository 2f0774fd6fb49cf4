"""Dense linear probes as the paper ran them: the Denoising-ViT evaluation configs
(Jiawei-Yang/Denoising-ViT ``evaluation/configs/vitb_ade20k_linear_config.py`` and
``vitb_nyu_linear_config.py``, mmseg 0.x and the Monocular-Depth-Estimation-Toolbox they build
on). The backbone is frozen and runs on every augmented crop (no feature cache).

Segmentation (ADE20k): the last block's patch tokens through the final norm (``norm=True``),
the image centre-padded to a multiple of the patch size (``CenterPadding``); mmseg's ``BNHead``
(BatchNorm + 1x1 conv, N(0, 0.01)); logits resized bilinearly to the crop; cross-entropy,
ignore 255, averaged over all pixels (mmseg's ``avg_non_ignore=False``). Training pipeline: ``Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))``
(keep ratio), ``RandomCrop(512, cat_max_ratio=0.75)``, ``RandomFlip(0.5)``, ``Normalize``,
``Pad(512, seg 255)``. AdamW (lr 1e-3, weight decay 1e-4), ``poly`` schedule (power 1, min 0)
with a linear warm-up of 1500 iterations from 1e-6; 40k iterations of batch 16. Test: the image
rescaled (keep ratio) to fit (2048, 512), ``slide`` inference (window 512, stride 341), logits
resized to the label's native size, mIoU (mean over classes that occur) at label resolution.

Depth (NYUd): the last block's patch tokens and class token through the final norm
(``final_norm=True``, ``output_cls_token=True``), the class token concatenated to each patch,
upsampled x4, a 1x1 conv to 256 bins spread uniformly over (1e-3, 10), the "linear" bin
normalisation; ``SigLoss`` (with its 100-call warm-up) + 0.5 x ``GradientLoss``. Training
pipeline: ``NYUCrop`` (rows 45:472, columns 43:608 of 480 x 640), ``RandomRotate(0.5, 2.5 deg)``,
``RandomFlip(0.5)``, ``RandomCrop(416 x 544)``. AdamW (lr 5e-3, weight decay 0.01, grad-norm
clip 35), cosine annealing to 1e-8 x lr with a linear warm-up of 12800 iterations from 1e-3;
38.4k iterations of batch 16. Test: the whole image at its native size, centre-padded, the
prediction clamped to the range and resized to the image, averaged with the prediction of the
flipped image (flipped back); per image, over valid pixels (1e-3 < d < 10) inside the Eigen crop
(rows 45:471, columns 41:601 of 480 x 640), RMSE, AbsRel and delta1; means over images.

Differences, stated in each result's ``protocol``: the photometric augmentations are left out
(mmseg's ``PhotoMetricDistortion``; the toolbox's ``ColorAug`` and its ``OneCycle`` momentum for
AdamW); ``GradientLoss`` is applied to each image's ``(H, W)`` map -- the reference indexes the
``(B, 1, H, W)`` batch as if it were ``(H, W)``, which at its batch of 2 per GPU makes the term
exactly zero (:func:`gradient_loss_as_run`); with fewer iterations (``iterations``) the warm-up
is shortened in proportion; crops, scales and windows scale with ``crop_size`` where it is not
the reference's; NYUCrop and the Eigen crop are taken in proportion on images that are not
480 x 640; BatchNorm is one process's, not synchronised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters import wrap
from ..sizes import at_size
from .backbone import block_tokens, preprocessing
from .datasets import load_depth, load_mask, load_rgb
from .heads import DepthHead, SegmentationHead
from .metrics import confusion_matrix, mean_iou, pixel_accuracy

REFERENCE = {
    "segmentation": "Jiawei-Yang/Denoising-ViT evaluation/configs/vitb_ade20k_linear_config.py "
                    "(mmseg EncoderDecoder slide_inference, BNHead, RandomCrop, Resize)",
    "depth": "Jiawei-Yang/Denoising-ViT evaluation/configs/vitb_nyu_linear_config.py "
             "(evaluation/depth: BNHead classify UD/linear, SigLoss, GradientLoss, NYUCrop, "
             "NYUDataset.eval_mask eigen_crop, aug_test flip)",
}


@dataclass(frozen=True)
class DVTConfig:
    """One task's DVT schedule, pipeline and test settings (the reference's values)."""

    task: str
    crop: tuple[int, int]
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: int
    warmup_ratio: float
    schedule: str                              # "poly" (mmseg) or "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    # segmentation
    scale: tuple[int, int] = (2048, 512)       # (long side, short side) limits
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    stride: tuple[int, int] = (341, 341)
    # depth
    rotate: float = 2.5
    sig_warmup: int = 100
    gradient_weight: float = 0.5
    min_depth: float = 1e-3
    max_depth: float = 10.0
    bins: int = 256

    def at_crop(self, crop: tuple[int, int] | None) -> "DVTConfig":
        """The config at another crop size: scales and windows in proportion (the reference's
        own at its own crop)."""
        if crop is None or tuple(crop) == self.crop:
            return self
        f = crop[0] / self.crop[0]
        return replace(self, crop=tuple(crop), scale=(round(self.scale[0] * f), round(self.scale[1] * f)),
                       stride=(crop[0] * 2 // 3, crop[1] * 2 // 3))

    def for_iterations(self, iterations: int | None) -> "DVTConfig":
        """Fewer (or more) iterations, the warm-ups shortened in proportion."""
        if iterations is None or iterations == self.iterations:
            return self
        f = iterations / self.iterations
        return replace(self, iterations=int(iterations), warmup=round(self.warmup * f),
                       sig_warmup=round(self.sig_warmup * f))


ADE20K = DVTConfig("segmentation", crop=(512, 512), iterations=40000, batch_size=16, lr=1e-3,
                   weight_decay=1e-4, warmup=1500, warmup_ratio=1e-6, schedule="poly")
NYUD = DVTConfig("depth", crop=(416, 544), iterations=38400, batch_size=16, lr=5e-3, weight_decay=0.01,
                 warmup=12800, warmup_ratio=1e-3, schedule="cosine", min_lr_ratio=1e-8, grad_clip=35.0)
CONFIGS = {"segmentation": ADE20K, "depth": NYUD}


# --- schedules (mmcv's LrUpdaterHook, by iteration) ----------------------------------------------------
def learning_rate(cfg: DVTConfig, it: int) -> float:
    """The rate at iteration ``it`` (0-based): mmcv's ``poly`` (``(lr - min) (1 - it/T)^1 + min``)
    or ``CosineAnnealing`` (``min + (lr - min) (1 + cos(pi it/T)) / 2``, min = lr x
    ``min_lr_ratio``), times mmcv's linear warm-up ``1 - (1 - it/W)(1 - ratio)`` while it < W."""
    T, lr = cfg.iterations, cfg.lr
    lo = lr * cfg.min_lr_ratio
    if cfg.schedule == "poly":
        regular = (lr - lo) * (1 - it / T) ** 1.0 + lo
    else:
        regular = lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * it / T))
    if it < cfg.warmup:
        k = (1 - it / cfg.warmup) * (1 - cfg.warmup_ratio)
        return regular * (1 - k)
    return regular


# --- losses ------------------------------------------------------------------------------------------
def sig_loss(pred: torch.Tensor, target: torch.Tensor, warm: bool = False,
             max_depth: float | None = None) -> torch.Tensor:
    """``SigLoss`` over the valid pixels of the whole batch (target > 0, <= ``max_depth``):
    ``g = log(pred + 1e-3) - log(target + 1e-3)``, ``sqrt(var(g) + 0.15 mean(g)^2)``; during
    its warm-up (``warm``) ``sqrt(0.15 mean(g)^2)``."""
    valid = target > 0
    if max_depth is not None:
        valid = valid & (target <= max_depth)
    g = torch.log(pred[valid] + 1e-3) - torch.log(target[valid] + 1e-3)
    if warm:
        return torch.sqrt(0.15 * g.mean() ** 2)
    return torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``GradientLoss`` (MegaDepth's multi-scale log-gradient matching) on each image's map,
    averaged over the batch: for the map and its subsamplings by 2, 4 and 6, ``d = (log(pred +
    1e-3) - log(target + 1e-3))`` x valid (target > 0), the sum of ``|d[i] - d[i+2]|`` over valid
    pairs along rows and columns, divided by the valid count. ``pred``, ``target``: ``(B, H, W)``."""
    total = pred.new_zeros(())
    for s in (1, 2, 4, 6):
        p, t = pred[:, ::s, ::s], target[:, ::s, ::s]
        m = (t > 0).to(p.dtype)
        d = (torch.log(p + 1e-3) - torch.log(t + 1e-3)) * m
        v = (d[:, :-2, :] - d[:, 2:, :]).abs() * m[:, :-2, :] * m[:, 2:, :]
        h = (d[:, :, :-2] - d[:, :, 2:]).abs() * m[:, :, :-2] * m[:, :, 2:]
        total = total + ((v.sum((1, 2)) + h.sum((1, 2))) / m.sum((1, 2)).clamp_min(1)).mean()
    return total


def gradient_loss_as_run(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's ``GradientLoss`` as it runs on its ``(B, 1, H, W)`` inputs: its ``[::2i,
    ::2i]``, ``[0:-2, :]`` and ``[:, 0:-2]`` index the batch and channel axes, so at the
    per-GPU batch of 2 every difference is empty and the loss is 0 (kept to document that;
    :func:`gradient_loss` is what it means)."""
    total = pred.new_zeros(())
    for i in range(4):
        p = pred if i == 0 else pred[::2 * i, ::2 * i]
        t = target if i == 0 else target[::2 * i, ::2 * i]
        m = (t > 0).to(p.dtype)
        d = (torch.log(p + 1e-3) - torch.log(t + 1e-3)) * m
        v = (d[0:-2, :] - d[2:, :]).abs() * m[0:-2, :] * m[2:, :]
        h = (d[:, 0:-2] - d[:, 2:]).abs() * m[:, 0:-2] * m[:, 2:]
        total = total + (v.sum() + h.sum()) / m.sum()
    return total


# --- geometry ----------------------------------------------------------------------------------------
def center_pad(x: torch.Tensor, multiple: Sequence[int]) -> torch.Tensor:
    """DINOv2's ``CenterPadding``: zero-pad the last two axes up to a multiple of
    ``multiple`` (h, w), ``pad // 2`` before and the rest after."""
    pads = []
    for size, m in zip(reversed(x.shape[-2:]), reversed(tuple(multiple))):
        pad = math.ceil(size / m) * m - size
        pads += [pad // 2, pad - pad // 2]
    return F.pad(x, pads)


def rescale_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` with ``keep_ratio``: the factor ``min(long / max(h, w), short /
    min(h, w))`` for ``scale = (long, short)``, sizes ``int(x * f + 0.5)``."""
    h, w = hw
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def slide_windows(hw: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """mmseg's ``slide_inference`` windows ``(y1, y2, x1, x2)``: ``max(H - crop + stride - 1, 0)
    // stride + 1`` per axis, the last windows moved back inside the image."""
    (H, W), (ch, cw), (sh, sw) = hw, crop, stride
    out = []
    for i in range(max(H - ch + sh - 1, 0) // sh + 1):
        for j in range(max(W - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, H), min(j * sw + cw, W)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


def slide_inference(fn: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor, num_channels: int,
                    crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits of ``img`` ``(1, 3, H, W)`` as mmseg's ``slide`` mode: ``fn`` on every window
    (one batch: the windows share a size), summed where they overlap, divided by the count."""
    H, W = img.shape[-2:]
    wins = slide_windows((H, W), crop, stride)
    out = fn(torch.cat([img[..., y1:y2, x1:x2] for y1, y2, x1, x2 in wins]))
    preds = img.new_zeros((1, num_channels, H, W), dtype=torch.float32)
    count = img.new_zeros((1, 1, H, W), dtype=torch.float32)
    for k, (y1, y2, x1, x2) in enumerate(wins):
        preds[..., y1:y2, x1:x2] += out[k:k + 1].float()
        count[..., y1:y2, x1:x2] += 1
    return preds / count


def _span(n: int, lo: int, hi: int, ref: int) -> slice:
    return slice(lo, hi) if n == ref else slice(round(lo * n / ref), round(hi * n / ref))


def nyu_crop(hw: tuple[int, int]) -> tuple[slice, slice]:
    """The toolbox's ``NYUCrop`` (rows 45:472, columns 43:608 of 480 x 640), in proportion on
    other sizes."""
    return _span(hw[0], 45, 472, 480), _span(hw[1], 43, 608, 640)


def eigen_mask(hw: tuple[int, int]) -> np.ndarray:
    """``NYUDataset.eval_mask``'s Eigen crop (rows 45:471, columns 41:601 of 480 x 640), in
    proportion on other sizes: a bool ``(H, W)`` mask."""
    m = np.zeros(hw, dtype=bool)
    m[_span(hw[0], 45, 471, 480), _span(hw[1], 41, 601, 640)] = True
    return m


def depth_metrics(gt: np.ndarray, pred: np.ndarray, min_depth: float, max_depth: float) -> dict[str, float]:
    """The toolbox's ``metrics`` on one image's pixels: kept where ``min < gt < max``; delta1 =
    share of ``max(gt/pred, pred/gt) < 1.25``, AbsRel = mean ``|gt - pred| / gt``, RMSE."""
    keep = (gt > min_depth) & (gt < max_depth)
    gt, pred = gt[keep].astype(np.float64), pred[keep].astype(np.float64)
    if gt.size == 0:
        return {"rmse": float("nan"), "abs_rel": float("nan"), "delta1": float("nan")}
    thresh = np.maximum(gt / pred, pred / gt)
    return {"rmse": float(np.sqrt(((gt - pred) ** 2).mean())), "abs_rel": float((np.abs(gt - pred) / gt).mean()),
            "delta1": float((thresh < 1.25).mean())}


# --- training crops -------------------------------------------------------------------------------------
def _resize_pair(img: np.ndarray, target: np.ndarray, hw: tuple[int, int], depth: bool):
    from PIL import Image
    im = np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))
    t = Image.fromarray(target.astype(np.float32 if depth else np.int32))
    return im, np.asarray(t.resize((hw[1], hw[0]), Image.NEAREST)).astype(target.dtype)


def _crop_box(rng: np.random.Generator, hw, crop) -> tuple[int, int, int, int]:
    """mmseg's ``get_crop_bbox``: offsets ``randint(0, margin + 1)``."""
    mh, mw = max(hw[0] - crop[0], 0), max(hw[1] - crop[1], 0)
    y, x = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
    return y, min(y + crop[0], hw[0]), x, min(x + crop[1], hw[1])


def segmentation_crop(img: np.ndarray, mask: np.ndarray, cfg: DVTConfig, rng: np.random.Generator,
                      ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """mmseg's ADE20k training pipeline (photometric distortion left out): a ratio drawn from
    ``ratio_range``, the image rescaled (keep ratio) to fit ``scale`` x ratio; ``RandomCrop``
    (up to 10 draws until no class other than ``ignore_index`` covers ``cat_max_ratio`` or more
    of the crop); a flip with probability 1/2; padding to the crop (image 0, label
    ``ignore_index``). Returns uint8 ``(h, w, 3)`` and ``(h, w)``."""
    r = rng.random() * (cfg.ratio_range[1] - cfg.ratio_range[0]) + cfg.ratio_range[0]
    hw = rescale_size(img.shape[:2], (int(cfg.scale[0] * r), int(cfg.scale[1] * r)))
    img, mask = _resize_pair(img, mask, hw, depth=False)
    box = _crop_box(rng, hw, cfg.crop)
    if cfg.cat_max_ratio < 1:
        for _ in range(10):
            y1, y2, x1, x2 = box
            labels, cnt = np.unique(mask[y1:y2, x1:x2], return_counts=True)
            cnt = cnt[labels != ignore_index]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cfg.cat_max_ratio:
                break
            box = _crop_box(rng, hw, cfg.crop)
    y1, y2, x1, x2 = box
    img, mask = img[y1:y2, x1:x2], mask[y1:y2, x1:x2]
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    out_i = np.zeros((*cfg.crop, 3), dtype=np.uint8)
    out_m = np.full(cfg.crop, ignore_index, dtype=np.int64)
    out_i[:img.shape[0], :img.shape[1]], out_m[:mask.shape[0], :mask.shape[1]] = img, mask
    return out_i, out_m


def depth_crop(img: np.ndarray, depth: np.ndarray, cfg: DVTConfig,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The toolbox's NYUd training pipeline (``ColorAug`` left out): ``NYUCrop``; with
    probability 1/2 a rotation by an angle drawn from (-2.5, 2.5) degrees about the centre
    (image bilinear, depth nearest, 0 outside); a flip with probability 1/2; ``RandomCrop``;
    padding to the crop with 0 (invalid depth)."""
    from PIL import Image
    rows, cols = nyu_crop(img.shape[:2])
    img, depth = img[rows, cols], depth[rows, cols]
    rotate = rng.random() < 0.5
    angle = rng.uniform(-cfg.rotate, cfg.rotate)
    if rotate:           # mmcv.imrotate turns counter-clockwise for positive angles, as PIL
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).rotate(angle, Image.BILINEAR))
        depth = np.asarray(Image.fromarray(np.ascontiguousarray(depth, dtype=np.float32))
                           .rotate(angle, Image.NEAREST))
    if rng.random() < 0.5:
        img, depth = img[:, ::-1], depth[:, ::-1]
    y1, y2, x1, x2 = _crop_box(rng, img.shape[:2], cfg.crop)
    out_i = np.zeros((*cfg.crop, 3), dtype=np.uint8)
    out_d = np.zeros(cfg.crop, dtype=np.float32)
    out_i[:y2 - y1, :x2 - x1], out_d[:y2 - y1, :x2 - x1] = img[y1:y2, x1:x2], depth[y1:y2, x1:x2]
    return out_i, out_d


# --- the frozen backbone -----------------------------------------------------------------------------------
def _normalise(imgs: np.ndarray, mean, std, device, dtype) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(imgs)).float().div(255.0).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.to(device, dtype)


def backbone_features(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone as the DVT evaluation reads it: ``x`` centre-padded to the patch
    size, the last block's patch tokens and class token through the final norm:
    ``(B, rows, cols, D)`` float and ``(B, D)`` (zeros without a class token)."""
    ad = wrap(model)
    x = center_pad(x, ad.patch_size)
    with torch.no_grad():
        L = ad.num_layers
        prefix, patches = block_tokens(model, x, [L - 1], norm=True)[L - 1]
        rows, cols = ad.grid_size(x)
    cls = prefix[:, 0] if prefix.shape[1] else patches.new_zeros(len(x), patches.shape[-1])
    return patches.reshape(len(x), rows, cols, -1).float(), cls.float()


# --- training and testing ------------------------------------------------------------------------------------
def _adamw(head: nn.Module, cfg: DVTConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr,
                             betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def _batches(n: int, cfg: DVTConfig, rng: np.random.Generator) -> np.ndarray:
    """Endless shuffled epochs, ``(iterations, batch)`` indices."""
    need = cfg.iterations * cfg.batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])
    return order[:need].reshape(cfg.iterations, cfg.batch_size)


def train_dvt(model, arm, task: str, images: Sequence[Path], targets: Sequence, cfg: DVTConfig, *,
              num_classes: int = 0, ignore_index: int = 255, seed: int = 0,
              progress: bool = False) -> nn.Module:
    """Train the DVT head of ``task`` on ``(images, targets)`` (targets: label maps or depth maps
    at the images' sizes) with the frozen ``model`` under ``arm``. Returns the head, frozen."""
    ad = wrap(model)
    _, mean, std = preprocessing(model)
    p = ad.parameter()
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    dim = ad.embed_dim
    head = (SegmentationHead(dim, num_classes, g) if task == "segmentation"
            else DepthHead(dim, cfg.min_depth, cfg.max_depth, cfg.bins)).to(p.device)
    opt = _adamw(head, cfg)
    rng = np.random.default_rng(seed)
    batches = _batches(len(images), cfg, rng)
    steps = range(cfg.iterations)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"DVT {task} [{arm.name}]", unit="it")
    crop = segmentation_crop if task == "segmentation" else depth_crop
    head.train()
    with at_size(ad, tuple(center_pad(torch.zeros(1, 1, *cfg.crop), ad.patch_size).shape[-2:])), \
            ad.any_size(), arm.context(model):
        for it in steps:
            pairs = [crop(np.asarray(load_rgb(images[i])), np.asarray(targets[i]), cfg, rng)
                     for i in batches[it]]
            x = _normalise(np.stack([a for a, _ in pairs]), mean, std, p.device, p.dtype)
            y = torch.from_numpy(np.stack([b for _, b in pairs])).to(p.device)
            patches, cls = backbone_features(model, x)
            if task == "segmentation":
                logits = F.interpolate(head(patches), size=cfg.crop, mode="bilinear", align_corners=False)
                # mmseg's CrossEntropyLoss (avg_non_ignore=False): the mean over every pixel,
                # ignored ones counting 0 -- not F.cross_entropy's mean over the kept pixels
                loss = F.cross_entropy(logits, y.long(), ignore_index=ignore_index, reduction="none").mean()
            else:
                pred = F.interpolate(head(patches, cls), size=cfg.crop, mode="bilinear",
                                     align_corners=False)[:, 0]
                y = y.float()
                loss = sig_loss(pred, y, warm=it < cfg.sig_warmup) + cfg.gradient_weight * gradient_loss(pred, y)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, it)
            opt.zero_grad()
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            opt.step()
    return head.eval().requires_grad_(False)


def score_dvt(model, arm, task: str, head: nn.Module, images: Sequence[Path], targets: Sequence,
             cfg: DVTConfig, *, num_classes: int = 0, ignore_index: int = 255) -> dict[str, float]:
    """Score ``head`` on ``(images, targets)`` at label resolution (see the module docstring)."""
    ad = wrap(model)
    _, mean, std = preprocessing(model)
    p = ad.parameter()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    per_image: list[dict[str, float]] = []
    with torch.no_grad(), ad.any_size(), arm.context(model):
        for path, target in zip(images, targets):
            img = np.asarray(load_rgb(path))
            target = np.asarray(target)
            if task == "segmentation":
                hw = rescale_size(img.shape[:2], cfg.scale)
                im, _ = _resize_pair(img, np.zeros(img.shape[:2], np.int32), hw, depth=False)
                x = _normalise(im[None], mean, std, p.device, p.dtype)

                def logits(crops):
                    f, _ = backbone_features(model, crops)
                    return F.interpolate(head(f), size=crops.shape[-2:], mode="bilinear",
                                         align_corners=False)
                out = slide_inference(logits, x, num_classes, cfg.crop, cfg.stride)
                out = F.interpolate(out, size=target.shape, mode="bilinear", align_corners=False).cpu()
                conf += confusion_matrix(out.argmax(1)[0].numpy(), target, num_classes, ignore_index)
            else:
                x = _normalise(img[None], mean, std, p.device, p.dtype)
                x = torch.cat([x, x.flip(-1)])

                def depth(x):
                    f, c = backbone_features(model, x)
                    d = head(f, c).clamp(cfg.min_depth, cfg.max_depth)
                    return F.interpolate(d, size=target.shape, mode="bilinear", align_corners=False)
                d = depth(x)
                pred = ((d[0] + d[1].flip(-1)) / 2)[0].cpu().numpy()
                keep = eigen_mask(target.shape)
                per_image.append(depth_metrics(target[keep], pred[keep], cfg.min_depth, cfg.max_depth))
    if task == "segmentation":
        return {"miou": mean_iou(conf), "pixel_accuracy": pixel_accuracy(conf)}
    return {k: float(np.nanmean([m[k] for m in per_image])) for k in ("rmse", "abs_rel", "delta1")}


def load_targets(task: str, items: Sequence[tuple], *, reduce_zero_label: bool = False,
                 ignore_index: int = 255, depth_png_scale: float = 1000.0) -> list[np.ndarray]:
    """Label or depth maps at their native size."""
    out = []
    for _, t in items:
        if task == "segmentation":
            m = load_mask(t)
            if reduce_zero_label:
                m = np.where(m == 0, ignore_index, m - 1)
            out.append(m)
        else:
            out.append(load_depth(t, depth_png_scale))
    return out


DEVIATIONS = {
    "segmentation": ["photometric distortion (mmseg PhotoMetricDistortion) left out",
                     "BatchNorm of one process (the reference: SyncBN over 8 GPUs of batch 2)"],
    "depth": ["ColorAug and the OneCycle momentum schedule left out",
              "GradientLoss on each image's (H, W) map; the reference's indexes the (B, 1, H, W) batch "
              "and is exactly 0 at its batch of 2 per GPU"],
}


def describe(cfg: DVTConfig, reference_cfg: DVTConfig) -> list[str]:
    """What differs from the reference config, besides :data:`DEVIATIONS`."""
    out = list(DEVIATIONS[cfg.task])
    if cfg.iterations != reference_cfg.iterations:
        out.append(f"{cfg.iterations} iterations instead of {reference_cfg.iterations} (warm-up "
                   f"{cfg.warmup} instead of {reference_cfg.warmup})")
    if cfg.crop != reference_cfg.crop:
        out.append(f"crop {cfg.crop[0]}x{cfg.crop[1]} instead of {reference_cfg.crop[0]}x"
                   f"{reference_cfg.crop[1]}" + (f", scale {cfg.scale}, stride {cfg.stride}"
                                                  if cfg.task == "segmentation" else ""))
    if cfg.batch_size != reference_cfg.batch_size:
        out.append(f"batch {cfg.batch_size} instead of {reference_cfg.batch_size}")
    return out


__all__ = ["DVTConfig", "ADE20K", "NYUD", "CONFIGS", "learning_rate", "sig_loss", "gradient_loss",
           "gradient_loss_as_run", "center_pad", "rescale_size", "slide_windows", "slide_inference",
           "nyu_crop", "eigen_mask", "depth_metrics", "segmentation_crop", "depth_crop",
           "backbone_features", "train_dvt", "score_dvt", "load_targets", "describe"]
