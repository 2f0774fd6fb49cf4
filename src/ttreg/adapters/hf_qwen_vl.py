"""Qwen2-VL and Qwen3-VL (``transformers``): their vision towers, alone or inside the VLM.

The towers pack the patches of every image (every video frame) into one sequence
``(total, D)`` with no batch axis and run full attention within each image, told apart by
``cu_seqlens`` (variable-length attention). ttreg gives **each image its own test-time
registers**, appended at the end of its segment (:class:`~ttreg.adapters.base.PackedIO`):
``cu_seqlens`` and ``max_seqlen`` grow by R per segment, the rotary ``(cos, sin)`` table gets
identity rows there (a register has no rotary position, like CLS elsewhere), and the register
edit takes each neuron's maximum over the image's own segment. Every block output is cut back to
the image tokens, so the patch merger, Qwen3-VL's deep-stack mergers and the language model get
the usual tensors and image-token counts.

The tower orders an image's patches in 2x2 merge blocks (what the processor gives it); the
adapter's :meth:`HFQwenVisionAdapter.run` packs a batch ``(B, C, H, W)`` the same way, and
traces read the tokens back in raster order. Qwen2.5-VL (windowed attention) stays refused in
:mod:`ttreg.adapters.hf`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..calls import tagged
from .base import Adapter, BlockIO, PackedGrid, PackedIO, packed_run
from .hf import OPENAI_CLIP, HFVisionAdapter, HFVLMAdapter, get_path


def merge_order(rows: int, cols: int, merge: int) -> torch.Tensor:
    """``(rows * cols,)``: the place in Qwen's tower sequence of each patch in raster order (the
    processor orders patches by ``merge x merge`` blocks, the blocks in raster order)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    block = (r // merge) * (cols // merge) + c // merge
    return (block * merge * merge + (r % merge) * merge + c % merge).reshape(-1)


def qwen_pixels(x: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values (B * rows * cols, C * temporal * patch^2), grid_thw (B, 3))`` of images
    ``x`` ``(B, C, H, W)`` as Qwen2-VL's image processor packs them (each image one frame,
    repeated ``temporal`` times; patches in merge-block order)."""
    B, C, H, W = x.shape
    gh, gw = H // patch, W // patch
    if gh % merge or gw % merge or H % patch or W % patch:
        raise ValueError(f"Qwen-VL towers take images whose sides are multiples of "
                         f"{patch * merge} px (patch {patch} x merge {merge}); got {H}x{W}")
    t = x[:, None].expand(B, temporal, C, H, W)
    t = t.reshape(B, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    t = t.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pix = t.reshape(B * gh * gw, C * temporal * patch * patch)
    grid = torch.tensor([[1, gh, gw]] * B, device=x.device)
    return pix, grid


def trim_packed(output: Any, num_registers: int) -> Any:
    """A tower output whose recorded ``hidden_states`` include a block input with the registers
    appended (transformers' ``hidden_states[0]``): that entry becomes the tensor the block
    received."""
    if not isinstance(output, dict) or output.get("hidden_states") is None:
        return output

    def fix(h):
        call = tagged(h)
        return call.visible if call is not None and call.visible is not None else h
    output["hidden_states"] = tuple(fix(h) for h in output["hidden_states"])
    return output


class HFQwenVisionAdapter(HFVisionAdapter):
    """The vision tower of Qwen2-VL (``Qwen2VisionTransformerPretrainedModel``) and of Qwen3-VL
    (``Qwen3VLVisionModel``): packed images, 2-D rotary embedding, no prefix token."""

    class_names = ("Qwen2VisionTransformerPretrainedModel", "Qwen3VLVisionModel")
    token_dim = 0

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.config, "embed_dim", None) or self.config.hidden_size)

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def merge(self) -> int:
        return int(self.config.spatial_merge_size)

    @property
    def block_io(self) -> BlockIO:
        return PackedIO()

    def pre_block_module(self) -> nn.Module | None:
        return None

    def output_trims(self) -> list[tuple[nn.Module, Any]]:
        return [(self.vision, trim_packed)]

    def run(self, x: torch.Tensor) -> Any:
        """The tower on images ``x`` (B, C, H, W), packed as the processor packs them."""
        pix, grid = qwen_pixels(x, self.patch_size[0], self.merge, int(self.config.temporal_patch_size))
        gh, gw = self.grid_size(x)
        with packed_run(PackedGrid(len(x), gh * gw, merge_order(gh, gw, self.merge))):
            return self.vision(pix.to(self.parameter().dtype), grid_thw=grid)

    def image_size(self) -> tuple[int, int]:
        """Qwen3-VL: the learned position grid's size; Qwen2-VL (rotary only): 16 merge blocks."""
        side = getattr(self.vision, "num_grid_per_side", None)
        p = self.patch_size[0]
        n = int(side) if side else 8 * self.merge
        return (n * p, n * p)

    def dynamic_size(self) -> bool:
        return False

    def takes_any_size(self) -> bool:
        return True

    def final_norm(self) -> nn.Module:
        """The patch merger's norm (what the last block's tokens go through first)."""
        merger = self.vision.merger
        norm = get_path(merger, "ln_q", "norm")
        if getattr(merger, "use_postshuffle_norm", False) or not isinstance(norm, nn.Module):
            raise TypeError(f"cannot find the final norm of {type(self.model).__name__}")
        return norm

    def output_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return Adapter.output_tokens(self, x)

    def mean_std(self):
        return OPENAI_CLIP


class HFQwenVLAdapter(HFVLMAdapter):
    """Qwen2-VL and Qwen3-VL, through their vision tower (:class:`HFQwenVisionAdapter`)."""

    class_names = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel",
                   "Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    TOWER_PATHS = ("model.visual", "visual")


#: tried by :func:`ttreg.wrap` after the adapters of :mod:`ttreg.adapters.hf` (whose Qwen2.5-VL
#: refusal comes first)
HF_QWEN_ADAPTERS: list[type[Adapter]] = [HFQwenVLAdapter, HFQwenVisionAdapter]

__all__ = ["HFQwenVisionAdapter", "HFQwenVLAdapter", "HF_QWEN_ADAPTERS", "merge_order", "qwen_pixels"]
