"""The metrics, as small vectorised functions on arrays: box IoU and CorLoc, segmentation
confusion/mIoU/pixel accuracy, average precision, depth RMSE, attention entropy and top-k mass.
Each is checked against hand-computed answers in ``tests/test_eval_metrics.py``."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


# --- boxes ----------------------------------------------------------------------------------
def box_iou(box, boxes) -> np.ndarray:
    """IoU of one ``(x1, y1, x2, y2)`` box with each of ``boxes`` ``(M, 4)``, exactly as LOST
    computes it (valeoai/LOST ``datasets.bbox_iou``, after yolov5): continuous coordinates, an
    ``eps`` of 1e-7 added to both heights and to the union, in torch arithmetic on the inputs'
    own dtypes -- integer boxes (LOST's predictions and ground truth) are compared in float32,
    so an IoU of exactly 0.5 counts as 0.5. Returns ``(M,)`` float64."""
    eps = 1e-7
    b = torch.as_tensor(np.asarray(box))
    g = torch.as_tensor(np.asarray(boxes)).reshape(-1, 4).T
    inter = (torch.min(b[2], g[2]) - torch.max(b[0], g[0])).clamp(0) * \
        (torch.min(b[3], g[3]) - torch.max(b[1], g[1])).clamp(0)
    w1, h1 = b[2] - b[0], b[3] - b[1] + eps
    w2, h2 = g[2] - g[0], g[3] - g[1] + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    return (inter / union).double().numpy()


def corloc_hits(pred_boxes: Sequence, gt_boxes: Sequence, threshold: float = 0.5) -> np.ndarray:
    """Per image: does the predicted box reach IoU >= ``threshold`` with any ground-truth box
    (an image without ground-truth boxes is a miss, as in LOST)."""
    return np.array([bool(len(g)) and bool((box_iou(p, g) >= threshold).any())
                     for p, g in zip(pred_boxes, gt_boxes)], dtype=bool)


def corloc(pred_boxes: Sequence, gt_boxes: Sequence, threshold: float = 0.5) -> float:
    """Correct localisation: the fraction of images whose predicted box has IoU >= 0.5 with
    at least one ground-truth box."""
    hits = corloc_hits(pred_boxes, gt_boxes, threshold)
    return float(hits.mean()) if len(hits) else float("nan")


# --- segmentation ----------------------------------------------------------------------------
def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """``(C, C)`` counts, rows = target class, columns = predicted class; ``ignore_index`` and
    out-of-range targets are skipped."""
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    t = np.asarray(target).reshape(-1).astype(np.int64)
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    p, t = p[keep], t[keep]
    p = np.clip(p, 0, num_classes - 1)
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from target and prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over the classes that occur (in target or prediction)."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


def average_precision(scores, labels) -> float:
    """Average precision of ``scores`` ranking the positives of binary ``labels`` (scikit-learn's
    ``average_precision_score``: sum over distinct thresholds of (R_n - R_{n-1}) * P_n).
    0 without positives (scikit-learn gives NaN there, which Chefer et al. turn into 0)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    npos = int(y.sum())
    if npos == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]   # last index of each distinct score
    tp = tp[last]
    precision = tp / (last + 1)
    recall = tp / npos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_heatmap_scores(heat, mask) -> dict[str, float]:
    """One image of the ImageNet-segmentation evaluation, as Chefer et al. score it
    (hila-chefer/Transformer-Explainability, ``baselines/ViT/imagenet_seg_eval.py`` with
    ``utils/metrices.py``; Gandelsman et al.'s ``compute_segmentations.py`` does the same).

    ``heat``: ``(H, W)`` scores at the mask's resolution. In float32, as the reference: min-max
    normalised (a constant map becomes all 0, the reference's NaN set to 0); the prediction is
    ``heat > mean`` (``batch_pix_accuracy`` / ``batch_intersection_union``); the AP is
    ``get_ap_scores``: **one** AP over both channels pooled -- background scores ``1 - heat``
    against ``mask == 0`` and foreground scores ``heat`` against ``mask == 1`` ranked together.
    Returns per-image counts (``correct``, ``labeled``, ``inter``/``union`` for background and
    foreground) and ``ap``.
    """
    h = torch.as_tensor(np.asarray(heat), dtype=torch.float32)
    m = torch.as_tensor(np.asarray(mask)).bool()
    h = (h - h.min()) / (h.max() - h.min())
    bad = torch.isnan(h)
    fg = (h > h.mean()) & ~bad                         # NaN maps: both channels 0 -> background
    fg_ap = h.masked_fill(bad, 0.0)
    bg_ap = (1 - h).masked_fill(bad, 0.0)
    conf = confusion_matrix(fg.numpy().astype(np.int64), m.numpy().astype(np.int64), 2, None)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    ap = average_precision(torch.cat([bg_ap.reshape(-1), fg_ap.reshape(-1)]).numpy(),
                           torch.cat([~m.reshape(-1), m.reshape(-1)]).numpy())
    return {"correct": float(tp.sum()), "labeled": float(conf.sum()),
            "inter_bg": tp[0], "inter_fg": tp[1], "union_bg": float(union[0]),
            "union_fg": float(union[1]), "ap": ap}


def summarize_heatmaps(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    """Dataset totals of :func:`binary_heatmap_scores`, as Chefer et al.: pixel accuracy =
    total correct / total labelled, IoU per class = total intersection / total union (each
    denominator plus ``np.spacing(1)``), mIoU = their mean, mAP = mean of the per-image APs."""
    tot = {k: sum(r[k] for r in per_image) for k in per_image[0]}
    eps = np.spacing(1, dtype=np.float64)
    iou = [tot["inter_bg"] / (eps + tot["union_bg"]), tot["inter_fg"] / (eps + tot["union_fg"])]
    return {"pixel_accuracy": tot["correct"] / (eps + tot["labeled"]),
            "miou": float(np.mean(iou)), "iou_background": iou[0], "iou_foreground": iou[1],
            "map": tot["ap"] / len(per_image)}


# --- depth ----------------------------------------------------------------------------------
def rmse(pred, target, valid=None) -> float:
    """Root mean squared error over the ``valid`` pixels (all if None)."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    v = np.ones_like(t, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if not v.any():
        return float("nan")
    return float(np.sqrt(np.mean((p[v] - t[v]) ** 2)))


# --- attention --------------------------------------------------------------------------------
def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis of a probability tensor, renormalised first."""
    p = probs.float().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def topk_mass(probs: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Share of the (renormalised) mass on the ``k`` largest entries of the last axis."""
    p = probs.float().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return p.topk(min(k, p.shape[-1]), dim=-1).values.sum(-1)


# --- classification ------------------------------------------------------------------------------
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": .., "top5": ..}`` (k capped at the number of classes)."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[-1])
        hit = (logits.topk(kk, dim=-1).indices == labels[:, None]).any(-1)
        out[f"top{k}"] = float(hit.float().mean()) if len(labels) else float("nan")
    return out
