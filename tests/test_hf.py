"""Hugging Face adapters and timm->HF converters, on small random ViTs with planted register neurons.

Every family is planted in timm (:func:`ttreg.testing.planted_vit`) and converted, so the right
answer is known: the planted neurons (1, 7) and (3, 21) fire on patch 12 and make it an outlier.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import ttreg  # noqa: E402
from ttreg.adapters.hf import get_path  # noqa: E402
from ttreg.testing.convert.hf import (timm_to_hf_clip, timm_to_hf_clip_vision, timm_to_hf_dinov2,  # noqa: E402
                              timm_to_hf_dinov2_with_registers, timm_to_hf_llava,
                              timm_to_hf_siglip_vision, timm_to_hf_vit)
from ttreg.testing import mixed_images, planted_vit  # noqa: E402

from conftest import fail_inside, flat, hook_state, ratio  # noqa: E402

PLANTS = [(1, 7), (3, 21)]
POS = 12  # the planted patch
CLIP_KW = dict(pre_norm=True, act_layer="quick_gelu")
#: family -> (timm kwargs for planted_vit, converter, adapter class name)
FAMILIES = {
    "dinov2": (dict(init_values=1e-5), timm_to_hf_dinov2, "HFDinov2Adapter"),
    "dinov2_reg": (dict(init_values=1e-5, reg_tokens=4, no_embed_class=True),
                   timm_to_hf_dinov2_with_registers, "HFDinov2Adapter"),
    "vit": ({}, timm_to_hf_vit, "HFViTAdapter"),
    "clip_vision": (CLIP_KW, timm_to_hf_clip_vision, "HFCLIPVisionAdapter"),
    "clip": (CLIP_KW, timm_to_hf_clip, "HFCLIPAdapter"),
    "siglip": (dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),
               timm_to_hf_siglip_vision, "HFSiglipVisionAdapter"),
    "llava": (CLIP_KW, timm_to_hf_llava, "HFLlavaAdapter"),
}
PREFIX = {"dinov2": 1, "dinov2_reg": 5, "vit": 1, "clip_vision": 1, "clip": 1, "siglip": 0, "llava": 1}


@pytest.fixture(scope="module")
def images():
    return mixed_images(6)


@pytest.fixture(scope="module")
def built():
    """family -> (timm model, HF model), built once."""
    out, timm_models = {}, {}
    for name, (kw, convert, _) in FAMILIES.items():
        key = tuple(sorted(kw.items()))                  # the CLIP-tower families share one
        if key not in timm_models:
            timm_models[key] = planted_vit(**kw)
        out[name] = (timm_models[key], convert(timm_models[key]))
    return out


@torch.no_grad()
def user_call(name, model, x) -> dict[str, torch.Tensor]:
    """What a user of this family reads: all outputs, hidden states included."""
    if name == "clip":
        emb = model.get_image_features(pixel_values=x)       # a tensor before transformers 5
        emb = emb if torch.is_tensor(emb) else emb.pooler_output
        return {"image_embeds": emb, **flat(model.vision_model(pixel_values=x, output_hidden_states=True))}
    if name == "llava":
        seen = {}
        proj = get_path(model, "model.multi_modal_projector", "multi_modal_projector")
        h = proj.register_forward_pre_hook(lambda m, a: seen.update(projector_input=a[0]))
        try:
            feats = model.get_image_features(pixel_values=x)
        finally:
            h.remove()
        feats = getattr(feats, "pooler_output", feats)         # 5.x: an output; 4.x: tensor or list
        feats = feats if torch.is_tensor(feats) else torch.stack(list(feats))
        tower = get_path(model, "model.vision_tower", "vision_tower")
        return {**seen, "image_features": feats.reshape(len(x), -1, feats.shape[-1]),
                **flat(tower(pixel_values=x, output_hidden_states=True))}
    return flat(model(pixel_values=x, output_hidden_states=True))


def attn_impls(model):
    return [getattr(m.config, "_attn_implementation", None) for m in model.modules() if hasattr(m, "config")]


# --- adapters, neurons, registers ------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_structure(built, name):
    tm, hf = built[name]
    ad = ttreg.wrap(hf)
    assert type(ad).__name__ == FAMILIES[name][2]
    assert ad.num_layers == 6 and ad.embed_dim == 96 and ad.patch_size == (8, 8)
    assert ad.num_prefix_tokens == PREFIX[name] == tm.num_prefix_tokens
    assert ad.mlp_width(0) == 384 and ad.image_size() == (64, 64)
    assert (ad.pre_block_module() is not None) == (name in ("clip_vision", "clip", "llava"))
    mean = {"vit": 0.5, "siglip": 0.5, "dinov2": 0.485, "dinov2_reg": 0.485}.get(name, 0.48145466)
    assert ad.mean_std()[0][0] == mean


@pytest.mark.parametrize("name", FAMILIES)
def test_planted_neurons_found_and_registers_fix_norms(built, images, name):
    _, hf = built[name]
    neurons = ttreg.find_register_neurons(hf, images, top_k=len(PLANTS))
    assert sorted(neurons.neurons) == PLANTS
    before = ttreg.trace(hf, images)
    with ttreg.test_time_registers(hf, neurons):
        after = ttreg.trace(hf, images)
    assert ratio(before).min() >= 5.0
    assert ratio(after).max() <= 2.0
    assert (before.norms[:, -1].argmax(-1) == PREFIX[name] + POS).all()   # the planted patch
    # the high norm moved to the register token, the last one
    assert (after.norms[:, -1].argmax(-1) == after.norms.shape[-1] - 1).all()
    med = after.norms[:, -1, after.patch_slice].median(-1).values
    assert (after.register_norms(-1)[:, 0] >= 5 * med).all()


def test_official_preset_on_hf(built, images):
    _, hf = built["clip_vision"]
    with ttreg.test_time_registers(hf, PLANTS, preset="official"):
        tr = ttreg.trace(hf, images)
    assert ratio(tr).max() <= 2.0


@pytest.mark.parametrize("wrapper", ["CLIPVisionModelWithProjection", "SiglipModel"])
def test_other_wrappers_of_a_tower(built, images, wrapper):
    import transformers as tf
    tower = built["clip_vision" if wrapper.startswith("CLIP") else "siglip"][1]
    if wrapper == "SiglipModel":
        text = tf.SiglipTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=16)
        cfg = tf.SiglipConfig(text_config=text.to_dict(), vision_config=tower.config.to_dict())
        model = tf.SiglipModel(cfg)
    else:
        model = tf.CLIPVisionModelWithProjection(tower.config)
    src = get_path(tower, "vision_model") or tower                   # 4.x keeps a vision_model inside
    model.vision_model.load_state_dict(src.state_dict())
    model.eval()
    assert sorted(ttreg.find_register_neurons(model, images, top_k=2).neurons) == PLANTS
    with ttreg.test_time_registers(model, PLANTS):
        assert ratio(ttreg.trace(model, images)).max() <= 2.0


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_keep_shapes_and_batch_equals_single(built, images, name):
    _, hf = built[name]
    plain = user_call(name, hf, images)
    with ttreg.test_time_registers(hf, PLANTS):
        reg = user_call(name, hf, images)
        singles = [user_call(name, hf, images[i:i + 1]) for i in range(len(images))]
    assert reg.keys() == plain.keys() and len(plain) >= 2
    for k in plain:
        assert reg[k].shape == plain[k].shape, k
    if name not in ("clip", "llava"):
        assert len([k for k in plain if ".hidden_states." in k]) == 7
        assert plain["out.last_hidden_state"].shape == (6, PREFIX[name] + 64, 96)
    for k, v in reg.items():
        single = torch.cat([s[k] for s in singles])
        assert (single - v).abs().max() <= 1e-5, k


def test_siglip_head_never_sees_registers(built, images):
    _, hf = built["siglip"]
    seen = []
    head = get_path(hf, "head", "vision_model.head")
    h = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        with ttreg.test_time_registers(hf, PLANTS, num_registers=3), torch.no_grad():
            out = hf(pixel_values=images)
    finally:
        h.remove()
    assert seen == [torch.Size([6, 64, 96])]
    assert out.pooler_output.shape == (6, 96)


def test_clipmodel_runs_vision_side_only(built, images):
    _, hf = built["clip"]
    calls = []
    h = hf.text_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ttreg.trace(hf, images)
        ttreg.find_register_neurons(hf, images, top_k=2)
    finally:
        h.remove()
    assert calls == []


@pytest.mark.parametrize("name", FAMILIES)
def test_hooks_never_leak(built, images, name):
    _, hf = built[name]
    user_call(name, hf, images)            # let transformers install its own capture hooks first
    hooks, impls = hook_state(hf), attn_impls(hf)
    plain = user_call(name, hf, images)
    with ttreg.test_time_registers(hf, PLANTS):
        ttreg.trace(hf, images, attention=[0, -1], neurons=PLANTS)
    after = user_call(name, hf, images)
    fail_inside(hf, PLANTS, lambda x: user_call(name, hf, x), images)
    again = user_call(name, hf, images)
    assert hook_state(hf) == hooks and attn_impls(hf) == impls
    for out in (after, again):
        assert all(torch.equal(out[k], plain[k]) for k in plain)


@pytest.mark.parametrize("name", ["vit", "dinov2_reg", "siglip"])
def test_attention_probs_match_eager_outputs(built, images, name):
    _, hf = built[name]
    tr = ttreg.trace(hf, images, attention=True)
    T = PREFIX[name] + 64
    assert tr.attention[0].shape == (6, 4, T, T)
    assert (tr.attention[3].sum(-1) - 1).abs().max() < 1e-5
    assert set(attn_impls(hf)) == {"sdpa"}
    with ttreg.test_time_registers(hf, PLANTS):
        tr_r = ttreg.trace(hf, images, attention=[-1])
    assert tr_r.attention[5].shape == (6, 4, T + 1, T + 1)   # the trace shows the register
    old = hf.config._attn_implementation
    hf.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            ref = hf(pixel_values=images, output_attentions=True).attentions
            with ttreg.test_time_registers(hf, PLANTS):
                user = hf(pixel_values=images, output_attentions=True).attentions
    finally:
        hf.config._attn_implementation = old
    assert max((ref[l] - tr.attention[l]).abs().max() for l in range(6)) <= 1e-6
    assert all(a.shape == (6, 4, T, T) for a in user)              # registers trimmed for the user


# --- cross-library equivalence -----------------------------------------------------------------

@torch.no_grad()
def _timm_and_hf_outputs(name, tm, hf, x):
    ff = tm.forward_features(x)
    out = hf(pixel_values=x)
    if name in ("dinov2", "dinov2_reg", "vit"):
        return [(ff, out.last_hidden_state)]
    pre_logits = tm.forward_head(ff, pre_logits=True)
    if name == "siglip":
        return [(ff, out.last_hidden_state), (pre_logits, out.pooler_output)]
    return [(pre_logits, out.pooler_output)]


@pytest.mark.parametrize("name", ["dinov2", "dinov2_reg", "vit", "clip_vision", "siglip"])
def test_same_weights_same_results_in_timm_and_hf(built, images, name):
    tm, hf = built[name]
    nt = ttreg.find_register_neurons(tm, images, top_k=2)
    nh = ttreg.find_register_neurons(hf, images, top_k=2)
    assert nt.neurons == nh.neurons
    assert max(abs(a - b) for a, b in zip(nt.scores, nh.scores)) <= 1e-4
    with pytest.raises(ttreg.ModelMismatchError):
        ttreg.add_test_time_registers(hf, nt)           # fingerprinted on the timm model
    diffs = [(ttreg.trace(tm, images).norms - ttreg.trace(hf, images).norms).abs().max()]
    diffs += [(a - b).abs().max() for a, b in _timm_and_hf_outputs(name, tm, hf, images)]
    with ttreg.test_time_registers(tm, PLANTS), ttreg.test_time_registers(hf, PLANTS):
        diffs.append((ttreg.trace(tm, images).norms - ttreg.trace(hf, images).norms).abs().max())
        diffs += [(a - b).abs().max() for a, b in _timm_and_hf_outputs(name, tm, hf, images)]
    assert max(diffs) <= 1e-4


def test_resized_inputs_each_library_against_itself(built):
    x = mixed_images(4, size=96)[:, :, :80]                      # 80 x 96: a 10 x 12 grid
    tm = planted_vit(init_values=1e-5, dynamic_img_size=True)
    hf = timm_to_hf_dinov2(tm)
    vit = built["vit"][1]
    runs = {
        "timm": lambda b: tm.forward_features(b),
        "hf_dinov2": lambda b: hf(pixel_values=b).last_hidden_state,
        "hf_vit": lambda b: vit(pixel_values=b, interpolate_pos_encoding=True).last_hidden_state,
    }
    with torch.no_grad():
        for model, run in zip((tm, hf, vit), runs.values()):
            tr = ttreg.trace(model, x)
            assert tr.grid == (10, 12) and tr.norms.shape == (4, 6, 121)
            with ttreg.test_time_registers(model, PLANTS):
                assert ttreg.trace(model, x).norms.shape == (4, 6, 122)
                batch = run(x)
                single = torch.cat([run(x[i:i + 1]) for i in range(4)])
            assert batch.shape == (4, 121, 96)
            assert (batch - single).abs().max() <= 1e-5


# --- LLaVA: the projector's input ---------------------------------------------------------------

@torch.no_grad()
def _projector_input(model, x, **kw):
    seen = []
    proj = get_path(model, "model.multi_modal_projector", "multi_modal_projector")
    h = proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        model.get_image_features(pixel_values=x, **kw)
    finally:
        h.remove()
    return seen[0]


def _timm_block_output(tm, layer, x):
    seen = []
    h = tm.blocks[layer].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            tm.forward_features(x)
    finally:
        h.remove()
    return seen[0]


def test_llava_projector_input_keeps_shape_and_changes_only_as_registers_imply(built, images):
    tm, llava = built["llava"]
    plain = _projector_input(llava, images)          # hidden_states[-2] = block 4's output, CLS dropped
    assert plain.shape == (6, 64, 96)
    assert (plain - _timm_block_output(tm, 4, images)[:, 1:]).abs().max() <= 1e-5
    with ttreg.test_time_registers(llava, ttreg.RegisterNeurons(), num_registers=0):
        assert torch.equal(_projector_input(llava, images), plain)
    with ttreg.test_time_registers(llava, ttreg.RegisterNeurons(), num_registers=1):
        idle = _projector_input(llava, images)       # a register that receives nothing
    n0 = plain.norm(dim=-1)
    assert ((idle - plain).norm(dim=-1) / n0).max() <= 0.01

    tower = ttreg.wrap(llava).vision
    with torch.no_grad():
        first = tower(pixel_values=images, output_hidden_states=True).hidden_states[0]
        with ttreg.test_time_registers(llava, PLANTS), ttreg.test_time_registers(tm, PLANTS):
            edited = _projector_input(llava, images)
            timm_edited = _timm_block_output(tm, 4, images)[:, 1:]
            # transformers 5 records hidden_states[0] as layer 0's *input*, which carries the registers
            first_reg = tower(pixel_values=images, output_hidden_states=True).hidden_states[0]
    assert edited.shape == plain.shape and torch.equal(first_reg, first)
    assert (edited - timm_edited).abs().max() <= 1e-4      # the same edit, done by timm
    n1 = edited.norm(dim=-1)
    r0 = n0[:, POS] / n0.median(-1).values
    r1 = n1[:, POS] / n1.median(-1).values
    assert r0.min() >= 5 and r1.max() <= 2                 # the planted token lost its norm


def test_wrap_unsupported_model_points_to_what_is_supported():
    from pathlib import Path
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(TypeError) as e:
        ttreg.wrap(torchvision.models.resnet18())
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200 and "torchvision.models.resnet.ResNet" in msg
    assert "docs/families.md" in msg and "ttreg.wrap(model, blocks=" in msg
    listed = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text()
    for name in ("timm VisionTransformer", "HF Dinov2Model", "HF CLIPVisionModel", "HF SiglipVisionModel", "LLaVA"):
        assert name in listed

