"""Linear probes. DINOv2's protocol: its feature choices against timm's own
``get_intermediate_layers``, its optimiser restated, the learning-rate grid choosing the one rate
that learns, the segmentation and depth heads trained to known answers. The quick probe:
separable features give ~100%, shuffled labels chance, patch targets by hand. The three tasks
end to end, with the feature cache reused."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ttreg.eval import probe as P
from ttreg.eval.cli import main
from ttreg.testing import write_depth, write_image_folder, write_segmentation


def clusters(n_per_class=100, classes=4, dim=16, seed=0, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * spread
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


# --- DINOv2's protocol -----------------------------------------------------------------------------
def test_linear_input_is_dinov2s_create_linear_input():
    f = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)   # 4 class tokens + avg patch
    assert torch.equal(P.linear_input(f, 1, False), f[:, 3])
    assert torch.equal(P.linear_input(f, 1, True), torch.cat([f[:, 3], f[:, 4]], -1))
    assert torch.equal(P.linear_input(f, 4, True), f.reshape(2, 15))  # oldest block first, avg last


def test_global_features_are_timms_intermediate_layers(planted, images):
    x = images[:3]
    with torch.no_grad():
        got = P._features_of(planted, x, "global", (8, 8))
        ref = planted.forward_intermediates(x, indices=4, norm=True, output_fmt="NLC",
                                            intermediates_only=True, return_prefix_tokens=True)
    # timm gives the 4 last blocks' (patches, prefix) through the final norm
    assert got.shape == (3, 5, 96)
    for i, (patches, prefix) in enumerate(ref):
        assert torch.allclose(got[:, i], prefix[:, 0], atol=1e-6)
    assert torch.allclose(got[:, 4], ref[-1][0].mean(1), atol=1e-6)
    with torch.no_grad():
        raw = P._features_of(planted, x, "patch+cls", (8, 8))
        last = planted.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC",
                                             intermediates_only=True, return_prefix_tokens=True)[0]
    assert torch.allclose(raw["patches"].float(), last[0].reshape(3, 8, 8, 96), rtol=1e-3, atol=1e-3)
    assert torch.allclose(raw["cls"], last[1][:, 0], atol=1e-6)


def test_train_sgd_is_momentum_sgd_with_a_cosine_schedule():
    """SGD restated: buf = 0.9 buf + g (g alone at the first step), p -= lr_t buf,
    lr_t = lr (1 + cos(pi t / T)) / 2; no weight decay."""
    x, y = clusters(20, 3, 5)
    head = torch.nn.Linear(5, 3)
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    batches = P.batch_indices(len(x), 8, 12, seed=3)
    P.train_sgd(head, lambda h, idx: torch.nn.functional.cross_entropy(h(x[idx]), y[idx]), batches, 0.5)
    bufs = None
    for t, idx in enumerate(batches):
        w.requires_grad_(True), b.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(x[idx] @ w.T + b, y[idx])
        gw, gb = torch.autograd.grad(loss, (w, b))
        bufs = (gw, gb) if bufs is None else (0.9 * bufs[0] + gw, 0.9 * bufs[1] + gb)
        lr = 0.5 * (1 + math.cos(math.pi * t / len(batches))) / 2
        w, b = (w - lr * bufs[0]).detach(), (b - lr * bufs[1]).detach()
    assert torch.allclose(head.weight, w, atol=1e-6) and torch.allclose(head.bias, b, atol=1e-6)
    assert not head.training and not head.weight.requires_grad
    # the sampler: shuffled epochs back to back, every index once per epoch
    assert sorted(P.batch_indices(10, 5, 4, 0)[:2].flatten().tolist()) == list(range(10))


def test_select_best_keeps_the_first_of_equals():
    assert P.select_best({"a": 0.5, "b": 0.9, "c": 0.9}) == "b"
    assert P.select_best({"a": 0.3, "b": 0.1, "c": 0.1}, higher_is_better=False) == "b"


def test_grid_picks_the_rate_that_learns_on_the_validation_split():
    """Labels are made so that every head's shared initialisation (N(0, 0.01) from the seed) is
    wrong on every sample -- the class is the initial prediction plus one -- yet linearly
    separable. In 30 steps rates of 1e-6 and 1e-5 leave the heads where they started (0 right on
    the validation split), 0.1 learns them: the grid must choose 0.1."""
    x, _ = clusters(60, 4, 8, spread=3.0)
    w0 = torch.empty(4, 8).normal_(0.0, 0.01, generator=torch.Generator().manual_seed(0))
    y = ((x @ w0.T).argmax(-1) + 1) % 4
    f = torch.stack([x, x, x, x, x - x.mean(0)], 1)          # (N, 4 class tokens, avg patch)
    tr, va = slice(0, 160), slice(160, 240)
    best, heads, scores = P.classify_grid(f[tr], y[tr], f[va], y[va], 4, iterations=30, batch_size=32,
                                          learning_rates=(1e-6, 1e-5, 0.1), n_last_blocks=(1,),
                                          avgpool=(False,), seed=0)
    assert best == "blocks_1_avgpool_False_lr_0.0125"                      # 0.1 * 32 / 256
    assert scores["blocks_1_avgpool_False_lr_1.25e-07"] == scores["blocks_1_avgpool_False_lr_1.25e-06"] == 0.0
    assert scores[best] > 0.9
    head = heads[best][0]
    assert float((head(f[va, 3]).argmax(-1) == y[va]).float().mean()) == scores[best]


def test_segmentation_head_reaches_the_known_answer():
    """Each row of patches has one class and a feature that says which: BatchNorm + linear,
    upsampled to the 8-px pixel grid, labels every pixel right (mIoU 1)."""
    g = torch.Generator().manual_seed(0)
    n, rows, cols, patch = 16, 4, 4, 8
    lab = torch.randint(0, 3, (n, rows, 1), generator=g).expand(n, rows, cols)
    feats = torch.nn.functional.one_hot(lab, 3).float() * 2 + 0.05 * torch.randn(n, rows, cols, 3, generator=g)
    masks = lab.repeat_interleave(patch, 1).repeat_interleave(patch, 2).numpy()
    masks[:, 0, 0] = 255                                                   # ignored pixels
    best, heads, scores = P.segment_grid(feats[:12], masks[:12], feats[12:], masks[12:], 3,
                                         iterations=60, batch_size=4, learning_rates=(1e-4, 0.5))
    assert best == "lr_0.0078125" and scores[best] == 1.0                  # 0.5 * 4 / 256
    conf = P._seg_confusion(heads[best], feats[12:], masks[12:], 3, 255)
    assert conf.trace() == conf.sum() == 4 * 32 * 32 - 4


def test_depth_head_by_hand_and_trained_to_the_known_depth():
    head = P.DepthHead(1, 0.0, 10.0, bins=3)                    # bin centres 0, 5, 10
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.copy_(torch.tensor([0.0, 0.8, 0.2]))
    d = head(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1))
    w = torch.tensor([0.1, 0.9, 0.3]) / 1.3                     # ReLU + 0.1, normalised
    assert d.shape == (1, 1, 4, 4) and torch.allclose(d, (w @ torch.tensor([0.0, 5, 10])).expand(1, 1, 4, 4))
    pred, gt = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 0.0, 2.0])   # gt 0: invalid
    g = torch.log(pred[[0, 2]] + 1e-3) - torch.log(gt[[0, 2]] + 1e-3)
    assert float(P.sig_loss(pred, gt)) == pytest.approx(float(torch.sqrt(g.var() + 0.15 * g.mean() ** 2)))
    # each image at one depth in 2..8 m, written in its class token: the head learns it
    gen = torch.Generator().manual_seed(0)
    depth = torch.tensor([2.0, 4.0, 6.0, 8.0]).repeat(6)
    cls = torch.nn.functional.one_hot(torch.arange(24) % 4, 4).float() * 3
    patches = 0.1 * torch.randn(24, 2, 2, 4, generator=gen)
    target = depth[:, None, None].expand(24, 16, 16).numpy()
    best, heads, scores = P.depth_grid(patches[:16], cls[:16], target[:16], patches[16:], cls[16:],
                                       target[16:], min_depth=1e-3, max_depth=10.0, iterations=80,
                                       batch_size=8, learning_rates=(1e-4, 30.0))
    assert best == "lr_0.9375" and scores[best] < 0.3 < scores["lr_3.125e-06"]   # 30 * 8 / 256
    # predicting the mean depth (5 m) would give an RMSE of sqrt(5) = 2.24


def test_splits_for_holdout_selection():
    targets = np.repeat(np.arange(3), 20)
    tr, se, ev = P._splits("classification", targets, 60, 60, False, 0.25, "holdout", 0.2, 0)
    assert len(ev) == 15 and len(se) == 9 and len(tr) == 36
    assert not set(tr) & set(se) and not (set(tr) | set(se)) & set(ev)
    tr2, se2, ev2 = P._splits("classification", targets, 60, 60, False, 0.25, "eval", 0.2, 0)
    assert np.array_equal(se2, ev2) and np.array_equal(ev2, ev) and len(tr2) == 45


# --- ttreg's quick probe ---------------------------------------------------------------------------
def test_quick_probe_separable_is_perfect_and_shuffled_is_chance():
    x, y = clusters()
    tr, va = slice(0, 200), slice(200, 400)
    probe = P.fit_linear(x[tr], y[tr], num_outputs=4, seed=0, steps=100)
    assert float((probe(x[va]).argmax(-1) == y[va]).float().mean()) >= 0.99
    shuffled = y[tr][torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    probe = P.fit_linear(x[tr], shuffled, num_outputs=4, seed=0, steps=100)
    acc = float((probe(x[va]).argmax(-1) == y[va]).float().mean())
    assert abs(acc - 0.25) < 0.1                         # chance for 4 classes


def test_patch_targets_by_hand():
    masks = np.array([[[0, 0, 1, 1],
                       [0, 1, 1, 1],
                       [255, 255, 2, 2],
                       [255, 255, 2, 0]]])
    assert P.patch_labels(masks, (2, 2), 3).tolist() == [[[0, 1], [-1, 2]]]
    depth = np.array([[[1.0, 3.0, 2.0, 2.0],
                       [0.0, 0.0, 2.0, 2.0],
                       [5.0, 5.0, 0.0, 0.0],
                       [5.0, 7.0, 0.0, 0.0]]])
    mean, has = P.patch_means(depth, depth > 0, (2, 2))
    assert mean.tolist() == [[[2.0, 2.0], [5.5, 0.0]]]
    assert has.tolist() == [[[True, True], [True, False]]]


# --- end to end -------------------------------------------------------------------------------------
def test_classification_probe_end_to_end_with_feature_cache(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "cls", per_class=6)
    out, cache = tmp_path / "probe.json", tmp_path / "cache"
    argv = ["probe", "--task", "classification", "--model", "planted", "--data", str(tmp_path / "cls"),
            "--neurons", "auto", "--top-k", "2", "--seeds", "2", "--iterations", "20",
            "--learning-rates", "0.1", "--cache", str(cache), "--quiet", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "classification" and res["config"]["num_classes"] == 3
    assert res["protocol"]["name"] == "dinov2" and "linear.py" in res["protocol"]["reference"]
    assert res["config"]["batch_size"] == 128 and res["config"]["select_on"] == "eval"
    for arm in ("plain", "registers"):
        assert res["arms"][arm]["top1"]["n"] == 2
        assert res["arms"][arm]["top1"]["mean"] == 1.0          # noisy colours are separable
        assert len(res["arms"][arm]["selection_scores"][0]) == 2 * 2     # blocks x avgpool x rates
    assert len(list(cache.glob("*.pt"))) == 2                   # one feature file per arm

    def no_model(*a, **k):
        raise AssertionError("features should come from the cache")
    monkeypatch.setattr(P, "block_tokens", no_model)
    assert main(argv) == 0
    assert json.loads(out.read_text())["arms"]["plain"]["top1"] == res["arms"]["plain"]["top1"]
    assert main([*argv, "--quick", "--steps", "30"]) == 0       # the quick probe reads the same cache
    quick = json.loads(out.read_text())
    assert quick["protocol"]["name"] == "quick" and quick["arms"]["plain"]["top1"]["mean"] == 1.0


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_dense_probe_end_to_end(tmp_path, task):
    (write_segmentation if task == "segmentation" else write_depth)(tmp_path / "d", n=6)
    out = tmp_path / "probe.json"
    assert main(["probe", "--task", task, "--model", "planted", "--data", str(tmp_path / "d"),
                 "--top-k", "2", "--seeds", "1", "--iterations", "8", "--probe-batch-size", "2",
                 "--learning-rates", "0.5", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["arms"]) == {"plain", "registers"}
    assert any("SGD" in d for d in res["protocol"]["deviations"])
    for arm in res["arms"].values():
        assert arm["selected"] == ["lr_0.00390625"]              # 0.5 * 2 / 256
        if task == "segmentation":
            assert res["config"]["num_classes"] == 3
            assert 0 < arm["miou"]["mean"] <= 1 and 0 < arm["pixel_accuracy"]["mean"] <= 1
        else:                       # depth in 1..5 m, range 0..10 m
            assert 0 < arm["rmse"]["mean"] < 5


def test_depth_rmse_is_the_mean_over_images_of_each_images_rmse():
    """Per image, the RMSE over its valid pixels (min < depth < max, finite); images without a
    valid pixel are left out; then the mean over images -- by hand on three 1x2 maps."""
    from ttreg.eval.probe import _depth_rmse
    pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]], [[[5.0, 5.0]]]])           # (3, 1, 1, 2)
    depths = np.array([[[1.0, 4.0]], [[3.0, float("nan")]], [[20.0, 0.0]]])     # third: none valid
    got = _depth_rmse(lambda f, c: f, pred, None, depths, 1e-3, 10.0, chunk=2)
    assert got == pytest.approx((math.sqrt((0 + 4) / 2) + 3.0) / 2)


def test_single_tokens_are_the_tokens_they_name():
    """Table 1's tokens, each checked against timm's own forward and ttreg.trace: CLS, the patch at
    the grid's centre, the largest-norm patch (the planted outlier), the first trained register,
    the test-time register -- each through the final norm."""
    import ttreg
    from ttreg.testing import mixed_images, planted_vit
    model = planted_vit(reg_tokens=2)                  # CLS + 2 trained registers, 8 x 8 patches
    x = mixed_images(3)
    with torch.no_grad():
        full = model.forward_features(x)               # final norm applied to every token
        pre = {}
        h = model.blocks[-1].register_forward_hook(lambda m, i, o: pre.update(y=o))
        model.forward_features(x)
        h.remove()
        out = int(pre["y"][:, 3:].norm(dim=-1).argmax(dim=1)[0])
        assert torch.equal(P.single_token(model, x, "cls"), full[:, 0])
        assert torch.equal(P.single_token(model, x, "trained-register"), full[:, 1])
        assert torch.equal(P.single_token(model, x, "center"), full[:, 3 + 4 * 8 + 4])
        picked = P.single_token(model, x, "outlier")
        assert torch.equal(picked[0], full[0, 3 + out])
        with pytest.raises(ValueError, match="needs test-time registers"):
            P.single_token(model, x, "register")
        with ttreg.test_time_registers(model, [(1, 7), (3, 21)], check=False):
            reg = P.single_token(model, x, "register")
            tr = ttreg.trace(model, x, norms=True)
            seq = ttreg.wrap(model).intermediates(x, [-1], split=False, registers=True)[0]
    assert torch.allclose(seq[:, -1].norm(dim=-1), tr.norms[:, -1, -1], atol=1e-4)
    assert torch.equal(reg, model.norm(seq[:, -1]))
    with pytest.raises(ValueError, match="trained registers"):
        P.single_token(planted_vit(), x, "trained-register")


def classification_run(tmp_path, *options, per_class=6):
    """``ttreg eval probe --task classification`` on a small image folder: (exit code, JSON or None)."""
    if not (tmp_path / "cls").exists():
        write_image_folder(tmp_path / "cls", per_class=per_class)
    out = tmp_path / "p.json"
    out.unlink(missing_ok=True)
    rc = main(["probe", "--model", "planted", "--task", "classification", "--data", str(tmp_path / "cls"),
               "--seeds", "1", "--top-k", "2", "--quiet", "--out", str(out), *options])
    return rc, json.loads(out.read_text()) if out.exists() else None


def test_token_probe_command(tmp_path):
    rc, res = classification_run(tmp_path, "--token", "register", "--quick", "--steps", "20")
    assert rc == 0
    assert set(res["arms"]) == {"registers"} and res["config"]["token"] == "register"
    assert 0 <= res["arms"]["registers"]["top1"]["mean"] <= 1
    rc, res = classification_run(tmp_path, "--token", "center", "--iterations", "5", "--learning-rates", "0.1")
    assert rc == 0
    assert set(res["arms"]) == {"plain", "registers"}
    assert res["arms"]["plain"]["selected"] == ["blocks_1_avgpool_False_lr_0.05"]   # one token, no pooling


def test_dinov2_geometry_is_resize_256_center_crop_224(tmp_path):
    """``geometry="dinov2"``: dinov2/data/transforms.py's classification eval transform restated
    with PIL (shorter side to 256 bicubic, the central 224 square) and the model run at 224 px
    (timm's dynamic_img_size): the cached features are the class tokens of that input."""
    from PIL import Image
    from ttreg.eval.arms import Arm
    from ttreg.eval.datasets import to_tensor
    from ttreg.sizes import dynamic_size
    from ttreg.testing import planted_vit
    model = planted_vit()
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(100, 150), (300, 240)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    feats = P.extract_features(model, Arm("plain", "plain"), paths, "global", geometry="dinov2")
    ref = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        s = 256 / min(im.size)
        im = im.resize((max(256, round(im.width * s)), max(256, round(im.height * s))), Image.BICUBIC)
        left, top = (im.width - 224) // 2, (im.height - 224) // 2
        ref.append(to_tensor(im.crop((left, top, left + 224, top + 224)), (0.485, 0.456, 0.406),
                             (0.229, 0.224, 0.225)))
    x = torch.stack(ref)
    with torch.no_grad(), dynamic_size(model):
        out = model.forward_intermediates(x, indices=4, norm=True, output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True)
    cls = torch.stack([prefix[:, 0] for _, prefix in out], dim=1)
    assert feats.shape == (2, 5, 96)
    assert torch.allclose(feats[:, :4], cls, atol=1e-5)
    assert torch.allclose(feats[:, 4], out[-1][0].mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="'dinov2' for classification"):
        P.evaluate_probe(model, "depth", [], neurons=[], geometry="dinov2")


def test_dinov2_train_crop_is_random_resized_crop_and_flip_restated(tmp_path):
    """linear.py's training transform: torchvision's RandomResizedCrop(224, bicubic) get_params
    restated (10 tries of area in 0.08-1 and log-uniform ratio in 3/4-4/3, then the centre
    fallback) and a flip drawn with torch.rand(1) < 0.5, from torch's generator seeded per view
    and image; the caller's random state is untouched."""
    from PIL import Image
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8))

    def restated(seed):
        g = torch.Generator().manual_seed(seed)
        W, H = im.size
        area = H * W
        log_ratio = torch.log(torch.tensor([3 / 4, 4 / 3]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(0.08, 1.0, generator=g).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g).item())
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= W and 0 < h <= H:
                i = torch.randint(0, H - h + 1, size=(1,), generator=g).item()
                j = torch.randint(0, W - w + 1, size=(1,), generator=g).item()
                break
        else:
            raise AssertionError("fallback not expected on this image")
        out = im.crop((j, i, j + w, i + h)).resize((224, 224), Image.BICUBIC)
        if torch.rand(1, generator=g) < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out)
    state = torch.random.get_rng_state()
    flips = 0
    for v in range(3):
        for idx in range(4):
            seed = P.view_seed(v, idx)
            got = np.asarray(P.dinov2_train_crop(im, seed))
            assert got.shape == (224, 224, 3)
            assert np.array_equal(got, restated(seed))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len({P.view_seed(v, i) for v in range(10) for i in range(1000)}) == 10000


