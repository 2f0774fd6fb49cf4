"""``ttreg.trace``: per-layer token norms, chosen neuron activations and attention maps.

``record`` is the reusable part: a context manager that, for every forward pass while it is
open, fills a :class:`Recording` with what was asked for. ``trace`` runs one batch through it
and returns a :class:`Trace` with labelled tokens. Tokens are ``[prefix][patches][registers]``;
when test-time registers are active they are included (labelled ``"register"``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from . import attention as _attention
from .adapters import Adapter, wrap
from .calls import carried, num_carried
from .hooks import HookSet, StopForward, stop_forward


@dataclass
class Recording:
    norms: dict[int, torch.Tensor] = field(default_factory=dict)        # layer -> (B, T)
    activations: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, K)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)    # layer -> (B, h, T, T)
    num_registers: int = 0  # test-time registers the last block's output carried

    def clear(self) -> None:
        self.norms.clear()
        self.activations.clear()
        self.attention.clear()


@contextlib.contextmanager
def record(model, norm_layers: Sequence[int] = (), activation_layers: dict[int, Any] | None = None,
           attention_layers: Sequence[int] = (), abs_activations: bool = False) -> Iterator[Recording]:
    """Record norms of block outputs, down-projection inputs, and attention probabilities.

    ``activation_layers``: ``{layer: neuron indices (LongTensor) or None for all}``. Activations
    are what the down-projection receives (after any test-time-register edit).
    """
    ad = wrap(model)
    rec = Recording()
    io = ad.block_io
    with contextlib.ExitStack() as stack:
        hooks = stack.enter_context(HookSet())

        def on_last(mod, args, output):
            rec.num_registers = num_carried(ad.block_output(output))
        hooks.forward(ad.blocks[-1], on_last)
        for layer in norm_layers:
            def on_block(mod, args, output, layer=layer):
                out = ad.block_output(output)
                n = io.batch_first(out).detach().float().norm(dim=-1)
                regs = carried(out)
                if regs is not None and regs.shape[1]:
                    n = torch.cat([n, regs.detach().float().norm(dim=-1)], dim=1)
                rec.norms[layer] = n
            hooks.forward(ad.blocks[layer], on_block)
        for layer, idx in (activation_layers or {}).items():
            def on_site(mod, args, layer=layer, idx=idx):
                h = io.batch_first(args[0]).detach()
                if idx is not None:
                    h = h.index_select(-1, idx.to(h.device))
                rec.activations[layer] = h.abs().float() if abs_activations else h.float()
            hooks.pre(ad.down_proj(layer), on_site)
        if attention_layers:
            rec.attention = _record_attention(ad, list(attention_layers), hooks, stack)
        yield rec


def _record_attention(ad: Adapter, layers: list[int], hooks: HookSet,
                      stack: contextlib.ExitStack) -> dict[int, torch.Tensor]:
    """Attention maps of ``layers``, filled on each forward, read from inside each attention call
    (:mod:`ttreg.attention`): one interception for every family, nothing switched on the model.
    A layer whose attention carries ttreg's register hooks hands its maps over from there (with the
    bias form's extra key column); any other is tapped for the duration."""
    store: dict[int, torch.Tensor] = {}
    sinks = {}
    for l in layers:
        mod = ad.attention(l)

        def sink(p, l=l):
            store[l] = ad.block_io.attention_map(p)
        if _attention.intercepted(mod):
            sinks[mod] = sink
        else:
            _attention.tap(hooks, mod, probs=sink)
    stack.enter_context(_attention.recording(sinks))
    return store


def run_until(adapter: Adapter, x: torch.Tensor, layer: int) -> None:
    """Run ``x`` through blocks ``0..layer`` and stop: the later blocks, final norm and head are
    not run (hooks on block ``layer`` registered before this call still run). For passes that
    only need what the first blocks compute."""
    with HookSet() as hooks:
        hooks.forward(adapter.blocks[layer], stop_forward)
        try:
            adapter.run(x)
        except StopForward:
            pass


def check_layer(layer, num_layers: int, what: str = "layer") -> int:
    """``layer`` as an index in ``[0, num_layers)`` (negative counts from the end); a one-line
    ValueError when it is not a whole number in ``[-num_layers, num_layers)``."""
    if isinstance(layer, bool) or not isinstance(layer, int) and not (
            hasattr(layer, "__index__") and not isinstance(layer, float)):
        raise ValueError(f"{what} must be a whole number, got {layer!r}")
    layer = int(layer)
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"{what} {layer} does not exist: the model has {num_layers} blocks "
                         f"(0..{num_layers - 1}, or -1..-{num_layers} from the end)")
    return layer % num_layers


