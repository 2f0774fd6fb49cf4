"""Adapters for timm's ``features_only=True`` models (the backbones of detection and segmentation
models): the registers go into the ViT the feature extractor holds.

* ``FeatureGetterNet`` (``feature_cls="getter"``, the ViT default) calls the trunk's
  ``forward_intermediates``; the trunk is ``.model``.
* ``FeatureHookNet`` (``feature_cls="hook"``) runs the trunk, kept whole as ``body``, and records
  block outputs with forward hooks; ttreg's hooks run first, so what it records has no register.
* ``FeatureGraphNet`` (``feature_cls="fx"``) is refused: it runs a torch.fx rewrite of the trunk,
  whose traced code calls no block's hooks.

Every feature map keeps its shape: the registers are cut from each block output. Structure,
search and the fingerprint are the trunk's (a trunk pruned by ``features_only`` -- final norm,
head and any blocks after the last feature index removed -- has other weights than the full model,
so a neuron set found on the full model is refused by the fingerprint: find it on the feature
model, or pass ``check=False`` when the blocks are the same).
"""
from __future__ import annotations

import torch.nn as nn

from .base import DelegatingAdapter
from .timm_vit import is_timm


class TimmFeaturesAdapter(DelegatingAdapter):
    """timm ``FeatureGetterNet`` / ``FeatureHookNet`` around a supported trunk."""

    family = "timm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "_features", "FeatureGetterNet") or is_timm(model, "_features", "FeatureHookNet")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        trunk = model["body"] if isinstance(model, nn.ModuleDict) and "body" in model \
            else getattr(model, "model", None)
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"this timm {type(model).__name__} rewrote its trunk into its own modules "
                            "(flatten_sequential=True), which loses its tokens and positions: build it "
                            "with feature_cls='getter' or feature_cls='hook' without flatten_sequential")
        from . import wrap
        self.trunk = trunk
        self.inner = wrap(trunk)

    def describe(self) -> str:
        return f"timm {type(self.model).__name__} trunk: {self.inner.describe()}"


class TimmFeatureGraphRefusal(DelegatingAdapter):
    """timm ``FeatureGraphNet`` (``feature_cls="fx"``): recognised and refused in one line."""

    family = "timm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "_features_fx", "FeatureGraphNet")

    def __init__(self, model: nn.Module) -> None:
        raise TypeError("ttreg cannot install registers in timm's FeatureGraphNet (feature_cls='fx'): "
                        "it runs a torch.fx rewrite of the model that calls no block's hooks; build the "
                        "model with feature_cls='getter' (the ViT default) or feature_cls='hook'")


__all__ = ["TimmFeaturesAdapter", "TimmFeatureGraphRefusal"]
