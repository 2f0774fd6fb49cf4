"""Automatic calibration on outliers that behave like real ones (issue 14).

The content plant (:func:`ttreg.testing.content_planted_vit`) puts its outliers on the brightest
patches of each image, builds them with a trigger, three weaker neurons in consecutive layers
and an amplifier (a cascade), has dense distractor neurons, mildly large tokens in early layers
and attention sinks in later ones. Its right answer is known: the five register neurons.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import ttreg
from ttreg.outliers import emergence_layer, outlier_mask, thresholds
from ttreg.testing import ContentPlants, content_planted_vit, mixed_images, planted_vit

PLANTS = ContentPlants()
REGISTER = sorted(PLANTS.register_neurons)          # (0, 11), (2, 5), (3, 9), (4, 13), (5, 17)


@pytest.fixture(scope="module")
def model():
    return content_planted_vit()


@pytest.fixture(scope="module")
def images():
    return mixed_images(20, seed=3)


def ratio(norms: torch.Tensor, npre: int = 1, R: int = 0) -> torch.Tensor:
    pn = norms[:, npre:norms.shape[1] - R]
    return pn.amax(-1) / pn.median(-1).values


def photos(model) -> torch.Tensor:
    from ttreg.data import iter_batches, make_transform, resolve_images
    ad = ttreg.wrap(model)
    src = resolve_images("skimage")
    return torch.cat(list(iter_batches(src, ad, 32, make_transform(ad.image_size(), *ad.mean_std()))))


def test_outliers_follow_image_content_a_few_per_image(model, images):
    for x, distinct in ((images, 8), (photos(model), 12)):
        tr = ttreg.trace(model, x)
        det = tr.norms[:, -1]
        count = outlier_mask(det, 1).sum(dim=1)
        assert count.min() >= 1 and count.max() <= 5, count.tolist()
        where = det[:, 1:].argmax(dim=1)
        assert len(set(where.tolist())) >= distinct, where.tolist()
        # at each image's outlier the trigger fired: the brightest patch (within the margin)
        bright = x.mean(dim=1).unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).flatten(1)
        assert (bright.gather(1, where[:, None])[:, 0] >= bright.amax(1) - 0.5).all()
    # the same neurons do it everywhere: moved away, every image is clean
    with ttreg.test_time_registers(model, REGISTER):
        tr = ttreg.trace(model, images)
    assert ratio(tr.norms[:, -1], R=1).max() < 2


def test_content_plant_refuses_models_it_cannot_plant():
    with pytest.raises(ValueError, match="without a pre-norm"):
        content_planted_vit(pre_norm=True)
    with pytest.raises(ValueError, match="beyond the model's 4 blocks"):
        content_planted_vit(depth=4)


def test_early_layers_have_mildly_large_tokens_that_fooled_the_old_rule(model, images):
    rn = ttreg.find_register_neurons(model, images, top_k=5)
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
def test_calibrate_with_no_hyperparameters_recovers_the_plant(family, images):
    if family == "timm":
        m = content_planted_vit()
    else:
        pytest.importorskip("transformers")
        from ttreg.testing.convert.hf import timm_to_hf_dinov2
        m = timm_to_hf_dinov2(content_planted_vit(init_values=1e-5))
    cal = ttreg.calibrate(m, images)
    r = cal.report
    assert sorted(cal.neurons.neurons) == REGISTER
    assert r["top_k_rule"] == "cleared" and r["emergence_layer"] == 5 and r["top_layer"] == 5
    # the held-out ratio with test-time registers is that of zeroing the planted neurons
    held = images[_heldout_indices(len(images))]
    with ttreg.zero_neurons(m, REGISTER):
        zeroed = ratio(ttreg.trace(m, held).norms[:, -1]).mean()
    before, after = r["heldout_before"]["mean_norm_ratio"], r["heldout_after"]["mean_norm_ratio"]
    assert before > 30 and after <= 1.1 * float(zeroed)
    assert r["heldout_before"]["fraction_with_outliers"] == 1.0
    assert r["heldout_after"]["fraction_with_outliers"] == 0.0
    # the old clearing test -- the edited max under the *plain* image's mean + 3 std, which the
    # outliers inflate -- passed the amplifier alone, which leaves outliers 5x what zeroing does
    plain = ttreg.trace(m, held).norms[:, -1, 1:]
    with ttreg.test_time_registers(m, cal.neurons.top(1)):
        one = ttreg.trace(m, held).norms[:, -1, 1:-1]
    assert cal.neurons.neurons[0] == PLANTS.amplifier
    assert (one.amax(1) < thresholds(plain)).all()
    assert (one.amax(1) / one.median(1).values).mean() > 5 * after


def _heldout_indices(n: int) -> list[int]:
    from ttreg.calibration import _split
    return _split(torch.arange(n)[:, None], 0.2)[1][:, 0].tolist()


def test_low_memory_calibration_equals_the_one_pass_calibration(model, images):
    """Two passes per batch (norms first, then the scores inside the hooks): the same ranking,
    scores, emergence evidence and sweep as one pass that keeps every searched layer."""
    one = ttreg.calibrate(model, images)
    low = ttreg.calibrate(model, images, memory_budget=0)
    assert one.report["search_memory"]["mode"] == "one-pass"
    assert low.report["search_memory"] == {**one.report["search_memory"], "mode": "two-pass",
                                           "memory_budget": 0}
    assert low.neurons.neurons == one.neurons.neurons and sorted(low.neurons.neurons) == REGISTER
    torch.testing.assert_close(torch.tensor(low.neurons.scores), torch.tensor(one.neurons.scores),
                               rtol=1e-6, atol=0)
    drop = lambda r: {k: v for k, v in r.items() if k != "search_memory"}  # noqa: E731
    assert drop(low.report) == drop(one.report)


def test_dense_distractors_only_the_sparsity_filter_keeps_out(model, images):
    dense = set(PLANTS.distractors)
    plain = ttreg.find_register_neurons(model, images, top_k=7)       # the paper's Algorithm 1
    assert set(plain.neurons) == set(REGISTER) | dense                # they outrank the trigger
    assert plain.neurons.index(PLANTS.trigger) == 6
    filtered = ttreg.find_register_neurons(model, images, top_k=30, sparsity=True)
    assert not dense & set(filtered.neurons) and set(REGISTER) <= set(filtered.neurons[:5])
    assert not dense & set(ttreg.calibrate(model, images).neurons.neurons)


def test_later_attention_uses_the_outlier_as_a_sink(model, images):
    L = len(model.blocks)
    tr = ttreg.trace(model, images, attention=[L - 1])
    where = tr.norms[:, -1, 1:].argmax(dim=1)
    single = outlier_mask(tr.norms[:, -1], 1).sum(dim=1) == 1
    cls = tr.cls_attention(L - 1)[:, 0].flatten(1)                    # head 0: (B, patches)
    assert (cls[single].gather(1, where[single, None]) > 0.9).all()
    with ttreg.test_time_registers(model, REGISTER):
        reg = ttreg.trace(model, images, attention=[L - 1])
    att = reg.attention[L - 1][:, 0, 0]                                # head 0, CLS query
    assert (att[:, -1] > 0.9).all()                                    # the register is the sink
    # the register is no larger than the trigger's (mildly large) token in block 0, and takes
    # the outlier's place once the cascade has run
    assert (reg.norms[:, 0, -1] < 1.5 * tr.norms[:, 0, 1:].amax(dim=-1)).all()
    med = reg.norms[:, -1, 1:-1].median(dim=-1).values
    assert (reg.norms[:, -1, -1] > 20 * med).all()
    assert (att[torch.arange(len(images)), 1 + where] < 0.05).all()


def test_widening_when_the_emergence_layer_misses_a_later_neuron(images):
    # (1, 3) writes 20x on patch 5, (4, 40) adds 8x on the same patch: block 4 barely grows the
    # outlier, so the emergence layer is 1 -- but zeroing the candidates of layers <= 1 leaves
    # (4, 40)'s vector: the sweep widens to every layer up to the detection layer
    m = planted_vit([(1, 3, 5, 20.0), (4, 40, 5, 8.0)], depth=6)
    cal = ttreg.calibrate(m, images)
    r = cal.report
    assert r["emergence_layer"] == 1 and r["top_layer"] == 5
    assert r["top_k_rule"] == "cleared after widening"
    assert r["attempts"][0]["why"].startswith("zeroing the 23 best neurons of layers <= 1 still leaves")
    assert sorted(cal.neurons.neurons) == [(1, 3), (4, 40)]
    assert r["heldout_after"]["mean_norm_ratio"] < 2 < 10 < r["heldout_before"]["mean_norm_ratio"]


def test_outliers_no_neuron_makes_get_an_explanation_not_neurons(images):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4,
                          num_classes=0).eval()
    with torch.no_grad():
        m.pos_embed[0, 11, 5] += 18.0        # patch 10 is large from the embedding on
    with pytest.warns(UserWarning, match="no register neurons clear the outliers"):
        cal = ttreg.calibrate(m, images)
    assert len(cal.neurons) == 0 and cal.report["top_k_rule"] == "none"
    assert "do not reduce the outliers" in cal.report["top_k_reason"]
    assert [a["top_layer"] for a in cal.report["attempts"]] == [0, 3]


def test_calibrate_runs_in_eval_mode_and_restores_the_mode(images):
    m = content_planted_vit(drop_rate=0.3, proj_drop_rate=0.3)
    ref = ttreg.calibrate(m, images)
    m.train()
    cal = ttreg.calibrate(m, images)
    assert m.training and all(mod.training for mod in m.modules())
    assert cal.neurons.neurons == ref.neurons.neurons and cal.report["sweep"] == ref.report["sweep"]
    with pytest.raises(ValueError, match="top_layer"):
        ttreg.calibrate(m, images, top_layer="bogus")
    assert m.training


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


def test_official_search_preset_ranks_exactly_like_the_authors(model, images):
    x = images[:8]
    saved = model.cls_token.detach().clone()
    with torch.no_grad():
        model.cls_token[0, 0, 0] += 3.0       # a large CLS, so CLS is an outlier candidate
    try:
        tr = ttreg.trace(model, x)
        det = tr.norms[:, -1]
        cls = float(det[:, 0].min())
        # below every CLS norm (CLS counts); exactly one image's max (strict '>': skipped)
        for threshold, bs in ((0.9 * cls, 3), (float(det[:, 1:].amax(1).sort().values[3]), 1)):
            ours = ttreg.find_register_neurons(model, x, threshold=threshold, top_layer=5,
                                               top_k=40, preset="official", batch_size=bs)
            assert ours.neurons == authors_ranking(model, x, threshold, 6, 5, 40)
            assert ours.hyperparameters["include_prefix"] and ours.hyperparameters["sparsity"]
            low = ttreg.find_register_neurons(model, x, threshold=threshold, top_layer=5, top_k=40,
                                              preset="official", batch_size=bs, memory_budget=0)
            assert low.statistics["search_memory"]["mode"] == "two-pass"
            assert low.neurons == ours.neurons and low.scores == ours.scores
        assert ours.num_images_with_outliers == 4          # three below, one exactly at it
        paper = ttreg.find_register_neurons(model, x, threshold=0.9 * cls, top_layer=5, top_k=40)
        assert paper.neurons != ours.neurons
    finally:
        with torch.no_grad():
            model.cls_token.copy_(saved)


# --- the authors' edit modes, re-stated -----------------------------------------------------------

def authors_edit(out: torch.Tensor, R: int, idx: list[int], scale, normal_values: str) -> torch.Tensor:
    """shared/hook_fn.py activate_on_registers, re-stated for one image ``(T, H)`` with CLS first."""
    out = out.clone()

    def sign_max(t):
        hi, lo = torch.max(t), torch.min(t)
        return hi if abs(hi) > abs(lo) else lo

    if isinstance(scale, list):
        for i in range(R):
            out[-R + i, idx] = scale[i] * sign_max(out[:, idx])
    else:
        out[-R:, idx] = scale * sign_max(out[:, idx])
    patches = out[1:-R, idx].clone()
    if normal_values == "zero":
        out[1:-R, idx] = 0
    elif normal_values == "mean":
        out[1:-R, idx] = patches.mean(dim=0)[None].expand(patches.shape[0], -1)
    elif normal_values == "only_outliers":
        means, stds = patches.mean(dim=0), patches.std(dim=0)
        mask = patches > (means + stds)[None]
        patches[mask] = means[None].expand_as(patches)[mask]
        out[1:-R, idx] = patches
    return out


@pytest.mark.parametrize("normal_values", ["zero", "mean", "only_outliers", "same"])
@pytest.mark.parametrize("scale", [1.0, 0.5, [1.0, 0.25]])
def test_edit_modes_equal_the_authors_hook(normal_values, scale):
    from ttreg.registers import _target_and_zero_masks, edit_activations
    g = torch.Generator().manual_seed(0)
    B, T, H, R = 3, 11, 16, 2
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    h[1, 4, 5] = -9.0                       # a negative value of largest magnitude
    idx = [2, 5, 9]
    target, zero = _target_and_zero_masks(B, T, 1, R, None, "official", h.device)
    ts = None if scale == 1.0 else torch.tensor([0.0] * (T - R) + (scale if isinstance(scale, list) else [scale] * R))
    got = edit_activations(h, torch.tensor(idx), target, zero, "official", normal_values, ts)
    for b in range(B):
        want = authors_edit(h[b], R, idx, scale, normal_values)
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


def test_edit_modes_through_the_hooks(model, images):
    x = images[:3]
    layer, neurons = 4, [13, 20]
    seen = {}
    with ttreg.test_time_registers(model, {layer: neurons}, num_registers=2, preset="official",
                                   normal_values="only_outliers", scale=[1.0, 0.5]):
        fc2 = model.blocks[layer].mlp.fc2
        h = fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", a[0].clone()),
                                          prepend=True)       # runs before the edit
        try:
            tr = ttreg.trace(model, x, neurons=[(layer, n) for n in neurons])
        finally:
            h.remove()
    for b in range(3):
        want = authors_edit(seen["pre"][b], 2, neurons, [1.0, 0.5], "only_outliers")[:, neurons]
        torch.testing.assert_close(tr.activations[b].T, want)
    with pytest.raises(ValueError, match="one value per register: got 3 values for 2"):
        ttreg.add_test_time_registers(model, {layer: neurons}, num_registers=2, scale=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown normal_values 'median'"):
        ttreg.add_test_time_registers(model, {layer: neurons}, normal_values="median")
