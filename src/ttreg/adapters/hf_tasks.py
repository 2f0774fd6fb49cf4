"""Adapters for the Hugging Face task models people deploy on a supported ViT.

* :class:`HFDinov2BackboneAdapter`: ``Dinov2Backbone`` / ``Dinov2WithRegistersBackbone`` (what
  ``load_backbone`` builds for a DINOv2 ``backbone_config``). The same modules and weight names as
  ``Dinov2Model`` / ``Dinov2WithRegistersModel``, and the same architecture description, so a
  neuron set found on a bare DINOv2 applies to the backbone with the same weights (and a set from
  other weights is refused by the fingerprint as usual). Its feature maps are built from the
  encoder's recorded hidden states, which are cut back to the plain token count, so they keep
  their shapes.
* :class:`HFTaskAdapter`: a task model around one of those -- ``DepthAnythingForDepthEstimation``
  and ``DPTForDepthEstimation`` (with a DINOv2 ``backbone_config``), and the
  ``*ForImageClassification`` heads on ViT, DINOv2, CLIP and SigLIP. The registers go into the
  inner model's blocks and are cut from every block output, so depth maps, feature maps and
  logits keep their shapes; search, calibration and the fingerprint are the inner model's.

Classes are matched by name along the model's MRO, as in :mod:`ttreg.adapters.hf`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .base import Adapter, DelegatingAdapter
from .hf import HFDinov2Adapter, hf_class_names

#: backbone class -> the model class with the same modules and weight names (and fingerprint)
BACKBONE_AS_MODEL = {"Dinov2Backbone": "Dinov2Model",
                     "Dinov2WithRegistersBackbone": "Dinov2WithRegistersModel"}


class HFDinov2BackboneAdapter(HFDinov2Adapter):
    """``Dinov2Backbone`` / ``Dinov2WithRegistersBackbone``: structure, running and the recorded
    outputs as :class:`~ttreg.adapters.hf.HFDinov2Adapter`; the architecture is described as the
    matching ``*Model``'s, so the fingerprint compares the backbone with a bare DINOv2."""

    class_names = tuple(BACKBONE_AS_MODEL)

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone on ``x``: its feature maps (``feature_map_0``, ...) and, as the matching
        ``*Model`` gives it, the final-norm ``last_hidden_state`` (what an export writes and the
        evaluations read)."""
        out = self.vision(pixel_values=x, output_hidden_states=True)
        res = {"last_hidden_state": self.vision.layernorm(out.hidden_states[-1])}
        res.update({f"feature_map_{i}": f for i, f in enumerate(out.feature_maps)})
        return res

    def architecture(self) -> dict[str, Any]:
        arch = super().architecture()
        arch["class"] = BACKBONE_AS_MODEL.get(arch["class"], arch["class"])
        return arch


class HFTaskAdapter(DelegatingAdapter):
    """A Hugging Face task model, through the supported model it holds (its ``backbone`` or its
    encoder child): everything structural, running and the fingerprint are the inner model's."""

    family = "hf"
    class_names = ("DepthAnythingForDepthEstimation", "DPTForDepthEstimation",
                   "ViTForImageClassification", "Dinov2ForImageClassification",
                   "Dinov2WithRegistersForImageClassification", "CLIPForImageClassification",
                   "SiglipForImageClassification", "Siglip2ForImageClassification")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return bool(hf_class_names(model) & set(cls.class_names))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from . import wrap
        tried = []
        for name, child in model.named_children():
            if not hf_class_names(child):
                continue
            try:
                self.inner = wrap(child)
            except TypeError:
                tried.append(f"{name} ({type(child).__name__})")
                continue
            self.backbone_name, self.vision = name, getattr(self.inner, "vision", child)
            return
        raise TypeError(f"ttreg does not support {type(model).__name__} with this configuration: "
                        f"none of its parts ({', '.join(tried) or 'none'}) is a model ttreg supports "
                        "(DPT: give it a DINOv2 backbone_config); see docs/families.md")

    def describe(self) -> str:
        return f"{type(self.model).__name__} {self.backbone_name}: {self.inner.describe()}"


#: tried in order by :func:`ttreg.wrap` after the encoder adapters
HF_TASK_ADAPTERS: list[type[Adapter]] = [HFTaskAdapter, HFDinov2BackboneAdapter]

__all__ = ["HF_TASK_ADAPTERS", "HFDinov2BackboneAdapter", "HFTaskAdapter", "BACKBONE_AS_MODEL"]
