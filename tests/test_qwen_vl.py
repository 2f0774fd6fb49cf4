"""Qwen2-VL and Qwen3-VL: test-time registers in towers that pack several images into one
sequence (``cu_seqlens``). The family matrix (tests/test_families.py) runs the common checks on
one image size; here: images of different sizes in one call (one register per image), the bare
towers, generation, and restatements of the rotary and the packing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ttreg
from ttreg.testing import marked_images, plant_register_neurons

tf = pytest.importorskip("transformers")

from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision  # noqa: E402

from ttreg.adapters.base import Packing, PackedIO  # noqa: E402
from ttreg.testing.vlm import VLM_IMAGE_TOKEN, qwen_vl_inputs, tiny_qwen_vl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTS = [(1, 7, 0.5), (2, 21, 12.0)]
NEURONS = [(1, 7), (2, 21)]
SIZE, PATCH = 48, 8


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def planted(request):
    torch.manual_seed(0)
    model = tiny_qwen_vl(request.param)
    x, marked = marked_images(8, SIZE, PATCH)
    plant_register_neurons(model, PLANTS, x, marked)
    return request.param, model, x, marked


def _mixed(x: torch.Tensor) -> list[torch.Tensor]:
    """Three marked images of different sizes (48x48, 64x80, 48x48): one packed sequence of 36,
    80 and 36 patches."""
    big = marked_images(3, 80, PATCH)[0][2]            # its marker in the top rows: kept below
    return [x[0], big[:, :64], x[2]]


def _last_block_norms(model, ins) -> torch.Tensor:
    """Token norms of the tower's last block output, packed ``(total,)`` (registers cut)."""
    ad = ttreg.wrap(model)
    got = {}
    h = ad.blocks[-1].register_forward_hook(lambda m, a, o: got.update(y=o.detach().float().norm(dim=-1)))
    try:
        with torch.no_grad():
            model(**ins)
    finally:
        h.remove()
    return got["y"]


def _segment_ratios(norms: torch.Tensor, grid: torch.Tensor) -> list[float]:
    """Max / median norm of each image's segment."""
    out, start = [], 0
    for n in grid.prod(-1).tolist():
        seg = norms[start:start + n]
        out.append(float(seg.max() / seg.median()))
        start += n
    return out


def test_wrap_models_and_bare_towers(planted):
    fam, model, x, _ = planted
    tower = model.model.visual
    for target, name in ((model, "HFQwenVLAdapter"), (model.model, "HFQwenVLAdapter"),
                         (tower, "HFQwenVisionAdapter")):
        ad = ttreg.wrap(target)
        assert type(ad).__name__ == name and ad.num_layers == 4 and ad.num_prefix_tokens == 0
    found = ttreg.find_register_neurons(tower, x, top_k=2)            # the search on the tower alone
    assert sorted(found.neurons) == NEURONS
    with ttreg.test_time_registers(model, found):                     # applies to the VLM (same fingerprint)
        tr = ttreg.trace(tower, x[:2])
    assert tr.num_registers == 1 and tr.norms.shape == (2, 4, 37)


def test_several_images_of_different_sizes_one_register_each(planted):
    """One packed call of three images (36, 80, 36 patches): every image gets its own register;
    each image's features equal its single-image run; the outliers go; the language model sees
    the same image-token count and shapes (deep-stack features too)."""
    fam, model, x, _ = planted
    images = _mixed(x)
    ins = qwen_vl_inputs(model, images)
    grid = ins["image_grid_thw"]
    plain = _last_block_norms(model, ins)
    with torch.no_grad():
        ref = model.model.get_image_features(ins["pixel_values"], grid)
        with ttreg.test_time_registers(model, NEURONS, num_registers=1):
            got = model.model.get_image_features(ins["pixel_values"], grid)
            singles = [model.model.get_image_features(**{k: v for k, v in qwen_vl_inputs(model, [im]).items()
                                                         if k in ("pixel_values", "image_grid_thw")})
                       for im in images]
            cleared = _last_block_norms(model, ins)
    before, after = _segment_ratios(plain, grid), _segment_ratios(cleared, grid)
    print(f"{fam}: max/median patch norm per image before {before}, after {after}")
    assert min(before) >= 10 and max(after) <= 1.5
    assert [t.shape for t in got.pooler_output] == [t.shape for t in ref.pooler_output] \
        == [(9, 32), (20, 32), (9, 32)]
    for i, s in enumerate(singles):        # its own register: the other images change nothing
        assert (got.pooler_output[i] - s.pooler_output[0]).abs().max() <= 1e-5
    deep = getattr(got, "deepstack_features", None)
    if fam == "qwen3_vl":
        assert len(deep) == 2
        for d, r in zip(deep, ref.deepstack_features):
            assert [t.shape for t in d] == [t.shape for t in r]
    # the language model: the same number of image tokens, and inputs of the same shape
    lm = model.model.language_model
    seen = []
    h = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k["inputs_embeds"].shape), with_kwargs=True)
    try:
        with torch.no_grad():
            out_plain = model(**ins).logits
            with ttreg.test_time_registers(model, NEURONS, num_registers=2):
                out_reg = model(**ins).logits
    finally:
        h.remove()
    assert seen[0] == seen[1] and out_plain.shape == out_reg.shape
    assert int((ins["input_ids"] == VLM_IMAGE_TOKEN).sum()) == sum(t.shape[0] for t in got.pooler_output)


