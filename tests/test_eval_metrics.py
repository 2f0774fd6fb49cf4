"""Every metric of ttreg.eval against answers worked out by hand."""
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


def test_binary_heatmap_scores_perfect_and_inverted():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    good = M.summarize_heatmaps([M.binary_heatmap_scores(mask.astype(float) * 3 + 1, mask)])
    assert good["pixel_accuracy"] == 1.0 and good["miou"] == 1.0 and good["map"] == 1.0
    bad = M.summarize_heatmaps([M.binary_heatmap_scores(1.0 - mask, mask)])
    assert bad["pixel_accuracy"] == 0.0 and bad["miou"] == 0.0
    # foreground AP with all positives ranked last: precision at the 12 positives is 12/64
    assert bad["map"] == pytest.approx(12 / 64 / 2 + 52 / 64 / 2)


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
