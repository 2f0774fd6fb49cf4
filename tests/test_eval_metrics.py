"""Every metric of ttreg.eval against answers worked out by hand, and against independent
re-statements of the reference code it follows (LOST's IoU, Chefer et al.'s ImageNet-segmentation
scores)."""
import math

import numpy as np
import pytest
import torch

from ttreg.eval import metrics as M
from ttreg.eval.report import format_table, mean_ci, jsonable


def test_box_iou_known_values():
    gt = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 5]])
    iou = M.box_iou([0, 0, 10, 10], gt)
    assert iou == pytest.approx([1.0, 50 / 150, 0.0, 0.5])


def test_corloc_counts_images_with_any_box_at_iou_half():
    preds = [[0, 0, 10, 10],            # IoU 1
             [0, 0, 10, 10],            # IoU 1/3 only -> miss
             [0, 0, 10, 10],            # IoU exactly 0.5 -> hit
             [0, 0, 10, 10]]            # second of two boxes matches -> hit
    gts = [np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10]]), np.array([[0, 0, 10, 5]]),
           np.array([[50, 50, 60, 60], [1, 1, 10, 10]])]
    assert M.corloc_hits(preds, gts).tolist() == [True, False, True, True]
    assert M.corloc(preds, gts) == 0.75


def test_confusion_miou_pixel_accuracy_by_hand():
    pred = np.array([[0, 0, 1], [1, 2, 2]])
    target = np.array([[0, 1, 1], [1, 2, 255]])          # the last pixel is ignored
    conf = M.confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]
    assert M.iou_per_class(conf) == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert M.mean_iou(conf) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert M.pixel_accuracy(conf) == pytest.approx(4 / 5)


def test_miou_skips_classes_absent_from_target_and_prediction():
    conf = M.confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 1]), 4)
    assert np.isnan(M.iou_per_class(conf)[2:]).all()
    assert M.mean_iou(conf) == 1.0


def test_average_precision_matches_the_hand_computation():
    # ranks: + - + -  -> AP = 1 * 1/2 + 2/3 * 1/2
    assert M.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert M.average_precision([0.1, 0.2, 0.3], [0, 0, 1]) == 1.0
    assert M.average_precision([0.5, 0.5], [1, 0]) == 0.5          # a tie is one threshold
    assert M.average_precision([0.5, 0.4], [0, 0]) == 0.0
    rng = np.random.default_rng(2)
    for _ in range(5):
        y, sc = rng.random(40) < 0.3, rng.integers(0, 8, 40) / 7      # many ties
        assert M.average_precision(sc, y) == pytest.approx(sklearn_ap(y, sc), abs=1e-12)


def test_binary_heatmap_scores_perfect_and_inverted():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    good = M.summarize_heatmaps([M.binary_heatmap_scores(mask.astype(float) * 3 + 1, mask)])
    assert good["pixel_accuracy"] == pytest.approx(1.0) and good["miou"] == pytest.approx(1.0)
    assert good["map"] == 1.0
    bad = M.summarize_heatmaps([M.binary_heatmap_scores(1.0 - mask, mask)])
    assert bad["pixel_accuracy"] == 0.0 and bad["miou"] == 0.0
    # pooled AP: the 128 scores are 1 for the 52 + 12 wrong-channel pixels and 0 for the 64 right
    # ones, so every positive is ranked below every negative: AP = 64 / 128
    assert bad["map"] == pytest.approx(0.5)


# --- independent re-statements of the references --------------------------------------------------
def lost_iou(box, boxes):
    """valeoai/LOST datasets.bbox_iou (x1y1x2y2, no GIoU), restated: torch on the inputs' dtypes,
    eps added to both heights and to the union."""
    eps = 1e-7
    p = torch.from_numpy(np.asarray(box))
    g = torch.from_numpy(np.asarray(boxes)).T
    iw = (torch.minimum(p[2], g[2]) - torch.maximum(p[0], g[0])).clamp(0)
    ih = (torch.minimum(p[3], g[3]) - torch.maximum(p[1], g[1])).clamp(0)
    area_p = (p[2] - p[0]) * ((p[3] - p[1]) + eps)
    area_g = (g[2] - g[0]) * ((g[3] - g[1]) + eps)
    return iw * ih / (area_p + area_g - iw * ih + eps)


def test_box_iou_is_losts_including_its_eps_and_dtypes():
    rng = np.random.default_rng(0)
    for dtype in (np.int64, np.float64):
        for _ in range(20):
            xy = rng.integers(0, 60, size=(6, 2))
            wh = rng.integers(1, 40, size=(6, 2))
            boxes = np.concatenate([xy, xy + wh], 1).astype(dtype)
            got = M.box_iou(boxes[0], boxes[1:])
            assert np.array_equal(got, lost_iou(boxes[0], boxes[1:]).double().numpy())
    # IoU exactly 1/2: LOST compares integer boxes in float32, where the eps vanishes -> a hit;
    # on float64 boxes the eps survives and the same pair misses. (A plain IoU says 0.5 for both.)
    pred, gt = np.array([0, 0, 10, 10]), np.array([[0, 0, 10, 5]])
    assert M.corloc_hits([pred], [gt]).tolist() == [True]
    assert M.corloc_hits([pred.astype(float)], [gt.astype(float)]).tolist() == [False]
    assert M.corloc_hits([pred], [np.zeros((0, 4), np.int64)]).tolist() == [False]   # no boxes: miss


