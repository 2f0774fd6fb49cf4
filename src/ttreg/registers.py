"""Test-time registers (the paper's Algorithm 2): append R tokens, move register neurons into them.

Two parts, configuration and mechanism:

* An :class:`Edit` is what one set of registers does: the neurons of each layer, R, the preset,
  ``shift_to``, the ablation modes, the attention bias, how registers are initialised and which
  register each neuron writes to. Frozen; made once per ``add_test_time_registers`` /
  ``with test_time_registers``.
* :class:`Sites` are ttreg's hooks on one model, **installed once** (the first time the model gets
  registers) and inert whenever no edit is active: a pre-hook and a forward hook on every block,
  a pre-hook on every MLP down-projection, a pre-hook and a forward hook on every attention, and
  the family's output trims. A handle from :func:`add_test_time_registers` makes its edit the
  sites' *persistent* edit (every forward, any thread); a ``with test_time_registers(...)`` block
  enters its edit into this context's scope (:data:`ttreg.calls.SCOPE`), like ``torch.no_grad()``.
  Neither adds or removes hooks, so another thread running the model meanwhile never sees half a
  registration; the model's hook dictionaries change only when the sites are installed and when
  they are removed (a persistent handle's ``remove()`` with nothing else active, or
  :func:`remove_test_time_registers`).

One forward, block by block (the per-call state is a :class:`~ttreg.calls.RegisterCall`):
block 0's pre-hook asks which edit is active (:meth:`Sites.active_edit`) and makes the initial
registers (zeros after the position embedding, through any ``ln_pre``); every later block takes
the registers its input carries. The pre-hook appends them, extends the block's other per-token
inputs (rotary tables, attention masks: the adapter's ``block_io``), tags the appended input with
the block's call and sets :data:`~ttreg.calls.CALL`; the down-projection pre-hook moves the
layer's neurons into the targets (the registers, or chosen patches with ``shift_to``); the
attention pre-hook adds the fitted key and value of the bias form (:mod:`ttreg.attention`); the
block's forward hook cuts the registers off the output, which carries them on, and resets the
call (also when the block raised). So every hidden state a user or a library sees between blocks
keeps its usual shape.

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

With several registers (the paper's appendix A.5): ``assign="copy"`` (default, the authors'
code) writes every neuron into every register; ``assign="random"`` gives each register neuron
one register, drawn with ``seed``, so registers hold different neurons. ``init`` is what a
register starts as (Table 10): ``"zero"`` (default: zeros after the position embedding),
``"mean"`` (the image's mean patch token as block 0 receives it) or ``"gaussian"`` (a draw, seeded,
from a Gaussian with the per-channel mean and std of the image's patch tokens there).
"""
from __future__ import annotations

import contextlib
import gc
import math
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx
import torch.nn as nn

from . import attention
from .adapters import Adapter, wrap
from .adapters.base import BlockIO, initial_registers
from .calls import CALL, RegisterCall, current, entered, in_backward, in_scope, tag, tagged
from .hooks import OwnedHook, owned_hooks, remove_owned_hooks
from .register_neurons import AttentionBias, RegisterNeurons, as_register_neurons

PRESETS = ("paper", "official")
#: ``token``: appended register tokens (the paper); ``bias``: a fitted extra key/value per head in
#: every attention and no token (the rebuttal)
FORMS = ("token", "bias")
NORMAL_VALUES = ("zero", "mean", "only_outliers", "same")
ASSIGNS = ("copy", "random")
INITS = ("zero", "mean", "gaussian")

REENTRANT = ("block {layer}: re-entrant gradient checkpointing (use_reentrant=True) re-runs blocks "
             "on detached inputs, which drops the test-time registers and their gradients; use "
             "use_reentrant=False (timm: set_grad_checkpointing(True); transformers: "
             "gradient_checkpointing_enable({{'use_reentrant': False}}))")

TRACER_REFUSAL = ("{tracer} cannot follow test-time registers (they are decided per forward call); "
                  "use torch.jit.trace, torch.export, torch.compile or ttreg.export_onnx, which do "
                  "(docs/method.md, 'Tracers and compilers'); ttreg.remove_test_time_registers(model) "
                  "takes ttreg's hooks off a model that no longer needs them")

PACKED_COMPILE = ("test-time registers on a tower that packs images into one sequence (cu_seqlens: "
                  "Qwen2-VL, Qwen3-VL) need each call's image layout, which torch.compile does not "
                  "carry to the MLP; run that tower eagerly")

#: installing and removing sites (the only changes to a model's hook dictionaries)
_INSTALL = threading.Lock()


class UnmeasuredSizeWarning(UserWarning):
    """Test-time registers used at an input size their neuron set was never measured at."""


