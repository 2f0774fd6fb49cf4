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

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # without open_clip,
from open_clip.timm_model import TimmModel                              # wrap() skips this module
from open_clip.transformer import VisionTransformer as OpenCLIPVisionTransformer

from ..hooks import HookSet
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

    def encoder(self):
        """What runs the image side: ``encode_image`` of a whole model, else the tower."""
        return self.model.encode_image if self.whole else self.visual


@dataclass
class DirectLayer:
    """One attention layer as the direct-contribution heat map (:mod:`ttreg.eval.direct`) needs
    it: the module whose input is read, its stacked q/k/v and output projections."""

    attn: nn.Module
    in_weight: torch.Tensor            # (3D, D) q, k, v stacked
    in_bias: torch.Tensor | None
    out_weight: torch.Tensor           # (D, D)
    out_bias: torch.Tensor | None
    heads: int
    scale: float
    layer_scale: Callable              # the block's ls on the attention branch (identity if none)
    q_norm: Callable | None = None
    k_norm: Callable | None = None


@dataclass
class DirectTower:
    """A CLIP image tower with class-token pooling, as the direct-contribution heat map needs it."""

    layers: list[DirectLayer]
    norm: nn.LayerNorm                 # the final norm, made linear per image
    proj: torch.Tensor                 # (D, E)
    batch_first: bool
    run: Callable


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


    # --- reading features ------------------------------------------------------------------------
    def final_norm(self) -> nn.Module:
        return self.visual.ln_post

    def _native_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled projected embedding, all tokens after ``ln_post``, batch-first)."""
        box: dict = {}
        with HookSet() as hooks:
            hooks.forward(self.visual.transformer, lambda m, a, out: box.__setitem__("out", out))
            pooled = self.encoder()(x)
        if isinstance(pooled, tuple):
            pooled = pooled[0]
        tokens = self.block_io.batch_first(box["out"])
        return pooled, self.visual.ln_post(tokens)

    def output_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self._native_tokens(x)[1]

    def image_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self._native_tokens(x)
        patches = tokens[:, 1:]
        if self.visual.proj is not None:
            patches = patches @ self.visual.proj
        return pooled, patches

    def direct_tower(self) -> DirectTower:
        """The tower for the direct-contribution heat map; a one-line ``TypeError`` saying what
        is unsupported (class-token pooling, a final ``LayerNorm`` and ``nn.MultiheadAttention``
        blocks are needed)."""
        visual = self.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise TypeError("towers without class-token pooling")
        if not isinstance(visual.ln_post, nn.LayerNorm):
            raise TypeError(f"a final {type(visual.ln_post).__name__}")
        layers = []
        for blk in visual.transformer.resblocks:
            a = blk.attn
            if not isinstance(a, nn.MultiheadAttention) or a.in_proj_weight is None:
                raise TypeError(f"open_clip blocks with {type(a).__name__}")
            layers.append(DirectLayer(a, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight,
                                      a.out_proj.bias, a.num_heads, a.head_dim ** -0.5, blk.ls_1))
        proj = visual.proj if visual.proj is not None else torch.eye(visual.ln_post.normalized_shape[0])
        return DirectTower(layers, visual.ln_post, proj,
                           bool(getattr(visual.transformer, "batch_first", True)), self.encoder())

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

    def image_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.visual.trunk
        tokens = trunk.forward_features(x)
        pooled = self.visual.head(trunk.forward_head(tokens))
        return pooled, self.visual.head(tokens[:, trunk.num_prefix_tokens:])

    def direct_tower(self) -> DirectTower:
        """As :meth:`OpenCLIPViTAdapter.direct_tower`, for a timm ``VisionTransformer`` trunk with
        class-token pooling, a final ``LayerNorm``, plain ``Attention`` blocks and a head of one
        bias-free linear layer."""
        from timm.layers import Attention
        visual, trunk = self.visual, self.visual.trunk
        if trunk.global_pool != "token" or not isinstance(getattr(trunk, "fc_norm", None), nn.Identity):
            raise TypeError("timm trunks without class-token pooling")
        if not isinstance(trunk.norm, nn.LayerNorm):
            raise TypeError(f"a final {type(trunk.norm).__name__}")
        linears = [m for m in visual.head.modules() if isinstance(m, nn.Linear)]
        others = [m for m in visual.head.modules()
                  if not isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Sequential))]
        if len(linears) != 1 or others or linears[0].bias is not None:
            raise TypeError("a projection head other than one bias-free linear layer")
        layers = []
        for blk in trunk.blocks:
            a = blk.attn
            if type(a) is not Attention or not isinstance(a.norm, nn.Identity) or a.gate is not None:
                raise TypeError(f"timm blocks with {type(a).__name__}")
            layers.append(DirectLayer(a, a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                                      a.num_heads, a.scale, blk.ls1, a.q_norm, a.k_norm))
        return DirectTower(layers, trunk.norm, linears[0].weight.T, True, self.encoder())

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

__all__ = ["OpenCLIPViTAdapter", "OpenCLIPTimmAdapter", "DirectLayer", "DirectTower", "OPEN_CLIP_ADAPTERS"]