def test_views_grid_reads_view_k_on_pass_k_and_one_view_is_the_plain_grid():
    x, y = clusters(n_per_class=8, classes=3, dim=5)
    f = torch.stack([x] * 5, dim=1)                                     # (N, 5, D) as linear_input wants
    kw = dict(iterations=20, batch_size=6, learning_rates=[0.1], n_last_blocks=[1], avgpool=[False])
    plain = P.classify_grid(f, y, f, y, 3, **kw)
    one = P.classify_grid(f[None], y, f, y, 3, **kw)
    name = plain[0]
    assert torch.equal(plain[1][name][0].weight, one[1][name][0].weight)
    two = P.classify_grid(torch.stack([f, f * 0]), y, f, y, 3, **kw)      # view 1 carries nothing
    assert not torch.equal(plain[1][name][0].weight, two[1][name][0].weight)


def test_dinov2_geometry_trains_on_augmented_views(tmp_path):
    rc, res = classification_run(tmp_path, "--geometry", "dinov2", "--iterations", "6", "--probe-batch-size", "4",
                                 "--learning-rates", "0.1", "--train-views", "2", per_class=3)
    assert rc == 0
    assert res["config"]["train_views"] == 2
    assert any("RandomResizedCrop 224 + flip) as 2 cached views" in d for d in res["protocol"]["deviations"])
    assert 0 <= res["arms"]["plain"]["top1"]["mean"] <= 1


