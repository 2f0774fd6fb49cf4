"""Adapter for timm's ``Eva`` family: EVA-02 (SwiGLU, RoPE), EVA-CLIP towers, DINOv3
(``vit_*_patch16_dinov3``: CLS + storage tokens, RoPE only) and Perception Encoder
(``vit_pe_core_*``: pre-norm, rotary attention, attention pooling).

Everything structural is timm's usual layout (see :mod:`ttreg.adapters.timm_vit`); what differs
is how the blocks are called: ``blk(x, rope=..., attn_mask=...)``. The rotary table covers the
patch tokens only -- ``EvaAttention`` and ``AttentionRope`` rotate the tokens after
``num_prefix_tokens`` -- so the appended registers would fall outside it. The block inputs are
extended (:class:`~ttreg.adapters.base.TokenInputsIO`): each register gets an identity row of the
table (cos 1, sin 0), i.e. **no rotary position, exactly like a prefix token**, and a given
attention mask is extended so the registers are visible. ``mixed`` RoPE (one table per block),
``dinov3``, ``cat`` and ``mrope`` tables all share timm's ``[sin | cos]`` layout, so one rule
covers them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import BlockIO, TokenInputsIO
from .timm_vit import TimmViTAdapter

#: how Eva blocks take their per-token inputs
EVA_IO = dict(rotary=("rope",), layout="sincos_cat", masks=(("attn_mask", -1),))


class TimmEvaAdapter(TimmViTAdapter):
    """timm ``Eva`` (EVA-02, EVA-CLIP, DINOv3, PE-Core). The neuron site is ``mlp.fc2``'s input
    -- for SwiGLU, ``act(gate) * value`` (after the MLP's scale norm when it has one)."""

    family = "timm"
    timm_class = ("eva", "Eva")

    def entry_module(self, layer: int) -> nn.Module:
        block = self.blocks[layer]
        # a post-norm block (EvaBlockPostNorm) reads its input with the attention first
        return block.attn if type(block).__name__ == "EvaBlockPostNorm" else block.norm1

    @property
    def block_io(self) -> BlockIO:
        return TokenInputsIO(self.token_dim, **EVA_IO)

    def qkv_weights(self, layer: int):
        """``EvaAttention`` adds its query/key/value biases (``q_bias``, ``k_bias``, ``v_bias``) to
        a bias-free fused ``qkv`` inside its forward, or has separate ``q_proj``/``k_proj``/``v_proj``."""
        attn = self.attention(layer)
        qkv = getattr(attn, "qkv", None)
        if isinstance(qkv, nn.Linear) and getattr(attn, "q_bias", None) is not None:
            k_bias = getattr(attn, "k_bias", None)
            k_bias = torch.zeros_like(attn.q_bias) if k_bias is None else k_bias
            return qkv.weight, torch.cat([attn.q_bias, k_bias, attn.v_bias])
        return super().qkv_weights(layer)


__all__ = ["TimmEvaAdapter", "EVA_IO"]
