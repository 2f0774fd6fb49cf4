"""The attention-bias form: fitting, the extra key/value in every family, files, threads, compile.

Every family is planted in timm and converted (as in test_hf / test_open_clip), so the same weights
run in timm, transformers and open_clip: the registers' keys and values must agree across
libraries, and the bias form must clear the planted outliers as the token form does.
"""
from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
import torch.nn.functional as F

import ttreg
from ttreg import attention
from ttreg.testing import mixed_images, planted_vit

from conftest import all_hooks, ratio

RN = {1: [7], 3: [21]}
CLIP_KW = dict(pre_norm=True, act_layer="quick_gelu")
TOWER_KW = dict(pre_norm=True, class_token=True, global_pool="token", act_layer="quick_gelu", num_classes=32)


@pytest.fixture(scope="module")
def x():
    return mixed_images(6)


@pytest.fixture(scope="module")
def planted_set(x):
    """A timm model with planted neurons, its neuron set and fitted bias."""
    m = planted_vit()
    rn = ttreg.RegisterNeurons.from_dict(RN, model=m)
    rn.attention_bias = ttreg.fit_attention_bias(m, rn, x)
    return m, rn


# --- every family ---------------------------------------------------------------------------------

def _family(name: str):
    """(timm model, the same weights in ``name``'s library)."""
    from ttreg.testing.convert import hf as conv
    if name.startswith("open_clip"):
        open_clip = pytest.importorskip("open_clip")
        from ttreg.testing.convert.open_clip import TINY_TEXT_CFG, timm_to_open_clip
        tower = planted_vit(**TOWER_KW)
        clip = timm_to_open_clip(tower)
        if name == "open_clip_custom":   # open_clip's own Attention module instead of nn.MultiheadAttention
            vcfg = dict(layers=6, width=96, head_width=24, patch_size=8, image_size=64,
                        block_type="custom", norm_kwargs={"eps": 1e-6})
            custom = open_clip.model.CLIP(32, vcfg, TINY_TEXT_CFG, quick_gelu=True).eval()
            custom.load_state_dict(clip.state_dict())
            return tower, custom
        return tower, clip
    pytest.importorskip("transformers")
    kw, convert = {
        "hf_dinov2": (dict(init_values=1e-5), conv.timm_to_hf_dinov2),
        "hf_dinov2_reg": (dict(init_values=1e-5, reg_tokens=4, no_embed_class=True),
                          conv.timm_to_hf_dinov2_with_registers),
        "hf_vit": ({}, conv.timm_to_hf_vit),
        "hf_clip": (CLIP_KW, conv.timm_to_hf_clip),
        "hf_siglip": (dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),
                      conv.timm_to_hf_siglip_vision),
        "hf_llava": (CLIP_KW, conv.timm_to_hf_llava),
    }[name]
    tm = planted_vit(**kw)
    return tm, convert(tm)


FAMILIES = ["open_clip_mha", "open_clip_custom", "hf_dinov2", "hf_dinov2_reg", "hf_vit", "hf_clip",
            "hf_siglip", "hf_llava"]


@pytest.mark.parametrize("name", FAMILIES)
def test_bias_form_in_every_family(x, name):
    """The registers' keys/values read inside transformers' and open_clip's attention equal those
    read inside timm's on the same weights; the bias form clears the outliers as the token form
    does; its attention maps gain the extra key column."""
    tm, other = _family(name)
    rn_t = ttreg.RegisterNeurons.from_dict(RN, model=tm)
    rn_o = ttreg.RegisterNeurons.from_dict(RN, model=other)
    ref = ttreg.fit_attention_bias(tm, rn_t, x)
    bias = ttreg.fit_attention_bias(other, rn_o, x)
    assert bias.key.shape == (6, 4, 24) and bias.num_images == 6
    # the adapter says the heads and head size its kernel is given, before any forward
    assert [ttreg.wrap(other).attention_heads(l) for l in range(6)] == [(4, 24, 24)] * 6
    assert (bias.key - ref.key).abs().max() <= 1e-5 and (bias.value - ref.value).abs().max() <= 1e-5
    assert bias.key[1:].norm() > 0
    with ttreg.test_time_registers(other, rn_o):
        token = ttreg.trace(other, x)
    with ttreg.test_time_registers(other, rn_o, form="bias", bias=bias):
        got = ttreg.trace(other, x, attention=[0, 5])
    with ttreg.test_time_registers(tm, rn_t, form="bias", bias=ref):
        ref_tr = ttreg.trace(tm, x)
    # the planted outliers (max/median >= 5 plain, see test_hf / test_open_clip) are cleared as
    # the token form clears them
    assert ratio(got).max() <= 1.5 * ratio(token).max() and ratio(got).max() <= 2
    assert got.num_registers == 0 and got.num_bias_keys == 1
    T = len(got.token_types)
    assert got.attention[5].shape == (6, 4, T, T + 1)
    assert torch.allclose(got.attention[5].sum(-1), torch.ones(6, 4, T), atol=1e-5)
    assert (got.norms - ref_tr.norms).abs().max() <= 1e-3 * ref_tr.norms.abs().max()
    assert all_hooks(other) == 0


