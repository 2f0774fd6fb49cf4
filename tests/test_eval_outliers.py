"""Outlier statistics: the planted model's outliers go away with test-time registers and stay
with the random-neuron control; a model without outliers says so; the command runs end to end."""
import json

import numpy as np
import pytest

from ttreg.eval.arms import make_arms, random_neurons
from ttreg.eval.cli import main
from ttreg.eval.outliers import evaluate_outliers
from ttreg.testing import write_image_folder
from ttreg.register_neurons import RegisterNeurons

PLANTS = [(1, 7), (3, 21)]


def test_random_control_matches_layer_counts(planted):
    rn = RegisterNeurons([(1, 7), (3, 21), (3, 5)])
    for seed in (0, 1):
        ctl = random_neurons(rn, planted, seed)
        assert {l: len(v) for l, v in ctl.by_layer().items()} == {1: 1, 3: 2}
        assert not set(ctl.neurons) & set(rn.neurons)
    assert random_neurons(rn, planted, 0).neurons == random_neurons(rn, planted, 0).neurons
    assert random_neurons(rn, planted, 0).neurons != random_neurons(rn, planted, 1).neurons
    names = [a.name for a in make_arms(planted, rn, control_seeds=(0, 1))]
    assert names == ["plain", "registers", "random-0", "random-1"]


def test_planted_outliers_move_into_the_register(planted, images):
    res = evaluate_outliers(planted, images, PLANTS, control_seeds=(0, 1), print_table=False)
    plain, reg = res["arms"]["plain"], res["arms"]["registers"]
    assert plain["images"] == 10
    assert plain["fraction_with_outliers"] == 1.0          # every image has the planted outlier
    assert reg["fraction_with_outliers"] == 0.0
    assert plain["norm_ratio"] > 4 and reg["norm_ratio"] < 2
    assert len(plain["norm_ratio_per_layer"]) == 6
    # outliers emerge at block 3 (the large plant): the ratio jumps there
    assert plain["norm_ratio_per_layer"][3] > 3 * plain["norm_ratio_per_layer"][0]
    assert reg["max_patch_norm"] < plain["max_patch_norm"] / 3
    assert plain["cls_to_registers"] == 0.0 and reg["cls_to_registers"] > 0.0
    for arm in res["arms"].values():
        assert 0 < arm["cls_entropy"] <= np.log(64) + 1e-6
        assert 5 / 64 - 1e-6 <= arm["top5_mass"] <= 1
    rnd = res["random"]
    assert rnd["fraction_with_outliers"]["mean"] == 1.0
    assert rnd["norm_ratio"]["mean"] == pytest.approx(plain["norm_ratio"], rel=0.05)


def test_cls_to_register_attention_is_the_max_over_heads(planted, images):
    """As the authors' register_neurons.ipynb: per image the largest last-layer CLS attention over
    heads and registers (and over heads and patches for comparison); the mean over heads too."""
    import ttreg
    res = evaluate_outliers(planted, images, PLANTS, control_seeds=(), num_registers=2, print_table=False)
    with ttreg.test_time_registers(planted, PLANTS, num_registers=2, check=False):
        tr = ttreg.trace(planted, images, norms=False, attention=[-1])
    cls = tr.attention[5][:, :, 0].double()                            # (B, heads, T)
    reg = res["arms"]["registers"]
    assert reg["cls_to_registers"] == pytest.approx(float(cls[..., -2:].amax(dim=(1, 2)).mean()))
    assert reg["cls_to_registers_median"] == pytest.approx(float(cls[..., -2:].amax(dim=(1, 2)).median()))
    assert reg["cls_to_registers_mean_heads"] == pytest.approx(float(cls[..., -2:].sum(-1).mean()))
    assert reg["cls_to_patches_max"] == pytest.approx(float(cls[..., 1:-2].amax(dim=(1, 2)).mean()))
    assert reg["cls_to_registers"] > reg["cls_to_registers_mean_heads"] / 2


