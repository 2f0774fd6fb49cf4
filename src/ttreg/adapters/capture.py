"""Attention maps from any attention module: watch the softmax it computes.

A hand-written attention module has no flag for an explicit path and no agreed place where the
probabilities live. What every implementation does call is either a softmax over the key axis
or ``F.scaled_dot_product_attention``. :func:`capture_attention` runs the forward under a
``TorchFunctionMode`` (thread-local, so other threads are not watched) and, while attention
module ``l`` is running, keeps the first post-softmax ``(B, heads, Q, K)`` tensor it produces --
for SDPA, the same probabilities recomputed from its ``q``, ``k``, mask and scale. The module's
own result is never changed.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..hooks import HookSet

_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


def sdpa_probs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
               **_) -> torch.Tensor:
    """The post-softmax probabilities ``F.scaled_dot_product_attention`` uses (no dropout)."""
    q, k = query.float(), key.float()
    if k.shape[-3] != q.shape[-3] and q.dim() >= 3:          # grouped-query attention
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    logits = q @ k.transpose(-2, -1) * s
    L, S = logits.shape[-2], logits.shape[-1]
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    return logits.softmax(dim=-1)


class _Watch(TorchFunctionMode):
    """Keeps the first attention probabilities computed while a watched module runs."""

    def __init__(self, store: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.store = store
        self.layer: int | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        layer = self.layer
        if layer is None or layer in self.store:
            return out
        if func is F.scaled_dot_product_attention:
            self.store[layer] = sdpa_probs(*args, **kwargs).detach().to(out.dtype)
        elif func in _SOFTMAX and torch.is_tensor(out) and out.dim() == 4:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, 3) and out.shape[-1] == out.shape[-2]:
                self.store[layer] = out.detach()
        return out


@contextlib.contextmanager
def capture_attention(modules: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record ``{layer: (B, heads, T, T)}`` post-softmax attention of ``modules`` (layer ->
    attention module) on each forward inside the block. A watched module that computes no
    softmax over its keys raises a one-line RuntimeError after its forward."""
    store: dict[int, torch.Tensor] = {}
    watch = _Watch(store)
    with HookSet() as hooks:
        for layer, mod in modules.items():
            def start(m, args, layer=layer):
                store.pop(layer, None)
                watch.layer = layer

            def stop(m, args, out, layer=layer):
                watch.layer = None
                if layer not in store:
                    raise RuntimeError(
                        f"block {layer}: its attention module ({type(m).__name__}) computed no softmax "
                        "over keys and no scaled_dot_product_attention, so ttreg cannot read its map")
            hooks.pre(mod, start)
            hooks.forward(mod, stop)
        with watch:
            try:
                yield store
            finally:
                watch.layer = None


__all__ = ["capture_attention", "sdpa_probs"]
