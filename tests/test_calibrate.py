"""Automatic calibration, its memory, and the published neuron sets."""
import json
import subprocess
import sys

import pytest
import torch

import ttreg
from ttreg.calibration import calibrate
from ttreg.neurons import one_pass_bytes, search_stats
from ttreg.register_neurons import as_bytes
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


@pytest.mark.parametrize("opts", [{}, {"sparsity": True}, {"preset": "official"},
                                  {"include_prefix": True, "top_layer": 4}])
def test_low_memory_search_ranks_like_the_one_pass_search(planted, opts):
    """Two passes (norms up to the last block first, then the scores summed inside the
    down-projection hooks with the known outlier weights) rank exactly like one pass and give
    the same scores; the budget decides, and the result says which ran."""
    x = mixed_images(12, seed=1)
    one = ttreg.find_register_neurons(planted, x, top_k=30, batch_size=5, **opts)
    low = ttreg.find_register_neurons(planted, x, top_k=30, batch_size=5, memory_budget=0, **opts)
    assert low.neurons == one.neurons and sorted(one.neurons[:2]) == [(1, 7), (3, 21)]
    torch.testing.assert_close(torch.tensor(low.scores), torch.tensor(one.scores), rtol=1e-6, atol=0)
    layers = 5 if opts.get("top_layer") == 4 else 6      # searched: up to top_layer, or to det
    need = one_pass_bytes(ttreg.wrap(planted), 5, 1 + 64, layers)
    assert need == 5 * 65 * 384 * 4 * layers
    assert one.statistics["search_memory"] == {"mode": "one-pass", "activation_bytes": need,
                                               "memory_budget": 1 << 30}
    assert low.statistics["search_memory"] == {"mode": "two-pass", "activation_bytes": need,
                                               "memory_budget": 0}
    # the budget is held against each batch: exactly enough keeps one pass
    full = one_pass_bytes(ttreg.wrap(planted), 5, 65, 6)
    assert search_stats(planted, x, batch_size=5, memory_budget=full).search_memory["mode"] == "one-pass"
    assert search_stats(planted, x, batch_size=5, memory_budget=full - 1).search_memory["mode"] == "two-pass"


def test_memory_budget_sizes(planted):
    assert as_bytes("512MiB") == 512 << 20 and as_bytes("2GB") == 2 * 10 ** 9
    assert as_bytes("1.5G") == 3 << 29 and as_bytes(1000) == 1000 and as_bytes(" 4 kb ") == 4000
    for bad in ("lots", "-1GB", -5, float("nan"), True, "1 parsec"):
        with pytest.raises(ValueError, match="memory_budget"):
            as_bytes(bad)
    with pytest.raises(ValueError, match="memory_budget"):
        calibrate(planted, mixed_images(2), memory_budget="huge")


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
