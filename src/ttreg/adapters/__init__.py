"""Model-family adapters and ``wrap``, which picks the right one for a module (or, given names,
describes any ViT: :mod:`ttreg.adapters.generic`)."""
from __future__ import annotations

import torch.nn as nn

from .base import Adapter
from .generic import SPEC_ATTR, GenericAdapter, WrapSpec, wrap_custom
from .peft_model import PeftAdapter
from .timm_eva import TimmEvaAdapter
from .timm_features import TimmFeatureGraphRefusal, TimmFeaturesAdapter
from .timm_naflex import TimmNaFlexAdapter
from .timm_vit import TimmViTAdapter

#: tried in order; the first whose ``matches`` accepts the model wins
ADAPTERS: list[type[Adapter]] = [TimmViTAdapter, TimmEvaAdapter, TimmNaFlexAdapter, TimmFeaturesAdapter,
                                 TimmFeatureGraphRefusal, PeftAdapter]

#: what ``wrap(model)`` recognises, by library (README's table and docs/families.md list the same)
SUPPORTED_BY_LIBRARY = {
    "timm": ("VisionTransformer (DINOv2, CLIP towers, DeiT, trained registers), Eva (EVA-02, "
             "EVA-CLIP, DINOv3 vit_*_dinov3, PE-Core vit_pe_core_*), NaFlexVit, and their "
             "features_only=True models (feature_cls 'getter' or 'hook'; not 'fx')"),
    "transformers": ("Dinov2Model, Dinov2WithRegistersModel, ViTModel, CLIPVisionModel, CLIPModel, "
                     "SiglipVisionModel, SiglipModel, DINOv3ViTModel, Siglip2VisionModel, Siglip2Model, "
                     "Aimv2VisionModel, Aimv2Model, InternVLVisionModel, and the vision tower of the VLMs "
                     "LLaVA, LLaVA-OneVision, PaliGemma, Gemma 3, Idefics3, SmolVLM, InternVL, Qwen2-VL and "
                     "Qwen3-VL (*ForConditionalGeneration / *Model, and the Qwen towers alone; not "
                     "Qwen2.5-VL); task models on them: "
                     "Dinov2Backbone, DepthAnythingForDepthEstimation, DPTForDepthEstimation (DINOv2 "
                     "backbone), ViT / Dinov2 / CLIP / Siglip / Siglip2 *ForImageClassification"),
    "open_clip": "CLIP models (own ViT towers, and timm VisionTransformer / Eva trunks)",
    "peft": "PeftModel (LoRA and other adapters) around any model above",
}
SUPPORTED = "; ".join(f"{lib} {what}" for lib, what in SUPPORTED_BY_LIBRARY.items()) + (
    "; any other ViT: ttreg.wrap(model, blocks=..., attention=..., mlp_down=...)")


def _libraries(model: nn.Module) -> set[str]:
    """Top-level packages that define the model's class or any of its submodules' classes."""
    return {type(m).__module__.split(".")[0] for m in (model, *model.children())}


def _register_optional(model: nn.Module) -> None:
    """Import the transformers / open_clip adapters only for models from those libraries."""
    libs = _libraries(model)
    for modname, clsname, lib in (("hf", "HF_ADAPTERS", "transformers"),
                                  ("hf_tasks", "HF_TASK_ADAPTERS", "transformers"),
                                  ("hf_qwen_vl", "HF_QWEN_ADAPTERS", "transformers"),
                                  ("open_clip", "OPEN_CLIP_ADAPTERS", "open_clip")):
        if lib not in libs:
            continue
        try:
            mod = __import__(f"{__name__}.{modname}", fromlist=[clsname])
        except ImportError:
            continue
        for cls in getattr(mod, clsname):
            if cls not in ADAPTERS:
                ADAPTERS.append(cls)


def wrap(model: nn.Module | Adapter, **names) -> Adapter:
    """Return the adapter for ``model`` (an adapter is returned as is).

    With keyword arguments (``blocks=``, ``attention=``, ``mlp_down=``, ``num_prefix_tokens=``,
    ... see :mod:`ttreg.adapters.generic`) any ViT is described by the names given and the parts
    found by role; the description is kept on the model, so later calls need no names.
    """
    if isinstance(model, Adapter):
        if names:
            raise TypeError("ttreg.wrap got an adapter and names; pass the model itself with names")
        return model
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise TypeError("this model was compiled with torch.compile, and compiled code ignores "
                        "hooks added afterwards: give ttreg the original module (install test-time "
                        "registers first, then compile)")
    if names:
        return wrap_custom(model, **names)
    spec = getattr(model, SPEC_ATTR, None)
    if isinstance(spec, WrapSpec):
        return GenericAdapter(model, spec)
    _register_optional(model)
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise TypeError(f"ttreg does not support {type(model).__module__}.{type(model).__name__}: see the "
                    "supported models in docs/families.md, or describe any ViT with "
                    "ttreg.wrap(model, blocks=..., attention=..., mlp_down=...)")


__all__ = ["Adapter", "GenericAdapter", "TimmViTAdapter", "TimmEvaAdapter", "TimmNaFlexAdapter",
           "TimmFeaturesAdapter", "TimmFeatureGraphRefusal", "PeftAdapter",
           "ADAPTERS", "SUPPORTED", "SUPPORTED_BY_LIBRARY", "WrapSpec", "wrap"]
