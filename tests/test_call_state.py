"""One forward call's state, in one place: hooks installed once and switched on per context,
threads, every compile arrangement, checkpointing (re-entrant too), the attention arguments a host
forward accepts, and what transformers records inside the layers."""
import threading

import pytest
import torch

import ttreg
from ttreg.testing import mixed_images, planted_vit

from conftest import all_hooks, site_hooks

RN = {1: [7], 3: [21]}
OTHER = {3: [21]}


@pytest.fixture
def model():
    return planted_vit()


def hook_dicts(model):
    """Every hook dictionary of the model, as (module, kind, keys)."""
    return [(name, kind, tuple(getattr(m, kind).keys())) for name, m in model.named_modules()
            for kind in ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                         "_forward_hooks_with_kwargs", "_forward_hooks_always_called")]


def _threads(jobs, rounds=30):
    errors, results = [], [[] for _ in jobs]
    barrier = threading.Barrier(len(jobs))

    def worker(i, job):
        try:
            barrier.wait()
            for _ in range(rounds):
                results[i].append(job())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    ts = [threading.Thread(target=worker, args=(i, j)) for i, j in enumerate(jobs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, repr(errors[0])
    return results


# --- hooks installed once -----------------------------------------------------------------------

def test_with_blocks_never_change_the_hook_dictionaries(model):
    x = mixed_images(2)
    with torch.no_grad():
        plain = model.forward_features(x)
        with ttreg.test_time_registers(model, RN):
            ref = model.forward_features(x)
        installed = hook_dicts(model)
        assert site_hooks(model) == 6 * len(model.blocks) and all_hooks(model) == 0
        for neurons in (RN, OTHER, RN):
            with ttreg.test_time_registers(model, neurons):
                assert hook_dicts(model) == installed
                got = model.forward_features(x)
            assert hook_dicts(model) == installed
        assert torch.equal(got, ref)
        assert torch.equal(model.forward_features(x), plain)            # inert outside
    assert ttreg.remove_test_time_registers(model) == 6 * len(model.blocks) and site_hooks(model) == 0


def test_four_threads_scoped_and_plain_while_the_first_installs(model):
    """The sites are installed by the first scoped thread while the plain ones already run: no
    half registration is ever seen, and each thread gets bitwise its single-thread result."""
    xs = [mixed_images(b, seed=b) for b in (2, 3, 1, 4)]
    with torch.no_grad():
        plain = [model.forward_features(x) for x in xs]
        with ttreg.test_time_registers(model, RN):
            reg = [model.forward_features(x) for x in xs]
    ttreg.remove_test_time_registers(model)       # the threads below install them again

    def scoped(i):
        def run():
            with torch.no_grad(), ttreg.test_time_registers(model, RN):
                return model.forward_features(xs[i])
        return run

    def plain_run(i):
        def run():
            with torch.no_grad():
                return model.forward_features(xs[i])
        return run
    got = _threads([scoped(0), plain_run(1), scoped(2), plain_run(3)])
    assert all(torch.equal(y, reg[0]) for y in got[0]) and all(torch.equal(y, reg[2]) for y in got[2])
    assert all(torch.equal(y, plain[1]) for y in got[1]) and all(torch.equal(y, plain[3]) for y in got[3])
    assert not torch.equal(reg[0], plain[0])


def test_one_call_state_is_reset_when_a_block_raises(model):
    from ttreg.calls import CALL
    x = mixed_images(2)
    boom = model.blocks[2].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(ValueError("boom")))
    try:
        with ttreg.test_time_registers(model, RN), pytest.raises(ValueError, match="boom"):
            model.forward_features(x)
    finally:
        boom.remove()
    assert CALL.get() is None
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), planted_vit().forward_features(x))


# --- compile, every arrangement ----------------------------------------------------------------------

def test_compiled_before_installing_is_refused_in_one_line(model):
    import torch._dynamo
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(RuntimeError, match="a torch.compile wrapper of it"):
        ttreg.add_test_time_registers(model, RN)
    with pytest.raises(RuntimeError, match="compiled with torch.compile"):
        with ttreg.test_time_registers(model, RN):
            pass
    del compiled
    torch._dynamo.reset()
    for part in (model.blocks[2], model.blocks[3].mlp):       # compiled submodules, in place
        part.compile(backend="eager")
        with pytest.raises(RuntimeError, match="its module 'blocks"):
            ttreg.add_test_time_registers(model, RN)
        part._compiled_call_impl = None
    model.blocks[1] = torch.compile(model.blocks[1], backend="eager")   # replaced by a wrapper
    with pytest.raises(RuntimeError, match="its module 'blocks.1'"):
        ttreg.add_test_time_registers(model, RN)
    assert all_hooks(model) == 0 and site_hooks(model) == 0


