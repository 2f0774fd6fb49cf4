"""Test-time registers (the paper's Algorithm 2): append R tokens, move register neurons into them.

Small :class:`~ttreg.hooks.OwnedHook` objects, holding only configuration (never data of one
forward pass):

* :class:`AppendRegisters`, a pre-hook on every block: block 0 appends R register tokens to its
  input (zeros after the position embedding, through any ``ln_pre``); every later block takes the
  registers its input carries (:mod:`ttreg.carry`) and appends them again;
* :class:`SplitRegisters`, a forward hook on every block: cuts the registers off the block's
  output and lets that output carry them, so every hidden state a user or a library sees between
  blocks keeps its usual shape;
* :class:`EditNeurons`, a pre-hook on each MLP down-projection with register neurons: for every
  image and neuron it writes the neuron's value into the target tokens (the registers, or chosen
  patches with ``shift_to``) and zeroes it elsewhere -- in block calls whose input carries the
  registers (:class:`MarkCall` on the block's first module tells it, also in a checkpoint
  recomputation that skips block-level hooks).

Blocks that take per-token inputs besides the hidden state (rotary tables, attention masks) get
them extended by the adapter's ``block_io`` (:class:`~ttreg.adapters.base.TokenInputsIO`): a
register has no rotary position, like a prefix token, and is masked in where a batch is padded;
the padding of that block call (``_VALID``) is kept out of the edit.

The attention-bias form (``form="bias"``, the authors' rebuttal) appends no token: the same block
hooks (with zero registers) mark the calls, :class:`EditNeurons` zeroes the neurons on every token,
and :class:`AttendBias`, a pre-hook on each layer's attention module, gives every attention call
one more key and value per head -- the register's mean ones, fitted by :mod:`ttreg.bias` -- through
:mod:`ttreg.attention`.

When do registers apply? An installation has an :class:`Activation`. A handle from
:func:`add_test_time_registers` is *persistent*: every forward of the model, from any thread,
gets registers until ``remove()``. The ``with test_time_registers(...)`` block is *scoped*, like
``torch.no_grad()``: forwards run by this thread (this context) inside the block get registers;
other threads using the same model meanwhile run it plain. Under ``torch.compile`` /
``torch.export`` an installed set always applies to the traced graph.

Presets (see docs/method.md):

``"paper"`` (default)
    per image and per neuron, the targets get the maximum of that neuron over the image's
    tokens; the neuron is zeroed on every other token (CLS included).
``"official"``
    the authors' released code, made batch-correct: per image, one value shared by all of a
    layer's register neurons -- the signed value of largest magnitude over all tokens and those
    neurons; the neurons are zeroed on patch tokens only (prefix tokens such as CLS untouched).

The authors' ablation modes (their ``activate_on_registers``), for either preset:
``normal_values`` says what the tokens that a preset zeroes get instead -- ``"zero"`` (default),
``"mean"`` (their mean over those tokens), ``"only_outliers"`` (only values above that mean + 1
std, unbiased, are set to the mean) or ``"same"`` (left as they are) -- and ``scale`` multiplies
the value written into the targets: a number, or one number per register.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import torch
import torch.nn as nn

from . import attention
from .adapters import Adapter, wrap
from .adapters.base import BlockIO, initial_registers
from .carry import ATTR, attach, carried
from .hooks import HookSet, OwnedHook, owned_hooks, remove_owned_hooks
from .register_neurons import AttentionBias, RegisterNeurons, as_register_neurons

PRESETS = ("paper", "official")
#: ``token``: appended register tokens (the paper); ``bias``: a fitted extra key/value per head in
#: every attention and no token (the rebuttal)
FORMS = ("token", "bias")
NORMAL_VALUES = ("zero", "mean", "only_outliers", "same")

#: scoped activations entered by this context (``with test_time_registers(...)``)
_SCOPE: contextvars.ContextVar[tuple] = contextvars.ContextVar("ttreg_scope", default=())
#: the activation whose registers the block running now (in this context) carries
_CALL: contextvars.ContextVar = contextvars.ContextVar("ttreg_block_call", default=None)
#: ``(B, T)`` bool of the real (non-padding) tokens of that block call, or None if all are real
_VALID: contextvars.ContextVar = contextvars.ContextVar("ttreg_block_valid", default=None)
#: attribute set on block 0's input when registers were appended to it, so that a checkpoint
#: recomputation (possibly in another thread, after the scope) appends them again
_STARTED = "_ttreg_started"
#: attribute of the tensor a block receives with registers appended: their number
_APPENDED = "_ttreg_appended"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class Activation:
    """When one installation's registers apply: always (``persistent``), or in the contexts that
    entered it (a ``with`` block). ``closed`` once removed.

    ``copy.deepcopy`` of a model gives a persistent installation its own activation (the copy's
    registers are independent of the original's handle) and shares a scoped one (inside the
    ``with`` block the copy has registers too; after it, neither has).
    """

    def __init__(self, persistent: bool) -> None:
        self.persistent = persistent
        self.closed = False

    def __deepcopy__(self, memo) -> "Activation":
        if not self.persistent:
            return self
        new = Activation(True)
        new.closed = self.closed
        return new

    def active(self) -> bool:
        if self.closed:
            return False
        if self.persistent or _compiling():
            return True
        return self in _SCOPE.get()


class RegisterHook(OwnedHook):
    """Base of the three register hooks: they share their installation's activation."""

    activation: Activation