def test_generate_with_registers(planted):
    fam, model, x, _ = planted
    ins = qwen_vl_inputs(model, _mixed(x))
    with torch.no_grad():
        plain = model.generate(**ins, max_new_tokens=5, do_sample=False)
        with ttreg.test_time_registers(model, NEURONS):
            reg = model.generate(**ins, max_new_tokens=5, do_sample=False)
    assert reg.shape == plain.shape == (3, ins["input_ids"].shape[1] + 5)


def test_bias_form_on_a_packed_call(planted):
    """The attention-bias form: one extra key per image segment (each kernel call); outputs keep
    their shapes and the outliers go."""
    fam, model, x, _ = planted
    bias = ttreg.fit_attention_bias(model, NEURONS, x)
    ins = qwen_vl_inputs(model, _mixed(x))
    plain = _last_block_norms(model, ins)
    with torch.no_grad(), ttreg.test_time_registers(model, NEURONS, form="bias", bias=bias):
        got = model.model.get_image_features(ins["pixel_values"], ins["image_grid_thw"])
        cleared = _last_block_norms(model, ins)
    before, after = _segment_ratios(plain, ins["image_grid_thw"]), _segment_ratios(cleared, ins["image_grid_thw"])
    print(f"{fam} bias form: before {before}, after {after}")
    assert min(before) >= 10 and max(after) <= 1.5 and [t.shape[0] for t in got.pooler_output] == [9, 20, 9]


def test_packing_restated():
    """Two segments of 3 and 2 tokens, one register each: where everything goes."""
    pk = Packing.of(torch.tensor([0, 3, 5]), 1)
    t = torch.arange(5.0)[:, None]
    regs = torch.tensor([[[10.0]], [[20.0]]])
    packed = pk.append(t, regs)
    assert packed[:, 0].tolist() == [0, 1, 2, 10, 3, 4, 20]
    assert pk.cu_seqlens(torch.tensor([0])).tolist() == [0, 4, 7]
    tb = pk.batch(packed)
    assert tb[..., 0].tolist() == [[0, 1, 2, 10], [3, 4, 0, 20]] and pk.valid.tolist() == [
        [True, True, True, True], [True, True, False, True]]
    back, r = pk.cut(packed)
    assert torch.equal(back, t) and torch.equal(r, regs) and torch.equal(pk.unbatch(tb), packed)


def test_register_gets_identity_rotary_restated(planted):
    """The rotary table a block receives gets identity rows (cos 1, sin 0) at each segment's
    register, so ``apply_rotary_pos_emb_vision`` leaves the register's query and key as they are;
    and block 0 with one zero register equals a restatement: the register's q/k unrotated, the
    patches' rotated, attention within the image."""
    fam, model, x, _ = planted
    tower = model.model.visual
    ad = ttreg.wrap(tower)
    io = ad.block_io
    assert isinstance(io, PackedIO)
    ins = qwen_vl_inputs(model, _mixed(x)[:2])
    got = {}

    def grab(m, args, kwargs):
        got.setdefault("kw", kwargs)
        got.setdefault("x", args[0] if args else kwargs["hidden_states"])
    h = ad.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            tower(ins["pixel_values"], grid_thw=ins["image_grid_thw"])
    finally:
        h.remove()
    kw, h0 = got["kw"], got["x"]
    cos, sin = kw["position_embeddings"]
    _, ext = io.extend_inputs((h0,), kw, 1)
    c2, s2 = ext["position_embeddings"]
    assert ext["cu_seqlens"].tolist() == [0, 37, 118]
    regs_at = [36, 117]
    keep = [i for i in range(len(c2)) if i not in regs_at]
    assert torch.equal(c2[keep], cos) and torch.equal(s2[keep], sin)
    assert (c2[regs_at] == 1).all() and (s2[regs_at] == 0).all()
    q = torch.randn(len(c2), 2, c2.shape[-1])
    qr, _ = apply_rotary_pos_emb_vision(q, q, c2, s2)
    assert torch.equal(qr[regs_at], q[regs_at])

    # block 0 by hand, one image, a zero register appended without rotary
    blk = ad.blocks[0]
    n = 36
    hs = torch.cat([h0[:n], torch.zeros(1, h0.shape[1])])
    a = blk.attn
    y = blk.norm1(hs)
    qkv = a.qkv(y).reshape(n + 1, 3, a.num_heads, -1).permute(1, 0, 2, 3)
    qq, kk, vv = qkv[0], qkv[1], qkv[2]
    qp, kp = apply_rotary_pos_emb_vision(qq[:n], kk[:n], cos[:n], sin[:n])
    qq, kk = torch.cat([qp, qq[n:]]), torch.cat([kp, kk[n:]])
    att = F.scaled_dot_product_attention(qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1))
    hs = hs + a.proj(att.transpose(0, 1).reshape(n + 1, -1))
    hs = hs + blk.mlp(blk.norm2(hs))
    out = {}
    hk = blk.register_forward_hook(lambda m, a_, o: out.setdefault("y", o))
    try:
        with torch.no_grad(), ttreg.test_time_registers(model, ttreg.RegisterNeurons(), num_registers=1):
            tower(ins["pixel_values"], grid_thw=ins["image_grid_thw"])
    finally:
        hk.remove()
    assert (out["y"][:n] - hs[:n]).abs().max() <= 1e-5