# --- what the extra key computes --------------------------------------------------------------------

def _attention_by_hand(attn, h, key, value, log_weight=0.0):
    """timm ``Attention`` on input ``h`` (B, T, D) with one extra key/value per head, written out:
    ``p = softmax([q k^T, q k'^T + log w] / sqrt(d))``, output ``proj(p @ [v; v'])``; returns both."""
    B, T, D = h.shape
    H = attn.num_heads
    q, k, v = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(B, T, 3, H, -1).permute(2, 0, 3, 1, 4)
    d = q.shape[-1]
    logits = torch.cat([q @ k.transpose(-1, -2), (q * key[None, :, None, :]).sum(-1, keepdim=True)], -1) / d ** 0.5
    logits[..., -1] += log_weight
    p = logits.softmax(-1)
    out = p[..., :-1] @ v + p[..., -1:] * value[None, :, None, :]
    return attn.proj(out.transpose(1, 2).reshape(B, T, D)), p


@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_extra_key_by_hand(planted_set, x, weight):
    m, rn = planted_set
    g = torch.Generator().manual_seed(1)
    bias = ttreg.AttentionBias(torch.randn(6, 4, 24, generator=g), torch.randn(6, 4, 24, generator=g),
                               torch.full((6,), weight), neurons=rn.neurons, fingerprint=rn.fingerprint)
    seen = {}
    h1 = m.blocks[2].norm1.register_forward_hook(lambda mod, a, out: seen.__setitem__("in", out))
    h2 = m.blocks[2].attn.register_forward_hook(lambda mod, a, out: seen.__setitem__("out", out))
    try:
        with torch.no_grad(), ttreg.test_time_registers(m, rn, form="bias", bias=bias):
            tr = ttreg.trace(m, x, attention=[2])
            want, probs = _attention_by_hand(m.blocks[2].attn, seen["in"], bias.key[2], bias.value[2],
                                             float(torch.tensor(weight).log()))
    finally:
        h1.remove(), h2.remove()
    assert (seen["out"] - want).abs().max() <= 1e-5
    assert tr.attention[2].shape == (6, 4, 65, 66) and tr.num_bias_keys == 1
    assert (tr.attention[2] - probs).abs().max() <= 1e-5         # trace shows the extra key column


def test_all_zero_bias_without_neurons_is_bitwise_plain(planted_set, x):
    m, _ = planted_set
    z = torch.zeros(6, 4, 24)
    bias = ttreg.AttentionBias(z, z, torch.zeros(6))
    with torch.no_grad():
        plain = m.forward_features(x)
        with ttreg.test_time_registers(m, {}, form="bias", bias=bias):
            assert all_hooks(m) == 0
            assert torch.equal(m.forward_features(x), plain)
        # weight 1 on zeros is not nothing: one more logit 0 with value 0 (softmax "plus one")
        with ttreg.test_time_registers(m, {}, form="bias", bias=ttreg.AttentionBias(z, z, torch.ones(6))):
            assert not torch.equal(m.forward_features(x), plain)