class AppendRegisters(RegisterHook):
    """Block pre-hook: append the registers (made fresh at block 0, carried after it)."""

    def __init__(self, activation: Activation, layer: int, num: int, io: BlockIO,
                 pre: nn.Module | None) -> None:
        self.activation, self.layer, self.num, self.io, self.pre = activation, layer, num, io, pre

    def __call__(self, mod, args, kwargs):
        act, io = self.activation, self.io
        x = io.input(args, kwargs)
        xb = io.batch_first(x)
        if self.layer == 0:
            if not (act.active() or getattr(x, _STARTED, None) is act):
                return self._off()
            regs = initial_registers(self.pre, xb.shape[0], self.num, xb)
            if not (act.persistent or _compiling()):
                setattr(x, _STARTED, act)
        else:
            regs = carried(x, act)
            if regs is None:
                if act.active():
                    raise RuntimeError(
                        f"block {self.layer} received hidden states without the test-time registers "
                        "the previous block returned: the model replaces the hidden state between "
                        "blocks, or runs them under re-entrant gradient checkpointing "
                        "(use use_reentrant=False); ttreg cannot carry registers through it")
                return self._off()
            if regs.shape[0] != xb.shape[0]:
                raise RuntimeError(f"block {self.layer}: the carried registers are for a batch of "
                                   f"{regs.shape[0]}, the hidden state has {xb.shape[0]}")
        valid = None if _compiling() else io.valid_tokens(args, kwargs)
        if valid is not None:
            valid = torch.cat([valid.expand(xb.shape[0], -1),
                               valid.new_ones(xb.shape[0], self.num)], dim=1)
        if not _compiling():
            _CALL.set(act)
            _VALID.set(valid)
        if self.num:
            new = torch.cat([xb, regs.to(xb.dtype)], dim=1)
            new = new if io.token_dim == 1 else new.transpose(0, 1)
        else:
            new = x
        setattr(new, _APPENDED, (act, regs, valid))
        args, kwargs = io.replace_input(args, kwargs, new)
        return io.extend_inputs(args, kwargs, self.num)

    def _off(self):
        if not _compiling():
            _CALL.set(None)
            _VALID.set(None)
        return None


class UnmeasuredSizeWarning(UserWarning):
    """Test-time registers used at an input size their neuron set was never measured at."""


