"""Automatic calibration and the published neuron sets."""
import pytest
import torch

import ttreg
from ttreg.calibrate import calibrate
from ttreg.testing import mixed_images, planted_vit


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


def test_search_shards_merge_to_the_single_process_result():
    from ttreg.neurons import SearchStats, accumulate, neurons_from_stats
    m = planted_vit()
    ad = ttreg.wrap(m)
    x = mixed_images(9)
    parts = []
    for shard in (x[:4], x[4:]):
        s = SearchStats.zeros(6, 6, 384)
        accumulate(ad, shard, s, 5, "auto")
        parts.append(s)
    merged = parts[0].merge(parts[1])
    whole = SearchStats.zeros(6, 6, 384)
    accumulate(ad, x, whole, 5, "auto")
    torch.testing.assert_close(merged.scores, whole.scores)
    a = neurons_from_stats(ad, merged, det=5, threshold="auto", top_layer="auto", top_k=4)
    b = ttreg.find_register_neurons(m, x, top_k=4)
    assert a.neurons == b.neurons


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
