"""Register neurons across input sizes: calibrate at several, record where a set was measured,
warn where it never was, and run each model at other sizes the way its library does."""
import json
import warnings

import pytest
import torch

import ttreg
from ttreg.neurons import search_stats
from ttreg.sizes import as_sizes, at_size, dynamic_size, label, num_patches
from ttreg.register_neurons import RegisterNeurons
from ttreg.testing import mixed_images, size_planted_vit

ALWAYS = [(1, 7), (3, 21)]            # fire at every size
LARGE_ONLY = (2, 30)                  # fires only on inputs with many patches


@pytest.fixture(scope="module")
def model():
    return size_planted_vit()


@pytest.fixture(scope="module")
def images():
    return mixed_images(24, 64, seed=1)


def _resized(x, px):
    return torch.nn.functional.interpolate(x, size=(px, px), mode="bilinear", antialias=True)


def test_the_plant_depends_on_the_number_of_patches(model, images):
    """(2, 30) is silent at 64 px (64 patches) and fires on a few tokens at 128 px (256)."""
    for px, fires in ((64, False), (128, True)):
        with dynamic_size(model):
            tr = ttreg.trace(model, _resized(images, px), neurons=[*ALWAYS, LARGE_ONLY])
        on = (tr.activations > 1).sum(-1)                      # (images, neurons): tokens firing
        assert (on[:, :2] >= 1).all()                          # the two others fire at both sizes
        if fires:
            assert ((on[:, 2] >= 1) & (on[:, 2] <= 6)).all(), on[:, 2]
        else:
            assert (on[:, 2] == 0).all() and float(tr.activations[:, 2].max()) < 0.1


def test_one_size_leaves_the_other_uncleared_two_sizes_clear_both(model, images):
    one = ttreg.calibrate(model, images)                       # the model's own size, 64 px
    assert sorted(one.neurons.neurons) == sorted(ALWAYS)
    assert one.neurons.sizes == {"calibrated": [(64, 64)], "measured": [(64, 64)]}
    assert list(one.report["per_size"]) == ["64x64"] and one.report["per_size"]["64x64"]["cleared"]

    # measured at 128 px as well, that set leaves the large-only outliers
    meas = ttreg.calibrate(model, images, neurons=one.neurons, sizes=[64, 128])
    per = meas.report["per_size"]
    assert per["64x64"]["cleared"] and not per["128x128"]["cleared"]
    assert per["64x64"]["heldout_after"]["mean_norm_ratio"] < 1.5 < 10 < per["64x64"]["heldout_before"]["mean_norm_ratio"]
    assert per["128x128"]["heldout_after"]["fraction_with_outliers"] == 1.0
    assert per["128x128"]["heldout_after"]["mean_norm_ratio"] > 10
    assert meas.neurons.sizes == {"calibrated": [(64, 64)], "measured": [(64, 64), (128, 128)]}
    assert "128x128 px" in meas.summary() and "NOT cleared" in meas.summary()

    both = ttreg.calibrate(model, images, sizes=[64, 128])
    assert sorted(both.neurons.neurons) == sorted([*ALWAYS, LARGE_ONLY])
    assert both.report["top_k_cleared"] and both.report["sizes"] == ["64x64", "128x128"]
    for size, r in both.report["per_size"].items():
        assert r["cleared"], size
        assert r["heldout_before"]["fraction_with_outliers"] == 1.0
        assert r["heldout_after"]["fraction_with_outliers"] == 0.0
        assert r["heldout_after"]["mean_norm_ratio"] < 1.6 < 10 < r["heldout_before"]["mean_norm_ratio"]
    assert both.neurons.sizes == {"calibrated": [(64, 64), (128, 128)], "measured": [(64, 64), (128, 128)]}
    # every image counts once per size
    assert both.neurons.num_images == 2 * one.neurons.num_images