class SizeCheck(RegisterHook):
    """Pre-hook on block 0 (only when the neuron set records the sizes it was measured at):
    warn, once per installation and patch count, when an input has a number of patches no
    measured size has. The first block knows an input's size only by its token count, and the
    patch count is what outliers depend on. Holds configuration and the counts already warned
    about (a warnings registry, like Python's own), never data of one forward."""

    def __init__(self, activation: Activation, io: BlockIO, num_prefix: int,
                 measured: dict[int, str]) -> None:
        self.activation, self.io, self.num_prefix, self.measured = activation, io, num_prefix, measured
        self.warned: set[int] = set()

    def __call__(self, mod, args, kwargs):
        if _compiling() or torch.jit.is_tracing() or not self.activation.active():
            return None
        x = self.io.input(args, kwargs)
        patches = int(self.io.batch_first(x).shape[1]) - self.num_prefix
        if patches in self.measured or patches in self.warned:
            return None
        self.warned.add(patches)
        import warnings
        where = ", ".join(f"{v} px ({n} patches)" for n, v in self.measured.items())
        warnings.warn(f"these register neurons were measured at {where}, never on an input of "
                      f"{patches} patches; check them there: ttreg calibrate --neurons FILE "
                      f"--sizes H (or ttreg.calibrate(model, images, neurons=..., sizes=[H]))",
                      UnmeasuredSizeWarning, stacklevel=2)
        return None


class MarkCall(RegisterHook):
    """Pre-hook on the first module inside a block (its pre-attention norm): if the block's input
    carries this installation's registers, the block call is on for the edits below. Block-level
    hooks already say so; this one also runs where a library recomputes a block's ``forward``
    for gradient checkpointing without its block-level hooks (transformers 5)."""

    def __init__(self, activation: Activation) -> None:
        self.activation = activation

    def __call__(self, mod, args):
        if _compiling() or not args:
            return None
        appended = getattr(args[0], _APPENDED, None)
        if appended is not None and appended[0] is self.activation:
            _CALL.set(self.activation)
            _VALID.set(appended[2])
        return None


class SplitRegisters(RegisterHook):
    """Block forward hook: cut the registers off the output; the output carries them on."""

    def __init__(self, activation: Activation, num: int, io: BlockIO) -> None:
        self.activation, self.num, self.io = activation, num, io

    def __call__(self, mod, args, kwargs, output):
        io, act = self.io, self.activation
        appended = getattr(io.input(args, kwargs), _APPENDED, None)
        if appended is None or appended[0] is not act:
            return None
        if not _compiling():
            _CALL.set(None)
            _VALID.set(None)
        y = io.output(output)
        if not self.num:  # shift_to / zeroing: nothing to cut; carry the (empty) marker on
            return io.replace_output(output, attach(y.view_as(y), appended[1], act))
        td = io.token_dim
        n = y.shape[td] - self.num
        regs = io.batch_first(y.narrow(td, n, self.num))
        return io.replace_output(output, attach(y.narrow(td, 0, n), regs, act))


def parse_shift_to(shift_to) -> torch.Tensor | None:
    """``shift_to`` as a long tensor of patch indices (1-D, the same for every image) or a bool
    mask ``(1 or B, num_patches)``; raise a one-line ValueError for anything else."""
    if shift_to is None:
        return None
    try:
        t = shift_to if torch.is_tensor(shift_to) else torch.as_tensor(
            shift_to.tolist() if hasattr(shift_to, "tolist") else shift_to)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError("shift_to must be a list of patch indices or a bool mask "
                         "(num_patches,) / (batch, num_patches)") from None
    if t.dtype == torch.bool:
        if t.dim() not in (1, 2):
            raise ValueError(f"a shift_to mask must be (num_patches,) or (batch, num_patches); "
                             f"got shape {tuple(t.shape)}")
        return t.reshape(1, -1) if t.dim() == 1 else t
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if t.is_floating_point() or t.is_complex():
        bad = t[t != t.round()] if t.is_floating_point() else t
        raise ValueError("shift_to must hold whole patch indices (or bools for a mask); got "
                         f"{bad.flatten()[0].item() if len(bad.flatten()) else t.flatten()[0].item()}")
    if t.dim() > 1:
        raise ValueError("shift_to indices must be 1-D (the same patches for every image); for "
                         "per-image positions pass a (batch, num_patches) bool mask")
    return t.reshape(-1).long()


