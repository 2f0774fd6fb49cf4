"""Adapter for timm's ``NaFlexVit`` (NaViT + FlexiViT: SigLIP2-NaFlex, RADIO, ...).

The model runs on images (``forward_features(images)``) or on NaFlex batches -- pre-patchified
tokens with ``patch_coord`` and ``patch_valid``, padded to a common length. Blocks are timm's
``Block`` or, with RoPE, ``EvaBlock``, called as ``blk(x, [rope=...,] attn_mask=...)``. With
test-time registers the block inputs are extended (:class:`~ttreg.adapters.base.TokenInputsIO`):
rotary tables get identity rows (a register has no rotary position, like a prefix token), and
the padding mask gets the registers **masked in** -- every real token sees them, they see every
real token -- while **padding stays out**: it sees nothing new, and the register edit neither
reads from nor writes to padding tokens (their activations do not enter the register's value).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from .base import BlockIO, TokenInputsIO
from .timm_eva import EVA_IO
from .timm_vit import TimmViTAdapter


class TimmNaFlexAdapter(TimmViTAdapter):
    """timm ``NaFlexVit``: the patch embedding is ``embeds``; images of any size."""

    family = "timm"
    timm_class = ("naflexvit", "NaFlexVit")

    @property
    def patch_embed(self) -> nn.Module:
        return self.model.embeds

    @property
    def block_io(self) -> BlockIO:
        return TokenInputsIO(self.token_dim, **EVA_IO)

    def image_size(self) -> tuple[int, int]:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        if cfg.get("input_size"):
            return tuple(int(v) for v in cfg["input_size"][-2:])
        emb = self.model.embeds
        if emb.default_img_size is not None:
            s = emb.default_img_size
            return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s),) * 2
        gh, gw = emb.pos_embed_grid_size or (14, 14)
        ph, pw = self.patch_size
        return (int(gh) * ph, int(gw) * pw)

    @contextlib.contextmanager
    def any_size(self) -> Iterator[None]:
        yield                                   # NaFlexVit takes any size as it is

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple(int(v) for v in self.model.embeds.dynamic_feat_size(tuple(x.shape[-2:])))


__all__ = ["TimmNaFlexAdapter"]
