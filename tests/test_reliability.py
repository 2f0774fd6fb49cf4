"""Registers belong to one forward call: threads, gradient checkpointing, copies, compile, and
the inputs that configure them (shift_to, layer and neuron indices, dtypes)."""
import copy
import pickle
import threading

import numpy as np
import pytest
import torch

import ttreg
from ttreg.testing import mixed_images, planted_vit

from conftest import all_hooks, ratio, site_hooks

RN = {1: [7], 3: [21]}


@pytest.fixture
def model():
    return planted_vit()


# --- threads ------------------------------------------------------------------------------------

def _run_threads(jobs):
    """Run callables concurrently, each many times; return their results and any error."""
    errors, results = [], [[] for _ in jobs]
    barrier = threading.Barrier(len(jobs))

    def worker(i, job):
        try:
            barrier.wait()
            for _ in range(25):
                results[i].append(job())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    return results


def test_two_threads_with_and_without_registers(model):
    xa, xb = mixed_images(3, seed=1), mixed_images(2, seed=2)   # different batch sizes too
    with torch.no_grad():
        plain_a, plain_b = model.forward_features(xa), model.forward_features(xb)
        with ttreg.test_time_registers(model, RN):
            reg_a = model.forward_features(xa)
    assert not torch.equal(reg_a, plain_a)

    def with_registers():
        with torch.no_grad(), ttreg.test_time_registers(model, RN):
            return model.forward_features(xa)

    def plain():
        with torch.no_grad():
            return model.forward_features(xb)
    got_reg, got_plain = _run_threads([with_registers, plain])
    assert all(torch.equal(y, reg_a) for y in got_reg)
    assert all(torch.equal(y, plain_b) for y in got_plain)
    assert all_hooks(model) == 0


def test_two_threads_share_a_persistent_handle(model):
    xs = [mixed_images(3, seed=1), mixed_images(5, seed=2)]
    handle = ttreg.add_test_time_registers(model, RN)
    try:
        with torch.no_grad():
            refs = [model.forward_features(x) for x in xs]
            traced = ttreg.trace(model, xs[0])
        jobs = [lambda x=x: model.forward_features(x).detach() for x in xs]
        jobs.append(lambda: ttreg.trace(model, xs[0]).norms)
        *outs, norms = _run_threads(jobs)
    finally:
        handle.remove()
    for out, ref in zip(outs, refs):
        assert all(torch.equal(y, ref) for y in out)
    # a trace in one thread never records the other threads' forwards
    assert all(torch.equal(n, traced.norms) for n in norms)
    assert traced.num_registers == 1 and ratio(traced).max() < 2


def test_trace_in_one_thread_plain_forward_in_another(model):
    x, y = mixed_images(2, seed=1), mixed_images(4, seed=2)
    ref = ttreg.trace(model, x)
    with torch.no_grad():
        ref_y = model(y)
    got_tr, got_y = _run_threads([lambda: ttreg.trace(model, x).norms, lambda: model(y).detach()])
    assert all(torch.equal(n, ref.norms) for n in got_tr)
    assert all(torch.equal(o, ref_y) for o in got_y)


# --- gradient checkpointing -----------------------------------------------------------------------

def _grads(model, x, checkpointing: bool):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad()
    try:
        with ttreg.test_time_registers(model, RN, num_registers=2):
            out = model.forward_features(x)
            (out ** 2).mean().backward()
    finally:
        model.set_grad_checkpointing(False)
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(model):
    x = mixed_images(3, seed=4)
    out_a, ga = _grads(model, x, False)
    out_b, gb = _grads(model, x, True)
    assert torch.equal(out_a, out_b)
    assert ga.keys() == gb.keys() and len(ga) > 50
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name
    # the registers matter for these gradients: without them they differ
    model.zero_grad()
    (model.forward_features(x) ** 2).mean().backward()
    assert not torch.equal(model.blocks[0].mlp.fc1.weight.grad, ga["blocks.0.mlp.fc1.weight"])


def test_reentrant_checkpointing_fails_loudly(model):
    from torch.utils.checkpoint import checkpoint
    x = mixed_images(2)
    with ttreg.test_time_registers(model, RN):
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        h = model.blocks[0](h)
        with pytest.raises(RuntimeError, match="re-entrant gradient checkpointing"):
            out = checkpoint(model.blocks[1], h.detach().requires_grad_(), use_reentrant=True)
            out.sum().backward()


