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

