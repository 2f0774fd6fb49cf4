"""Adapters for open_clip image towers: whole CLIP models and their ``visual`` tower.

Two kinds of tower:

* open_clip's own ``VisionTransformer`` (:class:`OpenCLIPViTAdapter`): blocks are
  ``visual.transformer.resblocks``, the neuron site is ``mlp.c_proj``'s input, one prefix token
  (the class embedding), and ``ln_pre`` sits between the position embedding and the first block,
  so a test-time register enters the blocks as ``ln_pre(0)``. Blocks run batch-first in open_clip
  >= 2.24 (``transformer.batch_first``) and sequence-first before; both are supported.
* a timm trunk (``visual`` is open_clip's ``TimmModel`` around a timm ``VisionTransformer``,
  :class:`OpenCLIPTimmAdapter`): the structure is the timm adapter's, on ``visual.trunk``.

For a whole CLIP (``CLIP``, ``CustomTextCLIP``, ``CoCa``) ``run`` is ``encode_image``, so pooling
(class token, average or attentional) and projection run too. Fingerprints cover the image tower
only, so a neuron set found on ``model.visual`` applies to ``model`` and back.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # without open_clip,
from open_clip.timm_model import TimmModel                              # wrap() skips this module
from open_clip.transformer import VisionTransformer as OpenCLIPVisionTransformer

from .base import Adapter, DelegatingAdapter
from .timm_vit import TimmViTAdapter

def _split(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(image tower, is_whole_model)`` for a CLIP-like model or a bare tower."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and hasattr(model, "encode_image"):
        return visual, True
    return model, False


def _preprocess(visual: nn.Module):
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean", getattr(visual, "image_mean", None)) or OPENAI_DATASET_MEAN
    std = cfg.get("std", getattr(visual, "image_std", None)) or OPENAI_DATASET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _size2(size) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size),) * 2


class _OpenCLIPModel(Adapter):
    """What both open_clip adapters share: running the model and its preprocessing."""

    visual: nn.Module
    whole: bool

    def run(self, x: torch.Tensor):
        return self.model.encode_image(x) if self.whole else self.visual(x)

    def image_size(self) -> tuple[int, int]:
        return _size2(self.visual.image_size)

    def mean_std(self):
        return _preprocess(self.visual)


class OpenCLIPViTAdapter(_OpenCLIPModel):
    """open_clip ``VisionTransformer`` towers, alone or inside a CLIP model."""

    family = "open_clip"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual, self.whole = _split(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(_split(model)[0], OpenCLIPVisionTransformer)

    # --- structure ---------------------------------------------------------------------------
    @property
    def token_dim(self) -> int:  # type: ignore[override]
        return 1 if getattr(self.visual.transformer, "batch_first", False) else 0

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.visual.transformer.resblocks)

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # the class embedding; open_clip towers have no trained registers

    @property
    def embed_dim(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def patch_size(self) -> tuple[int, int]:
        return _size2(self.visual.patch_size)

    def down_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.c_proj

    def attention(self, layer: int) -> nn.Module:
        return self.blocks[layer].attn

    def entry_module(self, layer: int) -> nn.Module:
        return self.blocks[layer].ln_1

    def pre_block_module(self) -> nn.Module | None:
        pre = self.visual.ln_pre
        return None if isinstance(pre, nn.Identity) else pre

    # --- running -------------------------------------------------------------------------------
    def parameter(self) -> torch.Tensor:
        return next(self.visual.parameters())

    # --- identity --------------------------------------------------------------------------------
    def architecture(self):
        arch = super().architecture()
        arch["class"] = type(self.visual).__name__
        return arch

    def fingerprint_module(self) -> nn.Module:
        return self.visual

    def describe(self) -> str:
        what = f"{type(self.model).__name__} image tower" if self.whole else type(self.visual).__name__
        return (f"{self.family} {what} ({self.num_layers} blocks, width {self.embed_dim}, "
                f"MLP {self.mlp_width(0)})")


class OpenCLIPTimmAdapter(DelegatingAdapter, _OpenCLIPModel):
    """open_clip towers around a timm trunk (``visual.trunk``): ``VisionTransformer`` (SigLIP,
    ...) or ``Eva`` (EVA02-CLIP, PE-Core).

    Everything structural is the trunk's timm adapter's; ``run`` goes through the open_clip
    model (``encode_image``, or the ``TimmModel``'s pooling and projection head).
    """

    family = "timm"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual, self.whole = _split(model)
        self.trunk = self.inner = _timm_adapter(self.visual.trunk)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        visual = _split(model)[0]
        return isinstance(visual, TimmModel) and _timm_adapter_class(getattr(visual, "trunk", None)) is not None

    run = _OpenCLIPModel.run
    image_size = _OpenCLIPModel.image_size
    mean_std = _OpenCLIPModel.mean_std

    def fingerprint_module(self) -> nn.Module:
        return self.trunk.model

    def describe(self) -> str:
        return f"open_clip {type(self.model).__name__} with a {self.trunk.describe()} trunk"


def _timm_adapter_class(trunk) -> type | None:
    from .timm_eva import TimmEvaAdapter
    from .timm_naflex import TimmNaFlexAdapter
    for cls in (TimmViTAdapter, TimmEvaAdapter, TimmNaFlexAdapter):
        if isinstance(trunk, nn.Module) and cls.matches(trunk):
            return cls
    return None


def _timm_adapter(trunk: nn.Module) -> Adapter:
    return _timm_adapter_class(trunk)(trunk)


OPEN_CLIP_ADAPTERS: list[type[Adapter]] = [OpenCLIPViTAdapter, OpenCLIPTimmAdapter]

__all__ = ["OpenCLIPViTAdapter", "OpenCLIPTimmAdapter", "OPEN_CLIP_ADAPTERS"]