def shift_mask(shift: torch.Tensor | None, batch: int, num_patches: int,
               device) -> torch.Tensor | None:
    """The ``(B, num_patches)`` bool mask of a parsed ``shift_to`` for one forward."""
    if shift is None:
        return None
    if shift.dtype == torch.bool:
        if shift.shape[1] != num_patches:
            raise ValueError(f"shift_to mask has {shift.shape[1]} patches, the image has {num_patches}")
        if shift.shape[0] not in (1, batch):
            raise ValueError(f"shift_to mask is for {shift.shape[0]} images, the batch has {batch}")
        return shift.to(device).expand(batch, -1)
    if len(shift) and (int(shift.min()) < -num_patches or int(shift.max()) >= num_patches):
        raise ValueError(f"shift_to indices must lie in [0, {num_patches}); got {shift.tolist()}")
    m = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    m[:, shift.to(device)] = True
    return m


def _target_and_zero_masks(batch: int, tokens: int, num_prefix: int, num_registers: int,
                           shift_to: torch.Tensor | None, preset: str,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(B, T)`` masks: where the register value goes, and where the neuron is zeroed."""
    target = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    if num_registers:
        target[:, tokens - num_registers:] = True
    if shift_to is not None:
        patches = shift_to.to(device)
        target[:, num_prefix:num_prefix + patches.shape[1]] |= patches
    if preset == "official":
        zero = torch.zeros_like(target)
        zero[:, num_prefix:tokens - num_registers] = True
        zero &= ~target
    else:
        zero = ~target
    return target, zero


def edit_activations(h: torch.Tensor, neurons: torch.Tensor, target: torch.Tensor,
                     zero: torch.Tensor, preset: str = "paper", normal_values: str = "zero",
                     target_scale: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Return MLP hidden states ``h`` ``(B, T, H)`` with the register edit applied (out of place).

    ``neurons``: long tensor of K neuron indices; ``target``/``zero``: ``(B, T)`` bool masks
    (where the value goes; which other tokens the edit changes). ``normal_values``: what the
    ``zero`` tokens get (see the module docstring). ``target_scale``: ``(T,)`` factor per target
    token (the per-register ``scale``), 1 when None. ``valid``: ``(B, T)`` bool of the real tokens
    when the batch is padded (NaFlex): padding neither gives the value nor receives or loses
    anything. Vectorised over batch, tokens and neurons.
    """
    v = h.index_select(-1, neurons)                                   # (B, T, K)
    if valid is not None:
        target, zero = target & valid, zero & valid
    if preset == "official":  # their sign_max: ties |max| == |min| go to the negative value
        hi_v = v if valid is None else v.masked_fill(~valid[:, :, None], float("-inf"))
        lo_v = v if valid is None else v.masked_fill(~valid[:, :, None], float("inf"))
        hi, lo = hi_v.reshape(v.shape[0], -1).amax(dim=1), lo_v.reshape(v.shape[0], -1).amin(dim=1)
        value = torch.where(hi.abs() > lo.abs(), hi, lo)[:, None, None].expand(-1, 1, v.shape[2])
    else:
        seen = v if valid is None else v.masked_fill(~valid[:, :, None], float("-inf"))
        value = seen.amax(dim=1, keepdim=True)                        # (B, 1, K)
    if target_scale is not None:
        value = value * target_scale.to(v.dtype)[None, :, None]         # (B, T, K)
    out = torch.where(zero[:, :, None], _normal_values(v, zero, normal_values), v)
    out = torch.where(target[:, :, None], value.to(v.dtype), out)
    return h.index_copy(-1, neurons, out)


def _normal_values(v: torch.Tensor, zero: torch.Tensor, mode: str) -> torch.Tensor:
    """What the ``zero`` tokens of ``v`` ``(B, T, K)`` get: 0, their mean, the mean in place of
    values above mean + 1 std (unbiased), or themselves."""
    if mode == "zero":
        return torch.zeros((), dtype=v.dtype, device=v.device)
    if mode == "same":
        return v
    m = zero[:, :, None].to(v.dtype)
    n = m.sum(dim=1, keepdim=True)
    mean = (v * m).sum(dim=1, keepdim=True) / n.clamp_min(1)           # (B, 1, K)
    if mode == "mean":
        return mean.expand_as(v)
    var = ((v - mean) ** 2 * m).sum(dim=1, keepdim=True) / (n - 1).clamp_min(1)
    return torch.where(v > mean + var.sqrt(), mean.expand_as(v), v)


class EditNeurons(RegisterHook):
    """Down-projection pre-hook: move the register neurons of one layer into the targets."""

    def __init__(self, activation: Activation, neurons: torch.Tensor, num_prefix: int,
                 num_registers: int, preset: str, shift: torch.Tensor | None,
                 token_dim: int, normal_values: str = "zero",
                 scale: tuple[float, ...] = (1.0,)) -> None:
        self.activation, self.neurons, self.num_prefix = activation, neurons, num_prefix
        self.num_registers, self.preset, self.shift, self.token_dim = num_registers, preset, shift, token_dim
        self.normal_values, self.scale = normal_values, tuple(float(s) for s in scale)

    def __call__(self, mod, args):
        if not _compiling() and _CALL.get() is not self.activation:
            return None
        h = args[0]
        if not self.num_registers and self.shift is None and self.preset == "paper" \
                and self.normal_values == "zero":
            # zeroing only (the bias form, zero_neurons): the same numbers as the masks below
            return (h.index_fill(-1, self.neurons.to(h.device), 0), *args[1:])
        hb = h if self.token_dim == 1 else h.transpose(0, 1)
        B, T = hb.shape[0], hb.shape[1]
        R, npre = self.num_registers, self.num_prefix
        shift = shift_mask(self.shift, B, T - npre - R, hb.device)
        target, zero = _target_and_zero_masks(B, T, npre, R, shift, self.preset, hb.device)
        valid = None if _compiling() else _VALID.get()
        if valid is not None and tuple(valid.shape) != (B, T):
            valid = None        # a module called outside its block's token layout
        scale = None
        if self.scale != (1.0,):
            scale = torch.full((T,), self.scale[0], device=hb.device)
            if len(self.scale) > 1:
                scale[T - R:] = torch.tensor(self.scale, device=hb.device)
        hb = edit_activations(hb, self.neurons.to(hb.device), target, zero, self.preset,
                              self.normal_values, scale,
                              None if valid is None else valid.to(hb.device))
        return (hb if self.token_dim == 1 else hb.transpose(0, 1), *args[1:])


def _parse_scale(scale, num_registers: int) -> tuple[float, ...]:
    """``scale`` as a tuple: one number for every target, or one per register."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return (float(scale),)
    try:
        vals = tuple(float(s) for s in scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number or a list of numbers, got {scale!r}") from None
    if len(vals) == 1:
        return vals
    if len(vals) != num_registers:
        raise ValueError(f"scale lists one value per register: got {len(vals)} values for "
                         f"{num_registers} registers")
    return vals


class AttendBias(RegisterHook, attention.InterceptHook):
    """Pre-hook on one layer's attention module (the bias form): in block calls that are on, the
    attention gets one more key and value per head, the fitted ones (:mod:`ttreg.attention`).
    Also pushes the call, without the key, where ``trace`` wants this layer's attention maps."""

    def __init__(self, activation: Activation, key: torch.Tensor, value: torch.Tensor,
                 weight: float) -> None:
        self.activation, self.key, self.value = activation, key, value
        self.log_weight = None if weight == 1 else math.log(weight)

    def __call__(self, mod, args):
        on = _compiling() or _CALL.get() is self.activation
        probs = None if _compiling() else attention.wanted(mod)
        if on or probs is not None:
            extra = (self.key, self.value, self.log_weight) if on else None
            attention.enter(attention.AttentionCall(mod, extra=extra, probs=probs))
        return None


def _check_not_compiled(ad: Adapter) -> None:
    """``module.compile()`` compiles in place; compiled code would ignore our hooks."""
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in (ad.model, *ad.blocks)):
        raise RuntimeError(
            "this model was compiled with torch.compile before test-time registers were installed, "
            "and compiled code ignores hooks added later: install registers on the original module "
            "first, then compile (e.g. ttreg.add_test_time_registers(model, neurons); "
            "model = torch.compile(model))")


