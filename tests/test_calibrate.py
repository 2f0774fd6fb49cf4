"""Automatic calibration (threshold, top layer and top k chosen from the images): on timm ViTs with
planted neurons and on outliers that behave like real ones (:func:`ttreg.testing.content_planted_vit`:
a trigger, a cascade, dense distractors, attention sinks; its right answer is the five register
neurons), the top-k sweep, widening, honest empty results, eval mode, memory, and the published
neuron sets."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import ttreg
from ttreg.calibration import calibrate
from ttreg.outliers import norm_ratio, thresholds
from ttreg.testing import content_planted_vit, mixed_images, planted_vit

from conftest import CONTENT_PLANTS, CONTENT_REGISTER


def test_auto_calibration_recovers_two_layers_with_no_hyperparameters():
    m = planted_vit()
    cal = calibrate(m, mixed_images(20, seed=3))
    assert sorted(cal.neurons.neurons) == [(1, 7), (3, 21)]
    r = cal.report
    assert r["emergence_layer"] == 3 and r["top_layer"] == 3 and r["top_k"] == 2
    assert r["heldout_before"]["fraction_with_outliers"] == 1.0
    assert r["heldout_after"]["fraction_with_outliers"] == 0.0
    assert r["heldout_before"]["mean_norm_ratio"] >= 5 and r["heldout_after"]["mean_norm_ratio"] <= 2
    # bisection: k=1 fails (only the small writer), k=2 clears; log2(max_k) + 1 steps, no linear scan
    ks = [s["k"] for s in r["sweep"]]
    assert 1 in ks and 2 in ks and len(ks) <= 1 + (r["sweep"][-1]["k"]).bit_length()
    assert next(s for s in r["sweep"] if s["k"] == 1)["fraction_with_outliers"] == 1.0


@pytest.mark.parametrize("plants", [
    [(0, 5, 20, 0.3), (2, 50, 20, 12.0)],       # lowest layer, same token
    [(2, 9, 3, 12.0), (2, 77, 60, 12.0)],       # two tokens at the emergence layer itself
])
def test_auto_calibration_plants_at_or_below_emergence(plants):
    m = planted_vit(plants, depth=5, seed=2)
    cal = calibrate(m, mixed_images(15, seed=4))
    assert sorted(cal.neurons.neurons) == sorted((l, n) for l, n, *_ in plants)
    assert cal.report["emergence_layer"] == 2


def test_calibration_on_a_model_without_outliers_is_honest():
    import timm
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=0).eval()
    with pytest.warns(UserWarning, match="no outlier tokens"):
        cal = calibrate(m, mixed_images(10))
    assert len(cal.neurons) == 0 and cal.report["top_k"] == 0
    assert "does not need registers" in cal.summary()


MEMORY_RUN = """
import json, resource, sys, tempfile
from pathlib import Path
import numpy as np, torch
from PIL import Image
import ttreg
from ttreg.testing import planted_vit
torch.set_num_threads(1)
model = planted_vit(((1, 7, 12, 0.4), (2, 21, 12, 12.0)), depth=4, embed_dim=64, img_size=224,
                    patch_size=16)