def check_neuron(adapter: Adapter, layer, neuron) -> tuple[int, int]:
    """``(layer, neuron)`` checked against the model (layer as :func:`check_layer`)."""
    l = check_layer(layer, adapter.num_layers, "neuron layer")
    if isinstance(neuron, bool) or not hasattr(neuron, "__index__"):
        raise ValueError(f"neuron ({layer}, {neuron!r}): the neuron must be a whole number")
    width = adapter.mlp_width(l)
    if not 0 <= int(neuron) < width:
        raise ValueError(f"neuron ({layer}, {neuron}) does not exist: block {l} has {width} MLP "
                         f"neurons (0..{width - 1})")
    return l, int(neuron)


@dataclass
class Trace:
    """What one forward pass showed. Tensors are on the CPU, batch first.

    Attention maps are ``(B, heads, T, T)`` over the tokens of ``token_types``; with the
    attention-bias form they have ``num_bias_keys`` (1) more key columns at the end: the fitted
    register key, the counterpart of the token form's register column."""

    norms: torch.Tensor | None                 # (B, L, T): residual stream after each block
    activations: torch.Tensor | None           # (B, N, T) for ``neurons``
    neurons: list[tuple[int, int]]
    attention: dict[int, torch.Tensor]         # layer -> (B, heads, T, T)
    token_types: list[str]                     # T labels: "prefix" | "patch" | "register"
    num_prefix_tokens: int
    num_registers: int
    grid: tuple[int, int]
    output: Any = None
    num_bias_keys: int = 0

    def __repr__(self) -> str:
        B = None if self.norms is None else self.norms.shape[0]
        L = None if self.norms is None else self.norms.shape[1]
        return (f"Trace(images={B}, layers={L}, tokens={len(self.token_types)} "
                f"(prefix {self.num_prefix_tokens}, grid {self.grid[0]}x{self.grid[1]}, registers "
                f"{self.num_registers}), attention layers={sorted(self.attention)}, "
                f"neurons={self.neurons})")

    @property
    def patch_slice(self) -> slice:
        T = len(self.token_types)
        return slice(self.num_prefix_tokens, T - self.num_registers)

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        return t[..., self.patch_slice].reshape(*t.shape[:-1], *self.grid)

    def norm_map(self, layer: int) -> torch.Tensor:
        """Patch-token norms after block ``layer`` as ``(B, rows, cols)``."""
        return self._grid(self.norms[:, layer])

    def register_norms(self, layer: int) -> torch.Tensor:
        """Norms of the test-time registers after block ``layer``: ``(B, R)``."""
        T = len(self.token_types)
        return self.norms[:, layer, T - self.num_registers:]

    def activation_map(self, i: int) -> torch.Tensor:
        """Activation of ``neurons[i]`` on the patch tokens: ``(B, rows, cols)``."""
        return self._grid(self.activations[:, i])

    def cls_attention(self, layer: int) -> torch.Tensor:
        """Attention of the first token to the patches, per head: ``(B, heads, rows, cols)``."""
        return self._grid(self.attention[layer][:, :, 0, :])


def trace(model, x: torch.Tensor, norms: bool = True, attention: bool | Sequence[int] = False,
          neurons: Sequence[tuple[int, int]] | None = None) -> Trace:
    """Run ``x`` (B, C, H, W) through ``model`` and return what it showed.

    ``norms``: token norms after every block. ``attention``: True for every layer, or a list of
    layers (negative indexes allowed). ``neurons``: ``(layer, neuron)`` pairs whose activations
    (input of the MLP down-projection) to record on every token.
    """
    ad: Adapter = wrap(model)
    L = ad.num_layers
    att_layers = list(range(L)) if attention is True else [
        check_layer(a, L, "attention layer") for a in (attention or [])]
    pairs = [check_neuron(ad, l, n) for l, n in (neurons or [])]
    act_layers: dict[int, torch.Tensor] = {}
    for l in sorted({l for l, _ in pairs}):
        act_layers[l] = torch.tensor(sorted({n for ll, n in pairs if ll == l}), dtype=torch.long)
    with torch.no_grad(), record(ad, range(L) if norms else (), act_layers, att_layers) as rec:
        out = ad.run(x)
        attn = {l: rec.attention[l].cpu() for l in att_layers}
    R = rec.num_registers
    npre = ad.num_prefix_tokens
    grid = ad.grid_size(x)
    T = npre + grid[0] * grid[1] + R
    types = ["prefix"] * npre + ["patch"] * (grid[0] * grid[1]) + ["register"] * R
    norm_t = torch.stack([rec.norms[l].cpu() for l in range(L)], dim=1) if norms else None
    acts = None
    if pairs:
        cols = []
        for l, n in pairs:
            pos = int((act_layers[l] == n).nonzero())
            cols.append(rec.activations[l][:, :, pos].cpu())
        acts = torch.stack(cols, dim=1)
    if norm_t is not None and norm_t.shape[-1] != T:
        raise RuntimeError(f"expected {T} tokens, saw {norm_t.shape[-1]}: the adapter's grid or "
                           "prefix count disagrees with the model")
    extra = {int(a.shape[-1] - a.shape[-2]) for a in attn.values()}
    return Trace(norm_t, acts, pairs, attn, types, npre, R, grid, out, max(extra, default=0))