class Key:
    """Names one installation of sites; shared by the model's copies (``copy.deepcopy``), so an
    edit entered in a ``with`` block applies to a copy made inside it as well."""

    def __deepcopy__(self, memo) -> "Key":
        return self


@dataclass(frozen=True, eq=False)
class LayerEdit:
    """The register neurons of one layer: their indices ``(K,)`` and, with ``assign="random"``, the
    register each one writes to ``(K,)`` (None: every register)."""

    neurons: torch.Tensor
    register: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class Edit:
    """What one set of test-time registers does (configuration only; see the module docstring)."""

    key: Key
    num_registers: int
    layers: dict[int, LayerEdit]
    preset: str = "paper"
    shift: torch.Tensor | None = None
    normal_values: str = "zero"
    scale: tuple[float, ...] = (1.0,)
    #: ``{layer: (key (heads, d), value (heads, dv), log_weight or None)}`` (the bias form)
    bias: dict[int, tuple] = field(default_factory=dict)
    init: str = "zero"
    seed: int = 0
    #: ``{patch count: size label}`` the neuron set was measured at (None: unknown)
    measured: dict[int, str] | None = None
    #: patch counts already warned about (a warnings registry, like Python's own)
    warned: set = field(default_factory=set)

    @property
    def static_call(self) -> RegisterCall:
        """The call that stands for every block call while ``torch.compile`` traces."""
        call = self.__dict__.get("_static")
        if call is None:
            call = RegisterCall(self)
            object.__setattr__(self, "_static", call)
        return call

    @property
    def appends(self) -> bool:
        """Does this edit change the attention's token set (registers, or the bias key)?"""
        return bool(self.num_registers or self.bias)

    def __repr__(self) -> str:
        return (f"Edit(R={self.num_registers}, layers={sorted(self.layers)}, preset={self.preset!r}, "
                f"bias={bool(self.bias)})")



# --- the edit of one layer -------------------------------------------------------------------------

def parse_shift_to(shift_to) -> torch.Tensor | None:
    """``shift_to`` as a long tensor of patch indices (1-D, the same for every image) or a bool
    mask ``(1 or B, num_patches)``; raise a one-line ValueError for anything else.

    Masks: bool, or 0/1 values of dtype uint8 (a mask by PyTorch's old convention), or a 0/1
    integer array that repeats a value (a list of indices never does); whole floats are indices."""
    if shift_to is None:
        return None
    try:
        t = shift_to if torch.is_tensor(shift_to) else torch.as_tensor(
            shift_to.tolist() if hasattr(shift_to, "tolist") else shift_to)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError("shift_to must be a list of patch indices or a bool mask "
                         "(num_patches,) / (batch, num_patches)") from None
    if t.is_complex():
        raise ValueError("shift_to must hold whole patch indices (or bools for a mask)")
    if t.is_floating_point():
        bad = t[t != t.round()]
        if bad.numel():
            raise ValueError(f"shift_to must hold whole patch indices (or bools for a mask); got "
                             f"{bad.flatten()[0].item()}")
        t = t.long()
    if t.dtype != torch.bool and t.numel():
        zero_one = bool(((t == 0) | (t == 1)).all())
        repeats = t.dim() == 1 and t.unique().numel() < t.numel()
        if zero_one and (t.dtype == torch.uint8 or t.dim() == 2 or repeats):
            t = t.bool()
        elif repeats:
            raise ValueError(f"shift_to repeats patch indices ({t.tolist()[:8]}...); give each "
                             "patch once, or a bool mask (num_patches,)")
    if t.dtype == torch.bool:
        if t.dim() not in (1, 2):
            raise ValueError(f"a shift_to mask must be (num_patches,) or (batch, num_patches); "
                             f"got shape {tuple(t.shape)}")
        return t.reshape(1, -1) if t.dim() == 1 else t
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
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