def test_bias_is_closer_to_the_token_form_than_zeroing(planted_set, x):
    """What the fitted key/value add: outputs nearer the token form's than zeroing the neurons
    alone, and far nearer than the plain model's."""
    m, rn = planted_set
    with torch.no_grad():
        plain = m.forward_features(x)
        with ttreg.test_time_registers(m, rn):
            token = m.forward_features(x)
        with ttreg.test_time_registers(m, rn, form="bias"):
            bias = m.forward_features(x)
        with ttreg.zero_neurons(m, rn):
            zeroed = m.forward_features(x)
    dist = lambda a: float((a - token).norm() / token.norm())
    assert dist(bias) < 0.8 * dist(zeroed) and dist(bias) < 0.01 * dist(plain)


def test_fit_streams(planted_set, x):
    m, rn = planted_set
    a = ttreg.fit_attention_bias(m, rn, x, batch_size=4)
    assert torch.allclose(a.key, rn.attention_bias.key, atol=1e-6)
    assert torch.allclose(a.value, rn.attention_bias.value, atol=1e-6)
    two = ttreg.fit_attention_bias(m, rn, x, num_registers=2)
    # two registers are two identical tokens: one key standing for both (weight 2), near one register's
    assert two.weight.tolist() == [2.0] * 6 and (two.key - a.key).norm() <= 0.05 * a.key.norm()


# --- files ------------------------------------------------------------------------------------------

def test_bias_file_round_trip_and_refusals(planted_set, x, tmp_path):
    m, rn = planted_set
    path = rn.save(tmp_path / "set.json")
    data = path.read_text()
    assert '"file": "set.bias.safetensors"' in data and '"sha256"' in data
    back = ttreg.RegisterNeurons.load(path)
    b, a = back.attention_bias, rn.attention_bias
    assert torch.equal(b.key, a.key) and torch.equal(b.value, a.value) and torch.equal(b.weight, a.weight)
    assert b.neurons == a.neurons and b.fingerprint == a.fingerprint and b.num_images == 6
    with torch.no_grad(), ttreg.test_time_registers(m, back, form="bias"):
        y = m.forward_features(x)
    with torch.no_grad(), ttreg.test_time_registers(m, rn, form="bias"):
        assert torch.equal(m.forward_features(x), y)
    # another model, another architecture, other neurons
    with pytest.raises(ttreg.ModelMismatchError, match="fitted on the same architecture with other weights"):
        ttreg.add_test_time_registers(planted_vit(seed=3), {1: [7], 3: [21]}, form="bias", bias=a)
    with pytest.raises(ttreg.ModelMismatchError, match="fitted on another architecture"):
        ttreg.add_test_time_registers(planted_vit(depth=4), {1: [7]}, form="bias", bias=a)
    with pytest.raises(ttreg.ModelMismatchError, match="other register neurons"):
        ttreg.add_test_time_registers(m, {1: [7]}, form="bias", bias=a)
    assert rn.top(1).attention_bias is None                  # a bias belongs to its neuron set
    # a changed or missing bias file, a symlink in the way
    bias_file = tmp_path / "set.bias.safetensors"
    a.__class__(a.key + 1, a.value, a.weight, neurons=a.neurons).save(bias_file)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        ttreg.RegisterNeurons.load(path)
    bias_file.unlink()
    with pytest.raises(FileNotFoundError, match="no attention-bias file"):
        ttreg.RegisterNeurons.load(path)
    (tmp_path / "other.bias.safetensors").symlink_to(tmp_path / "elsewhere")
    from ttreg.files import OutputPathError
    with pytest.raises(OutputPathError, match="symbolic link"):
        rn.save(tmp_path / "other.json")
    assert not (tmp_path / "other.json").exists() and not (tmp_path / "elsewhere").exists()


def test_bad_arguments(planted_set):
    m, rn = planted_set
    without = ttreg.RegisterNeurons.from_dict(RN, model=m)
    for neurons, kw, match in ((without, dict(form="bias"), "needs a fitted attention bias"),
                               (rn, dict(form="bias", num_registers=1), "appends no token"),
                               (rn, dict(form="kv"), "unknown form"),
                               (rn, dict(bias=rn.attention_bias), "bias= is for form='bias'")):
        with pytest.raises(ValueError, match=match):
            ttreg.add_test_time_registers(m, neurons, **kw)
    with pytest.raises(ValueError, match="one number per layer"):
        ttreg.AttentionBias(torch.zeros(6, 4, 24), torch.zeros(6, 4, 24), torch.zeros(5))
    with pytest.raises(ValueError, match=">= 0"):
        ttreg.AttentionBias(torch.zeros(6, 4, 24), torch.zeros(6, 4, 24), -torch.ones(6))
    assert all_hooks(m) == 0