def _closed(hook) -> bool:
    act = getattr(hook, "activation", None)
    return act is not None and act.closed


def installed(model) -> list[Activation]:
    """The activations of the test-time registers installed on ``model`` and not yet removed."""
    m = model.model if isinstance(model, Adapter) else model
    seen: dict[int, Activation] = {}
    for _, _, hook in owned_hooks(m, AppendRegisters):
        if not hook.activation.closed:
            seen[id(hook.activation)] = hook.activation
    return list(seen.values())


def active_registers(model) -> bool:
    """Would a forward of ``model`` run now, in this context, get test-time registers?"""
    return any(a.active() for a in installed(model))


def remove_test_time_registers(model) -> int:
    """Remove every test-time register hook from ``model`` -- also from a copy made while they
    were installed, or ones whose handle was lost; return how many hooks were removed."""
    m = model.model if isinstance(model, Adapter) else model
    return remove_owned_hooks(m, OwnedHook)


class RegistersHandle:
    """Test-time registers installed on a model; ``remove()`` (or leaving the ``with``) undoes them."""

    def __init__(self, model: nn.Module | Adapter, neurons, num_registers: int | None = None,
                 preset: str = "paper", shift_to=None, check: bool = True, *,
                 normal_values: str = "zero", scale=1.0,
                 scoped: bool = False, zero_only: bool = False, form: str = "token",
                 bias: AttentionBias | None = None) -> None:
        self.adapter = ad = wrap(model)
        _check_not_compiled(ad)
        self.neurons: RegisterNeurons = as_register_neurons(neurons, ad)
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if normal_values not in NORMAL_VALUES:
            raise ValueError(f"unknown normal_values {normal_values!r}; choose one of "
                             f"{', '.join(NORMAL_VALUES)}")
        if num_registers is not None and (isinstance(num_registers, bool) or not isinstance(num_registers, int)):
            raise ValueError(f"num_registers must be a whole number, got {num_registers!r}")
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
        self.form, self.bias = form, None
        if form == "bias":
            self.bias = _bias_for(ad, self.neurons, bias, num_registers, shift_to, check)
            zero_only, num_registers = True, 0
        elif bias is not None:
            raise ValueError("bias= is for form='bias'")
        if num_registers is None:
            num_registers = 0 if shift_to is not None or zero_only else 1
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        if zero_only:
            if num_registers or shift_to is not None:
                raise ValueError("zeroing neurons moves nothing: no registers, no shift_to")
        elif shift_to is not None and num_registers:
            raise ValueError("shift_to writes into patch tokens; pass num_registers=0 with it")
        elif num_registers == 0 and shift_to is None and len(self.neurons):
            raise ValueError("num_registers=0 with register neurons needs shift_to=[patch indices]")
        shift = parse_shift_to(shift_to)
        self.scale = _parse_scale(scale, num_registers)
        if check:
            self.neurons.check_model(ad)
        self.num_registers, self.preset, self.shift_to = num_registers, preset, shift_to
        self.check = check
        self.normal_values = normal_values
        self.activation = Activation(persistent=not scoped)
        remove_owned_hooks(ad.model, OwnedHook, _closed)
        clash = [a for a in installed(ad) if a.persistent or a.active()]
        if clash:
            raise RuntimeError("test-time registers are already active on this model; remove them "
                               "first (handle.remove(), or ttreg.remove_test_time_registers(model))")
        self.hooks = HookSet()
        try:
            if num_registers or len(self.neurons) or (self.bias is not None and self.bias.layers):
                self._install(shift)
        except BaseException:
            self.remove()
            raise

    def _install(self, shift: torch.Tensor | None) -> None:
        ad, act, R = self.adapter, self.activation, self.num_registers
        io, pre = ad.block_io, ad.pre_block_module()
        for i, block in enumerate(ad.blocks):
            self.hooks.pre(block, AppendRegisters(act, i, R, io, pre), prepend=True, with_kwargs=True)
            self.hooks.forward(block, SplitRegisters(act, R, io), prepend=True, with_kwargs=True)
            self.hooks.pre(ad.entry_module(i), MarkCall(act), prepend=True)
        if R:
            for mod, hook in ad.output_trims(R):
                hook.activation = act
                self.hooks.forward(mod, hook, prepend=True)
        sizes = self.neurons.measured_sizes if self.check else None
        if sizes:
            from .sizes import label, num_patches
            measured = {num_patches(s, ad.patch_size): label(s) for s in sizes}
            self.hooks.pre(ad.blocks[0], SizeCheck(act, io, ad.num_prefix_tokens, measured),
                           prepend=True, with_kwargs=True)
        for layer, idx in self.neurons.by_layer().items():
            edit = EditNeurons(act, torch.tensor(idx, dtype=torch.long), ad.num_prefix_tokens, R,
                               self.preset, shift, ad.token_dim, self.normal_values, self.scale)
            self.hooks.pre(ad.down_proj(layer), edit, prepend=True)
        bias, device = self.bias, ad.parameter().device
        for layer in bias.layers if bias is not None else ():
            attn = ad.attention(layer)
            self.hooks.pre(attn, AttendBias(act, bias.key[layer].to(device), bias.value[layer].to(device),
                                            float(bias.weight[layer])), prepend=True)
            self.hooks.forward(attn, attention.ExitCall(), prepend=True, always_call=True)

    def remove(self) -> None:
        """Remove the hooks; idempotent. Copies of the model made inside a ``with`` block lose
        their registers too (their hooks stay, inert, until ``ttreg.remove_test_time_registers``)."""
        self.activation.closed = True
        self.hooks.remove()

    def __enter__(self) -> "RegistersHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _bias_for(ad: Adapter, neurons: RegisterNeurons, bias: AttentionBias | None, num_registers,
              shift_to, check: bool) -> AttentionBias:
    """The attention bias the bias form installs: ``bias``, else the neuron set's own; checked."""
    if num_registers or shift_to is not None:
        raise ValueError("the bias form appends no token and moves nothing: leave num_registers "
                         "and shift_to out")
    bias = bias if bias is not None else neurons.attention_bias
    if bias is None:
        raise ValueError("form='bias' needs a fitted attention bias: "
                         "bias=ttreg.fit_attention_bias(model, neurons, images), or a neuron file "
                         "saved with one")
    if not isinstance(bias, AttentionBias):
        raise TypeError(f"bias must be a ttreg.AttentionBias, got {type(bias).__name__}")
    if check:
        bias.check_model(ad, neurons)
    elif bias.num_layers != ad.num_layers:
        raise ValueError(f"this attention bias has {bias.num_layers} layers, the model {ad.num_layers} blocks")
    for layer in bias.layers:
        if isinstance(ad.attention(layer), nn.MultiheadAttention) and float(bias.weight[layer]) != 1:
            raise ValueError(f"layer {layer}: nn.MultiheadAttention takes one extra key of weight 1 "
                             f"(bias_k), this bias has weight {float(bias.weight[layer]):g}; fit it "
                             "with num_registers=1")
    return bias