def target_and_zero_masks(batch: int, tokens: int, num_prefix: int, num_registers: int,
                          shift_to: torch.Tensor | None, preset: str, device: torch.device,
                          register: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks, where the register value goes and where the neuron is zeroed: ``(B, T)``,
    or ``(B, T, K)`` when ``register`` ``(K,)`` gives each of K neurons its one register."""
    target = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    if num_registers:
        target[:, tokens - num_registers:] = True
    if shift_to is not None:
        target[:, num_prefix:num_prefix + shift_to.shape[1]] |= shift_to.to(device)
    if register is not None and num_registers:
        own = torch.zeros(tokens, register.numel(), dtype=torch.bool, device=device)
        own[tokens - num_registers + register.to(device), torch.arange(register.numel(), device=device)] = True
        target = target[:, :, None] & own[None]                        # (B, T, K)
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

    ``neurons``: long tensor of K neuron indices; ``target``/``zero``: ``(B, T)`` bool masks, or
    ``(B, T, K)`` per neuron (where the value goes; which other tokens the edit changes).
    ``normal_values``: what the ``zero`` tokens get (see the module docstring). ``target_scale``:
    ``(T,)`` factor per target token (the per-register ``scale``), 1 when None. ``valid``: ``(B, T)``
    bool of the real tokens when the batch is padded (NaFlex): padding neither gives the value nor
    receives or loses anything. Vectorised over batch, tokens and neurons.
    """
    v = h.index_select(-1, neurons)                                   # (B, T, K)
    t3 = target if target.dim() == 3 else target[:, :, None]
    z3 = zero if zero.dim() == 3 else zero[:, :, None]
    if valid is not None:
        t3, z3 = t3 & valid[:, :, None], z3 & valid[:, :, None]
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
    out = torch.where(z3, _normal_values(v, z3, normal_values), v)
    out = torch.where(t3, value.to(v.dtype), out)
    return h.index_copy(-1, neurons, out)


def _normal_values(v: torch.Tensor, zero: torch.Tensor, mode: str) -> torch.Tensor:
    """What the ``zero`` tokens ``(B, T, 1 or K)`` of ``v`` ``(B, T, K)`` get: 0, their mean, the
    mean in place of values above mean + 1 std (unbiased), or themselves."""
    if mode == "zero":
        return torch.zeros((), dtype=v.dtype, device=v.device)
    if mode == "same":
        return v
    m = zero.to(v.dtype)
    n = m.sum(dim=1, keepdim=True)
    mean = (v * m).sum(dim=1, keepdim=True) / n.clamp_min(1)           # (B, 1, K)
    if mode == "mean":
        return mean.expand_as(v)
    var = ((v - mean) ** 2 * m).sum(dim=1, keepdim=True) / (n - 1).clamp_min(1)
    return torch.where(v > mean + var.sqrt(), mean.expand_as(v), v)


def apply_edit(hb: torch.Tensor, edit: Edit, le: LayerEdit, num_prefix: int,
               valid: torch.Tensor | None) -> torch.Tensor:
    """One layer's edit on its MLP hidden states ``hb`` ``(B, T, H)`` (batch-first)."""
    neurons = le.neurons.to(hb.device)
    R = edit.num_registers
    if not R and edit.shift is None and edit.preset == "paper" and edit.normal_values == "zero":
        # zeroing only (the bias form, zero_neurons): the same numbers as the masks below
        return hb.index_fill(-1, neurons, 0)
    B, T = hb.shape[0], hb.shape[1]
    shift = shift_mask(edit.shift, B, T - num_prefix - R, hb.device)
    target, zero = target_and_zero_masks(B, T, num_prefix, R, shift, edit.preset, hb.device, le.register)
    if valid is not None and tuple(valid.shape) != (B, T):
        valid = None        # a module called outside its block's token layout
    scale = None
    if edit.scale != (1.0,):
        scale = torch.full((T,), edit.scale[0], device=hb.device, dtype=hb.dtype)
        if len(edit.scale) > 1:
            scale[T - R:] = torch.tensor(edit.scale, device=hb.device, dtype=hb.dtype)
    return edit_activations(hb, neurons, target, zero, edit.preset, edit.normal_values, scale,
                            None if valid is None else valid.to(hb.device))


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
    else:
        bias.check_fits(ad)
    for layer in bias.layers:
        if isinstance(ad.attention(layer), nn.MultiheadAttention) and float(bias.weight[layer]) != 1:
            raise ValueError(f"layer {layer}: nn.MultiheadAttention takes one extra key of weight 1 "
                             f"(bias_k), this bias has weight {float(bias.weight[layer]):g}; fit it "
                             "with num_registers=1")
    return bias


# --- the sites: hooks installed once per model ------------------------------------------------------

class Sites:
    """ttreg's hooks on one model (configuration only, never data of one forward): which edit is
    active, and what the hooks need to know about the family (block I/O, prefix count, the module
    before the first block). Holds no reference to the model or its blocks, so a copied block does
    not copy the model."""

    def __init__(self, ad: Adapter) -> None:
        self.key = Key()
        #: the edit of a persistent handle (every forward), or None
        self.persistent: Edit | None = None
        #: ``with`` blocks open on these sites, over all threads
        self.scoped = 0
        self.io: BlockIO = ad.block_io
        self.pre: nn.Module | None = ad.pre_block_module()
        self.num_prefix = ad.num_prefix_tokens
        self.num_layers = ad.num_layers
        #: ``f(block) -> bool``: will the family's own checkpointing re-run this block re-entrantly?
        self.reentrant = ad.reentrant_checkpointing
        #: ``f(attention) -> bool``: does it compute its probabilities explicitly and return them?
        self.records = ad.records_attention

    def __deepcopy__(self, memo) -> "Sites":
        import copy
        new = Sites.__new__(Sites)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, v if k in ("key", "scoped", "reentrant", "records") else copy.deepcopy(v, memo))
        return new

    def __getstate__(self) -> dict:
        return {**self.__dict__, "scoped": 0}

    def active_edit(self) -> Edit | None:
        """The edit for a forward starting now in this context: the persistent one, else the
        innermost ``with`` block's on these sites (or on the model this one was copied from)."""
        if self.persistent is not None:
            return self.persistent
        for edit in in_scope(Edit):
            if edit.key is self.key:
                return edit
        return None

    # --- one forward ---------------------------------------------------------------------------
    def begin(self, block: nn.Module, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Block ``layer``'s pre-hook: its call, or None for a plain call."""
        io = self.io
        x = io.input(args, kwargs)
        prev = tagged(x, self.key)
        fresh = False                    # block 0 makes the registers
        if layer == 0:
            edit = self.active_edit()
            if edit is None and prev is not None and in_backward():
                edit, regs = prev.edit, prev.registers        # a checkpoint recomputation
            elif edit is None:
                return self._plain()
            else:
                fresh, regs = True, None
        elif prev is None:
            if self.active_edit() is not None:
                raise RuntimeError(
                    f"block {layer} received a hidden state without the test-time registers the "
                    "block before it returned: it was detached (re-entrant gradient checkpointing, "
                    "use_reentrant=True: use use_reentrant=False) or the model rebuilds the hidden "
                    "state between blocks, which ttreg cannot carry registers through")
            return self._plain()
        else:
            edit, regs = prev.edit, prev.registers
        if x.requires_grad and (not torch.is_grad_enabled() or (
                layer and regs is not None and regs.shape[1] and not regs.requires_grad)) \
                or self.reentrant(block):
            # a block run without autograd on an input that needs gradients, or registers that lost
            # theirs between blocks: re-entrant checkpointing, which re-runs it on a detached copy
            raise RuntimeError(REENTRANT.format(layer=layer))
        if edit.appends and io.causal(args, kwargs):
            raise RuntimeError("test-time registers are for bidirectional (ViT) attention: this block "
                               "is called with is_causal=True, so no token could attend to them")
        R = edit.num_registers
        packing = io.packing(args, kwargs, R)
        xb = self._batch(io, x, packing)
        if fresh:
            if packing is not None and packing.padded and edit.init != "zero" and R:
                raise ValueError(f"init={edit.init!r} takes each image's mean patch token, which "
                                 "a packed sequence of images of different sizes does not give "
                                 "here; use init='zero' (the default)")
            regs = self.initial(edit, xb)
            tag(x, RegisterCall(edit, regs))                  # for a checkpoint recomputation
        if regs is not None and regs.shape[0] != xb.shape[0]:
            raise RuntimeError(f"block {layer}: the carried registers are for a batch of "
                               f"{regs.shape[0]}, the hidden state has {xb.shape[0]}")
        call = RegisterCall(edit, regs, None, x)
        if packing is not None:          # one packed sequence of images: registers per segment
            if edit.shift is not None:
                raise ValueError("shift_to is not available on towers that pack several images into "
                                 "one sequence (cu_seqlens); use appended registers")
            call.layout, call.valid = packing, packing.valid
        if not torch.compiler.is_compiling():
            if layer == 0 and edit.measured:
                self._check_size(edit, xb.shape[1])
            valid = io.valid_tokens(args, kwargs)
            if valid is not None:
                call.valid = torch.cat([valid.expand(xb.shape[0], -1), valid.new_ones(xb.shape[0], R)], 1)
            call.token = CALL.set(call)
        if R and packing is not None:
            new = packing.append(x, regs)
        elif R:
            new = torch.cat([xb, regs.to(xb.dtype)], dim=1)
            new = new if io.token_dim == 1 else new.transpose(0, 1)
        else:
            new = x.view_as(x)           # its own tensor object, so the tag is this block's
        args, kwargs = io.replace_input(args, kwargs, tag(new, call))
        return io.extend_inputs(args, kwargs, R)

    @staticmethod
    def _batch(io: BlockIO, x: torch.Tensor, packing) -> torch.Tensor:
        """A block's input ``x`` batch-first ``(B, T, D)``; a packed sequence of images (its
        ``packing``) padded to ``(images, longest, D)``."""
        return io.batch_first(x) if packing is None else packing.plain.batch(x)

    def _plain(self) -> None:
        if CALL.get() is not None:       # an interrupted forward (Ctrl-C) left its call
            CALL.set(None)
        return None

    def enter_block(self, x: torch.Tensor) -> None:
        """The block's first module's pre-hook: a block whose ``forward`` runs without its
        block-level hooks -- transformers recomputes a checkpointed layer's ``forward`` alone -- is
        still on, from the call its input is tagged with."""
        call = tagged(x, self.key)
        if call is None:
            if self.active_edit() is not None and in_backward():
                raise RuntimeError(REENTRANT.format(layer="?"))
            return
        if call.visible is not None and current(self) is None:
            CALL.set(call)               # cleared by the next forward's first block

    def end(self, args: tuple, kwargs: dict, output: Any) -> Any:
        """A block's forward hook: cut the registers off the output, which carries them on."""
        call = tagged(self.io.input(args, kwargs), self.key)
        if call is None or call.visible is None:   # a plain call (or a carried tag, not a call)
            return None
        if call.token is not None:
            CALL.reset(call.token)
            call.token = None
        if output is None:               # the block raised: nothing to cut
            return None
        io, R = self.io, call.edit.num_registers
        y = io.output(output)
        td = io.token_dim
        if R and call.layout is not None:
            y, regs = call.layout.cut(y)
        elif R:
            n = y.shape[td] - R
            regs, y = io.batch_first(y.narrow(td, n, R)), y.narrow(td, 0, n)
        else:
            regs, y = call.registers, y.view_as(y)
        return io.replace_output(output, tag(y, RegisterCall(call.edit, regs)))

    def initial(self, edit: Edit, xb: torch.Tensor) -> torch.Tensor:
        """The registers block 0 appends to ``xb`` ``(B, T, D)`` (see ``init`` in the module docstring)."""
        B, R = xb.shape[0], edit.num_registers
        if edit.init == "zero" or not R:
            return initial_registers(self.pre, B, R, xb)
        patches = xb[:, self.num_prefix:]
        mean = patches.mean(dim=1, keepdim=True)                           # (B, 1, D)
        if edit.init == "mean":
            return mean.expand(B, R, -1)
        std = patches.std(dim=1, keepdim=True)
        gen = torch.Generator(device=xb.device).manual_seed(edit.seed)
        noise = torch.randn(B, R, xb.shape[-1], generator=gen, device=xb.device, dtype=xb.dtype)
        return mean + std * noise

    def _check_size(self, edit: Edit, tokens: int) -> None:
        """Warn, once per edit and patch count, at a patch count no measured size has."""
        patches = tokens - self.num_prefix
        if torch.jit.is_tracing() or patches in edit.measured or patches in edit.warned:
            return
        edit.warned.add(patches)
        where = ", ".join(f"{v} px ({n} patches)" for n, v in edit.measured.items())
        warnings.warn(f"these register neurons were measured at {where}, never on an input of "
                      f"{patches} patches; check them there: ttreg calibrate --neurons FILE "
                      f"--sizes H (or ttreg.calibrate(model, images, neurons=..., sizes=[H]))",
                      UnmeasuredSizeWarning, stacklevel=4)


class SiteHook(OwnedHook):
    """Base of the hooks that make up :class:`Sites`. Each tolerates being called with the
    signature of a hook registered without keyword arguments: PyTorch registers a keyword hook in
    two dictionaries one after the other, so a forward in another thread can meet it half
    registered (it is then inert; that forward is a plain one)."""

    def __init__(self, sites: Sites, layer: int) -> None:
        self.sites, self.layer = sites, layer

    @property
    def __name__(self) -> str:
        """TorchScript compiles a module's hooks from their source, by name: refused in one line."""
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("torch.jit"):
            raise RuntimeError(TRACER_REFUSAL.format(tracer="torch.jit.script"))
        raise AttributeError("__name__")


class BlockEntry(SiteHook):
    """Block pre-hook (with kwargs): start the block's call (:meth:`Sites.begin`)."""

    def __call__(self, mod, args, kwargs=None):
        if kwargs is None:
            return None
        if isinstance(self.sites.io.input(args, kwargs), torch.fx.Proxy):
            if self.sites.active_edit() is not None:
                raise RuntimeError(TRACER_REFUSAL.format(tracer="torch.fx symbolic tracing"))
            return None
        return self.sites.begin(mod, self.layer, args, kwargs)


class EntrySite(SiteHook):
    """Pre-hook on the first module inside a block (:meth:`Sites.enter_block`)."""

    def __call__(self, mod, args):
        if args:
            self.sites.enter_block(args[0])
        return None


class BlockExit(SiteHook):
    """Block forward hook (with kwargs, ``always_call``): end the block's call (:meth:`Sites.end`)."""

    def __call__(self, mod, args, *rest):
        if len(rest) != 2:
            return None
        return self.sites.end(args, rest[0], rest[1])


class EditSite(SiteHook):
    """Down-projection pre-hook: move the register neurons of its layer into the targets."""

    def __init__(self, sites: Sites, layer: int, token_dim: int) -> None:
        super().__init__(sites, layer)
        self.token_dim = token_dim

    def __call__(self, mod, args):
        call = current(self.sites)
        if call is None:
            return None
        edit = call.edit
        le = edit.layers.get(self.layer)
        if le is None:
            return None
        h = args[0]
        pk = call.layout
        if pk is not None and h.dim() == 2 and h.shape[0] == pk.total:    # a packed sequence
            hb = apply_edit(pk.batch(h), edit, le, self.sites.num_prefix, pk.valid)
            return (pk.unbatch(hb), *args[1:])
        if h.dim() == 2:                 # a packed sequence whose layout this call does not have
            raise RuntimeError(PACKED_COMPILE)
        hb = h if self.token_dim == 1 else h.transpose(0, 1)
        hb = apply_edit(hb, edit, le, self.sites.num_prefix, call.valid)
        return (hb if self.token_dim == 1 else hb.transpose(0, 1), *args[1:])


class AttentionSite(SiteHook, attention.InterceptHook):
    """Attention pre-hook: in calls that are on, the bias form's extra key and value per head
    (:mod:`ttreg.attention`), and, in an attention that returns its probabilities, their visible
    block on the graph; also where ``trace`` wants this layer's attention maps."""

    def __call__(self, mod, args):
        call = current(self.sites)
        extra = call.edit.bias.get(self.layer) if call is not None else None
        probs = attention.wanted(mod)
        regs = None
        if call is not None and call.edit.num_registers and self.sites.records(mod):
            regs = (call.edit, call.edit.num_registers)
        if extra is not None or probs is not None or regs is not None:
            attention.enter(attention.AttentionCall(mod, extra=extra, probs=probs, registers=regs))
        return None


class TrimSite(SiteHook):
    """Forward hook of a module that returns what a library recorded *inside* the blocks
    (transformers' ``hidden_states`` and ``attentions``): the family's ``trim`` makes them what the
    plain model returns."""

    def __init__(self, sites: Sites, trim) -> None:
        super().__init__(sites, -1)
        self.trim = trim

    def __call__(self, mod, args, output):
        edit = self.sites.active_edit()
        if edit is None or not edit.num_registers:
            return None
        return self.trim(output, edit.num_registers)


def find_sites(model: nn.Module | Adapter) -> Sites | None:
    """The sites installed on ``model``, or None."""
    ad = model if isinstance(model, Adapter) else None
    m = ad.model if ad is not None else model
    for _, _, hook in owned_hooks(m, BlockEntry):
        return hook.sites
    return None


def _refuse_compiled(ad: Adapter) -> None:
    """Compiled code ignores hooks added after it was compiled: refuse registers on a model
    (or any of its modules) compiled before ttreg's sites were installed."""
    from torch._dynamo.eval_frame import OptimizedModule
    what = None
    for name, mod in ad.model.named_modules():
        if isinstance(mod, OptimizedModule) or getattr(mod, "_compiled_call_impl", None) is not None:
            what = f"its module {name!r}" if name else "it"
            break
    if what is None and any(issubclass(type(o), OptimizedModule) and o._orig_mod is ad.model
                            for o in gc.get_objects()):
        what = "a torch.compile wrapper of it"
    if what is not None:
        raise RuntimeError(
            f"this model was compiled with torch.compile ({what}) before test-time registers were "
            "installed, and compiled code ignores hooks added later: install registers on the "
            "original module first, then compile (ttreg.add_test_time_registers(model, neurons); "
            "model = torch.compile(model))")


def _fit(ad: Adapter, sites: Sites) -> bool:
    """Do the installed ``sites`` still sit where the model's parts are now (a library may have
    swapped modules since -- peft's ``merge_and_unload`` -- or changed the blocks' layout)?"""
    def has(mod, kind, hooks="_forward_pre_hooks"):
        return any(isinstance(h, kind) and h.sites is sites for h in getattr(mod, hooks).values())
    if sites.io != ad.block_io or sites.num_prefix != ad.num_prefix_tokens \
            or sites.num_layers != ad.num_layers:
        return False
    return all(has(b, BlockEntry) and has(ad.down_proj(i), EditSite) and has(ad.attention(i), AttentionSite)
               and has(ad.entry_module(i), EntrySite) for i, b in enumerate(ad.blocks))


def install_sites(ad: Adapter) -> Sites:
    """The model's sites, installed now if it has none (the one time its hooks change), or
    installed anew where the model's parts changed since."""
    with _INSTALL:
        sites = find_sites(ad)
        if sites is not None:
            if _fit(ad, sites):
                return sites
            _uninstall(ad.model, sites)
        _refuse_compiled(ad)
        sites = Sites(ad)
        try:
            for i, block in enumerate(ad.blocks):
                block.register_forward_pre_hook(BlockEntry(sites, i), prepend=True, with_kwargs=True)
                block.register_forward_hook(BlockExit(sites, i), prepend=True, with_kwargs=True,
                                            always_call=True)
                ad.down_proj(i).register_forward_pre_hook(EditSite(sites, i, ad.token_dim), prepend=True)
                attn = ad.attention(i)
                attn.register_forward_pre_hook(AttentionSite(sites, i), prepend=True)
                attn.register_forward_hook(attention.ExitCall(sites), prepend=True, always_call=True)
                # registered last and prepended, so it runs first (the entry may be the attention)
                ad.entry_module(i).register_forward_pre_hook(EntrySite(sites, i), prepend=True)
            for mod, trim in ad.output_trims():
                mod.register_forward_hook(TrimSite(sites, trim), prepend=True)
        except BaseException:
            _uninstall(ad.model, sites)
            raise
        return sites


def _uninstall(model: nn.Module, sites: Sites) -> int:
    return remove_owned_hooks(model, OwnedHook, lambda h: getattr(h, "sites", None) is sites)

# --- making an edit, and the public calls ----------------------------------------------------------

def make_edit(ad: Adapter, sites_key: Key, neurons: RegisterNeurons, num_registers: int | None,
              preset: str, shift_to, check: bool, normal_values: str, scale, zero_only: bool,
              form: str, bias: AttentionBias | None, assign: str, init: str, seed: int) -> Edit:
    """Validate every option once and make the :class:`Edit` (one-line errors before any work)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if normal_values not in NORMAL_VALUES:
        raise ValueError(f"unknown normal_values {normal_values!r}; choose one of {', '.join(NORMAL_VALUES)}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    if assign not in ASSIGNS:
        raise ValueError(f"unknown assign {assign!r}; choose one of {', '.join(ASSIGNS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    if num_registers is not None and (isinstance(num_registers, bool) or not isinstance(num_registers, int)):
        raise ValueError(f"num_registers must be a whole number, got {num_registers!r}")
    attn_bias = None
    if form == "bias":
        attn_bias = _bias_for(ad, neurons, bias, num_registers, shift_to, check)
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
    elif num_registers == 0 and shift_to is None and len(neurons):
        raise ValueError("num_registers=0 with register neurons needs shift_to=[patch indices]")
    if (assign != "copy" or init != "zero") and not num_registers:
        raise ValueError("assign= and init= are for appended registers (num_registers >= 1)")
    shift = parse_shift_to(shift_to)
    scale_t = _parse_scale(scale, num_registers)
    if check:
        neurons.check_model(ad)
    device = ad.parameter().device
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for layer, idx in neurons.by_layer().items():
        reg = None
        if assign == "random" and num_registers:
            reg = torch.randint(num_registers, (len(idx),), generator=gen, dtype=torch.long).to(device)
        layers[layer] = LayerEdit(torch.tensor(idx, dtype=torch.long, device=device), reg)
    extra = {}
    for layer in attn_bias.layers if attn_bias is not None else ():
        w = float(attn_bias.weight[layer])
        extra[layer] = (attn_bias.key[layer].to(device), attn_bias.value[layer].to(device),
                        None if w == 1 else math.log(w))
    measured = None
    if check and neurons.measured_sizes:
        from .sizes import label, num_patches
        measured = {num_patches(s, ad.patch_size): label(s) for s in neurons.measured_sizes}
    return Edit(sites_key, num_registers, layers, preset, shift, normal_values, scale_t, extra,
                init, seed, measured)


class RegistersHandle:
    """Test-time registers on a model: a persistent handle (:func:`add_test_time_registers`;
    ``remove()`` ends it) or a ``with`` block's (:func:`test_time_registers`)."""

    def __init__(self, model: nn.Module | Adapter, neurons, num_registers: int | None = None,
                 preset: str = "paper", shift_to=None, check: bool = True, *,
                 normal_values: str = "zero", scale=1.0,
                 scoped: bool = False, zero_only: bool = False, form: str = "token",
                 bias: AttentionBias | None = None, assign: str = "copy", init: str = "zero",
                 seed: int = 0) -> None:
        self.adapter = ad = wrap(model)
        self.neurons: RegisterNeurons = as_register_neurons(neurons, ad)
        existing = find_sites(ad)
        if existing is None or not _fit(ad, existing):
            _refuse_compiled(ad)
        key = existing.key if existing is not None else Key()
        self.edit = make_edit(ad, key, self.neurons, num_registers, preset, shift_to, check,
                              normal_values, scale, zero_only, form, bias, assign, init, seed)
        self.form, self.preset, self.shift_to, self.check = form, preset, shift_to, check
        self.num_registers, self.normal_values = self.edit.num_registers, normal_values
        self.scale, self.assign, self.init, self.seed = self.edit.scale, assign, init, seed
        self.bias = self.neurons.attention_bias if form == "bias" and bias is None else bias
        self.scoped, self.closed = scoped, False
        sites = install_sites(ad)
        if sites.key is not key:           # installed anew, or meanwhile by another thread
            object.__setattr__(self.edit, "key", sites.key)
        self.sites = sites
        with _INSTALL:
            if sites.persistent is not None or sites.active_edit() is not None:
                raise RuntimeError("test-time registers are already active on this model; remove "
                                   "them first (handle.remove(), or ttreg.remove_test_time_registers(model))")
            if scoped:
                sites.scoped += 1
            else:
                sites.persistent = self.edit

    def remove(self) -> None:
        """End these registers; idempotent. A persistent handle also takes ttreg's hooks off the
        model when no ``with`` block is open on it (a ``with`` block leaves them, inert)."""
        if self.closed:
            return
        self.closed = True
        sites = self.sites
        with _INSTALL:
            if self.scoped:
                sites.scoped -= 1
                return
            if sites.persistent is self.edit:
                sites.persistent = None
            if not sites.scoped and find_sites(self.adapter) is sites:
                _uninstall(self.adapter.model, sites)

    def __enter__(self) -> "RegistersHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "scoped" if self.scoped else "persistent"
        how = f"form={self.form!r}" if self.form == "bias" else f"num_registers={self.num_registers}"
        return (f"RegistersHandle({state}, {len(self.neurons)} neurons in "
                f"{len(self.edit.layers)} layers, {how}, preset={self.preset!r})")


def installed(model) -> list[Edit]:
    """The edits that could apply to ``model`` now: its persistent one, and this context's."""
    sites = find_sites(model)
    if sites is None:
        return []
    return [e for e in (sites.persistent, sites.active_edit()) if e is not None][:1]


def active_registers(model) -> bool:
    """Would a forward of ``model`` run now, in this context, get test-time registers?"""
    sites = find_sites(model)
    return sites is not None and sites.active_edit() is not None


def remove_test_time_registers(model) -> int:
    """Remove every ttreg hook from ``model`` -- also from a copy made while they were installed,
    or ones whose handle was lost; return how many hooks were removed. (Not while another thread
    runs the model: this is the one call that changes its hooks under it.)"""
    m = model.model if isinstance(model, Adapter) else model
    with _INSTALL:
        sites = find_sites(m)
        if sites is not None:
            sites.persistent = None
        return remove_owned_hooks(m, OwnedHook)


def add_test_time_registers(model, neurons, num_registers: int | None = None, preset: str = "paper",
                            shift_to=None, check: bool = True, *, form: str = "token",
                            bias: AttentionBias | None = None, normal_values: str = "zero",
                            scale=1.0, assign: str = "copy", init: str = "zero",
                            seed: int = 0) -> RegistersHandle:
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
    number per register). The paper's appendix: ``assign="random"`` (each neuron to one register,
    drawn with ``seed``) and ``init="mean"|"gaussian"`` (what registers start as).

    Works with threads, gradient checkpointing (non-reentrant; re-entrant is refused in one line),
    ``copy.deepcopy`` (the copy has its own registers; ``ttreg.remove_test_time_registers(copy)``
    removes them), ``torch.compile`` when compiled *after* installing (swapping sets afterwards
    recompiles), and ONNX export (:func:`ttreg.export_onnx`).
    """
    return RegistersHandle(model, neurons, num_registers, preset, shift_to, check, form=form, bias=bias,
                           normal_values=normal_values, scale=scale, assign=assign, init=init, seed=seed)


@contextlib.contextmanager
def test_time_registers(model, neurons, num_registers: int | None = None, preset: str = "paper",
                        shift_to=None, check: bool = True, *, form: str = "token",
                        bias: AttentionBias | None = None, normal_values: str = "zero",
                        scale=1.0, assign: str = "copy", init: str = "zero",
                        seed: int = 0) -> Iterator[RegistersHandle]:
    """Test-time registers for the forwards this thread runs inside the ``with`` block.

    Arguments as :func:`add_test_time_registers` (``form="bias"``: the attention-bias form).
    Scoped like ``torch.no_grad()``: other threads using the same model meanwhile run it plain.
    The first use installs ttreg's hooks on the model once; entering and leaving the block only
    switches them on and off for this context (they stay, inert, until
    ``ttreg.remove_test_time_registers(model)``). With gradient checkpointing, call ``backward()``
    inside the block.
    """
    handle = RegistersHandle(model, neurons, num_registers, preset, shift_to, check, scoped=True,
                             form=form, bias=bias, normal_values=normal_values, scale=scale,
                             assign=assign, init=init, seed=seed)
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
    try:
        with entered(handle.edit):
            yield handle
    finally:
        handle.remove()


__all__ = ["ASSIGNS", "FORMS", "INITS", "PRESETS", "NORMAL_VALUES", "Edit", "RegistersHandle", "Sites",
           "UnmeasuredSizeWarning", "add_test_time_registers", "test_time_registers", "zero_neurons",
           "remove_test_time_registers", "installed", "active_registers", "edit_activations",
           "find_sites"]
