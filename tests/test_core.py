"""Foundation: search, registers, presets, hygiene, on timm ViTs with planted register neurons."""
import json

import pytest
import torch

import ttreg
from ttreg.registers import edit_activations, _target_and_zero_masks
from ttreg.testing import mixed_images, planted_vit

from conftest import all_hooks

PLANTS = [(1, 7), (3, 21)]


def ratio(tr, layer=-1):
    pn = tr.norms[:, layer, tr.patch_slice]
    return pn.amax(-1) / pn.median(-1).values


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


def test_registers_remove_outliers_and_register_takes_the_norm(planted, images):
    plain = ttreg.trace(planted, images)
    assert ratio(plain).min() >= 5
    rn = ttreg.RegisterNeurons.from_dict({1: [7], 3: [21]}, model=planted)
    with ttreg.test_time_registers(planted, rn, num_registers=1):
        tr = ttreg.trace(planted, images)
    assert ratio(tr).max() <= 2
    assert tr.token_types[-1] == "register" and tr.num_registers == 1
    reg = tr.register_norms(-1)[:, 0]
    assert (reg > 5 * tr.norms[:, -1, tr.patch_slice].median(-1).values).all()
    assert tr.norms.shape[-1] == plain.norms.shape[-1] + 1


def test_outputs_keep_shapes(planted, images):
    rn = {1: [7], 3: [21]}
    x = images[:3]
    ref = {
        "forward": planted(x), "features": planted.forward_features(x),
        "inter": planted.forward_intermediates(x, indices=[1, 3, 5]),
    }
    with ttreg.test_time_registers(planted, rn, num_registers=2):
        out = planted(x)
        feats = planted.forward_features(x)
        final, inter = planted.forward_intermediates(x, indices=[1, 3, 5])
        head = planted.forward_head(feats)
    assert out.shape == ref["forward"].shape and feats.shape == ref["features"].shape
    assert final.shape == ref["inter"][0].shape
    assert [t.shape for t in inter] == [t.shape for t in ref["inter"][1]]
    assert head.shape == out.shape
    torch.testing.assert_close(head, out)


def test_empty_set_and_no_registers_is_bitwise_plain(planted, images):
    ref = planted(images)
    with ttreg.test_time_registers(planted, {}, num_registers=0):
        out = planted(images)
    assert torch.equal(out, ref)


def test_batch_equals_single(planted, images):
    rn = {1: [7], 3: [21]}
    for preset in ("paper", "official"):
        with ttreg.test_time_registers(planted, rn, preset=preset, num_registers=2):
            batch = planted.forward_features(images)
            single = torch.cat([planted.forward_features(images[i:i + 1]) for i in range(len(images))])
        assert (batch - single).abs().max() <= 1e-5


def test_exception_inside_context_cleans_up(planted, images):
    ref = planted(images)
    before = all_hooks(planted)
    fused = [b.attn.fused_attn for b in planted.blocks]
    with pytest.raises(RuntimeError, match="boom"):
        with ttreg.test_time_registers(planted, {1: [7], 3: [21]}):
            planted(images)
            raise RuntimeError("boom")
    assert all_hooks(planted) == before == 0
    assert torch.equal(planted(images), ref)
    with pytest.raises(RuntimeError, match="boom"):
        from ttreg.tracing import record
        with record(planted, range(6), {1: None}, attention_layers=[0, 5]):
            planted(images)
            raise RuntimeError("boom")
    assert all_hooks(planted) == 0
    assert [b.attn.fused_attn for b in planted.blocks] == fused
    assert torch.equal(planted(images), ref)


def test_handle_remove(planted, images):
    ref = planted(images)
    h = ttreg.add_test_time_registers(planted, {3: [21]})
    assert all_hooks(planted) > 0
    assert not torch.equal(planted(images), ref)
    h.remove()
    assert all_hooks(planted) == 0 and torch.equal(planted(images), ref)
    h.remove()  # idempotent


def test_registers_twice_is_an_error(planted):
    with ttreg.test_time_registers(planted, {3: [21]}):
        with pytest.raises(RuntimeError, match="already active"):
            ttreg.add_test_time_registers(planted, {3: [21]})
    assert all_hooks(planted) == 0


# --- presets on hand-computed examples ----------------------------------------------------------

def _example():
    # B=2 images, T=4 tokens: [CLS, patch, patch, register], H=3 neurons; neurons 0 and 2 edited.
    h = torch.tensor([
        [[1.0, 9.0, -2.0], [5.0, 8.0, 0.5], [3.0, 7.0, -6.0], [0.2, 6.0, 0.1]],
        [[-4.0, 1.0, 2.0], [0.0, 2.0, 1.0], [2.5, 3.0, 0.0], [0.1, 4.0, 0.3]],
    ])
    return h, torch.tensor([0, 2])


