"""Finding a ViT's parts by what they do, not by what they are called.

Shared by the Hugging Face adapters and the generic adapter (:func:`ttreg.wrap` with names):

* the **attention** of a block: its outermost submodule that is an ``nn.MultiheadAttention``, or
  whose class name says attention (``*Attention*``, ``*Attn*``), or that holds a fused
  ``Linear(d -> 3d)`` query-key-value projection;
* the **MLP down-projection**: the ``nn.Linear`` outside the attention that maps the widest input
  back to the residual width (``fc2``, ``mlp.2``, ``down_proj``, ``output.dense``); ties (an MLP
  ratio of 1) go to the last one registered;
* the **blocks**: the longest ``ModuleList`` / ``Sequential`` of same-type modules that each have
  an attention and a down-projection;
* the **patch size**: the first ``Conv2d`` whose kernel equals its stride.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn


def _says_attention(mod: nn.Module) -> bool:
    name = type(mod).__name__.lower()
    return isinstance(mod, nn.MultiheadAttention) or "attention" in name or "attn" in name


def _has_fused_qkv(mod: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) and m.out_features == 3 * m.in_features for m in mod.modules())


def find_attention_by_role(block: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of a block's attention (see the module docstring), or None."""
    for test in (_says_attention, _has_fused_qkv):
        for name, mod in block.named_modules():
            if name and test(mod):
                return name, mod
    return None


def down_projection(block: nn.Module, hidden: int, attention: nn.Module | None) -> nn.Linear | None:
    """The MLP down-projection of ``block``: outside ``attention``, ``Linear(widest -> hidden)``."""
    inside = {id(m) for m in attention.modules()} if attention is not None else set()
    best = None
    for mod in block.modules():
        if id(mod) in inside or not isinstance(mod, nn.Linear):
            continue
        if mod.out_features == hidden and (best is None or mod.in_features >= best.in_features):
            best = mod
    return best


def residual_width(block: nn.Module, attention: nn.Module | None) -> int | None:
    """The width of a block's hidden state: its first norm's size, else the output size of the
    attention's last linear layer."""
    for mod in block.modules():
        shape = getattr(mod, "normalized_shape", None)
        if shape is not None:
            return int(shape[-1]) if isinstance(shape, (tuple, list)) else int(shape)
        weight = getattr(mod, "weight", None)
        if "norm" in type(mod).__name__.lower() and weight is not None and weight.dim() == 1:
            return int(weight.shape[0])
    if attention is not None:
        lins = [m for m in attention.modules() if isinstance(m, nn.Linear)]
        if lins:
            return int(lins[-1].out_features)
        if isinstance(attention, nn.MultiheadAttention):
            return int(attention.embed_dim)
    return None


def find_blocks_by_role(model: nn.Module, is_block: Callable[[nn.Module], bool]) -> tuple[str, nn.Module] | None:
    """``(name, container)`` of the longest ``ModuleList``/``Sequential`` of same-type modules
    whose first element ``is_block``; None if there is none."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or not len(mod):
            continue
        if not all(type(m) is type(mod[0]) for m in mod) or not is_block(mod[0]):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    return best


def find_patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The kernel of the first ``Conv2d`` whose kernel equals its stride (a patch embedding)."""
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == tuple(mod.stride) and mod.kernel_size[0] > 1:
            return int(mod.kernel_size[0]), int(mod.kernel_size[1])
    return None


__all__ = ["find_attention_by_role", "down_projection", "residual_width", "find_blocks_by_role",
           "find_patch_size"]