folder, rng, paths = Path(sys.argv[1]), np.random.default_rng(0), []
for i in range(int(sys.argv[3])):
    paths.append(folder / f"{i:04d}.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
peaks = []
for n in (int(sys.argv[2]), int(sys.argv[2]), int(sys.argv[3])):
    cal = ttreg.calibrate(model, paths[:n], batch_size=8)
    assert cal.neurons.neurons and len(cal.report["sweep"]) >= 2
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(peaks))
"""


def test_calibration_memory_does_not_grow_with_the_image_count(tmp_path):
    """Peak resident memory of calibrate on 24 and then 240 image files (224 px after the
    transform, 600 kB each decoded) in one fresh process: every pass streams the images, so
    the peak grows by less than a fixed slack. Keeping the 48 held-out images of the second
    run decoded (what calibrate did before) adds about 26 MB."""
    r = subprocess.run([sys.executable, "-c", MEMORY_RUN, str(tmp_path), "24", "240"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    small, warm, large = json.loads(r.stdout.strip().splitlines()[-1])
    assert large - warm < 10, (small, warm, large)       # MB


def test_published_dinov2_large_set():
    rn = ttreg.RegisterNeurons.from_name("dinov2_vitl14")
    assert len(rn) == 45 and rn.neurons[:3] == [(17, 884), (17, 133), (17, 1427)]
    assert {l: len(n) for l, n in rn.by_layer().items()} == {12: 1, 13: 1, 14: 8, 15: 9, 16: 9, 17: 17}
    assert "2506.08010" in rn.provenance["paper"]
    assert rn.provenance["valid_on"] == ["timm:vit_large_patch14_dinov2.lvd142m", "hf:facebook/dinov2-large"]
    with pytest.raises(ValueError, match="known: dinov2_vitl14"):
        ttreg.RegisterNeurons.from_name("nope")


def test_published_set_applies_to_timm_and_hf_dinov2_large_and_nothing_else():
    import timm
    from transformers import Dinov2Config, Dinov2Model
    rn = ttreg.RegisterNeurons.from_name("dinov2_vitl14")
    with torch.device("meta"):  # structure only: the check needs shapes, not weights
        t = timm.create_model("vit_large_patch14_dinov2", pretrained=False)
        h = Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, patch_size=14, image_size=518))
    ad_t, ad_h = ttreg.wrap(t), ttreg.wrap(h)
    for ad in (ad_t, ad_h):
        for k, v in rn.fingerprint["architecture"].items():
            assert ad.architecture()[k] == v
    small = timm.create_model("vit_small_patch14_dinov2", pretrained=False)
    with pytest.raises(ttreg.ModelMismatchError):
        rn.check_model(small)


def test_published_set_runs_on_a_random_dinov2_large():
    import timm
    torch.manual_seed(0)
    with torch.device("meta"):  # timm's own init of 300M weights is slow; fill them quickly
        m = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=112)
    m = m.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0) if p.dim() == 1 and "norm" in name else p.normal_(0, 0.02)
    rn = ttreg.RegisterNeurons.from_name("dinov2_vitl14")
    x = torch.randn(2, 3, 112, 112)
    with ttreg.test_time_registers(m, rn):
        tr = ttreg.trace(m, x, neurons=[(17, 884)])
        out = m.forward_features(x)
    assert out.shape == (2, 1 + 64, 1024) and tr.token_types[-1] == "register"
    act = tr.activations[:, 0]
    assert (act[:, :-1] == 0).all() and torch.equal(act[:, -1], act.amax(1))


# --- on outliers that behave like real ones (the content plant) ------------------------------------

def test_top_k_search_finds_the_smallest_clearing_k_from_any_first_probe():
    from ttreg.calibration import _Sweep, score_gap
    assert score_gap([5.97, 5.75, 5.68, 5.68, 2.80, 0.37, 0.36]) == 5 and score_gap([3.0]) == 1
    for n in (1, 7, 40):
        for kstar in [*range(1, n + 1), None]:            # None: no k clears
            for gap in range(1, n):
                sweep = _Sweep.__new__(_Sweep)
                sweep.ranked = ttreg.RegisterNeurons([(0, i) for i in range(n)],
                                                     [10.0] * gap + [1.0] * (n - gap))
                sweep.tolerance, probes = 0.0, []
                sweep.failing = lambda k, ref: probes.append(k) or float(kstar is None or k < kstar)
                assert sweep.smallest(None) == kstar
                if kstar == gap:                          # the score gap was right
                    assert probes == ([1] if gap == 1 else [gap, gap - 1])
                assert len(probes) <= 2 * (n.bit_length() + 1)


@pytest.mark.parametrize("family", ["timm", "hf_dinov2"])
def test_calibrate_with_no_hyperparameters_recovers_the_plant(family, calibration_images):
    if family == "timm":
        m = content_planted_vit()
    else:
        pytest.importorskip("transformers")
        from ttreg.testing.convert.hf import timm_to_hf_dinov2
        m = timm_to_hf_dinov2(content_planted_vit(init_values=1e-5))
    cal = ttreg.calibrate(m, calibration_images)
    r = cal.report
    assert sorted(cal.neurons.neurons) == CONTENT_REGISTER
    assert r["top_k_rule"] == "cleared" and r["emergence_layer"] == 5 and r["top_layer"] == 5
    # the held-out ratio with test-time registers is that of zeroing the planted neurons
    held = calibration_images[_heldout_indices(len(calibration_images))]
    with ttreg.zero_neurons(m, CONTENT_REGISTER):
        zeroed = norm_ratio(ttreg.trace(m, held).norms[:, -1], 1).mean()
    before, after = r["heldout_before"]["mean_norm_ratio"], r["heldout_after"]["mean_norm_ratio"]
    assert before > 30 and after <= 1.1 * float(zeroed)
    assert r["heldout_before"]["fraction_with_outliers"] == 1.0
    assert r["heldout_after"]["fraction_with_outliers"] == 0.0
    # the old clearing test -- the edited max under the *plain* image's mean + 3 std, which the
    # outliers inflate -- passed the amplifier alone, which leaves outliers 5x what zeroing does
    plain = ttreg.trace(m, held).norms[:, -1, 1:]
    with ttreg.test_time_registers(m, cal.neurons.top(1)):
        one = ttreg.trace(m, held).norms[:, -1, 1:-1]
    assert cal.neurons.neurons[0] == CONTENT_PLANTS.amplifier
    assert (one.amax(1) < thresholds(plain)).all()
    assert norm_ratio(one, 0).mean() > 5 * after


def _heldout_indices(n: int) -> list[int]:
    from ttreg.calibration import _split
    return _split(torch.arange(n)[:, None], 0.2)[1][:, 0].tolist()


def test_low_memory_calibration_equals_the_one_pass_calibration(content_model, calibration_images):
    """Two passes per batch (norms first, then the scores inside the hooks): the same ranking,
    scores, emergence evidence and sweep as one pass that keeps every searched layer."""
    one = ttreg.calibrate(content_model, calibration_images)
    low = ttreg.calibrate(content_model, calibration_images, memory_budget=0)
    assert one.report["search_memory"]["mode"] == "one-pass"
    assert low.report["search_memory"] == {**one.report["search_memory"], "mode": "two-pass",
                                           "memory_budget": 0}
    assert low.neurons.neurons == one.neurons.neurons and sorted(low.neurons.neurons) == CONTENT_REGISTER
    torch.testing.assert_close(torch.tensor(low.neurons.scores), torch.tensor(one.neurons.scores),
                               rtol=1e-6, atol=0)
    drop = lambda r: {k: v for k, v in r.items() if k != "search_memory"}  # noqa: E731
    assert drop(low.report) == drop(one.report)


def test_widening_when_the_emergence_layer_misses_a_later_neuron(calibration_images):
    # (1, 3) writes 20x on patch 5, (4, 40) adds 8x on the same patch: block 4 barely grows the
    # outlier, so the emergence layer is 1 -- but zeroing the candidates of layers <= 1 leaves
    # (4, 40)'s vector: the sweep widens to every layer up to the detection layer
    m = planted_vit([(1, 3, 5, 20.0), (4, 40, 5, 8.0)], depth=6)
    cal = ttreg.calibrate(m, calibration_images)
    r = cal.report
    assert r["emergence_layer"] == 1 and r["top_layer"] == 5
    assert r["top_k_rule"] == "cleared after widening"
    assert r["attempts"][0]["why"].startswith("zeroing the 23 best neurons of layers <= 1 still leaves")
    assert sorted(cal.neurons.neurons) == [(1, 3), (4, 40)]
    assert r["heldout_after"]["mean_norm_ratio"] < 2 < 10 < r["heldout_before"]["mean_norm_ratio"]


def test_outliers_no_neuron_makes_get_an_explanation_not_neurons(calibration_images):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4,
                          num_classes=0).eval()
    with torch.no_grad():
        m.pos_embed[0, 11, 5] += 18.0        # patch 10 is large from the embedding on
    with pytest.warns(UserWarning, match="no register neurons clear the outliers"):
        cal = ttreg.calibrate(m, calibration_images)
    assert len(cal.neurons) == 0 and cal.report["top_k_rule"] == "none"
    assert "do not reduce the outliers" in cal.report["top_k_reason"]
    assert [a["top_layer"] for a in cal.report["attempts"]] == [0, 3]



def test_calibrate_runs_in_eval_mode_and_restores_the_mode(planted, calibration_images):
    """Calibration runs in eval mode (dropout off: the same answer as from an eval-mode model)
    and gives every module its own mode back -- a model all in train mode, and one in a mixed
    state -- also when it refuses an option."""
    m = content_planted_vit(drop_rate=0.3, proj_drop_rate=0.3)
    ref = ttreg.calibrate(m, calibration_images)
    m.train()
    cal = ttreg.calibrate(m, calibration_images)
    assert m.training and all(mod.training for mod in m.modules())
    assert cal.neurons.neurons == ref.neurons.neurons and cal.report["sweep"] == ref.report["sweep"]
    with pytest.raises(ValueError, match="top_layer"):
        ttreg.calibrate(m, calibration_images, top_layer="bogus")
    assert m.training

    x = mixed_images(6)
    model = copy.deepcopy(planted)
    model.pos_drop.p = 0.5            # dropout that train mode would switch on
    ref = ttreg.calibrate(model.eval(), x)
    model.train()
    model.blocks[0].eval()            # a mixed state is restored module by module
    cal = ttreg.calibrate(model, x)
    assert cal.neurons.neurons == ref.neurons.neurons and cal.report == ref.report
    assert model.training and model.pos_drop.training and not model.blocks[0].training
    with pytest.raises(ValueError, match="out of range"):
        ttreg.calibrate(model, x, detection_layer=40)
    assert model.training and not model.blocks[0].training