def test_statistics_summed_over_sizes_equal_separate_runs_merged(model, images):
    """Sums and counts: searching both sizes at once is bitwise the merge of each alone; and
    the 128 px run equals resized images on the same model built with dynamic_img_size."""
    kw = dict(batch_size=7, search_layers=4)
    both = search_stats(model, images, sizes=[64, 128], **kw)
    a, b = search_stats(model, images, sizes=[64], **kw), search_stats(model, images, sizes=[128], **kw)
    merged = a.merge(b)
    assert (both.images, both.images_with_outliers) == (merged.images, merged.images_with_outliers) == (48, 48)
    for name in ("scores", "layer_outlier_counts", "outlier_log_ratio_sum"):
        if getattr(both, name, None) is not None:
            assert torch.equal(getattr(both, name), getattr(merged, name)), name
    import timm
    built = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64, patch_size=8,
                              embed_dim=96, depth=6, num_heads=4, num_classes=10,
                              dynamic_img_size=True).eval()
    built.load_state_dict(model.state_dict())
    direct = search_stats(built, _resized(images, 128), **kw)
    assert torch.equal(direct.scores, b.scores) and direct.images_with_outliers == b.images_with_outliers
    assert not model.dynamic_img_size and model.patch_embed.strict_img_size   # switched back


def test_neuron_files_old_and_new(model, images, tmp_path):
    rn = ttreg.calibrate(model, images, top_k=2).neurons
    rn.save(tmp_path / "v2.json")
    data = json.loads((tmp_path / "v2.json").read_text())
    assert data["version"] == 2 and data["sizes"] == {"calibrated": [[64, 64]], "measured": [[64, 64]]}
    back = RegisterNeurons.load(tmp_path / "v2.json")
    assert back.sizes == rn.sizes and back.neurons == rn.neurons
    # a version 1 file (no sizes) still loads; its sizes are unknown, so nothing warns
    old = {k: v for k, v in data.items() if k != "sizes"} | {"version": 1}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    v1 = RegisterNeurons.load(tmp_path / "v1.json")
    assert v1.sizes is None and v1.neurons == rn.neurons and v1.measured_sizes is None
    assert RegisterNeurons.from_name("dinov2_vitl14").sizes is None
    for bad, msg in (({"calibrated": [[64]]}, r"sizes.calibrated\[0\]"), ([64], "'sizes' must be an object"),
                     ({"measured": [[64, -1]]}, r"sizes.measured\[0\]"), ({"measured": "64"}, "sizes.measured")):
        (tmp_path / "bad.json").write_text(json.dumps(data | {"sizes": bad}))
        with pytest.raises(ValueError, match=msg):
            RegisterNeurons.load(tmp_path / "bad.json")
    (tmp_path / "v3.json").write_text(json.dumps(data | {"version": 3}))
    with pytest.raises(ValueError, match="reads versions 1, 2"):
        RegisterNeurons.load(tmp_path / "v3.json")


def test_the_warning_fires_once_and_only_at_unmeasured_sizes(model, images):
    rn = ttreg.calibrate(model, images, top_k=2).neurons          # measured at 64 px only
    x = images[:2]

    def run(px):
        with dynamic_size(model), torch.no_grad():
            model(_resized(x, px))

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with ttreg.test_time_registers(model, rn):
            run(64), run(128), run(128), run(64), run(96), run(128)
        with ttreg.test_time_registers(model, rn):              # a new handle warns afresh
            run(128)
        with ttreg.test_time_registers(model, rn, check=False):  # no checks, no warning
            run(128)
        v1 = RegisterNeurons.from_dict({k: v for k, v in rn.to_dict().items() if k != "sizes"})
        with ttreg.test_time_registers(model, v1):                # sizes unknown: no warning
            run(128)
    msgs = [str(w.message) for w in got if issubclass(w.category, ttreg.UnmeasuredSizeWarning)]
    assert len(msgs) == 3, msgs
    assert "256 patches" in msgs[0] and "144 patches" in msgs[1] and "256 patches" in msgs[2]
    assert "64x64 px (64 patches)" in msgs[0] and "--sizes" in msgs[0]
    # measured there too: silent at 128 px
    meas = ttreg.calibrate(model, images, neurons=rn, sizes=[128]).neurons
    with warnings.catch_warnings():
        warnings.simplefilter("error", ttreg.UnmeasuredSizeWarning)
        with ttreg.test_time_registers(model, meas):
            run(64), run(128)


