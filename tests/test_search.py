"""Register-neuron search (the paper's Algorithm 1, streamed): the planted neurons found exactly,
on timm ViTs with planted neurons and on outliers that behave like real ones
(:func:`ttreg.testing.content_planted_vit`); the emergence layer, by hand and followed back
through the blocks; the sparsity filter; the official preset against the authors' code restated;
shards that merge and the low-memory two-pass search."""
import pytest
import torch

import ttreg
from ttreg.calibration import calibrate
from ttreg.neurons import one_pass_bytes, search_stats
from ttreg.outliers import emergence_layer
from ttreg.register_neurons import as_bytes
from ttreg.testing import mixed_images, planted_vit

from conftest import CONTENT_PLANTS, CONTENT_REGISTER, PLANTS


def test_planted_neurons_found_exactly(planted, images):
    rn = ttreg.find_register_neurons(planted, images, top_k=2, batch_size=3)
    assert sorted(rn.neurons) == PLANTS
    assert rn.num_images == 10 and rn.num_images_with_outliers == 10
    assert rn.statistics["emergence_layer"] == 3
    assert rn.hyperparameters["top_layer"] == 3
    # the planted neurons stand far above every other neuron
    more = ttreg.find_register_neurons(planted, images, top_k=3)
    assert more.scores[1] > 10 * more.scores[2]


def test_search_streams_and_batch_size_does_not_matter(planted, images):
    a = ttreg.find_register_neurons(planted, images, top_k=5, batch_size=1)
    b = ttreg.find_register_neurons(planted, images, top_k=5, batch_size=10)
    assert a.neurons == b.neurons
    torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), rtol=1e-5, atol=1e-6)


def test_planted_in_two_layers_emergence_follows_every_outlier_back():
    m = planted_vit([(1, 3, 5, 12.0), (4, 40, 30, 12.0)], depth=6)
    x = mixed_images(6, seed=1)
    rn = ttreg.find_register_neurons(m, x, top_k=2, top_layer=-1)
    assert sorted(rn.neurons) == [(1, 3), (4, 40)]
    # token 5 is an outlier from block 1, token 30 from block 4: followed back from the
    # detection layer, their mean size grows at both blocks, and the last growth is block 4
    # (the old "first block with outliers on most images" said 1 and missed (4, 40))
    auto = ttreg.find_register_neurons(m, x, top_k=2)
    assert auto.statistics["emergence_layer"] == 4 and auto.hyperparameters["top_layer"] == 4
    assert auto.statistics["majority_layer"] == 1
    assert sorted(auto.neurons) == [(1, 3), (4, 40)]


def test_no_outliers_gives_empty_result_with_message():
    import timm
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=0).eval()
    with pytest.warns(UserWarning, match="no outlier tokens at layer 3 over 6 images"):
        rn = ttreg.find_register_neurons(m, mixed_images(6))
    assert len(rn) == 0 and rn.num_images == 6 and "does not need registers" in rn.note
    assert rn.statistics["mean_norm_ratio"][3] < 2



# --- the emergence layer and the sparsity filter on outliers that behave like real ones ----------

def test_early_layers_have_mildly_large_tokens_that_fooled_the_old_rule(content_model,
                                                                        calibration_images):
    rn = ttreg.find_register_neurons(content_model, calibration_images, top_k=5)
    st = rn.statistics
    # block 0's output already has "outliers" (~3x the median) on every image: the old rule
    # (first block with outliers on most images) says 0; followed back from the detection
    # layer, the outlier tokens grow at blocks 0, 2, 3, 4 and jump at 5
    assert st["majority_layer"] == 0 and st["fraction_with_outliers"][0] == 1.0
    assert st["emergence_layer"] == 5 and rn.hyperparameters["top_layer"] == 5
    r = st["outlier_norm_ratio"]
    assert 2.5 < r[0] < 4 and r[5] > 30 and r[4] < 10
    growth = st["outlier_log_growth"]
    assert max(growth) == growth[5] and growth[6] < 0.1 * torch.tensor(r).log().max()


def test_emergence_rule_on_hand_computed_curves():
    # the content plant's curve: last growth >= 10% of the peak log ratio (3.69) is block 5
    assert emergence_layer([1.10, 1.06, 1.40, 1.85, 2.07, 3.69, 3.69]) == 5
    # a job shared over blocks 0-2 then a 10% drift: the drift (0.10 < 0.24) does not count
    assert emergence_layer([1.10, 1.79, 2.30, 2.40]) == 2
    # an abrupt outlier that later shrinks a little
    assert emergence_layer([0.0, 0.1, 4.0, 3.5, 3.6]) == 2
    assert emergence_layer([0.0, -0.1, 0.0]) is None