# transformers' checkpointing, and timm's on the other families: tests/test_host_contracts.py


# --- copies -------------------------------------------------------------------------------------

def test_deepcopy_inside_the_context(model):
    x, y = mixed_images(3, seed=1), mixed_images(1, seed=5)
    with torch.no_grad():
        plain = model.forward_features(x)
        with ttreg.test_time_registers(model, RN):
            ref = model.forward_features(x)
            ref_y = model.forward_features(y)
            twin = copy.deepcopy(model)
            # interleaved, different batch sizes: nothing is shared between the two
            assert torch.equal(twin.forward_features(y), ref_y)
            assert torch.equal(model.forward_features(x), ref)
            assert torch.equal(twin.forward_features(x), ref)
        assert torch.equal(model.forward_features(x), plain)
        assert torch.equal(twin.forward_features(x), plain)   # the scope ended for the copy too
    assert all_hooks(model) == 0
    assert site_hooks(twin) > 0                                # inert hooks, removable publicly
    assert ttreg.remove_test_time_registers(twin) > 0 and all_hooks(twin) == 0


def test_deepcopy_and_pickle_with_a_handle(model):
    x = mixed_images(2, seed=1)
    with torch.no_grad():
        plain = model.forward_features(x)
        handle = ttreg.add_test_time_registers(model, RN)
        ref = model.forward_features(x)
        twin = copy.deepcopy(model)
        thawed = pickle.loads(pickle.dumps(model))
        handle.remove()                     # the copies keep their own registers
        assert torch.equal(model.forward_features(x), plain)
        for m in (twin, thawed):
            assert torch.equal(m.forward_features(x), ref)
            with pytest.raises(RuntimeError, match="already active"):
                ttreg.add_test_time_registers(m, RN)
            ttreg.remove_test_time_registers(m)
            assert all_hooks(m) == 0 and torch.equal(m.forward_features(x), plain)


def test_deepcopy_of_a_block_does_not_copy_the_model(model):
    with ttreg.test_time_registers(model, RN):
        block = copy.deepcopy(model.blocks[2])
    n = sum(p.numel() for p in block.parameters())
    assert n == sum(p.numel() for p in model.blocks[2].parameters())
    assert sum(t.numel() for t in pickle.loads(pickle.dumps(block)).state_dict().values()) == n


def test_discarded_handle_is_removable(model):
    x = mixed_images(2)
    with torch.no_grad():
        plain = model(x)
        ttreg.add_test_time_registers(model, RN)   # handle dropped
        assert not torch.equal(model(x), plain)
        assert ttreg.remove_test_time_registers(model) > 0
        assert torch.equal(model(x), plain) and all_hooks(model) == 0


# --- torch.compile ----------------------------------------------------------------------------------

def test_compiled_then_registers_is_refused(model):
    compiled = torch.compile(model)
    with pytest.raises(TypeError, match="compiled with torch.compile"):
        ttreg.add_test_time_registers(compiled, RN)
    model.compile()
    try:
        with pytest.raises(RuntimeError, match="install registers on the original module first"):
            ttreg.add_test_time_registers(model, RN)
    finally:
        model._compiled_call_impl = None
    assert all_hooks(model) == 0


def test_registers_then_compile_one_graph(model):
    """Installed first, registers trace into one graph (no break); removed, the compiled model
    recompiles to the plain one. aot_eager keeps this fast; inductor is in the slow test."""
    import torch._dynamo
    x = mixed_images(3)
    with torch.no_grad():
        plain = model.forward_features(x)
        handle = ttreg.add_test_time_registers(model, RN)
        eager = model.forward_features(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.forward_features)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(model.forward_features, backend="aot_eager", fullgraph=True)
        assert (compiled(x) - eager).abs().max() <= 1e-4
        handle.remove()
        assert (compiled(x) - plain).abs().max() <= 1e-4
    torch._dynamo.reset()


def test_registers_compile_inductor_no_recompile_on_batch_size(model):
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), ttreg.test_time_registers(model, RN):
        compiled = torch.compile(model.forward_features, dynamic=True)
        for b in (2, 3, 5):
            x = mixed_images(b, seed=b)
            assert (compiled(x) - model.forward_features(x)).abs().max() <= 1e-4
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# --- what configures the edit -------------------------------------------------------------------

