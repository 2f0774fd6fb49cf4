"""The Denoising-ViT dense protocol (``ttreg eval probe --protocol dvt``): every piece against a
line-by-line restatement of its reference (mmseg / mmcv / the depth toolbox DVT vendors) on small
inputs, then both tasks end to end from the command line."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ttreg.eval import dense as D
from ttreg.eval.cli import main
from ttreg.testing import write_depth, write_segmentation


def _maps(seed=0, shape=(2, 1, 7, 9)):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=g) * 5 + 0.1
    target = torch.rand(shape, generator=g) * 5
    target[target < 1.0] = 0                       # invalid pixels
    return pred, target


# --- restatements of the reference (read, not copied) ------------------------------------------------
class RefSigLoss:
    """Denoising-ViT evaluation/depth/models/losses/sigloss.py, as a class with its counter."""

    def __init__(self, warm_up=False, warm_iter=100):
        self.warm_up, self.warm_iter, self.counter, self.eps = warm_up, warm_iter, 0, 0.001

    def __call__(self, input, target):
        mask = target > 0
        input, target = input[mask], target[mask]
        if self.warm_up and self.counter < self.warm_iter:
            g = torch.log(input + self.eps) - torch.log(target + self.eps)
            self.counter += 1
            return torch.sqrt(0.15 * torch.pow(torch.mean(g), 2))
        g = torch.log(input + self.eps) - torch.log(target + self.eps)
        return torch.sqrt(torch.var(g) + 0.15 * torch.pow(torch.mean(g), 2))


def ref_gradient_loss(input, target):
    """evaluation/depth/models/losses/gradientloss.py ``gradientloss`` (valid_mask=True)."""
    ins = [input] + [input[::2 * i, ::2 * i] for i in range(1, 4)]
    tgs = [target] + [target[::2 * i, ::2 * i] for i in range(1, 4)]
    loss = 0
    for input, target in zip(ins, tgs):
        mask = target > 0
        N = torch.sum(mask)
        d = torch.mul(torch.log(input + 0.001) - torch.log(target + 0.001), mask)
        v = torch.mul(torch.abs(d[0:-2, :] - d[2:, :]), torch.mul(mask[0:-2, :], mask[2:, :]))
        h = torch.mul(torch.abs(d[:, 0:-2] - d[:, 2:]), torch.mul(mask[:, 0:-2], mask[:, 2:]))
        loss += (torch.sum(h) + torch.sum(v)) / N
    return loss


def ref_slide_inference(fn, img, num_classes, crop, stride):
    """mmseg EncoderDecoder.slide_inference (F.pad of each window's logits)."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            out = fn(img[:, :, y1:y2, x1:x2])
            preds += F.pad(out, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    return preds / count_mat


def ref_calculate(gt, pred):
    """evaluation/depth/core/evaluation/metrics.py ``calculate`` (the three reported)."""
    thresh = np.maximum((gt / pred), (pred / gt))
    a1 = (thresh < 1.25).mean()
    abs_rel = np.mean(np.abs(gt - pred) / gt)
    rmse = np.sqrt(((gt - pred) ** 2).mean())
    return a1, abs_rel, rmse


def ref_depth_pred(feat, conv, min_depth, max_depth, n_bins):
    """evaluation/depth/models/decode_heads/decode_head.py ``depth_pred`` (classify, UD, linear)."""
    logit = conv(feat)
    bins = torch.linspace(min_depth, max_depth, n_bins)
    logit = torch.relu(logit) + 0.1
    logit = logit / logit.sum(dim=1, keepdim=True)
    return torch.einsum("ikmn,k->imn", [logit, bins]).unsqueeze(dim=1)


# --- the pieces ---------------------------------------------------------------------------------------
def test_sig_loss_is_the_references_with_its_warm_up():
    pred, target = _maps()
    ref = RefSigLoss(warm_up=True, warm_iter=2)
    ours = [D.sig_loss(pred, target, warm=it < 2) for it in range(4)]
    theirs = [ref(pred, target) for _ in range(4)]
    for a, b in zip(ours, theirs):
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    assert float(ours[0]) != pytest.approx(float(ours[3]))           # warm-up is a different loss
    # by hand on three valid pixels
    p, t = torch.tensor([1.0, 2.0, 4.0, 9.0]), torch.tensor([2.0, 2.0, 2.0, 0.0])
    g = torch.log(p[:3] + 1e-3) - torch.log(t[:3] + 1e-3)
    assert float(D.sig_loss(p, t)) == pytest.approx(math.sqrt(float(g.var()) + 0.15 * float(g.mean()) ** 2))


def test_gradient_loss_is_the_references_formula_on_each_image():
    pred, target = _maps(1, (3, 1, 13, 11))
    per_image = [float(ref_gradient_loss(pred[i, 0], target[i, 0])) for i in range(3)]
    assert float(D.gradient_loss(pred[:, 0], target[:, 0])) == pytest.approx(np.mean(per_image), rel=1e-6)
    assert float(D.gradient_loss(pred[:1, 0], target[:1, 0])) == pytest.approx(per_image[0], rel=1e-6)
    assert per_image[0] > 0.1                                         # a real number, not a vacuous 0


def test_the_references_gradient_loss_is_zero_on_its_batch_of_two():
    """As it runs (inputs (B, 1, H, W), batch 2 per GPU) its differences are all empty."""
    pred, target = _maps(2, (2, 1, 13, 11))
    assert float(ref_gradient_loss(pred, target)) == 0.0
    assert float(D.gradient_loss_as_run(pred, target)) == 0.0
    pred4, target4 = _maps(3, (4, 1, 5, 5))                          # batch 4: batch-axis differences
    assert float(D.gradient_loss_as_run(pred4, target4)) == pytest.approx(
        float(ref_gradient_loss(pred4, target4)), rel=1e-6)


def test_slide_inference_is_mmsegs():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    img = torch.randn(1, 3, 50, 70, generator=g)
    fn = lambda x: conv(x) * (1 + x.shape[-1] / 100)      # depends on the window, as a ViT does
    with torch.no_grad():
        for crop, stride in (((32, 32), (21, 21)), ((64, 64), (42, 42)), ((20, 30), (7, 11))):
            ours = D.slide_inference(fn, img, 4, crop, stride)
            theirs = ref_slide_inference(fn, img, 4, crop, stride)
            assert torch.allclose(ours, theirs, atol=1e-6)
    assert D.slide_windows((512, 683), (512, 512), (341, 341)) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert len(D.slide_windows((512, 2048), (512, 512), (341, 341))) == 6


def test_bins_head_is_the_references_depth_pred_after_upsampling():
    """DINOv2/DVT's BNHead(classify, UD, linear, upsample 4): features (and the class token)
    upsampled x4, then the 1x1 conv; ttreg convolves first (both linear) -- equal."""
    from ttreg.eval.probe import DepthHead
    torch.manual_seed(0)
    head = DepthHead(6, 1e-3, 10.0, 256)
    patches, cls = torch.randn(2, 3, 4, 6), torch.randn(2, 6)
    x = patches.permute(0, 3, 1, 2)
    x = torch.cat([x, cls[:, :, None, None].expand_as(x)], 1)
    x = F.interpolate(x, size=[12, 16], mode="bilinear", align_corners=False)
    ref = ref_depth_pred(x, head.conv, 1e-3, 10.0, 256)
    with torch.no_grad():
        assert torch.allclose(head(patches, cls), ref.clamp(1e-3, 10.0), atol=1e-5)


def test_eigen_crop_nyu_crop_and_metrics_are_the_references():
    m = D.eigen_mask((480, 640))
    ref = np.zeros((480, 640))
    ref[45:471, 41:601] = 1
    assert np.array_equal(m, ref.astype(bool)) and m.sum() == 426 * 560
    assert D.nyu_crop((480, 640)) == (slice(45, 472), slice(43, 608))
    assert D.eigen_mask((48, 64)).sum() == (47 - 4) * (60 - 4)        # in proportion elsewhere
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 12, 500)
    pred = rng.uniform(0.5, 9, 500)
    got = D.depth_metrics(gt, pred, 1e-3, 10.0)
    keep = (gt > 1e-3) & (gt < 10.0)
    a1, abs_rel, rmse = ref_calculate(gt[keep], pred[keep])
    assert (got["delta1"], got["abs_rel"], got["rmse"]) == pytest.approx((a1, abs_rel, rmse), rel=1e-12)


def test_schedules_are_mmcvs_poly_and_cosine_with_linear_warm_up():
    seg, dep = D.ADE20K, D.NYUD
    for it in (0, 1, 700, 1499, 1500, 20000, 39999):
        regular = (1e-3 - 0) * (1 - it / 40000) ** 1.0 + 0
        want = regular * (1 - (1 - it / 1500) * (1 - 1e-6)) if it < 1500 else regular
        assert D.learning_rate(seg, it) == pytest.approx(want, rel=1e-12)
    lo = 5e-3 * 1e-8
    for it in (0, 6400, 12799, 12800, 30000, 38399):
        regular = lo + 0.5 * (5e-3 - lo) * (1 + math.cos(math.pi * it / 38400))
        want = regular * (1 - (1 - it / 12800) * (1 - 1e-3)) if it < 12800 else regular
        assert D.learning_rate(dep, it) == pytest.approx(want, rel=1e-12)
    short = dep.for_iterations(384)
    assert (short.iterations, short.warmup, short.sig_warmup) == (384, 128, 1)
    assert seg.at_crop((32, 32)).stride == (21, 21) and seg.at_crop((32, 32)).scale == (128, 32)
    assert seg.at_crop((512, 512)) is seg and seg.stride == (341, 341)


def test_center_padding_and_rescale_are_dinov2s_and_mmcvs():
    x = torch.ones(1, 3, 480, 640)
    y = D.center_pad(x, (14, 14))
    assert y.shape[-2:] == (490, 644)
    assert y[0, 0, 5:485, 2:642].eq(1).all() and y[0, 0, :5].eq(0).all() and y[0, 0, :, :2].eq(0).all()
    assert y[0, 0, 485:].eq(0).all() and y[0, 0, :, 642:].eq(0).all()
    assert D.rescale_size((512, 683), (2048, 512)) == (512, 683)
    assert D.rescale_size((300, 400), (2048, 512)) == (512, 683)       # int(400 * 512/300 + 0.5)
    assert D.rescale_size((100, 1000), (2048, 512)) == (205, 2048)


def test_training_crops_keep_image_and_label_aligned_and_pad_with_ignore():
    rng = np.random.default_rng(0)
    img = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), np.int64)
    img[:, 30:] = 200
    mask[:, 30:] = 1
    cfg = D.ADE20K.at_crop((48, 48))
    for _ in range(10):
        im, m = D.segmentation_crop(img, mask, cfg, rng)
        assert im.shape == (48, 48, 3) and m.shape == (48, 48)
        valid = m != 255
        wrong = (im[..., 0][valid] > 100) != (m[valid] == 1)            # image and label aligned,
        assert wrong.sum() <= 2 * 48                                     # up to the blurred edge
        assert (im[~valid] == 0).all()                                     # padding: image 0, label 255
    depth = np.linspace(1, 5, 48 * 64, dtype=np.float32).reshape(48, 64)
    dimg = np.repeat((depth * 40).astype(np.uint8)[..., None], 3, -1)
    for _ in range(10):
        im, d = D.depth_crop(dimg, depth, D.NYUD.at_crop((32, 40)), rng)
        assert im.shape == (32, 40, 3) and d.shape == (32, 40)
        ok = d > 0
        assert np.abs(im[..., 0][ok].astype(float) - d[ok] * 40).max() <= 12  # aligned up to rotation


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_dvt_protocol_end_to_end(tmp_path, task):
    (write_segmentation if task == "segmentation" else write_depth)(tmp_path / "d", n=6)
    out = tmp_path / "probe.json"
    argv = ["probe", "--task", task, "--protocol", "dvt", "--model", "planted", "--data", str(tmp_path / "d"),
            "--top-k", "2", "--seeds", "1", "--iterations", "6", "--probe-batch-size", "2",
            "--crop-size", "32", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["protocol"]["name"] == "dvt" and "Denoising-ViT" in res["protocol"]["reference"]
    assert any("6 iterations" in d for d in res["protocol"]["deviations"])
    assert res["config"]["dvt"]["iterations"] == 6 and res["config"]["dvt"]["crop"] == [32, 32]
    assert set(res["arms"]) == {"plain", "registers"}
    for arm in res["arms"].values():
        if task == "segmentation":
            assert res["config"]["dvt"]["stride"] == [21, 21]
            assert 0 < arm["miou"]["mean"] <= 1
        else:
            assert 0 < arm["rmse"]["mean"] < 5 and 0 < arm["abs_rel"]["mean"] < 2
            assert 0 <= arm["delta1"]["mean"] <= 1
    assert main(["probe", "--task", "classification", "--protocol", "dvt", "--model", "planted",
                 "--data", str(tmp_path / "d"), "--quiet"]) == 2
    assert main(["probe", "--task", task, "--crop-size", "32", "--model", "planted",
                 "--data", str(tmp_path / "d"), "--quiet"]) == 2            # --crop-size is dvt's