def test_recorded_hidden_states_and_features_keep_their_shapes(planted):
    fam, model, x, _ = planted
    tower, ad = model.model.visual, ttreg.wrap(model)
    ins = qwen_vl_inputs(model, _mixed(x))
    with torch.no_grad():
        plain = tower(ins["pixel_values"], grid_thw=ins["image_grid_thw"], output_hidden_states=True)
        with ttreg.test_time_registers(model, NEURONS, num_registers=2):
            reg = tower(ins["pixel_values"], grid_thw=ins["image_grid_thw"], output_hidden_states=True)
            pre, patches = ad.features(x[:3])
            inter = ad.intermediates(x[:3], [1, 3], split=False, registers=True)
    assert [h.shape for h in reg.hidden_states] == [h.shape for h in plain.hidden_states] == [(152, 64)] * 5
    assert torch.equal(reg.hidden_states[0], plain.hidden_states[0])     # the first block's input
    assert pre.shape == (3, 0, 64) and patches.shape == (3, 36, 64)
    assert [t.shape for t in inter] == [(3, 38, 64)] * 2                  # registers after the patches


def test_calibrate_finds_the_big_plant(planted):
    fam, model, x, _ = planted
    res = ttreg.calibrate(model, x)
    assert (2, 21) in res.neurons.neurons and res.neurons.hyperparameters["top_layer"] == 2


def test_gradient_checkpointing_gives_the_same_gradients(planted):
    """transformers' non-reentrant checkpointing recomputes a block from its input, which carries
    the packed call: the gradients with registers equal the un-checkpointed ones."""
    fam, model, x, _ = planted
    tower = model.model.visual
    ins = qwen_vl_inputs(model, _mixed(x)[:2])

    def grads(ckpt: bool) -> torch.Tensor:
        tower.zero_grad()
        if ckpt:
            tower.gradient_checkpointing_enable({"use_reentrant": False})
            tower.train()
        with ttreg.test_time_registers(model, NEURONS):
            out = tower(ins["pixel_values"], grid_thw=ins["image_grid_thw"]).pooler_output
        out.square().sum().backward()
        return torch.cat([p.grad.flatten() for p in tower.parameters() if p.grad is not None])
    try:
        plain = grads(False)
        ckpt = grads(True)
    finally:
        tower.gradient_checkpointing_disable()
        tower.eval()
        tower.zero_grad(set_to_none=True)
    assert torch.equal(plain, ckpt) and plain.abs().max() > 0


@pytest.mark.slow      # compiling: ~30 s on 2 busy cores
def test_compiled_packed_tower_is_refused_in_one_line():
    """torch.compile traces the edit without the call's image layout: refused, never a wrong edit."""
    torch.manual_seed(0)
    model = tiny_qwen_vl("qwen2_vl", depth=2)
    x, _ = marked_images(2, SIZE, PATCH)
    ins = qwen_vl_inputs(model, list(x))
    tower = model.model.visual
    handle = ttreg.add_test_time_registers(model, [(1, 7)])
    try:
        with pytest.raises(RuntimeError, match="run that tower eagerly") as e, torch.no_grad():
            torch.compile(tower)(ins["pixel_values"], grid_thw=ins["image_grid_thw"])
        assert "\n" not in str(e.value)
    finally:
        handle.remove()
        torch._dynamo.reset()