def add_test_time_registers(model, neurons, num_registers: int | None = None, preset: str = "paper",
                            shift_to=None, check: bool = True, *, form: str = "token",
                            bias: AttentionBias | None = None, normal_values: str = "zero",
                            scale=1.0) -> RegistersHandle:
    """Install test-time registers on ``model`` for every forward, from any thread, until the
    returned handle's ``remove()``.

    ``neurons``: a :class:`RegisterNeurons`, a ``{layer: [neuron, ...]}`` dict, or a list of
    ``(layer, neuron)`` pairs. ``num_registers`` (default 1; 0 when ``shift_to`` is given) extra
    tokens are appended after the patch tokens and removed from every output, so outputs keep
    their shapes. ``preset``: ``"paper"`` (default) or ``"official"`` (see the module docstring).
    ``shift_to`` writes the values into patches instead of registers: a 1-D list of patch
    indices (the same for every image) or a bool mask ``(num_patches,)`` or
    ``(batch, num_patches)``. ``check=False`` skips the model-fingerprint check.

    ``form="bias"`` installs the attention-bias form instead: no token; every attention of a layer
    gets one more key and value per head, the register's mean ones fitted by
    :func:`ttreg.fit_attention_bias` (``bias=``, else ``neurons.attention_bias``), and the neurons
    are zeroed on every token. It works where a family's attention runs
    ``scaled_dot_product_attention`` or ``nn.MultiheadAttention``.

    Ablations as in the authors' code: ``normal_values`` -- what the tokens the preset zeroes get
    instead: ``"zero"`` (default), ``"mean"``, ``"only_outliers"`` or ``"same"`` -- and
    ``scale``, a factor on the value written into the targets (a number, or a list with one
    number per register).

    Works with gradient checkpointing (non-reentrant), threads, ``copy.deepcopy`` (the copy has
    its own registers; ``ttreg.remove_test_time_registers(copy)`` removes them),
    ``torch.compile`` when compiled *after* installing, and ONNX export (:func:`ttreg.export_onnx`).
    """
    return RegistersHandle(model, neurons, num_registers, preset, shift_to, check, form=form, bias=bias,
                           normal_values=normal_values, scale=scale)


