"""Test-time registers (the paper's Algorithm 2): append R tokens, move register neurons into them.

Two pieces of plumbing, both plain hooks held in a :class:`~ttreg.hooks.HookSet`:

* the **register stream** carries R extra tokens through the blocks. A pre-hook on each block
  appends them to the block's input, a forward hook splits them off the block's output again.
  Between blocks -- where ``forward_intermediates``, ``output_hidden_states``, pooling heads and
  final norms look -- the hidden state keeps its usual shape, so every output the user sees does.
* the **neuron edit** is a pre-hook on each MLP down-projection that has register neurons. For
  every image and every register neuron it writes the neuron's value into the target tokens
  (the registers, or chosen patches with ``shift_to``) and zeroes it on the other tokens.

Presets (see docs/method.md):

``"paper"`` (default)
    per image and per neuron, the targets get the maximum of that neuron over the image's
    tokens; the neuron is zeroed on every other token (CLS included).
``"official"``
    the authors' released code, made batch-correct: per image, one value shared by all of a
    layer's register neurons -- the signed value of largest magnitude over all tokens and those
    neurons; the neurons are zeroed on patch tokens only (prefix tokens such as CLS untouched).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .adapters import Adapter, wrap
from .hooks import HookSet
from .spec import RegisterNeurons, as_register_neurons

PRESETS = ("paper", "official")

# Block 0 of a model -> the register stream active on it (read by ``trace``).
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, RegisterStream]" = weakref.WeakKeyDictionary()


def active_stream(adapter: Adapter) -> "RegisterStream | None":
    blocks = adapter.blocks
    return _ACTIVE.get(blocks[0]) if len(blocks) else None


class RegisterStream:
    """Carries ``num`` register tokens from block to block (batch-first ``(B, R, D)``)."""

    def __init__(self, adapter: Adapter, num: int) -> None:
        self.adapter = adapter
        self.num = num
        self.tokens: torch.Tensor | None = None  # registers after the last block that ran

    def install(self, hooks: HookSet) -> None:
        ad = self.adapter
        td = ad.token_dim
        for i, block in enumerate(ad.blocks):
            def append(mod, args, kwargs, first=(i == 0)):
                x = ad.block_input(args, kwargs)
                bdim = 1 - td
                if first or self.tokens is None or self.tokens.shape[0] != x.shape[bdim]:
                    self.tokens = ad.register_init(x.shape[bdim], self.num, x)
                regs = self.tokens if td == 1 else self.tokens.transpose(0, 1)
                return ad.replace_block_input(args, kwargs, torch.cat([x, regs.to(x.dtype)], dim=td))

            def split(mod, args, output):
                y = ad.block_output(output)
                n = y.shape[td] - self.num
                regs = y.narrow(td, n, self.num)
                self.tokens = regs if td == 1 else regs.transpose(0, 1)
                return ad.replace_block_output(output, y.narrow(td, 0, n))

            hooks.pre(block, append, prepend=True, with_kwargs=True)
            hooks.forward(block, split, prepend=True)
        ad.stream_hooks(hooks, self.num)


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
                     zero: torch.Tensor, preset: str = "paper") -> torch.Tensor:
    """Return MLP hidden states ``h`` ``(B, T, H)`` with the register edit applied (out of place).

    ``neurons``: long tensor of K neuron indices; ``target``/``zero``: ``(B, T)`` bool masks.
    Vectorised over batch, tokens and neurons.
    """
    v = h.index_select(-1, neurons)                                   # (B, T, K)
    if preset == "official":
        flat = v.reshape(v.shape[0], -1)                              # (B, T*K)
        pick = flat.abs().argmax(dim=1, keepdim=True)
        value = flat.gather(1, pick)[:, :, None].expand(-1, 1, v.shape[2])  # (B, 1, K)
    else:
        value = v.amax(dim=1, keepdim=True)                           # (B, 1, K)
    out = torch.where(zero[:, :, None], torch.zeros((), dtype=v.dtype, device=v.device), v)
    out = torch.where(target[:, :, None], value.to(v.dtype), out)
    return h.index_copy(-1, neurons, out)


class RegistersHandle:
    """Test-time registers installed on a model; ``remove()`` (or leaving the ``with``) undoes them."""

    def __init__(self, model: nn.Module | Adapter, neurons, num_registers: int | None = None,
                 preset: str = "paper", shift_to=None, check: bool = True,
                 zero_only: bool = False) -> None:
        self.adapter = ad = wrap(model)
        self.neurons: RegisterNeurons = as_register_neurons(neurons, ad)
        if check:
            self.neurons.check_model(ad)
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if num_registers is None:
            num_registers = 0 if shift_to is not None else 1
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        if shift_to is not None and num_registers:
            raise ValueError("shift_to writes into patch tokens; pass num_registers=0 with it")
        if zero_only:
            if num_registers or shift_to is not None:
                raise ValueError("zeroing neurons moves nothing: no registers, no shift_to")
        elif num_registers == 0 and shift_to is None and len(self.neurons):
            raise ValueError("num_registers=0 with register neurons needs shift_to=[patch indices]")
        self.num_registers = num_registers
        self.preset = preset
        self.shift_to = shift_to
        self.hooks = HookSet()
        try:
            self._install()
        except BaseException:
            self.hooks.remove()
            raise

    def _shift_mask(self, batch: int, num_patches: int, device) -> torch.Tensor | None:
        s = self.shift_to
        if s is None:
            return None
        if torch.is_tensor(s) and s.dtype == torch.bool:
            m = s.reshape(s.shape[0] if s.dim() > 1 else 1, -1)
            if m.shape[1] != num_patches:
                raise ValueError(f"shift_to mask has {m.shape[1]} patches, the image has {num_patches}")
            return m.expand(batch, -1) if m.shape[0] == 1 else m
        idx = torch.as_tensor(s, dtype=torch.long).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= num_patches):
            raise ValueError(f"shift_to indices must lie in [0, {num_patches}); got {idx.tolist()}")
        m = torch.zeros(batch, num_patches, dtype=torch.bool)
        m[:, idx] = True
        return m

    def _install(self) -> None:
        ad = self.adapter
        if self.num_registers and active_stream(ad) is not None:
            raise RuntimeError("test-time registers are already active on this model; remove them first")
        if self.num_registers:
            stream = RegisterStream(ad, self.num_registers)
            stream.install(self.hooks)
            _ACTIVE[ad.blocks[0]] = stream
            self._stream_key = ad.blocks[0]
        npre, R, preset, td = ad.num_prefix_tokens, self.num_registers, self.preset, ad.token_dim
        cache: dict = {}
        for layer, idx in self.neurons.by_layer().items():
            site = ad.down_proj(layer)
            index = torch.tensor(idx, dtype=torch.long)

            def edit(mod, args, index=index):
                h = args[0]
                hb = h if td == 1 else h.transpose(0, 1)
                B, T = hb.shape[0], hb.shape[1]
                key = (B, T, hb.device)
                if key not in cache:
                    shift = self._shift_mask(B, T - npre - R, hb.device)
                    cache.clear()
                    cache[key] = _target_and_zero_masks(B, T, npre, R, shift, preset, hb.device)
                target, zero = cache[key]
                hb = edit_activations(hb, index.to(hb.device), target, zero, preset)
                return (hb if td == 1 else hb.transpose(0, 1), *args[1:])

            self.hooks.pre(site, edit, prepend=True)

    def remove(self) -> None:
        self.hooks.remove()
        key = getattr(self, "_stream_key", None)
        if key is not None and _ACTIVE.get(key) is not None:
            del _ACTIVE[key]
        self._stream_key = None

    def __enter__(self) -> "RegistersHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def add_test_time_registers(model, neurons, num_registers: int | None = None, preset: str = "paper",
                            shift_to=None, check: bool = True) -> RegistersHandle:
    """Install test-time registers on ``model`` and return a handle with ``.remove()``.

    ``neurons``: a :class:`RegisterNeurons`, a ``{layer: [neuron, ...]}`` dict, or a list of
    ``(layer, neuron)`` pairs. ``num_registers`` (default 1; 0 when ``shift_to`` is given) extra
    tokens are appended after the patch tokens and removed from every output. ``shift_to``
    (patch indices, or a ``(B, num_patches)`` bool mask) writes the values into those patches
    instead. ``check=False`` skips the model-fingerprint check.
    """
    return RegistersHandle(model, neurons, num_registers, preset, shift_to, check)


@contextlib.contextmanager
def test_time_registers(model, neurons, num_registers: int | None = None, preset: str = "paper",
                        shift_to=None, check: bool = True) -> Iterator[RegistersHandle]:
    """Context manager form of :func:`add_test_time_registers`; hooks are removed on exit."""
    handle = add_test_time_registers(model, neurons, num_registers, preset, shift_to, check)
    try:
        yield handle
    finally:
        handle.remove()


test_time_registers.__test__ = False  # not a pytest test


@contextlib.contextmanager
def zero_neurons(model, neurons, check: bool = True) -> Iterator[RegistersHandle]:
    """Ablation: ``neurons`` set to 0 on every token, nothing moved anywhere (the paper's
    "register neurons zeroed" control arm). Hooks are removed on exit."""
    handle = RegistersHandle(model, neurons, 0, "paper", None, check, zero_only=True)
    try:
        yield handle
    finally:
        handle.remove()
