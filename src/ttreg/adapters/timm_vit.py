"""Adapter for timm's ``VisionTransformer`` (DeiT, DINOv2, CLIP towers, trained registers,
gated MLPs, ``dynamic_img_size``)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..hooks import HookSet
from .base import Adapter


def _is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


class TimmViTAdapter(Adapter):
    family = "timm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_timm_vit(model)

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
        ps = self.model.patch_embed.patch_size
        return (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))

    def down_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.fc2

    def attention(self, layer: int) -> nn.Module:
        return self.blocks[layer].attn

    def entry_module(self, layer: int) -> nn.Module:
        return self.blocks[layer].norm1

    def pre_block_module(self) -> nn.Module | None:
        pre = self.model.norm_pre
        return None if isinstance(pre, nn.Identity) else pre

    def image_size(self) -> tuple[int, int]:
        size = getattr(self.model.patch_embed, "img_size", None)
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
        pe = self.model.patch_embed
        if hasattr(pe, "dynamic_feat_size") and getattr(self.model, "dynamic_img_size", False):
            return tuple(int(v) for v in pe.dynamic_feat_size(x.shape[-2:]))
        return super().grid_size(x)

    @contextlib.contextmanager
    def attention_probs(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        store: dict[int, torch.Tensor] = {}
        with HookSet() as hooks:
            for layer in layers:
                attn = self.attention(layer)
                if not hasattr(attn, "attn_drop"):
                    raise TypeError(f"timm block {layer} has an attention module "
                                    f"({type(attn).__name__}) ttreg cannot read maps from")
                if hasattr(attn, "fused_attn"):
                    hooks.set_attr(attn, "fused_attn", False)

                def grab(mod, args, out, layer=layer):
                    store[layer] = args[0].detach()
                hooks.forward(attn.attn_drop, grab)
            yield store