def test_cli_outliers_end_to_end(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=3)
    out = tmp_path / "out.json"
    assert main(["outliers", "--model", "planted", "--images", str(tmp_path / "imgs"),
                 "--top-k", "2", "--controls", "2", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == "planted" and sorted(res["neurons"]) == [[1, 7], [3, 21]]
    assert res["arms"]["plain"]["images"] == 9
    assert res["arms"]["plain"]["fraction_with_outliers"] == 1.0
    assert res["arms"]["registers"]["fraction_with_outliers"] == 0.0
    assert res["random"]["fraction_with_outliers"]["n"] == 2


def _need_builtin():
    try:
        from ttreg.builtin import onnx_path
        onnx_path()
    except Exception as e:  # pragma: no cover - the built-in model is optional here
        pytest.skip(f"built-in model unavailable: {e}")


def test_builtin_model_has_no_outliers(tmp_path, capsys):
    """The real DINOv2 ViT-S/14 (offline): no outlier tokens, so no register neurons."""
    _need_builtin()
    write_image_folder(tmp_path / "imgs", classes=("red", "blue"), per_class=1, size=224)
    out = tmp_path / "out.json"
    assert main(["outliers", "--model", "builtin:dinov2_vits14", "--images", str(tmp_path / "imgs"),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["neurons"] == []
    assert set(res["arms"]) == {"plain", "registers"}          # nothing to draw a control from
    assert res["arms"]["plain"]["fraction_with_outliers"] == 0.0
    assert res["arms"]["plain"]["norm_ratio"] < 4
    assert "does not need registers" in capsys.readouterr().err



def test_rebuttal_statistics_by_hand():
    """One image, CLS + 4 patches + 1 register, 2 blocks, 2 heads, fixed norms and attention: the
    patch-norm median and std, the outlier norms (CLS counted only when asked, as the authors'
    code counts it) and CLS's head-mean attention to the register against its median elsewhere."""
    import torch
    from types import SimpleNamespace
    from ttreg.eval.outliers import _batch_stats
    norms = torch.tensor([[[1., 1, 1, 1, 1, 1], [50., 2, 4, 6, 40, 3]]])       # (B, L, T)
    attn = torch.zeros(1, 2, 6, 6)
    attn[0, 0, 0] = torch.tensor([.1, .1, .2, .1, .1, .4])
    attn[0, 1, 0] = torch.tensor([.1, .3, .2, .1, .1, .2])
    tr = SimpleNamespace(num_prefix_tokens=1, num_registers=1, norms=norms, attention={1: attn},
                         patch_slice=slice(1, 5))
    got = _batch_stats(tr, 1, 20.0, 2)
    assert got["median_norm"].tolist() == [4.0]            # torch's median of 2, 4, 6, 40: the lower
    assert got["std_norm"].item() == pytest.approx(float(np.std([2, 4, 6, 40], ddof=1)))
    assert got["outlier_norms"].tolist() == [40.0]          # above 20: patch 4 only
    assert got["to_regs_mean_heads"].item() == pytest.approx(0.3)       # (.4 + .2) / 2
    # head means over CLS's other tokens (patches): .2, .2, .1, .1 -> median .1 (the lower)
    assert got["to_others_median"].item() == pytest.approx(0.1)
    with_cls = _batch_stats(tr, 1, 20.0, 2, count_cls=True)
    assert with_cls["outlier_norms"].tolist() == [50.0, 40.0]


def test_outliers_command_reports_rebuttal_statistics_and_bias_arm(tmp_path, capsys):
    write_image_folder(tmp_path / "imgs", per_class=2)
    out = tmp_path / "o.json"
    assert main(["outliers", "--model", "planted", "--images", str(tmp_path / "imgs"), "--top-k", "2",
                 "--controls", "0", "--bias-arm", "--count-cls", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert set(res["arms"]) == {"plain", "registers", "bias"} and res["config"]["count_cls"]
    plain, reg, bias = (res["arms"][a] for a in ("plain", "registers", "bias"))
    assert bias["setup"]["kind"] == "bias" and bias["setup"]["preset"] == "paper"
    assert bias["setup"]["bias_images"] == 6 and "paper" in table
    assert plain["outlier_norm"]["tokens"] >= 6 and reg["outlier_norm"]["tokens"] == 0
    # the bias form also takes the outliers away (no token), like the rebuttal's 150 -> 40
    assert bias["max_patch_norm"] < plain["max_patch_norm"] / 3
    assert bias["fraction_with_outliers"] == 0.0
    assert 0 < reg["cls_to_others_median"] < 1 and plain["cls_to_registers_mean_heads"] == 0
    assert bias["cls_to_registers_mean_heads"] > 0                    # the fitted key is attended to
