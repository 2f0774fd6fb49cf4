"""The host library's contracts, per family, with test-time registers installed.

timm's ``tests/test_models.py`` and transformers' ``ModelTesterMixin`` check these on every model
they build; ttreg must keep each of them (docs/method.md, "What the host library's contracts
keep"). One row per family, built tiny and random, with planted register neurons so that the
registers change every output they should; each test is one contract over all the families it
applies to (:data:`APPLIES`). The numbers are compared bitwise where the same arithmetic runs
(copies, reloads, checkpoint recomputation, return forms, the default dtype), to a tolerance where
the arithmetic differs (batch size, attention kernel).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import pickle
import unittest.mock
import warnings

import pytest
import torch

import ttreg

tf = pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("open_clip")

from ttreg.adapters.hf import RecordedAttentionWarning  # noqa: E402
from ttreg.testing import planted_vit  # noqa: E402
from ttreg.testing.convert.hf import (timm_to_hf_clip_vision, timm_to_hf_dinov2,  # noqa: E402
                                      timm_to_hf_dinov2_with_registers, timm_to_hf_siglip_vision,
                                      timm_to_hf_vit)
from ttreg.testing.convert.open_clip import timm_to_open_clip  # noqa: E402

from conftest import flat  # noqa: E402
from test_families import NEURONS as ZOO_NEURONS, Zoo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTS = [(1, 7), (3, 21)]                         # planted_vit's register neurons
CLIP_KW = dict(pre_norm=True, act_layer="quick_gelu")
#: family -> (how it is built, its register neurons); the timm rows beside ViT come from the
#: families table (tests/test_families.py), the rest are planted_vit converted
HOSTS = {
    "timm ViT": (lambda zoo: planted_vit(), PLANTS),
    "timm Eva": (lambda zoo: zoo("timm Eva: EVA-02 (SwiGLU, RoPE)"), ZOO_NEURONS),
    "timm NaFlexVit": (lambda zoo: zoo("timm NaFlexVit (SigLIP 2)"), ZOO_NEURONS),
    "HF Dinov2": (lambda zoo: timm_to_hf_dinov2(planted_vit(init_values=1e-5)), PLANTS),
    "HF Dinov2WithRegisters": (lambda zoo: timm_to_hf_dinov2_with_registers(
        planted_vit(init_values=1e-5, reg_tokens=4, no_embed_class=True)), PLANTS),
    "HF ViT": (lambda zoo: timm_to_hf_vit(planted_vit()), PLANTS),
    "HF CLIPVision": (lambda zoo: timm_to_hf_clip_vision(planted_vit(**CLIP_KW)), PLANTS),
    "HF SiglipVision": (lambda zoo: timm_to_hf_siglip_vision(
        planted_vit(class_token=False, global_pool="map", act_layer="gelu_tanh")), PLANTS),
    "open_clip": (lambda zoo: timm_to_open_clip(planted_vit(**CLIP_KW, num_classes=32)), PLANTS),
}
NAMES = list(HOSTS)
TIMM = [n for n in NAMES if n.startswith("timm")]
HF = [n for n in NAMES if n.startswith("HF")]
#: contract -> the families it applies to (the table in docs/method.md)
APPLIES = {
    "return forms": NAMES,                      # HF return_dict, timm forward_intermediates, open_clip output_dict
    "backward": NAMES,
    "recorded outputs on the graph": HF,        # timm's and open_clip's intermediates are slices, off it
    "batching": NAMES,
    "state_dict and save/load": NAMES,
    "deepcopy and pickle": NAMES,
    "eager vs sdpa": TIMM + HF,                 # open_clip's nn.MultiheadAttention has one path
    "gradient checkpointing": NAMES,
    "default dtype": NAMES,
    "masks": TIMM,                              # the HF encoders and open_clip's tower take none
    "tracers": NAMES,
}


class Hosts:
    """The families' models and neuron sets, built on first use and kept for the session."""

    def __init__(self) -> None:
        self.zoo = Zoo()
        self.built: dict[str, tuple] = {}

    def __call__(self, name: str):
        if name not in self.built:
            build, neurons = HOSTS[name]
            torch.manual_seed(0)
            model = build(self.zoo).eval()
            self.built[name] = (model, ttreg.RegisterNeurons.from_dict(_as_dict(neurons), model=model))
        return self.built[name]

    def images(self, name: str, n: int = 3) -> torch.Tensor:
        """Images on which the family's neurons fire (the zoo's rows fire on a marker)."""
        if name in ("timm Eva", "timm NaFlexVit"):
            return self.zoo.images[:n]
        h, w = ttreg.wrap(self(name)[0]).image_size()
        return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def _as_dict(pairs) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, n in pairs:
        out.setdefault(layer, []).append(n)
    return out