def test_dense_distractors_only_the_sparsity_filter_keeps_out(content_model, calibration_images):
    dense = set(CONTENT_PLANTS.distractors)
    # the paper's Algorithm 1 as its text states it, no filter
    plain = ttreg.find_register_neurons(content_model, calibration_images, top_k=7, sparsity=False)
    assert set(plain.neurons) == set(CONTENT_REGISTER) | dense                # they outrank the trigger
    assert plain.neurons.index(CONTENT_PLANTS.trigger) == 6
    assert ttreg.find_register_neurons(content_model, calibration_images, top_k=7,
                                       sparsity=None).neurons == plain.neurons
    filtered = ttreg.find_register_neurons(content_model, calibration_images, top_k=30)  # default: on
    assert not dense & set(filtered.neurons) and set(CONTENT_REGISTER) <= set(filtered.neurons[:5])
    assert not dense & set(ttreg.calibrate(content_model, calibration_images).neurons.neurons)



# --- the authors' search, re-stated -------------------------------------------------------------

def authors_ranking(model, images, threshold: float, det: int, highest_layer: int,
                    top_k: int) -> list[tuple[int, int]]:
    """shared/algorithms.py of nickjiang2378/test-time-registers, re-stated: one image at a
    time; outliers = tokens (CLS included) with norm strictly above the threshold; images
    without outliers skipped; per layer, mean |activation| over the outliers, zeroed for
    neurons that are not below 0.5 on at least half of the tokens; averaged over images;
    sorted over all layers; filtered to layers <= highest_layer; the first top_k."""
    L = len(model.blocks)
    H = model.blocks[0].mlp.fc2.in_features
    acts, outs = {}, {}
    hooks = [b.mlp.act.register_forward_hook(lambda m, a, o, l=l: acts.__setitem__(l, o))
             for l, b in enumerate(model.blocks)]
    hooks += [b.register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o))
              for l, b in enumerate(model.blocks)]
    per_image = []
    try:
        for i in range(len(images)):
            with torch.no_grad():
                model(images[i:i + 1])
            norm_map = torch.norm(outs[det][0], dim=1)
            filtered = norm_map.clone()
            filtered[filtered < threshold] = 0
            where = torch.where(filtered > threshold)[0]
            if len(where) == 0:
                continue
            scores = torch.zeros(L, H)
            for layer in range(L):
                act = acts[layer][0]
                values = torch.abs(act[where])
                sparse = torch.sum(act < 0.5, dim=0) >= 0.5 * act.shape[0]
                if not torch.any(sparse):
                    continue
                scores[layer] = values.mean(dim=0) * sparse.float()
            per_image.append(scores)
    finally:
        for h in hooks:
            h.remove()
    mean = torch.stack(per_image).mean(dim=0).flatten()
    _, order = torch.sort(mean, descending=True, stable=True)
    pairs = [(int(i) // H, int(i) % H) for i in order]
    return [p for p in pairs if p[0] <= highest_layer][:top_k]


def test_official_search_preset_ranks_exactly_like_the_authors(content_model, calibration_images):
    x = calibration_images[:8]
    saved = content_model.cls_token.detach().clone()
    with torch.no_grad():
        content_model.cls_token[0, 0, 0] += 3.0       # a large CLS, so CLS is an outlier candidate
    try:
        tr = ttreg.trace(content_model, x)
        det = tr.norms[:, -1]
        cls = float(det[:, 0].min())
        # below every CLS norm (CLS counts); exactly one image's max (strict '>': skipped)
        for threshold, bs in ((0.9 * cls, 3), (float(det[:, 1:].amax(1).sort().values[3]), 1)):
            ours = ttreg.find_register_neurons(content_model, x, threshold=threshold, top_layer=5,
                                               top_k=40, preset="official", batch_size=bs)
            assert ours.neurons == authors_ranking(content_model, x, threshold, 6, 5, 40)
            assert ours.hyperparameters["include_prefix"] and ours.hyperparameters["sparsity"]
            low = ttreg.find_register_neurons(content_model, x, threshold=threshold, top_layer=5,
                                              top_k=40, preset="official", batch_size=bs,
                                              memory_budget=0)
            assert low.statistics["search_memory"]["mode"] == "two-pass"
            assert low.neurons == ours.neurons and low.scores == ours.scores
        assert ours.num_images_with_outliers == 4          # three below, one exactly at it
        paper = ttreg.find_register_neurons(content_model, x, threshold=0.9 * cls, top_layer=5, top_k=40)
        assert paper.neurons != ours.neurons
    finally:
        with torch.no_grad():
            content_model.cls_token.copy_(saved)



# --- shards and memory ----------------------------------------------------------------------------

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
    b = ttreg.find_register_neurons(m, x, top_k=4, sparsity=False)     # accumulate's default
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