def test_sizes_are_read_strictly_and_named_plainly():
    assert as_sizes("224,518") == [(224, 224), (518, 518)] and as_sizes(224) == [(224, 224)]
    assert as_sizes(["224x448", (96, 64), "224X448"]) == [(224, 448), (96, 64)]
    assert label((224, 448)) == "224x448" and num_patches((518, 518), (14, 14)) == 37 * 37
    for bad in ("224,", "abc", [], [0], [1.5], "224x", [(1, 2, 3)], [True]):
        with pytest.raises(ValueError, match="size"):
            as_sizes(bad)


def test_a_model_that_cannot_change_size_is_refused_before_any_work(images):
    import open_clip
    tower = open_clip.transformer.VisionTransformer(image_size=64, patch_size=8, width=32, layers=2,
                                                    heads=2, mlp_ratio=4, output_dim=16).eval()
    ad = ttreg.wrap(tower)
    with pytest.raises(ValueError, match=r"cannot run at 96x96 px .*use its own size 64x64") as err:
        with at_size(ad, (96, 96)):
            pass
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cannot run at 96x96"):
        ttreg.calibrate(tower, images, sizes=[64, 96])


def test_hugging_face_runs_other_sizes_with_interpolate_pos_encoding(images):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    hf = ViTModel(ViTConfig(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=2, intermediate_size=64), add_pooling_layer=False).eval()
    stats = search_stats(hf, images[:6], sizes=[64, 96], batch_size=3)
    assert stats.images == 12
    with torch.no_grad():
        want = hf(pixel_values=_resized(images[:3], 96), interpolate_pos_encoding=True).last_hidden_state
        with at_size(ttreg.wrap(hf), (96, 96)):
            got = ttreg.wrap(hf).run(_resized(images[:3], 96)).last_hidden_state
    assert torch.equal(got, want) and got.shape[1] == 1 + 12 * 12


def test_cli_sizes(tmp_path, monkeypatch):
    from ttreg.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--model", "planted", "--images", "skimage", "--out", "a.json",
                 "--sizes", "64,96", "--quiet"]) == 0
    assert RegisterNeurons.load("a.json").sizes["calibrated"] == [(64, 64), (96, 96)]
    assert main(["calibrate", "--model", "planted", "--images", "skimage", "--out", "b.json",
                 "--neurons", "a.json", "--sizes", "128", "--report", "r.json", "--quiet"]) == 0
    b = RegisterNeurons.load("b.json")
    assert b.sizes == {"calibrated": [(64, 64), (96, 96)], "measured": [(64, 64), (96, 96), (128, 128)]}
    assert list(json.loads((tmp_path / "r.json").read_text())["per_size"]) == ["128x128"]
    assert main(["calibrate", "--model", "planted", "--images", "skimage", "--out", "c.json",
                 "--sizes", "64,x"]) == 2
    assert not (tmp_path / "c.json").exists()


def test_attention_bias_fitted_across_sizes(model, images):
    """The bias form's key and value are means over every image at every size: the sums of the
    two sizes, weighted by their image counts."""
    rn = RegisterNeurons(neurons=[*ALWAYS, LARGE_ONLY])
    a = ttreg.fit_attention_bias(model, rn, images[:6], sizes=[64], check=False)
    b = ttreg.fit_attention_bias(model, rn, images[:6], sizes=[128], check=False)
    both = ttreg.fit_attention_bias(model, rn, images[:6], sizes=[64, 128], check=False)
    assert both.num_images == 12
    torch.testing.assert_close(both.key, (a.key + b.key) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both.value, (a.value + b.value) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.value, b.value)