def test_register_count_ablation_is_one_row_per_count(tmp_path):
    rc, res = classification_run(tmp_path, "--quick", "--steps", "10", "--num-registers", "0,1,3", per_class=4)
    assert rc == 0
    assert list(res["arms"]) == ["plain", "registers-R1", "registers-R3"]
    assert [a["setup"]["num_registers"] for a in res["arms"].values()] == [0, 1, 3]
    assert classification_run(tmp_path, "--num-registers", "0") == (2, None)   # one count must be >= 1


# --- label resolution and native-size depth (DINOv2's protocol) -------------------------------------
def test_dense_scores_are_taken_at_each_labels_native_size():
    """Logits at the feature grid upsampled (bilinear) to each label's own size, one image at a
    time -- by hand against F.interpolate + the confusion of each image."""
    from ttreg.eval.metrics import confusion_matrix
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 2, 3, 4, generator=g)                    # (N, rows, cols, D)
    head = lambda f: f.permute(0, 3, 1, 2)[:, :3] * 3                # 3 classes from 4 channels
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 3, s) for s in ((5, 7), (8, 8), (2, 9))]
    masks[1][0, :] = 255
    got = P._seg_confusion(head, feats, masks, 3, 255, chunk=2)
    want = sum(confusion_matrix(F.interpolate(head(feats[i:i + 1]), size=m.shape, mode="bilinear",
                                              align_corners=False).argmax(1).numpy(), m, 3, 255)
               for i, m in enumerate(masks))
    assert np.array_equal(got, want) and got.sum() == 35 + 64 + 18 - 8
    depths = [rng.uniform(0.5, 4, s).astype(np.float32) for s in ((5, 7), (8, 8))]
    pred = lambda f, c: f.permute(0, 3, 1, 2)[:, :1].abs() + 1
    rmse = P._depth_rmse(pred, feats[:2], None, depths, 1e-3, 10.0, chunk=2)
    per = [float(np.sqrt(((F.interpolate(pred(feats[i:i + 1], None), size=d.shape, mode="bilinear",
                                         align_corners=False)[0, 0].numpy() - d) ** 2).mean()))
           for i, d in enumerate(depths)]
    assert rmse == pytest.approx(np.mean(per), rel=1e-6)