def sklearn_ap(y, s):
    """scikit-learn's average_precision_score restated: thresholds at each distinct score,
    precision and recall there, AP = sum of recall steps times precision."""
    y, s = np.asarray(y, bool), np.asarray(s, np.float64)
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        sel = s >= t
        tp = (sel & y).sum()
        recall = tp / y.sum()
        ap += (recall - prev_recall) * tp / sel.sum()
        prev_recall = recall
    return ap


def chefer_scores(heat, mask):
    """Chefer et al.'s eval_batch for one image, restated: min-max (NaN -> 0), prediction
    heat > mean, pixel accuracy and intersection / union by histograms of label + 1, AP pooled over
    the (1 - heat, heat) channels against the one-hot mask."""
    r = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    r = (r - r.min()) / (r.max() - r.min())
    thr = r.mean()
    fg, bg = r.gt(thr).float(), r.le(thr).float()
    fg_ap, bg_ap = r.clone(), 1 - r
    for t in (fg, bg, fg_ap, bg_ap):
        t[t != t] = 0
    pred = torch.cat([bg, fg], 1)[0].max(0)[1].numpy() + 1
    lab = np.asarray(mask).astype(np.int64) + 1
    correct, labeled = ((pred == lab) * (lab > 0)).sum(), (lab > 0).sum()
    pred = pred * (lab > 0)
    inter = np.histogram(pred * (pred == lab), bins=2, range=(1, 2))[0]
    union = np.histogram(pred, bins=2, range=(1, 2))[0] + np.histogram(lab, bins=2, range=(1, 2))[0] - inter
    onehot = np.stack([lab == 1, lab == 2])
    ap = sklearn_ap(onehot.reshape(-1), torch.cat([bg_ap, fg_ap], 1)[0].numpy().reshape(-1))
    return correct, labeled, inter, union, ap


def test_heatmap_scores_equal_chefer_et_al_restated():
    rng = np.random.default_rng(1)
    heats, masks = [], []
    for i in range(5):
        m = np.zeros((16, 16), bool)
        r, c = rng.integers(0, 8, 2)
        m[r:r + 6, c:c + 7] = True
        heats.append(m * 1.5 + rng.normal(0, 0.6, (16, 16)) + (i == 4) * 7 * m)
        masks.append(m)
    heats.append(np.full((16, 16), 0.3))                   # constant: NaN in the reference
    masks.append(masks[0])
    ref = [chefer_scores(h, m) for h, m in zip(heats, masks)]
    eps = np.spacing(1, dtype=np.float64)
    inter = sum(r[2] for r in ref)
    union = sum(r[3] for r in ref)
    want = {"pixel_accuracy": sum(r[0] for r in ref) / (eps + sum(r[1] for r in ref)),
            "miou": float(np.mean(inter / (eps + union))), "map": float(np.mean([r[4] for r in ref]))}
    got = M.summarize_heatmaps([M.binary_heatmap_scores(h, m) for h, m in zip(heats, masks)])
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert M.binary_heatmap_scores(heats[-1], masks[-1])["ap"] == 0.5   # all scores 0 after NaN
    # the pooled AP is not the mean of a foreground and a background AP (the old definition)
    h = (heats[0] - heats[0].min()) / (heats[0].max() - heats[0].min())
    split = 0.5 * (M.average_precision(h, masks[0]) + M.average_precision(1 - h, ~masks[0]))
    assert abs(ref[0][4] - split) > 1e-3 and M.binary_heatmap_scores(heats[0], masks[0])["ap"] == \
        pytest.approx(ref[0][4], abs=1e-12)


def test_rmse():
    assert M.rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(math.sqrt(4 / 3))
    assert M.rmse([1, 2, 3], [1, 2, 5], valid=[True, True, False]) == 0.0


def test_attention_entropy_and_topk_mass():
    uniform = torch.full((2, 3, 16), 1 / 16)
    assert torch.allclose(M.attention_entropy(uniform), torch.full((2, 3), math.log(16)))
    onehot = torch.zeros(16)
    onehot[5] = 1
    assert float(M.attention_entropy(onehot)) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.1, 0.5, 0.1, 0.3])
    assert float(M.topk_mass(p, 2)) == pytest.approx(0.8)
    assert float(M.topk_mass(p * 2, 2)) == pytest.approx(0.8)        # renormalised


def test_topk_accuracy():
    logits = torch.tensor([[3.0, 2, 1], [1, 3, 2], [1, 2, 3], [3, 2, 1]])
    labels = torch.tensor([0, 2, 2, 2])
    acc = M.topk_accuracy(logits, labels, ks=(1, 2))
    assert acc == {"top1": 0.5, "top2": 0.75}


def test_mean_ci_and_table():
    s = mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0
    assert s["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert mean_ci([0.7])["ci95"] == 0.0
    text = format_table([{"arm": "plain", "x": s}, {"arm": "registers", "x": 0.25}],
                        [("arm", "arm"), ("x", "score")], digits=2)
    assert "2.00 ± 2.48" in text and "0.25" in text
    assert jsonable({"a": float("nan"), "b": torch.tensor([1, 2]), "c": np.float32(0.5)}) == \
        {"a": None, "b": [1, 2], "c": 0.5}