def test_paper_preset_by_hand():
    h, idx = _example()
    target, zero = _target_and_zero_masks(2, 4, 1, 1, None, "paper", h.device)
    out = edit_activations(h.clone(), idx, target, zero, "paper")
    want = torch.tensor([
        [[0.0, 9.0, 0.0], [0.0, 8.0, 0.0], [0.0, 7.0, 0.0], [5.0, 6.0, 0.5]],   # max per neuron
        [[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 0.0], [2.5, 4.0, 2.0]],
    ])
    assert torch.equal(out, want)


def test_official_preset_by_hand():
    h, idx = _example()
    target, zero = _target_and_zero_masks(2, 4, 1, 1, None, "official", h.device)
    out = edit_activations(h.clone(), idx, target, zero, "official")
    # image 0: largest |value| over all tokens of neurons {0, 2} is -6 (signed), shared;
    # image 1: it is -4, on the CLS token. CLS is left untouched, patches zeroed.
    want = torch.tensor([
        [[1.0, 9.0, -2.0], [0.0, 8.0, 0.0], [0.0, 7.0, 0.0], [-6.0, 6.0, -6.0]],
        [[-4.0, 1.0, 2.0], [0.0, 2.0, 0.0], [0.0, 3.0, 0.0], [-4.0, 4.0, -4.0]],
    ])
    assert torch.equal(out, want)


def test_shift_to_by_hand():
    h, idx = _example()
    shift = torch.tensor([[False, True, False], [True, False, False]])  # per-image patch targets
    target, zero = _target_and_zero_masks(2, 4, 1, 0, shift, "paper", h.device)
    out = edit_activations(h.clone(), idx, target, zero, "paper")
    want = torch.tensor([
        [[0.0, 9.0, 0.0], [0.0, 8.0, 0.0], [5.0, 7.0, 0.5], [0.0, 6.0, 0.0]],
        [[0.0, 1.0, 0.0], [2.5, 2.0, 2.0], [0.0, 3.0, 0.0], [0.0, 4.0, 0.0]],
    ])
    assert torch.equal(out, want)


def test_presets_differ_on_a_model(planted, images):
    outs = {}
    for preset in ("paper", "official"):
        with ttreg.test_time_registers(planted, {3: [21]}, preset=preset):
            outs[preset] = ttreg.trace(planted, images, neurons=[(3, 21)])
    # Same register stream, no edit: layers 0-2 are identical, so at block 3 the neuron's
    # unedited value on CLS is this one.
    with ttreg.test_time_registers(planted, {}, num_registers=1):
        unedited = ttreg.trace(planted, images, neurons=[(3, 21)])
    # the paper preset zeroes neuron (3, 21) on CLS too; official leaves CLS untouched
    assert outs["paper"].activations[:, 0, 0].abs().max() == 0
    assert unedited.activations[:, 0, 0].abs().min() > 0
    assert torch.equal(outs["official"].activations[:, 0, 0], unedited.activations[:, 0, 0])
    with ttreg.test_time_registers(planted, {1: [7], 3: [21]}, preset="official"):
        assert ratio(ttreg.trace(planted, images)).max() <= 2


def test_shift_to_moves_outlier_to_chosen_patch(planted, images):
    with ttreg.test_time_registers(planted, {1: [7], 3: [21]}, shift_to=[40]):
        tr = ttreg.trace(planted, images)
    nm = tr.norm_map(-1).flatten(1)
    assert (nm.argmax(1) == 40).all()
    assert tr.num_registers == 0


def test_several_registers_share_the_value(planted, images):
    with ttreg.test_time_registers(planted, {1: [7], 3: [21]}, num_registers=3):
        tr = ttreg.trace(planted, images, neurons=[(3, 21)])
    reg = tr.activations[:, 0, -3:]
    assert torch.equal(reg[:, 0], reg[:, 1]) and torch.equal(reg[:, 1], reg[:, 2])
    assert (reg[:, 0] > 1).all()


def test_bad_arguments(planted):
    with pytest.raises(ValueError, match="preset"):
        ttreg.add_test_time_registers(planted, {3: [21]}, preset="nope")
    with pytest.raises(ValueError, match="shift_to"):
        ttreg.add_test_time_registers(planted, {3: [21]}, num_registers=0)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        with ttreg.test_time_registers(planted, {3: [21]}, shift_to=[64]):
            planted(mixed_images(1))
    with pytest.raises(ttreg.ModelMismatchError, match="6 blocks"):
        ttreg.add_test_time_registers(planted, {9: [1]})
    assert all_hooks(planted) == 0


# --- the spec file ---------------------------------------------------------------------------