@pytest.mark.parametrize("shift, expect", [
    (np.eye(1, 64, 40, dtype=bool)[0], [40]),                  # numpy bool mask
    ([i == 40 for i in range(64)], [40]),                     # list of bools
    (np.array([40, 41]), [40, 41]),                           # numpy indices
    (torch.tensor([40]), [40]),
])
def test_shift_to_forms(model, shift, expect):
    x = mixed_images(3)
    with ttreg.test_time_registers(model, RN, shift_to=shift):
        tr = ttreg.trace(model, x, neurons=[(3, 21)])
    act = tr.activation_map(0).flatten(1)
    on = (act.abs() > 0).any(0).nonzero().flatten().tolist()
    assert on == expect


@pytest.mark.parametrize("shift, match", [
    ([1.5], "whole patch indices"),
    (torch.tensor([[1, 2], [3, 4]]), "1-D"),
    (torch.zeros(2, 2, 64, dtype=torch.bool), "mask must be"),
    ([[1, 2], [3]], "list of patch indices"),
])
def test_shift_to_refused(model, shift, match):
    with pytest.raises(ValueError, match=match):
        ttreg.add_test_time_registers(model, RN, shift_to=shift)
    assert all_hooks(model) == 0


def test_trace_checks_layers_and_neurons(model):
    x = mixed_images(1)
    for kw, match in ((dict(attention=[99]), "attention layer 99 does not exist"),
                      (dict(neurons=[(99, 7)]), "neuron layer 99 does not exist"),
                      (dict(neurons=[(5, 5000)]), r"neuron \(5, 5000\) does not exist: block 5 has 384"),
                      (dict(neurons=[(5, 1.5)]), "whole number"),
                      (dict(attention=[-7]), "has 6 blocks")):
        with pytest.raises(ValueError, match=match):
            ttreg.trace(model, x, **kw)
    tr = ttreg.trace(model, x, attention=[-6], neurons=[(-1, 3)])
    assert list(tr.attention) == [0] and tr.neurons == [(5, 3)]
    assert all_hooks(model) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_neurons_apply_to_the_model_in_16_bit(model, dtype):
    rn = ttreg.find_register_neurons(model, mixed_images(6), top_k=2)
    low = copy.deepcopy(model).to(dtype)
    rn.check_model(low)                               # same weights, another dtype: accepted
    x = mixed_images(2).to(dtype)
    with ttreg.test_time_registers(low, rn):
        tr = ttreg.trace(low, x)
    assert ratio(tr).max() < 2
    with pytest.raises(ttreg.ModelMismatchError, match="other weights"):
        rn.check_model(planted_vit(seed=3).to(dtype))


@pytest.mark.parametrize("default", [torch.float16, torch.bfloat16, torch.float64])
def test_fingerprint_and_search_do_not_depend_on_the_default_dtype(model, default):
    """torch.set_default_dtype(float16) once made the weight sample's places (a linspace in the
    default dtype) land elsewhere or out of range: the same model, another fingerprint. Places,
    thresholds, image normalisation and sums are computed in fixed dtypes."""
    from ttreg.data import make_transform
    from PIL import Image
    x = mixed_images(6)
    im = Image.fromarray((np.arange(48 * 40 * 3) % 251).astype(np.uint8).reshape(40, 48, 3))
    tf = make_transform((32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    want_fp = ttreg.RegisterNeurons.from_dict({1: [7], 3: [21]}, model=model).fingerprint
    want = ttreg.find_register_neurons(model, x, top_k=4, threshold=30.0)
    want_px = tf(im)
    torch.set_default_dtype(default)
    try:
        rn = ttreg.RegisterNeurons.from_dict({1: [7], 3: [21]}, model=model)
        got = ttreg.find_register_neurons(model, x, top_k=4, threshold=30.0)
        px = tf(im)
    finally:
        torch.set_default_dtype(torch.float32)
    assert rn.fingerprint == want_fp and len(want_fp["weights_sample"]) == 64
    assert got.neurons == want.neurons and got.neurons[:2] == [(1, 7), (3, 21)]
    assert got.scores == want.scores and got.fingerprint == want.fingerprint
    assert px.dtype == torch.float32 and torch.equal(px, want_px)
