"""What the evaluations read through the adapter contract: keys, queries and values of any layer
(checked against LOST's own hook on timm's ``qkv`` and against each family's attention output),
intermediate tokens as timm's ``forward_intermediates`` gives them, the final norm, and running
at another size, for timm (ViT, Eva), Hugging Face and open_clip."""
import pytest
import torch
import torch.nn.functional as F

import ttreg
from ttreg.eval.backbone import accepts_any_size, block_tokens, layer_qkv, token_features
from ttreg.sizes import dynamic_size
from ttreg.testing import mixed_images, planted_clip, planted_vit

from test_eval_lost import lost_reference_qkv

TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)


def test_qkv_of_every_layer_equal_losts_hook_on_timm():
    model = planted_vit(reg_tokens=2)
    x = mixed_images(3)
    with torch.no_grad():
        got = layer_qkv(model, x, [-4, -3, -2, -1], ["key", "query", "value"])
        for l in (2, 3, 4, 5):
            ref = lost_reference_qkv(model, x, l)
            for f in ("key", "query", "value"):
                assert torch.equal(got[(l, f)], ref[f])
    assert got[(5, "key")].shape == (3, 3 + 64, 96)
    with pytest.raises(ValueError, match="features must be among key, query, value"):
        layer_qkv(model, x, [-1], ["keys"])


def attention_from(rec, heads):
    """softmax(q k^T / sqrt(d)) v, heads side by side: ``(B, T, A)``."""
    B, T, A = rec["query"].shape
    q, k, v = (rec[n].reshape(B, T, heads, A // heads).transpose(1, 2) for n in ("query", "key", "value"))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, A)


def family_cases():
    import open_clip
    import timm
    import transformers
    torch.manual_seed(0)
    eva = timm.models.eva.Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              qkv_bias=True, use_rot_pos_emb=False).eval()
    with torch.no_grad():                        # q_bias / v_bias start at zero: make them count
        for blk in eva.blocks:
            blk.attn.q_bias.normal_()
            blk.attn.v_bias.normal_()
    hf = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8)).eval()
    clip = open_clip.model.CLIP(16, dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                                TEXT).eval()
    return {
        "timm-eva": (eva, lambda l: eva.blocks[l].attn, lambda a, y: a.proj(a.norm(y)), 2),
        "hf-dinov2": (hf, lambda l: hf.encoder.layer[l].attention,
                      lambda a, y: a.o_proj(y), 2),
        "open_clip": (clip, lambda l: clip.visual.transformer.resblocks[l].attn,
                      lambda a, y: a.out_proj(y), 2),
    }


@pytest.mark.parametrize("family", ["timm-eva", "hf-dinov2", "open_clip"])
def test_recorded_qkv_reproduce_the_attention_output(family):
    """The recorded q, k, v are exactly what the attention used: softmax(q k^T) v through the
    output projection gives the attention module's own output (Eva: with its separate q/v
    biases; HF: three linears; open_clip: nn.MultiheadAttention's in_proj)."""
    model, attn_of, project, heads = family_cases()[family]
    ad = ttreg.wrap(model)
    x = mixed_images(2, 32)
    seen = {}
    attn = attn_of(1)
    h = attn.register_forward_hook(lambda m, i, o: seen.update(out=o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad(), ad.record_qkv([-1]) as rec:
            ad.run(x)
            mine = project(attn, attention_from(rec[1], heads))
    finally:
        h.remove()
    assert set(rec) == {1} and rec[1]["key"].shape == (2, 1 + 16, 32)
    assert (mine - ad.block_io.batch_first(seen["out"])).abs().max() < 1e-5


def test_intermediates_are_timms_forward_intermediates():
    model = planted_vit(reg_tokens=2)
    x = mixed_images(2)
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=[1, 4], norm=True, output_fmt="NLC",
                                          intermediates_only=True, return_prefix_tokens=True)
        got = ttreg.wrap(model).intermediates(x, [1, 4], norm=True)
        last2 = ttreg.wrap(model).intermediates(x, 2)
        plain = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True,
                                            return_prefix_tokens=True)
        toks = block_tokens(model, x, [-1], norm=True)[-1]
        feats = token_features(model, x)
    for (patches, prefix), (p, q) in zip(ref + plain, got + last2):
        assert torch.equal(p, prefix) and torch.equal(q, patches)
    assert got[0][1].shape == (2, 64, 96) and got[0][0].shape == (2, 3, 96)
    assert torch.equal(toks[1], feats[1]) and torch.equal(toks[0], feats[0])   # last block + norm
    with pytest.raises(ValueError, match="block 6 does not exist: the model has 6 blocks"):
        ttreg.wrap(model).intermediates(x, [6])


def test_test_time_registers_stay_out_of_intermediates_and_in_qkv():
    model = planted_vit()
    x = mixed_images(2)
    with torch.no_grad(), ttreg.test_time_registers(model, [(1, 7), (3, 21)], check=False):
        (prefix, patches), = ttreg.wrap(model).intermediates(x, [3])
        k = layer_qkv(model, x, [3], ["key"])[(3, "key")]
    assert prefix.shape == (2, 1, 96) and patches.shape == (2, 64, 96)
    assert k.shape == (2, 1 + 64 + 1, 96)                      # the register is attended to


def test_final_norm_and_sizes_per_family():
    cases = family_cases()
    eva, hf, clip = cases["timm-eva"][0], cases["hf-dinov2"][0], cases["open_clip"][0]
    assert ttreg.wrap(eva).final_norm() is eva.norm
    assert ttreg.wrap(hf).final_norm() is hf.layernorm
    assert ttreg.wrap(clip).final_norm() is clip.visual.ln_post
    assert [accepts_any_size(m) for m in (eva, hf, clip)] == [True, True, False]
    tower, _ = planted_clip()
    assert accepts_any_size(tower) and ttreg.wrap(tower).final_norm() is tower.visual.trunk.norm
    x = mixed_images(1, 96)
    with torch.no_grad():
        with dynamic_size(tower):                              # the open_clip tower's timm trunk
            assert tower.encode_image(x).shape == (1, 32)
        assert not tower.visual.trunk.dynamic_img_size
        with pytest.raises(AssertionError):
            tower.encode_image(x)
