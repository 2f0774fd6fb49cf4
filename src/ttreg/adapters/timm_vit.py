"""Adapter for timm's ``VisionTransformer`` (DeiT, DINOv2, CLIP towers, trained registers,
gated MLPs, ``dynamic_img_size``)."""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..hooks import HookSet
from .base import Adapter, BlockIO, TokenInputsIO


def is_timm(model: nn.Module, module: str, name: str) -> bool:
    """Is ``model`` an instance of timm's ``timm.models.<module>.<name>`` (False without timm)?"""
    try:
        cls = getattr(importlib.import_module(f"timm.models.{module}"), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(model, cls)


class TimmViTAdapter(Adapter):
    family = "timm"
    #: ``(module, class)`` of the timm model class this adapter takes
    timm_class = ("vision_transformer", "VisionTransformer")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, *cls.timm_class)

    @property
    def patch_embed(self) -> nn.Module:
        return self.model.patch_embed

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> tuple[int, int]:
        ps = self.patch_embed.patch_size
        return (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))

    def down_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.fc2

    def attention(self, layer: int) -> nn.Module:
        return self.blocks[layer].attn

    def entry_module(self, layer: int) -> nn.Module:
        return self.blocks[layer].norm1

    @property
    def block_io(self) -> BlockIO:
        """``blk(x, attn_mask=None, is_causal=False)``: a mask is extended for the registers."""
        return TokenInputsIO(self.token_dim, masks=(("attn_mask", 1),), causal_arg=("is_causal", 2))

    def pre_block_module(self) -> nn.Module | None:
        pre = self.model.norm_pre
        return None if isinstance(pre, nn.Identity) else pre

    def image_size(self) -> tuple[int, int]:
        size = getattr(self.patch_embed, "img_size", None)
        if size is None:
            return super().image_size()
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size),) * 2

    def mean_std(self):
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        if "mean" in cfg and "std" in cfg:
            return tuple(cfg["mean"]), tuple(cfg["std"])
        return super().mean_std()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        pe = self.patch_embed
        if hasattr(pe, "dynamic_feat_size") and getattr(self.model, "dynamic_img_size", False):
            return tuple(int(v) for v in pe.dynamic_feat_size(x.shape[-2:]))
        return super().grid_size(x)

    # --- reading features -----------------------------------------------------------------------
    def takes_any_size(self) -> bool:
        return True

    @contextlib.contextmanager
    def any_size(self) -> Iterator[None]:
        """The model as if built with timm's ``dynamic_img_size=True``: its position embedding
        (and rotary embedding) follows each input's grid, resampled by timm. The four switches
        timm's constructor sets for it are set for the duration and restored on exit."""
        vit = self.model
        pe = getattr(vit, "patch_embed", None)
        if getattr(vit, "dynamic_img_size", True) or not hasattr(pe, "strict_img_size"):
            yield
            return
        from timm.layers import Format
        with HookSet() as switches:
            switches.set_attr(vit, "dynamic_img_size", True)
            switches.set_attr(pe, "strict_img_size", False)
            switches.set_attr(pe, "flatten", False)
            switches.set_attr(pe, "output_fmt", Format.NHWC)
            yield

    def final_norm(self) -> nn.Module:
        return self.model.norm

    def output_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