@contextlib.contextmanager
def test_time_registers(model, neurons, num_registers: int | None = None, preset: str = "paper",
                        shift_to=None, check: bool = True, *, form: str = "token",
                        bias: AttentionBias | None = None, normal_values: str = "zero",
                        scale=1.0) -> Iterator[RegistersHandle]:
    """Test-time registers for the forwards this thread runs inside the ``with`` block.

    Arguments as :func:`add_test_time_registers` (``form="bias"``: the attention-bias form).
    Scoped like ``torch.no_grad()``: other threads using the same model meanwhile run it plain.
    Every hook is removed on exit, also on an exception. With gradient checkpointing, call
    ``backward()`` inside the block.
    """
    handle = RegistersHandle(model, neurons, num_registers, preset, shift_to, check, scoped=True,
                             form=form, bias=bias, normal_values=normal_values, scale=scale)
    with _entered(handle):
        yield handle


test_time_registers.__test__ = False  # not a pytest test


@contextlib.contextmanager
def zero_neurons(model, neurons, check: bool = True) -> Iterator[RegistersHandle]:
    """Ablation: ``neurons`` set to 0 on every token, nothing moved anywhere (the paper's
    "register neurons zeroed" control arm), for this thread's forwards inside the block."""
    handle = RegistersHandle(model, neurons, 0, "paper", None, check, scoped=True, zero_only=True)
    with _entered(handle):
        yield handle


@contextlib.contextmanager
def _entered(handle: RegistersHandle) -> Iterator[RegistersHandle]:
    token = _SCOPE.set(_SCOPE.get() + (handle.activation,))
    try:
        yield handle
    finally:
        _SCOPE.reset(token)
        handle.remove()


__all__ = ["FORMS", "PRESETS", "NORMAL_VALUES", "RegistersHandle", "UnmeasuredSizeWarning", "add_test_time_registers", "test_time_registers",
           "zero_neurons", "remove_test_time_registers", "installed", "active_registers",
           "edit_activations", "ATTR"]