def test_compiled_after_installing_follows_swaps_and_scopes(model):
    """Sites installed, then compiled: a set swapped afterwards, a scope entered afterwards, and
    the plain model all give the eager numbers (the compiled code guards on the active edit)."""
    import torch._dynamo
    torch._dynamo.reset()
    x = mixed_images(3)
    with torch.no_grad():
        plain = model.forward_features(x)
        refs = {}
        for name, rn in (("a", RN), ("b", OTHER)):
            with ttreg.test_time_registers(model, rn):
                refs[name] = model.forward_features(x)
        compiled = torch.compile(model.forward_features, backend="aot_eager")
        assert (compiled(x) - plain).abs().max() <= 1e-4
        h = ttreg.add_test_time_registers(model, RN)
        assert (compiled(x) - refs["a"]).abs().max() <= 1e-4
        h.remove()
        h = ttreg.add_test_time_registers(model, OTHER)          # swapped after compiling
        assert (compiled(x) - refs["b"]).abs().max() <= 1e-4
        h.remove()
        with ttreg.test_time_registers(model, RN):
            assert (compiled(x) - refs["a"]).abs().max() <= 1e-4
        assert (compiled(x) - plain).abs().max() <= 1e-4
        # model.compile() in place after the sites: the same
        with ttreg.test_time_registers(model, OTHER):
            pass
    torch._dynamo.reset()


def test_compiled_model_driven_from_several_threads(model):
    import torch._dynamo
    torch._dynamo.reset()
    x = mixed_images(2)
    with torch.no_grad():
        plain = model.forward_features(x)
        with ttreg.test_time_registers(model, RN):
            ref = model.forward_features(x)
        # fullgraph: neither the plain nor the scoped forward may break the graph (a break splits
        # the blocks into frames that recompile per layer, and a frame run eagerly loses the call)
        compiled = torch.compile(model.forward_features, backend="aot_eager", fullgraph=True)
        compiled(x)
        with ttreg.test_time_registers(model, RN):
            compiled(x)

    def scoped():
        with torch.no_grad(), ttreg.test_time_registers(model, RN):
            return compiled(x)

    def bare():
        with torch.no_grad():
            return compiled(x)
    got = _threads([scoped, bare, scoped, bare], rounds=8)
    for i in (0, 2):
        assert all((y - ref).abs().max() <= 1e-4 for y in got[i])
    for i in (1, 3):
        assert all((y - plain).abs().max() <= 1e-4 for y in got[i])
    torch._dynamo.reset()


# --- checkpointing -------------------------------------------------------------------------------

