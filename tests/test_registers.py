"""Test-time registers on timm ViTs with planted register neurons: the outliers move into the
register, shapes and outputs kept, bitwise plain when empty, batch equals single, hooks cleaned up
(also on an exception), the paper and official presets and ``shift_to`` by hand, the authors' edit
modes restated, timm variants, other input sizes, attention maps and ``zero_neurons``."""
import pytest
import torch

import ttreg
from ttreg.registers import edit_activations, target_and_zero_masks
from ttreg.testing import mixed_images, planted_vit

from conftest import PLANTS, all_hooks, ratio, site_hooks


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
    assert site_hooks(planted) > 0
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
    target, zero = target_and_zero_masks(2, 4, 1, 1, None, "paper", h.device)
    out = edit_activations(h.clone(), idx, target, zero, "paper")
    want = torch.tensor([
        [[0.0, 9.0, 0.0], [0.0, 8.0, 0.0], [0.0, 7.0, 0.0], [5.0, 6.0, 0.5]],   # max per neuron
        [[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 0.0], [2.5, 4.0, 2.0]],
    ])
    assert torch.equal(out, want)


def test_official_preset_by_hand():
    h, idx = _example()
    target, zero = target_and_zero_masks(2, 4, 1, 1, None, "official", h.device)
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
    target, zero = target_and_zero_masks(2, 4, 1, 0, shift, "paper", h.device)
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
    from ttreg.registers import target_and_zero_masks, edit_activations
    g = torch.Generator().manual_seed(0)
    B, T, H, R = 3, 11, 16, 2
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    h[1, 4, 5] = -9.0                       # a negative value of largest magnitude
    idx = [2, 5, 9]
    target, zero = target_and_zero_masks(B, T, 1, R, None, "official", h.device)
    ts = None if scale == 1.0 else torch.tensor([0.0] * (T - R) + (scale if isinstance(scale, list) else [scale] * R))
    got = edit_activations(h, torch.tensor(idx), target, zero, "official", normal_values, ts)
    for b in range(B):
        want = authors_edit(h[b], R, idx, scale, normal_values)
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


def test_edit_modes_through_the_hooks(content_model, calibration_images):
    x = calibration_images[:3]
    layer, neurons = 4, [13, 20]
    seen = {}
    with ttreg.test_time_registers(content_model, {layer: neurons}, num_registers=2, preset="official",
                                   normal_values="only_outliers", scale=[1.0, 0.5]):
        fc2 = content_model.blocks[layer].mlp.fc2
        h = fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", a[0].clone()),
                                          prepend=True)       # runs before the edit
        try:
            tr = ttreg.trace(content_model, x, neurons=[(layer, n) for n in neurons])
        finally:
            h.remove()
    for b in range(3):
        want = authors_edit(seen["pre"][b], 2, neurons, [1.0, 0.5], "only_outliers")[:, neurons]
        torch.testing.assert_close(tr.activations[b].T, want)
    with pytest.raises(ValueError, match="one value per register: got 3 values for 2"):
        ttreg.add_test_time_registers(content_model, {layer: neurons}, num_registers=2, scale=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown normal_values 'median'"):
        ttreg.add_test_time_registers(content_model, {layer: neurons}, normal_values="median")