def test_spec_round_trip(tmp_path, planted, images):
    rn = ttreg.find_register_neurons(planted, images, top_k=2)
    path = rn.save(tmp_path / "n.json")
    data = json.loads(path.read_text())
    assert data["format"] == "ttreg.register_neurons" and len(data["neurons"]) == 2
    back = ttreg.RegisterNeurons.load(path)
    assert back == rn
    assert [p.name for p in tmp_path.iterdir()] == ["n.json"]  # no temp files left
    back.check_model(planted)


def test_spec_for_another_model_is_refused(planted, images):
    rn = ttreg.find_register_neurons(planted, images, top_k=2)
    other_arch = planted_vit(depth=6, embed_dim=128)
    with pytest.raises(ttreg.ModelMismatchError, match="another architecture"):
        ttreg.add_test_time_registers(other_arch, rn)
    other_weights = planted_vit(seed=1)
    with pytest.raises(ttreg.ModelMismatchError, match="other weights"):
        ttreg.add_test_time_registers(other_weights, rn)
    ttreg.add_test_time_registers(other_weights, rn, check=False).remove()
    assert all_hooks(other_weights) == 0


def test_no_outliers_gives_empty_result_with_message():
    import timm
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=0).eval()
    with pytest.warns(UserWarning, match="no outlier tokens at layer 3 over 6 images"):
        rn = ttreg.find_register_neurons(m, mixed_images(6))
    assert len(rn) == 0 and rn.num_images == 6 and "does not need registers" in rn.note
    assert rn.statistics["mean_norm_ratio"][3] < 2


# --- timm variants ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(reg_tokens=4, no_embed_class=True, init_values=1e-5),        # DINOv2-reg style
    dict(pre_norm=True, class_token=True, global_pool="token"),       # CLIP tower
    dict(mlp_layer="swiglu"),                                         # gated MLP
    dict(dynamic_img_size=True),
])
def test_timm_variants(kwargs, images):
    if kwargs.get("mlp_layer") == "swiglu":
        from timm.layers import SwiGLUPacked
        import torch.nn as nn
        kwargs = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2.0)
    m = planted_vit(**kwargs)
    ad = ttreg.wrap(m)
    rn = ttreg.find_register_neurons(m, images, top_k=2)
    assert sorted(rn.neurons) == PLANTS, kwargs
    plain = ttreg.trace(m, images)
    assert ratio(plain).min() >= 5
    ref = m(images)
    with ttreg.test_time_registers(m, rn):
        tr = ttreg.trace(m, images)
        out = m(images)
        single = m(images[:1])
    assert ratio(tr).max() <= 2
    assert out.shape == ref.shape and (out[:1] - single).abs().max() <= 1e-5
    assert tr.num_prefix_tokens == ad.num_prefix_tokens
    assert all_hooks(m) == 0


def test_dynamic_img_size_other_resolution():
    m = planted_vit(dynamic_img_size=True)
    x = mixed_images(3, size=80)
    with ttreg.test_time_registers(m, {1: [7], 3: [21]}):
        tr = ttreg.trace(m, x)
        out = m.forward_features(x)
        single = m.forward_features(x[1:2])
    assert tr.grid == (10, 10) and out.shape == (3, 1 + 100, 96)
    assert (out[1:2] - single).abs().max() <= 1e-5


def test_trace_attention_and_neurons(planted, images):
    fused = [b.attn.fused_attn for b in planted.blocks]
    tr = ttreg.trace(planted, images[:2], attention=[-1, 0], neurons=[(3, 21), (1, 7)])
    assert set(tr.attention) == {5, 0}
    a = tr.attention[5]
    assert a.shape == (2, 4, 65, 65)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 65))
    assert [b.attn.fused_attn for b in planted.blocks] == fused
    assert tr.activations.shape == (2, 2, 65)
    # the planted neuron fires on its token (patch 12) only
    act = tr.activation_map(0).flatten(1)
    assert (act.argmax(1) == 12).all() and (act[:, 12] > 3).all()
    assert tr.cls_attention(5).shape == (2, 4, 8, 8)
    # attention with registers includes the register token
    with ttreg.test_time_registers(planted, {1: [7], 3: [21]}):
        tr2 = ttreg.trace(planted, images[:2], attention=True)
    assert tr2.attention[5].shape == (2, 4, 66, 66)


def test_zero_neurons_zeroes_every_token(planted, images):
    with ttreg.zero_neurons(planted, {3: [21]}):
        tr = ttreg.trace(planted, images, neurons=[(3, 21), (1, 7)])
        assert tr.num_registers == 0
    assert torch.equal(tr.activations[:, 0], torch.zeros_like(tr.activations[:, 0]))
    assert tr.activations[:, 1].abs().max() > 1     # other neurons untouched
    assert all_hooks(planted) == 0