def _hf_grads(hf, x, ckpt, hidden):
    hf.zero_grad()
    if ckpt:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": ckpt == "reentrant"})
    try:
        with ttreg.test_time_registers(hf, RN):
            out = hf(pixel_values=x, output_hidden_states=hidden)
            (out.last_hidden_state.pow(2).mean() + (out.hidden_states[3].mean() if hidden else 0)).backward()
    finally:
        if ckpt:
            hf.gradient_checkpointing_disable()
    return {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("hidden", [False, True])
def test_hf_checkpointing_equal_or_refused_before_the_backward(hidden):
    pytest.importorskip("transformers")
    from ttreg.convert.hf import timm_to_hf_dinov2
    hf = timm_to_hf_dinov2(planted_vit(init_values=1e-5)).train()
    x = mixed_images(2, seed=3)
    ref = _hf_grads(hf, x, None, hidden)
    got = _hf_grads(hf, x, "plain", hidden)
    assert ref.keys() == got.keys() and len(ref) > 20
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    with pytest.raises(RuntimeError, match="re-entrant gradient checkpointing"):
        _hf_grads(hf, x, "reentrant", hidden)


@pytest.mark.parametrize("first", [0, 2])
def test_timm_reentrant_checkpointing_refused_before_the_backward(model, first):
    """Whichever block is the first to be checkpointed re-entrantly refuses, in the forward."""
    from torch.utils.checkpoint import checkpoint
    x = mixed_images(2)
    with ttreg.test_time_registers(model, RN):
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks[:first]:
            h = blk(h)
        with pytest.raises(RuntimeError, match=f"block {first}: re-entrant gradient checkpointing"):
            checkpoint(model.blocks[first], h, use_reentrant=True)
        out = checkpoint(model.blocks[first], h, use_reentrant=False)   # the supported way
    assert out.shape == h.shape


# --- shift_to as masks -----------------------------------------------------------------------------

def test_shift_to_masks_of_every_type(model):
    import numpy as np
    x = mixed_images(2)
    mask = np.zeros(64, dtype=bool)
    mask[[5, 40]] = True
    with torch.no_grad():
        with ttreg.test_time_registers(model, RN, shift_to=mask):
            ref = model.forward_features(x)
        with ttreg.test_time_registers(model, RN, shift_to=[5, 40]):
            assert torch.equal(model.forward_features(x), ref)
        for same in (mask.astype(np.uint8), torch.from_numpy(mask.astype(np.uint8)), mask.astype(int),
                     [5.0, 40.0]):
            with ttreg.test_time_registers(model, RN, shift_to=same):
                assert torch.equal(model.forward_features(x), ref), type(same)
    with pytest.raises(ValueError, match="repeats patch indices"):
        with ttreg.test_time_registers(model, RN, shift_to=[5, 5, 7]):
            pass
    with pytest.raises(ValueError, match="whole patch indices"):
        with ttreg.test_time_registers(model, RN, shift_to=[5.5]):
            pass


# The host's attention arguments (attn_mask, is_causal) and what transformers records inside the
# layers (every return form, on the graph) are host contracts: tests/test_host_contracts.py, per family.


# --- tracers ------------------------------------------------------------------------------------

def test_tracers_refused_in_one_line_and_trace_export_equal_eager(model):
    import torch.fx
    x = mixed_images(2)
    torch.fx.symbolic_trace(planted_vit())                       # the plain model traces
    with torch.no_grad():
        ref_plain = model(x)
        h = ttreg.add_test_time_registers(model, RN)
        ref = model(x)
        for tracer, name in ((torch.jit.script, "torch.jit.script"),
                             (torch.fx.symbolic_trace, "torch.fx symbolic tracing")):
            with pytest.raises(RuntimeError, match=f"^{name} cannot follow test-time registers.*"
                                                   "torch.jit.trace, torch.export"):
                tracer(model)
        traced = torch.jit.trace(model, x, check_trace=False)
        assert torch.equal(traced(x), ref)
        exported = torch.export.export(model, (x,)).module()
        assert (exported(x) - ref).abs().max() <= 1e-5
        h.remove()
        assert torch.equal(model(x), ref_plain)
    assert "registers 1" in repr(ttreg.trace(model, x)) or "registers 0" in repr(ttreg.trace(model, x))
    assert "RegistersHandle(closed" in repr(h)


# --- several registers: assignment and initialisation (the paper's appendix A.5, Table 10) ----------

def test_random_assignment_gives_each_neuron_one_register(model):
    x = mixed_images(3)
    rn = {1: [7, 11, 30], 3: [21, 40]}
    pairs = [(l, n) for l, ns in rn.items() for n in ns]
    with torch.no_grad():
        with ttreg.test_time_registers(model, rn, num_registers=3):
            copy_tr = ttreg.trace(model, x, neurons=pairs)
        with ttreg.test_time_registers(model, rn, num_registers=3, assign="random", seed=1):
            rand_tr = ttreg.trace(model, x, neurons=pairs)
            again = ttreg.trace(model, x, neurons=pairs)
    regs = slice(-3, None)
    c, r = copy_tr.activations[..., regs], rand_tr.activations[..., regs]      # (B, N, R)
    assert torch.equal(c, c[..., :1].expand_as(c))                            # copy: all the same
    assert torch.equal(rand_tr.activations, again.activations)               # seeded
    owner = torch.randint(3, (3,), generator=torch.Generator().manual_seed(1))
    # a restatement: neuron k's value goes to register owner[k] only (layer 1's three neurons
    # are drawn first with the seed, as ttreg draws them), zero in the others
    for k in range(3):
        others = [j for j in range(3) if j != int(owner[k])]
        assert torch.equal(r[:, k, others], torch.zeros_like(r[:, k, others]))
        assert torch.equal(r[:, k, int(owner[k])], c[:, k, 0])
    assert (r != 0).sum(-1).le(1).all()


@pytest.mark.parametrize("init", ["mean", "gaussian"])
def test_register_initialisations_equal_their_restatement(model, init):
    x = mixed_images(2)
    seen = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad(), ttreg.test_time_registers(model, RN, num_registers=4, init=init, seed=3):
            out = model.forward_features(x)
    finally:
        hook.remove()
    xb = seen["x"]                                             # block 0's input, registers appended
    patches = xb[:, 1:-4]
    mean = patches.mean(1, keepdim=True)
    if init == "mean":
        want = mean.expand(-1, 4, -1)
    else:
        noise = torch.randn(2, 4, xb.shape[-1], generator=torch.Generator().manual_seed(3))
        want = mean + patches.std(1, keepdim=True) * noise
    assert torch.equal(xb[:, -4:], want)
    with torch.no_grad(), ttreg.test_time_registers(model, RN, num_registers=4):
        assert not torch.equal(model.forward_features(x), out)
    with pytest.raises(ValueError, match="unknown init"):
        with ttreg.test_time_registers(model, RN, init="ones"):
            pass


def test_assignment_and_initialisation_compile(model):
    import torch._dynamo
    torch._dynamo.reset()
    x = mixed_images(2)
    with torch.no_grad(), ttreg.test_time_registers(model, RN, num_registers=2, assign="random", init="mean"):
        eager = model.forward_features(x)
        compiled = torch.compile(model.forward_features, backend="aot_eager")
        assert (compiled(x) - eager).abs().max() <= 1e-4
    torch._dynamo.reset()
