"""open_clip: adapters for whole CLIP models and towers, the timm -> open_clip converter, and
timm / Hugging Face / open_clip giving the same numbers on the same weights."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ttreg

open_clip = pytest.importorskip("open_clip")

from ttreg.adapters.open_clip import OpenCLIPTimmAdapter, OpenCLIPViTAdapter  # noqa: E402
from ttreg.outliers import norm_ratio  # noqa: E402
from ttreg.testing.convert.open_clip import TINY_TEXT_CFG, timm_to_open_clip  # noqa: E402
from ttreg.testing import plant_timm_register_neurons, planted_vit  # noqa: E402

from conftest import all_hooks, ratio  # noqa: E402

PLANTS = [(1, 7), (3, 21)]
RN = {1: [7], 3: [21]}


@pytest.fixture(scope="module")
def tower():
    """A CLIP-shaped timm tower with planted register neurons (quick GELU, bias-free head)."""
    return planted_vit(pre_norm=True, class_token=True, global_pool="token",
                       act_layer="quick_gelu", num_classes=32)


@pytest.fixture(scope="module")
def clip(tower):
    return timm_to_open_clip(tower)


def test_converter_copies_the_tower_exactly(tower, clip, images):
    assert isinstance(clip, open_clip.model.CLIP) and not clip.training
    assert type(clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    with torch.no_grad():
        diff = (clip.encode_image(images) - tower(images)).abs().max()
    assert diff <= 1e-5
    a, b = ttreg.trace(tower, images), ttreg.trace(clip, images)
    assert a.norms.shape == b.norms.shape == (10, 6, 65)
    assert (a.norms - b.norms).abs().max() <= 1e-4
    proj = torch.randn(96, 16)
    other = timm_to_open_clip(tower, proj=proj)
    assert torch.equal(other.visual.proj, proj) and other.encode_image(images[:2]).shape == (2, 16)


def test_converter_refuses_models_open_clip_cannot_express(tower):
    from timm.models.vision_transformer import VisionTransformer
    small = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=8)
    with pytest.raises(ValueError, match="global_pool='token'"):
        timm_to_open_clip(VisionTransformer(pre_norm=True, global_pool="avg", **small))
    with pytest.raises(ValueError, match="bias-free patch embedding"):
        timm_to_open_clip(VisionTransformer(**small))   # timm's default patch embedding has a bias
    with pytest.raises(ValueError, match="bias"):
        biased = copy.deepcopy(tower)
        torch.nn.init.ones_(biased.head.bias)
        timm_to_open_clip(biased)


def test_wrap_whole_model_and_tower(clip):
    ad, vis = ttreg.wrap(clip), ttreg.wrap(clip.visual)
    assert isinstance(ad, OpenCLIPViTAdapter) and isinstance(vis, OpenCLIPViTAdapter)
    assert ad.whole and not vis.whole
    assert (ad.num_layers, ad.num_prefix_tokens, ad.embed_dim, ad.mlp_width(0)) == (6, 1, 96, 384)
    assert ad.token_dim == 1 and clip.visual.transformer.batch_first
    assert ad.patch_size == (8, 8) and ad.image_size() == (64, 64)
    assert ad.down_proj(2) is clip.visual.transformer.resblocks[2].mlp.c_proj
    assert ad.pre_block_module() is clip.visual.ln_pre
    assert ad.mean_std() == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    # registers enter the blocks as zeros after the position embedding, i.e. ln_pre(0) = its bias
    init = ad.register_init(3, 2, torch.zeros(1, 1, 96))
    assert init.shape == (3, 2, 96) and torch.allclose(init, clip.visual.ln_pre.bias.expand(3, 2, -1))
    # the fingerprint covers the image tower: a set found on the CLIP applies to its tower
    assert ttreg.RegisterNeurons.fingerprint_of(clip) == ttreg.RegisterNeurons.fingerprint_of(clip.visual)


def test_planted_neurons_found_exactly(clip, images):
    rn = ttreg.find_register_neurons(clip, images, top_k=len(PLANTS))
    assert sorted(rn.neurons) == PLANTS
    assert rn.num_images_with_outliers == 10 and rn.statistics["emergence_layer"] == 3
    more = ttreg.find_register_neurons(clip, images, top_k=3)
    assert more.scores[1] > 10 * more.scores[2]
    rn.check_model(clip.visual)


def test_registers_remove_outliers_and_keep_shapes(clip, images):
    plain = ttreg.trace(clip, images)
    assert ratio(plain).min() >= 5
    with torch.no_grad():
        ref = clip.encode_image(images)
        ref_inter = clip.visual.forward_intermediates(images, indices=[1, 5])
    with ttreg.test_time_registers(clip, ttreg.RegisterNeurons.from_dict(RN, model=clip)):
        tr = ttreg.trace(clip, images, attention=[0, -1])
        with torch.no_grad():
            out = clip.encode_image(images)
            inter = clip.visual.forward_intermediates(images, indices=[1, 5])
    assert ratio(tr).max() <= 2
    assert tr.token_types[-1] == "register" and tr.norms.shape[-1] == 66
    reg = tr.register_norms(-1)[:, 0]
    assert (reg > 5 * tr.norms[:, -1, tr.patch_slice].median(-1).values).all()
    assert out.shape == ref.shape == tr.output.shape == (10, 32)
    assert [t.shape for t in inter["image_intermediates"]] == [t.shape for t in ref_inter["image_intermediates"]]
    att = tr.attention[5]
    assert att.shape == (10, 4, 66, 66)
    torch.testing.assert_close(att.sum(-1), torch.ones(10, 4, 66))


def test_batch_equals_single(clip, images):
    x = images[:4]
    with ttreg.test_time_registers(clip, RN, num_registers=2), torch.no_grad():
        batch = clip.encode_image(x)
        single = torch.cat([clip.encode_image(x[i:i + 1]) for i in range(len(x))])
    assert (batch - single).abs().max() <= 1e-5


def test_hooks_never_leak(clip, images):
    from ttreg.tracing import record
    x = images[:3]
    with torch.no_grad():
        plain = clip.encode_image(x)
    with ttreg.test_time_registers(clip, RN):
        ttreg.trace(clip, x, attention=True)
    with torch.no_grad():
        assert torch.equal(clip.encode_image(x), plain)
    assert all_hooks(clip) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with ttreg.test_time_registers(clip, RN), record(clip, attention_layers=[0, 3]):
            clip.encode_image(x)
            raise RuntimeError("boom")
    assert all_hooks(clip) == 0
    assert not any("forward" in vars(m) for m in clip.modules())
    with torch.no_grad():
        assert torch.equal(clip.encode_image(x), plain)


def test_attention_maps_match_timm_and_custom_blocks(tower, clip, images):
    x = images[:3]
    with ttreg.test_time_registers(tower, RN, check=False):
        ref = ttreg.trace(tower, x, attention=True)
    with ttreg.test_time_registers(clip, RN):
        got = ttreg.trace(clip, x, attention=True)
    # open_clip's CustomResidualAttentionBlock (its own Attention module), same weights
    vcfg = dict(layers=6, width=96, head_width=24, patch_size=8, image_size=64,
                block_type="custom", norm_kwargs={"eps": 1e-6})
    custom = open_clip.model.CLIP(32, vcfg, TINY_TEXT_CFG, quick_gelu=True).eval()
    custom.load_state_dict(clip.state_dict())
    with ttreg.test_time_registers(custom, RN, check=False):
        cus = ttreg.trace(custom, x, attention=True)
    worst = max(max((got.attention[l] - ref.attention[l]).abs().max(),
                    (cus.attention[l] - ref.attention[l]).abs().max()) for l in range(6))
    assert worst <= 1e-5
    assert (cus.output - got.output).abs().max() <= 1e-5
    assert all_hooks(clip) == 0 and all_hooks(custom) == 0


@pytest.mark.parametrize("kw", [dict(qk_norm=True), dict(scale_heads=True)])
def test_custom_attention_probs_reproduce_the_module_output(images, kw):
    """open_clip's own ``Attention`` (custom blocks): the recomputed probabilities times the
    values give exactly what the module computed with its fused kernel."""
    torch.manual_seed(0)
    vcfg = dict(layers=2, width=64, head_width=16, patch_size=16, image_size=64, **kw)
    m = open_clip.model.CLIP(16, vcfg, TINY_TEXT_CFG).eval()
    attn = m.visual.transformer.resblocks[1].attn
    seen = {}
    handle = attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    try:
        p = ttreg.trace(m, images[:2], attention=[1]).attention[1]
    finally:
        handle.remove()
    x = seen["x"]
    N, L, C = x.shape
    v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)[2]
    y = p @ v.reshape(N, L, attn.num_heads, -1).transpose(1, 2)
    if attn.head_scale is not None:
        y = y * attn.head_scale
    y = attn.out_proj(attn.ln_inner(y.transpose(1, 2).reshape(N, L, C)))
    assert p.shape == (2, 4, 17, 17)
    assert (y - seen["out"]).abs().max() <= 1e-5
    assert all_hooks(m) == 0


def test_sequence_first_blocks(clip, images):
    """open_clip < 2.24 ran its blocks sequence-first; the adapter follows ``batch_first``."""
    seq = copy.deepcopy(clip)
    ttreg.remove_test_time_registers(seq)   # the hooks were installed for the batch-first layout
    seq.visual.transformer.batch_first = False
    for blk in seq.visual.transformer.resblocks:
        blk.attn.batch_first = False
    assert ttreg.wrap(seq).token_dim == 0
    x = images[:4]
    assert sorted(ttreg.find_register_neurons(seq, images, top_k=2).neurons) == PLANTS
    with ttreg.test_time_registers(clip, RN):
        a = ttreg.trace(clip, x, attention=[3])
    with ttreg.test_time_registers(seq, RN):
        b = ttreg.trace(seq, x, attention=[3])
    assert (a.norms - b.norms).abs().max() <= 1e-4
    assert (a.output - b.output).abs().max() <= 1e-5
    assert (a.attention[3] - b.attention[3]).abs().max() <= 1e-6


@pytest.mark.parametrize("variant", [dict(pool_type="avg"), dict(final_ln_after_pool=True),
                                     dict(attentional_pool=True, attn_pooler_queries=4,
                                          attn_pooler_heads=2)])
def test_pooling_variants_never_see_the_registers(clip, images, variant):
    vcfg = dict(layers=6, width=96, head_width=24, patch_size=8, image_size=64,
                norm_kwargs={"eps": 1e-6}, **variant)
    m = open_clip.model.CLIP(32, vcfg, TINY_TEXT_CFG, quick_gelu=True).eval()
    own = m.state_dict()
    m.load_state_dict({k: v for k, v in clip.state_dict().items() if own[k].shape == v.shape},
                      strict=False)
    x = images[:4]
    with ttreg.test_time_registers(clip, RN):
        ref = ttreg.trace(clip, x)
    with torch.no_grad():
        plain = m.encode_image(x)
    with ttreg.test_time_registers(m, RN, check=False), torch.no_grad():
        tr = ttreg.trace(m, x)
        single = torch.cat([m.encode_image(x[i:i + 1]) for i in range(len(x))])
    assert (tr.norms - ref.norms).abs().max() <= 1e-5          # the blocks are the same
    assert tr.output.shape == plain.shape == (4, 32)
    assert (tr.output - single).abs().max() <= 1e-5


def test_no_ln_pre_tower_matches_timm(images):
    tower = planted_vit(global_pool="token", num_classes=32)   # timm pre_norm=False: no ln_pre
    with torch.no_grad():
        tower.patch_embed.proj.bias.zero_()                    # open_clip's conv1 has no bias
    clip = timm_to_open_clip(tower)
    assert isinstance(clip.visual.ln_pre, torch.nn.Identity)
    assert ttreg.wrap(clip).pre_block_module() is None
    with ttreg.test_time_registers(tower, RN, check=False):
        a = ttreg.trace(tower, images[:4])
        head = tower.forward_head(a.output)
    with ttreg.test_time_registers(clip, RN):
        b = ttreg.trace(clip, images[:4])
    assert (a.norms - b.norms).abs().max() <= 1e-4
    assert (head - b.output).abs().max() <= 1e-5


def test_timm_trunk_tower_goes_through_the_timm_adapter(images):
    torch.manual_seed(0)
    vcfg = dict(timm_model_name="test_vit", timm_model_pretrained=False, timm_pool="token",
                timm_proj="linear", image_size=64)
    model = open_clip.model.CLIP(32, vcfg, TINY_TEXT_CFG).eval()
    model.visual.set_input_size(64)
    plant_timm_register_neurons(model.visual.trunk, [(1, 7, 5, 0.4), (3, 21, 5, 12.0)])
    ad = ttreg.wrap(model)
    assert isinstance(ad, OpenCLIPTimmAdapter) and isinstance(ttreg.wrap(model.visual), OpenCLIPTimmAdapter)
    assert ad.down_proj(3) is model.visual.trunk.blocks[3].mlp.fc2 and ad.image_size() == (64, 64)
    plain = ttreg.trace(model, images)
    assert plain.output.shape == (10, 32) and ratio(plain).min() >= 5
    rn = ttreg.find_register_neurons(model, images, top_k=2)
    assert sorted(rn.neurons) == PLANTS
    rn.check_model(model.visual.trunk)                       # same weights, same fingerprint
    with torch.no_grad():
        ref = model.encode_image(images[:3])
    with ttreg.test_time_registers(model, rn):
        tr = ttreg.trace(model, images, attention=[-1])
        with torch.no_grad():
            single = torch.cat([model.encode_image(images[i:i + 1]) for i in range(3)])
    assert ratio(tr).max() <= 2 and tr.attention[5].shape == (10, 2, 18, 18)
    assert (tr.output[:3] - single).abs().max() <= 1e-5
    # the attention-bias form reads and extends the trunk's timm attention: the same bias as the bare trunk
    bias = ttreg.fit_attention_bias(model, rn, images[:4])
    assert torch.equal(bias.key, ttreg.fit_attention_bias(model.visual.trunk, rn, images[:4]).key)
    with ttreg.test_time_registers(model, rn, form="bias", bias=bias):
        tr = ttreg.trace(model, images, attention=[-1])
    assert ratio(tr).max() <= 2 and tr.attention[5].shape == (10, 2, 17, 18)
    assert all_hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model.encode_image(images[:3]), ref)


def test_three_libraries_agree(tower, clip, images):
    """The same CLIP vision weights in timm, Hugging Face and open_clip: same per-layer token
    norms and the same outputs, plain and with test-time registers, at the native grid."""
    hf_convert = pytest.importorskip("ttreg.testing.convert.hf")
    pytest.importorskip("ttreg.adapters.hf")
    hf = hf_convert.timm_to_hf_clip_vision(tower).eval()
    x = images[:4]
    results = {}
    for regs in (False, True):
        for name, model in (("timm", tower), ("hf", hf), ("open_clip", clip)):
            handle = ttreg.add_test_time_registers(model, RN, check=False) if regs else None
            try:
                tr = ttreg.trace(model, x)
                with torch.no_grad():
                    if name == "timm":
                        out = tower(x)
                    elif name == "hf":
                        out = hf(pixel_values=x).pooler_output @ tower.head.weight.t()
                    else:
                        out = clip.encode_image(x)
            finally:
                if handle is not None:
                    handle.remove()
            results[name, regs] = (tr.norms, out)
    for regs in (False, True):
        norms, out = results["timm", regs]
        assert norms.shape == (4, 6, 65 + regs)
        for name in ("hf", "open_clip"):
            n, o = results[name, regs]
            assert (n - norms).abs().max() <= 1e-4, (name, regs)
            assert (o - out).abs().max() <= 1e-4, (name, regs)
    assert norm_ratio(results["timm", False][0][:, -1], 1).min() >= 5
    assert norm_ratio(results["timm", True][0][:, -1], 1, 1).max() <= 2
    for m in (tower, hf, clip):
        assert all_hooks(m) == 0