@pytest.fixture(scope="session")
def hosts() -> Hosts:
    return Hosts()


def outputs(name: str, model, x: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    """Every tensor the family's user reads: HF with hidden states (and ``kw``), timm the features
    and the intermediates, open_clip the image embedding and its tower's intermediates."""
    if name.startswith("HF"):
        return flat(model(pixel_values=x, output_hidden_states=True, **kw))
    if name == "open_clip":
        inter = model.visual.forward_intermediates(x, intermediates_only=True)
        return {"embeds": model.encode_image(x), **flat(inter, "inter")}
    return flat(model.forward_intermediates(x, indices=[0, 2]), "out")


def assert_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys() and len(a) >= 2
    for k in a:
        if atol:
            assert a[k].shape == b[k].shape and (a[k] - b[k]).abs().max() <= atol, k
        else:
            assert torch.equal(a[k], b[k]), k


@contextlib.contextmanager
def eager(name: str, model):
    """Attention computed explicitly in the block (HF ``attn_implementation="eager"``, which
    records attention maps; timm ``fused_attn=False``), put back as it was afterwards."""
    if name.startswith("HF"):
        owners = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
        attr, value = "_attn_implementation", "eager"
    else:
        owners, attr, value = [m for m in model.modules() if hasattr(m, "fused_attn")], "fused_attn", False
    assert owners
    before = [getattr(o, attr) for o in owners]
    for o in owners:
        setattr(o, attr, value)
    try:
        yield
    finally:
        for o, b in zip(owners, before):
            setattr(o, attr, b)


def _outcome(run):
    """What ``run()`` returns, or the exception it raises."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 -- compared with the plain model's outcome
        return e


def registered(hosts: Hosts, name: str, x: torch.Tensor, **kw):
    """(plain outputs, outputs with registers); the registers change the final output."""
    model, neurons = hosts(name)
    with torch.no_grad():
        plain = outputs(name, model, x, **kw)
        with ttreg.test_time_registers(model, neurons):
            got = outputs(name, model, x, **kw)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in plain.items()}
    assert any((got[k] - plain[k]).abs().max() > 1e-3 for k in got)
    return plain, got


# --- return forms ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", APPLIES["return forms"])
def test_return_forms_agree(hosts, name):
    """HF: ``return_dict=False`` (per call and in the config) gives the dict's tensors in order;
    timm: ``forward_intermediates`` gives ``forward_features`` and its ``intermediates_only`` list;
    open_clip: ``output_dict`` gives the tuple's tensors."""
    model, neurons = hosts(name)
    x = hosts.images(name, 2)
    if name.startswith("HF"):
        kw = dict(output_hidden_states=True, output_attentions=True)
        with eager(name, model), torch.no_grad():
            plain_tuple = model(pixel_values=x, return_dict=False, **kw)
            with ttreg.test_time_registers(model, neurons):
                as_dict = model(pixel_values=x, **kw)
                as_tuple = model(pixel_values=x, return_dict=False, **kw)
            model.config.return_dict = False       # in the config: as the plain model does it
            try:
                plain = _outcome(lambda: model(pixel_values=x, **kw))
                with ttreg.test_time_registers(model, neurons):
                    got = _outcome(lambda: model(pixel_values=x, **kw))
            finally:
                model.config.return_dict = True
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(plain_tuple) >= 3
        shapes = {k: v.shape for k, v in flat(plain_tuple).items()}
        assert {k: v.shape for k, v in flat(as_tuple).items()} == shapes   # no register leaks out
        assert len(shapes) > 12                                            # hidden states and attentions
        assert (as_tuple[0] - plain_tuple[0]).abs().max() > 1e-3           # the registers did something
        assert_equal(flat(as_dict.to_tuple()), flat(as_tuple))
        if isinstance(plain, Exception):           # Dinov2* read .last_hidden_state of a tuple
            assert type(got) is type(plain) and str(got) == str(plain)
        else:
            assert_equal(flat(got), flat(as_tuple))
        return
    with torch.no_grad(), ttreg.test_time_registers(model, neurons):
        if name == "open_clip":
            vocab = model.token_embedding.num_embeddings
            text = torch.randint(0, vocab, (2, model.context_length), generator=torch.Generator().manual_seed(0))
            as_tuple = model(x, text)
            model.output_dict = True
            try:
                as_dict = model(x, text)
            finally:
                model.output_dict = False
            assert isinstance(as_tuple, tuple) and isinstance(as_dict, dict)
            assert_equal(flat(list(as_dict.values())), flat(list(as_tuple)))
        else:
            final, inter = model.forward_intermediates(x, indices=[0, 2])
            only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
            assert torch.equal(final, model.forward_features(x))
            assert_equal(flat(inter), flat(only))


# --- backward, recorded outputs on the graph -------------------------------------------------------------------

@pytest.mark.parametrize("name", APPLIES["backward"])
def test_backward_reaches_the_same_parameters(hosts, name):
    """timm's test_model_backward: a loss on the outputs gives a gradient to the same parameters
    as in the plain model (all of them that the plain outputs read), and to the input image."""
    model, neurons = hosts(name)
    x = hosts.images(name, 2)
    reached = []
    for edit in (None, neurons):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with contextlib.nullcontext() if edit is None else ttreg.test_time_registers(model, edit):
            sum(v.pow(2).mean() for v in outputs(name, model, xi).values()).backward()
        assert xi.grad is not None and xi.grad.abs().sum() > 0
        reached.append([n for n, p in model.named_parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    assert reached[0] == reached[1] and len(reached[0]) > 20


@pytest.mark.parametrize("name", APPLIES["recorded outputs on the graph"])
def test_recorded_outputs_are_on_the_graph(hosts, name):
    """Gradients of the final output reach every recorded hidden state and attention map, as in
    the plain model (transformers' test_retain_grad_hidden_states_attentions): the eager
    attention's probabilities reach the values through their visible block, the very tensor
    returned, and the output is bitwise the one computed without recording."""
    model, neurons = hosts(name)
    x = hosts.images(name, 2)
    with ttreg.test_time_registers(model, neurons):
        out = model(pixel_values=x, output_hidden_states=True)
        grads = torch.autograd.grad(out.last_hidden_state.pow(2).sum(), out.hidden_states[:-1])
        out = model(pixel_values=x, output_hidden_states=True)
        for h in out.hidden_states:
            h.retain_grad()
        out.last_hidden_state.pow(2).sum().backward()
    model.zero_grad(set_to_none=True)
    assert len(grads) == 6 and all(g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(h.grad, g) for h, g in zip(out.hidden_states, grads))
    with eager(name, model):
        with ttreg.test_time_registers(model, neurons), warnings.catch_warnings():
            warnings.simplefilter("error", RecordedAttentionWarning)
            unrecorded = model(pixel_values=x).last_hidden_state
            out = model(pixel_values=x, output_attentions=True)
            agrads = torch.autograd.grad(out.last_hidden_state.pow(2).sum(), out.attentions, retain_graph=True)
            for a in out.attentions:
                a.retain_grad()
            out.last_hidden_state.pow(2).sum().backward()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            plain = model(pixel_values=x, output_attentions=True).attentions
    assert torch.equal(out.last_hidden_state, unrecorded)
    assert [a.shape for a in out.attentions] == [a.shape for a in plain]
    assert all(g.abs().sum() > 0 for g in agrads[:-1])              # the last map feeds the output
    assert all(torch.equal(a.grad, g) for a, g in zip(out.attentions, agrads))
    rows = torch.stack([a.detach().sum(-1) for a in out.attentions])  # the register's share is cut off
    assert rows.max() <= 1 + 1e-5 and rows.min() < 1 - 1e-4


# --- batching ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", APPLIES["batching"])
def test_one_image_alone_equals_it_in_a_batch(hosts, name):
    """transformers' test_batching_equivalence: every output of an image, recorded ones included
    (attention maps too for HF), is the same alone as inside a batch."""
    model, neurons = hosts(name)
    x = hosts.images(name, 3)
    kw = dict(output_attentions=True) if name.startswith("HF") else {}
    explicit = eager(name, model) if name != "open_clip" else contextlib.nullcontext()
    with explicit, torch.no_grad(), ttreg.test_time_registers(model, neurons):
        batch = outputs(name, model, x, **kw)
        alone = outputs(name, model, x[1:2], **kw)
    assert_equal(alone, {k: v[1:2] for k, v in batch.items()}, atol=1e-5)


# --- state_dict and save/load ------------------------------------------------------------------------

@pytest.mark.parametrize("name", APPLIES["state_dict and save/load"])
def test_state_dict_unchanged_and_reloads(hosts, name, tmp_path):
    """Installing registers adds no key and changes no tensor; what is saved with registers on
    loads strictly into a plain copy, which with the same registers gives the same numbers
    (HF: save_pretrained / from_pretrained too)."""
    model, neurons = hosts(name)
    x = hosts.images(name, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = ttreg.add_test_time_registers(model, neurons)
    try:
        sd = model.state_dict()
        assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in sd)
        buf = io.BytesIO()
        torch.save(sd, buf)
        with torch.no_grad():
            ref = outputs(name, model, x)
        if name.startswith("HF"):
            model.save_pretrained(tmp_path)
    finally:
        handle.remove()
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    buf.seek(0)
    assert not fresh.load_state_dict(torch.load(buf), strict=True).missing_keys
    reloaded = [fresh]
    if name.startswith("HF"):
        reloaded.append(type(model).from_pretrained(tmp_path).eval())
        assert list(reloaded[1].state_dict()) == list(before)
    for m in reloaded:
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
        with torch.no_grad(), ttreg.test_time_registers(m, neurons):
            assert_equal(outputs(name, m, x), ref)


# --- deepcopy and pickle -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", APPLIES["deepcopy and pickle"])
def test_copies_of_a_model_with_registers_behave_the_same(hosts, name):
    model, neurons = hosts(name)
    x = hosts.images(name, 2)
    with torch.no_grad():
        plain = outputs(name, model, x)
        handle = ttreg.add_test_time_registers(model, neurons)
        try:
            ref = outputs(name, model, x)
            copies = [copy.deepcopy(model)]
            if name.startswith("HF"):        # transformers' output-capturing hooks are local functions
                with pytest.raises(AttributeError, match="Can't pickle local object"):
                    pickle.dumps(model)      # ... so a model that ran once never pickles, plain or not
            else:
                copies.append(pickle.loads(pickle.dumps(model)))
        finally:
            handle.remove()
        assert_equal(outputs(name, model, x), plain)
        for m in copies:                      # the copies keep their own registers
            assert_equal(outputs(name, m, x), ref)
            ttreg.remove_test_time_registers(m)
            assert_equal(outputs(name, m, x), plain)


# --- eager vs sdpa -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", APPLIES["eager vs sdpa"])
def test_eager_and_sdpa_attention_agree(hosts, name):
    """transformers' test_eager_matches_sdpa_inference (float32) and timm's ``fused_attn``."""
    x = hosts.images(name, 2)
    with eager(name, hosts(name)[0]):
        explicit = registered(hosts, name, x)[1]
    assert_equal(explicit, registered(hosts, name, x)[1], atol=1e-4)


# --- gradient checkpointing --------------------------------------------------------------------------

def _checkpointing(name: str, model, on: bool, reentrant: bool = False) -> None:
    if name.startswith("HF"):                    # transformers 5 renamed gradient_ to activation_
        new = hasattr(model, "activation_checkpointing_enable")
        if on:
            getattr(model, "activation_checkpointing_enable" if new else "gradient_checkpointing_enable")(
                {"use_reentrant": reentrant})
        else:
            getattr(model, "activation_checkpointing_disable" if new else "gradient_checkpointing_disable")()
    else:
        model.set_grad_checkpointing(on)


def _grads(name: str, model, neurons, x, on: bool, reentrant: bool = False, wrap=None) -> dict:
    model.zero_grad()
    _checkpointing(name, model, on, reentrant)
    layers = [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")] if wrap else []
    for m in layers:
        m._gradient_checkpointing_func = wrap(m._gradient_checkpointing_func)
    try:
        with ttreg.test_time_registers(model, neurons):
            sum(v.pow(2).mean() for v in outputs(name, model, x).values()).backward()
    finally:
        for m in layers:
            del m._gradient_checkpointing_func
        _checkpointing(name, model, False)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", APPLIES["gradient checkpointing"])
def test_checkpointed_gradients_equal_plain_ones(hosts, name):
    """Non-reentrant checkpointing (timm's set_grad_checkpointing, transformers'
    activation_checkpointing_enable, open_clip's set_grad_checkpointing) recomputes the blocks
    with their registers: the gradients are bitwise those without checkpointing. transformers'
    test_training_gradient_checkpointing puts a mock around each layer's checkpoint function:
    the same then (ttreg once took the mock's made-up ``keywords`` for ``use_reentrant=True``),
    and a mocked re-entrant one is still refused in the forward."""
    model, neurons = hosts(name)
    x = hosts.images(name, 2)
    mocks = []

    def wrap(fn):                               # as transformers' test does (unittest.mock.patch.object)
        mocks.append(unittest.mock.Mock(side_effect=fn))
        return mocks[-1]
    model.train()
    try:
        ref = _grads(name, model, neurons, x, False)
        got = [_grads(name, model, neurons, x, True)]
        if name.startswith("HF"):
            got.append(_grads(name, model, neurons, x, True, wrap=wrap))
            assert sum(m.call_count for m in mocks) == 6          # each block checkpointed once
            with pytest.raises(RuntimeError, match="re-entrant gradient checkpointing"):
                _grads(name, model, neurons, x, True, reentrant=True, wrap=wrap)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    assert ref.keys() == got[0].keys() and len(ref) > 20
    for g in got:
        for k in ref:
            assert torch.equal(ref[k], g[k]), k


# --- default dtype -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", APPLIES["default dtype"])
def test_default_dtype_changes_neither_file_nor_numbers(hosts, name):
    """transformers builds models under a float16 default: the neuron file (fingerprint and
    weight sample) and the outputs with registers do not depend on torch's default dtype."""
    model, neurons = hosts(name)
    x = hosts.images(name, 2)
    ref_file = neurons.to_dict()
    _, ref = registered(hosts, name, x)
    before = torch.get_default_dtype()
    for dtype in (torch.float64, torch.float16):
        torch.set_default_dtype(dtype)
        try:
            again = ttreg.RegisterNeurons.from_dict(_as_dict(list(neurons)), model=model)
            if dtype == torch.float64:
                with torch.no_grad(), ttreg.test_time_registers(model, again):
                    got = outputs(name, model, x)
        finally:
            torch.set_default_dtype(before)
        assert again.to_dict() == ref_file, dtype
        if dtype == torch.float64:
            assert_equal(got, ref)


# --- masks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["token", "bias"])
@pytest.mark.parametrize("name", APPLIES["masks"])
def test_attention_masks_are_extended_and_causal_refused(hosts, name, form):
    """timm's ``attn_mask`` (over the visible tokens) is extended for the registers in both forms:
    an all-True mask gives bitwise the unmasked numbers; ``is_causal=True`` (ViT, Eva) is refused
    in one line: a register appended last could be attended by no token."""
    model, neurons = hosts(name)
    x = hosts.images(name, 2)
    kw = {}
    if form == "bias":
        kw = dict(form="bias", bias=ttreg.fit_attention_bias(model, neurons, x))
    with torch.no_grad(), ttreg.test_time_registers(model, neurons, **kw):
        ref = model.forward_features(x)
        T = ref.shape[1]
        assert torch.equal(model.forward_features(x, attn_mask=torch.ones(T, T, dtype=torch.bool)), ref)
        assert (model.forward_features(x, attn_mask=torch.zeros(2, 1, T, T)) - ref).abs().max() <= 1e-5
        if "is_causal" in inspect.signature(model.forward_features).parameters:
            with pytest.raises(RuntimeError, match="is_causal=True") as err:
                model.forward_features(x, is_causal=True)
            assert "\n" not in str(err.value)


# --- tracers -----------------------------------------------------------------------------------------

#: the families whose plain model torch.jit.script and torch.fx.symbolic_trace can follow (timm's
#: test_model_forward_torchscript / _fx); the others fail plain, before any hook is met
TRACEABLE = ["timm ViT", "timm Eva", "open_clip"]


@pytest.mark.parametrize("name", APPLIES["tracers"])
def test_scripting_and_fx_refused_in_one_line(hosts, name):
    """With registers, a tracer that follows the plain model gets ttreg's one-line refusal, which
    names what works instead; one that fails on the plain model fails the same way."""
    import torch.fx
    model, neurons = hosts(name)
    plain = None
    if name not in TRACEABLE:
        plain = copy.deepcopy(model)
        ttreg.remove_test_time_registers(plain)
    for tracer, what in ((torch.jit.script, "torch.jit.script"),
                         (torch.fx.symbolic_trace, "torch.fx symbolic tracing")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ttreg.test_time_registers(model, neurons):
                got = _outcome(lambda: tracer(model))
            expected = None if plain is None else _outcome(lambda: tracer(plain))
        assert isinstance(got, Exception)
        if plain is None:
            msg = str(got)
            assert type(got) is RuntimeError and "\n" not in msg
            assert msg.startswith(f"{what} cannot follow test-time registers")
            assert "use torch.jit.trace, torch.export, torch.compile or ttreg.export_onnx" in msg
        else:
            assert isinstance(expected, Exception), what
            assert type(got) is type(expected) and str(got).splitlines()[0] == str(expected).splitlines()[0]
