"""The linear heads of the dense probes, shared by DINOv2's protocol (:mod:`ttreg.eval.probe`)
and the Denoising-ViT protocol (:mod:`ttreg.eval.dense`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: DINOv2's depth head: bins of a uniform ("UD") strategy
DEPTH_BINS = 256


class SegmentationHead(nn.Module):
    """DINOv2's linear segmentation head: BatchNorm over the channels, then a 1x1 linear layer
    (weights N(0, 0.01), bias 0, as mmseg's ``conv_seg``), at patch resolution."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.normal_(0.0, 0.01, generator=generator)
            self.conv.bias.zero_()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, rows, cols, D)`` patch features -> ``(B, classes, rows, cols)`` logits."""
        return self.conv(self.bn(feats.permute(0, 3, 1, 2).float()))


class DepthHead(nn.Module):
    """DINOv2's linear depth head (``BNHead(classify=True, bins_strategy="UD",
    norm_strategy="linear", upsample=4)``, without its commented-out BatchNorm): patch tokens
    with the class token concatenated, a 1x1 linear layer to ``bins`` logits, ReLU + 0.1
    normalised to weights over bin centres ``linspace(min_depth, max_depth, bins)``, depth = the
    weighted centre, clamped to the range. The 1x1 layer runs before the x4 bilinear
    upsampling (both are linear, so the order does not change the result, only the cost)."""

    def __init__(self, dim: int, min_depth: float, max_depth: float, bins: int = DEPTH_BINS,
                 upsample: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * dim, bins, 1)
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins))
        self.min_depth, self.max_depth, self.upsample = min_depth, max_depth, upsample

    def forward(self, patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """``(B, rows, cols, D)`` and ``(B, D)`` -> depth ``(B, 1, upsample*rows, upsample*cols)``."""
        x = patches.permute(0, 3, 1, 2).float()
        x = torch.cat([x, cls.float()[:, :, None, None].expand_as(x)], dim=1)
        logit = self.conv(x)
        logit = F.interpolate(logit, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        w = torch.relu(logit) + 0.1
        w = w / w.sum(dim=1, keepdim=True)
        depth = torch.einsum("bkhw,k->bhw", w, self.centres)[:, None]
        return depth.clamp(self.min_depth, self.max_depth)