def test_explicit_attention_path_is_refused(planted_set, x):
    m, rn = planted_set
    twin = copy.deepcopy(m)
    for blk in twin.blocks:
        blk.attn.fused_attn = False
    with ttreg.test_time_registers(twin, rn, form="bias", check=False):
        with pytest.raises(RuntimeError, match="without scaled_dot_product_attention"):
            twin.forward_features(x)
    assert not torch.overrides._get_current_function_mode_stack()
    assert all_hooks(twin) == 0


# --- one forward call: threads, checkpointing, copies ------------------------------------------------

def test_threads(planted_set):
    m, rn = planted_set
    xa, xb = mixed_images(3, seed=1), mixed_images(2, seed=2)
    with torch.no_grad():
        plain_b = m.forward_features(xb)
        with ttreg.test_time_registers(m, rn, form="bias"):
            bias_a = m.forward_features(xa)
            maps = ttreg.trace(m, xa, attention=[4]).attention[4]
    errors, got = [], {"a": [], "b": [], "maps": []}
    barrier = threading.Barrier(2)

    def with_bias():
        barrier.wait()
        for _ in range(15):
            with torch.no_grad(), ttreg.test_time_registers(m, rn, form="bias"):
                got["a"].append(m.forward_features(xa))
                got["maps"].append(ttreg.trace(m, xa, attention=[4]).attention[4])

    def plain():
        barrier.wait()
        for _ in range(15):
            with torch.no_grad():
                got["b"].append(m.forward_features(xb))
    threads = [threading.Thread(target=lambda f=f: _catch(f, errors)) for f in (with_bias, plain)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors[0]
    assert all(torch.equal(y, bias_a) for y in got["a"]) and all(torch.equal(y, plain_b) for y in got["b"])
    assert all(torch.equal(a, maps) for a in got["maps"])
    assert all_hooks(m) == 0


def _catch(fn, errors):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_gradient_checkpointing_and_deepcopy(planted_set, x):
    m, rn = planted_set
    grads = []
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        m.zero_grad()
        try:
            with ttreg.test_time_registers(m, rn, form="bias"):
                (m.forward_features(x[:2]) ** 2).mean().backward()
        finally:
            m.set_grad_checkpointing(False)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    m.zero_grad()
    with torch.no_grad():
        handle = ttreg.add_test_time_registers(m, rn, form="bias")
        ref = m.forward_features(x)
        twin = copy.deepcopy(m)
        handle.remove()
        assert torch.equal(twin.forward_features(x), ref)
    ttreg.remove_test_time_registers(twin)
    assert all_hooks(twin) == 0 and all_hooks(m) == 0


# --- torch.compile ----------------------------------------------------------------------------------

def _compiled_checks(model, call, handle_args, backend):
    """Installed, then compiled with ``dynamic=True``: one graph (``fullgraph=True`` raises on any
    break), eager outputs on three batch sizes without a recompile; removed: the plain model."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    x = mixed_images(3)
    with torch.no_grad():
        plain = call(x)
        handle = ttreg.add_test_time_registers(model, *handle_args[0], **handle_args[1])
        eager = {b: call(mixed_images(b, seed=b)) for b in (2, 3, 5)}
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(call, backend=backend, dynamic=True, fullgraph=True)
        for b, want in eager.items():
            assert (compiled(mixed_images(b, seed=b)) - want).abs().max() <= 1e-4
        assert counters["stats"]["unique_graphs"] == 1          # batch size changes: no recompile
        handle.remove()
        assert (compiled(x) - plain).abs().max() <= 1e-4
    torch._dynamo.reset()


def test_bias_form_compiles_to_one_graph(planted_set):
    m, rn = planted_set
    _compiled_checks(m, m.forward_features, ((rn,), dict(form="bias")), "aot_eager")


@pytest.mark.slow
def test_bias_form_inductor(planted_set):
    m, rn = planted_set
    _compiled_checks(m, m.forward_features, ((rn,), dict(form="bias")), "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_dinov2", "open_clip_mha"])
@pytest.mark.parametrize("form", ["token", "bias"])
def test_other_families_compile(x, name, form):
    _, model = _family(name)
    rn = ttreg.RegisterNeurons.from_dict(RN, model=model)
    bias = ttreg.fit_attention_bias(model, rn, x) if form == "bias" else None
    if name == "hf_dinov2":
        call = lambda t: model(pixel_values=t).last_hidden_state
    else:
        call = model.encode_image
    _compiled_checks(model, call, ((rn,), dict(form=form, bias=bias)), "aot_eager")


def test_attention_call_is_popped_after_an_error(planted_set, x, recwarn):
    m, rn = planted_set

    def boom(mod, args, out):
        raise KeyError("inside the attention")
    h = m.blocks[2].attn.qkv.register_forward_hook(boom)
    try:
        with ttreg.test_time_registers(m, rn, form="bias"):
            with pytest.raises(KeyError, match="inside the attention"):
                m.forward_features(x)
    finally:
        h.remove()
    assert not torch.overrides._get_current_function_mode_stack()   # the call was popped
    assert all_hooks(m) == 0          # only the register sites stay, inert
    assert not [w for w in recwarn if "always_call" in str(w.message)]


# --- checked before any work: modes, heads, files ---------------------------------------------------

def test_fit_restores_each_modules_own_mode(planted_set, x):
    """A training model whose blocks are in eval mode comes back exactly so (as calibrate does),
    also after an error inside the fit; the fit itself runs in eval mode."""
    m, rn = planted_set
    twin = copy.deepcopy(m).train()
    twin.blocks.eval()
    before = {n: mod.training for n, mod in twin.named_modules()}
    assert twin.training and twin.patch_embed.training and not twin.blocks[0].attn.training
    seen = []
    h = twin.blocks[2].register_forward_hook(lambda mod, a, out: seen.append(twin.patch_embed.training))
    bias = ttreg.fit_attention_bias(twin, rn, x)
    h.remove()
    assert seen == [False] and {n: mod.training for n, mod in twin.named_modules()} == before
    assert torch.allclose(bias.key, rn.attention_bias.key, atol=1e-6)

    def boom(mod, a, out):
        raise RuntimeError("boom in block 2")
    h = twin.blocks[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom in block 2"):
        ttreg.fit_attention_bias(twin, rn, x)
    h.remove()
    assert {n: mod.training for n, mod in twin.named_modules()} == before


def _bias(rn, heads: int, size: int) -> ttreg.AttentionBias:
    g = torch.Generator().manual_seed(0)
    return ttreg.AttentionBias(torch.randn(6, heads, size, generator=g), torch.randn(6, heads, size, generator=g),
                               torch.ones(6), neurons=rn.neurons, fingerprint=rn.fingerprint)


@pytest.mark.parametrize("heads, size", [(3, 32), (8, 12), (4, 16)])
def test_bias_of_other_heads_is_refused_before_any_work(planted_set, tmp_path, capsys, heads, size):
    """Heads or head size that the model's attention does not have: one line before the first
    forward (the Python call, a neuron set carrying it, the command line with exit 2)."""
    m, rn = planted_set
    assert [ttreg.wrap(m).attention_heads(l) for l in range(6)] == [(4, 24, 24)] * 6
    bad = _bias(rn, heads, size)
    want = rf"this attention bias has {heads} heads of size {size} \(values {size}\); block 0's attention has 4 heads of size 24"
    calls = []
    h = m.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=want) as e:
            ttreg.add_test_time_registers(m, rn, form="bias", bias=bad)
        assert "\n" not in str(e.value)
        carrying = ttreg.RegisterNeurons.from_dict(rn.to_dict())
        carrying.attention_bias = bad
        path = carrying.save(tmp_path / "bad.json")
        back = ttreg.RegisterNeurons.load(path)            # the files alone are well formed
        with pytest.raises(ValueError, match=want):
            back.check_model(m)
    finally:
        h.remove()
    assert calls == [] and all_hooks(m) == 0
    from ttreg.cli import main
    out = tmp_path / "m.onnx"
    code = main(["export", "--model", "planted", "--neurons", str(path), "--form", "bias", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("ttreg: error: this attention bias has") and "fit one for this model" in err
    assert not out.exists()


def _bias_file(path, meta: dict, planted_set) -> None:
    """An attention-bias file whose metadata is the good one with ``meta`` changed."""
    from safetensors.torch import save_file
    _, rn = planted_set
    a = rn.attention_bias
    good = {"format": "ttreg.attention_bias", "version": "1", "neurons": json.dumps(a.neurons),
            "num_images": "6", "num_registers": "1", "fingerprint": json.dumps(a.fingerprint),
            "provenance": "{}"}
    save_file({"key": a.key, "value": a.value, "weight": a.weight}, str(path), metadata={**good, **meta})


BAD_BIAS_METADATA = [
    ({"neurons": "[[1]]"}, r"neurons\[0\] must be a \(layer, neuron\) pair, got \[1\]"),
    ({"neurons": "[[1, -7]]"}, r"neurons\[0\] neuron must be >= 0, got -7"),
    ({"neurons": "NaN"}, r"neurons must be a list of \(layer, neuron\) pairs, got nan"),
    ({"neurons": "[[1, 7"}, r"metadata 'neurons' is not valid JSON"),
    ({"num_images": "abc"}, r"metadata 'num_images' must be a whole number >= 0, got 'abc'"),
    ({"num_images": "-3"}, r"metadata 'num_images' must be a whole number >= 0, got '-3'"),
    ({"num_registers": "0"}, r"num_registers must be at least 1, got 0"),
    ({"fingerprint": '"abc"'}, r"'fingerprint' must be an object or null, got str"),
    ({"fingerprint": '{"weights": 5}'}, r"fingerprint.weights must be a string or null, got 5"),
    ({"fingerprint": '{"weights_sample": [1, Infinity]}'}, r"fingerprint.weights_sample\[1\] must be a finite number"),
    ({"provenance": "[1]"}, r"provenance must be an object, got list"),
    ({"version": "2"}, r"metadata 'version' is '2'; this ttreg reads version '1'"),
]


@pytest.mark.parametrize("meta, needle", BAD_BIAS_METADATA, ids=[next(iter(m)) + ":" + m[next(iter(m))]
                                                                for m, _ in BAD_BIAS_METADATA])
def test_bad_bias_metadata_names_the_file_and_the_field(planted_set, tmp_path, meta, needle):
    p = tmp_path / "set.bias.safetensors"
    _bias_file(p, meta, planted_set)
    with pytest.raises(ValueError, match=rf"^{p}: {needle}") as e:
        ttreg.AttentionBias.load(p)
    assert "\n" not in str(e.value)
    # through the neuron file that names it, too
    _, rn = planted_set
    data = rn.to_dict()
    data["attention_bias"] = {"file": p.name}
    (tmp_path / "set.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^{p}: {needle}"):
        ttreg.RegisterNeurons.load(tmp_path / "set.json")


def test_good_bias_metadata_loads_and_files_over_the_limit_are_not_read(planted_set, tmp_path, monkeypatch):
    from ttreg import loading
    _, rn = planted_set
    p = tmp_path / "set.bias.safetensors"
    _bias_file(p, {}, planted_set)
    b = ttreg.AttentionBias.load(p)
    assert torch.equal(b.key, rn.attention_bias.key) and b.neurons == rn.attention_bias.neurons
    assert b.num_images == 6 and b.fingerprint == rn.attention_bias.fingerprint
    monkeypatch.setattr(loading, "MAX_BIAS_FILE_BYTES", p.stat().st_size - 1)
    monkeypatch.setattr(ttreg.register_neurons, "MAX_BIAS_FILE_BYTES", p.stat().st_size - 1)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    with pytest.raises(ValueError, match=rf"^{p} is {p.stat().st_size} bytes; no ttreg attention-bias file is over"):
        ttreg.AttentionBias.load(p)
    assert str(p) not in opened
