"""Linear probes: separable features give ~100%, shuffled labels give chance; patch targets and
dense scores by hand; the three tasks end to end, with the feature cache reused."""
import json

import numpy as np
import pytest
import torch

from ttreg.eval import probe as P
from ttreg.eval.cli import main
from ttreg.eval.synthetic import write_depth, write_image_folder, write_segmentation


def clusters(n_per_class=100, classes=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 4
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def test_probe_separable_is_perfect_and_shuffled_is_chance():
    x, y = clusters()
    tr, va = slice(0, 200), slice(200, 400)
    probe = P.fit_linear(x[tr], y[tr], num_outputs=4, seed=0)
    assert float((probe(x[va]).argmax(-1) == y[va]).float().mean()) >= 0.99
    shuffled = y[tr][torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    probe = P.fit_linear(x[tr], shuffled, num_outputs=4, seed=0)
    acc = float((probe(x[va]).argmax(-1) == y[va]).float().mean())
    assert abs(acc - 0.25) < 0.1                         # chance for 4 classes


def test_probe_regression_recovers_a_linear_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    y = x @ torch.arange(1.0, 9.0) + 3.0
    probe = P.fit_linear(x[:200], y[:200], num_outputs=1, regression=True, seed=0)
    err = (probe(x[200:])[:, 0] - y[200:]).pow(2).mean().sqrt()
    assert float(err) < 0.05 * float(y.std())


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


def test_dense_scores_on_features_that_encode_the_answer():
    rng = np.random.default_rng(0)
    n, grid, patch = 12, (4, 4), 8
    # one class per row of patches (bilinear upsampling then needs no 2-D corner votes)
    lab = rng.integers(0, 3, size=(n, grid[0], 1)).repeat(grid[1], 2)
    masks = lab.repeat(patch, 1).repeat(patch, 2)
    feats = torch.nn.functional.one_hot(torch.from_numpy(lab), 3).float() * 3
    feats = feats + 0.01 * torch.randn(*feats.shape, generator=torch.Generator().manual_seed(0))
    s = P._score_segmentation(feats[:8], masks[:8], feats[8:], masks[8:], 3, seed=0)
    assert s["miou"] > 0.95 and s["pixel_accuracy"] > 0.97
    depth = np.linspace(1, 9, n)[:, None, None] * np.ones((1, 32, 32))   # one depth per image
    f = torch.from_numpy(np.linspace(1, 9, n)).float()[:, None, None, None].expand(n, 4, 4, 2).clone()
    f[..., 1] = torch.rand(n, 4, 4, generator=torch.Generator().manual_seed(1))
    assert P._score_depth(f[::2], depth[::2], f[1::2], depth[1::2], seed=0)["rmse"] < 0.1


def test_classification_probe_end_to_end_with_feature_cache(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "cls", per_class=6)
    out, cache = tmp_path / "probe.json", tmp_path / "cache"
    argv = ["probe", "--task", "classification", "--model", "planted", "--data", str(tmp_path / "cls"),
            "--neurons", "auto", "--top-k", "2", "--seeds", "2", "--steps", "100", "--cache", str(cache), "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "classification" and res["config"]["num_classes"] == 3
    for arm in ("plain", "registers"):
        assert res["arms"][arm]["top1"]["n"] == 2
        assert res["arms"][arm]["top1"]["mean"] == 1.0          # noisy colours are separable
    assert len(list(cache.glob("*.pt"))) == 2                   # one feature file per arm

    def no_model(*a, **k):
        raise AssertionError("features should come from the cache")
    monkeypatch.setattr(P, "token_features", no_model)
    assert main(argv) == 0
    assert json.loads(out.read_text())["arms"]["plain"]["top1"] == res["arms"]["plain"]["top1"]


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_dense_probe_end_to_end(tmp_path, task):
    (write_segmentation if task == "segmentation" else write_depth)(tmp_path / "d", n=8)
    out = tmp_path / "probe.json"
    assert main(["probe", "--task", task, "--model", "planted", "--data", str(tmp_path / "d"),
                 "--top-k", "2", "--seeds", "2", "--steps", "100", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["arms"]) == {"plain", "registers"}
    for arm in res["arms"].values():
        if task == "segmentation":
            assert res["config"]["num_classes"] == 3
            assert 0.3 < arm["miou"]["mean"] <= 1 and 0.6 < arm["pixel_accuracy"]["mean"] <= 1
        else:                       # depth in 1..5 m: far better than predicting a constant
            assert 0 < arm["rmse"]["mean"] < 0.6