def test_depth_images_run_at_their_own_size_centre_padded(tmp_path):
    """DINOv2's depther geometry: each image at its native size, centre-padded to a multiple of
    the patch size (CenterPadding), the model run there; the features are the patch tokens and
    class token of that input; the probe is scored at the depth maps' own size."""
    from PIL import Image
    from ttreg.eval.arms import Arm
    from ttreg.eval.datasets import to_tensor
    from ttreg.eval.dense import center_pad
    from ttreg.sizes import dynamic_size
    from ttreg.testing import planted_vit
    model = planted_vit()
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "depth").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        np.save(tmp_path / "depth" / f"{i}.npy", rng.uniform(1, 4, (50, 70)).astype(np.float32))
    paths = sorted((tmp_path / "images").glob("*.png"))
    feats = P.extract_features(model, Arm("plain", "plain"), paths, "patch+cls", geometry="native")
    x = torch.stack([center_pad(to_tensor(Image.open(p).convert("RGB"), (0.485, 0.456, 0.406),
                                          (0.229, 0.224, 0.225)), (8, 8)) for p in paths])
    assert x.shape[-2:] == (56, 72)
    with torch.no_grad(), dynamic_size(model):
        out = model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC",
                                          intermediates_only=True, return_prefix_tokens=True)
    patches, prefix = out[-1]
    assert feats["patches"].shape == (4, 7, 9, 96)
    assert torch.allclose(feats["patches"].float(), patches.reshape(4, 7, 9, 96).half().float(), atol=1e-3)
    assert torch.allclose(feats["cls"], prefix[:, 0], atol=1e-5)
    items = [(p, tmp_path / "depth" / f"{p.stem}.npy") for p in paths]
    res = P.evaluate_probe(model, "depth", items, neurons=[], seeds=[0], iterations=4, probe_batch_size=2,
                           learning_rates=[0.5], print_table=False)
    devs = res["protocol"]["deviations"]
    assert any("centre-padded" in d for d in devs) and any("label resolution" in d for d in devs)
    assert 0 < res["arms"]["plain"]["rmse"]["mean"] < 4
