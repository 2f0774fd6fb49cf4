"""Model-family adapters and ``wrap``, which picks the right one for a module."""
from __future__ import annotations

import torch.nn as nn

from .base import Adapter
from .timm_vit import TimmViTAdapter

#: tried in order; the first whose ``matches`` accepts the model wins
ADAPTERS: list[type[Adapter]] = [TimmViTAdapter]

SUPPORTED = (
    "timm VisionTransformer (DINOv2, CLIP towers, DeiT, trained registers); "
    "transformers Dinov2Model, Dinov2WithRegistersModel, ViTModel, CLIPVisionModel, CLIPModel, "
    "SiglipVisionModel, LLaVA vision towers; open_clip CLIP models"
)


def _libraries(model: nn.Module) -> set[str]:
    """Top-level packages that define the model's class or any of its submodules' classes."""
    return {type(m).__module__.split(".")[0] for m in (model, *model.children())}


def _register_optional(model: nn.Module) -> None:
    """Import the transformers / open_clip adapters only for models from those libraries."""
    libs = _libraries(model)
    for modname, clsname, lib in (("hf", "HF_ADAPTERS", "transformers"),
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


def wrap(model: nn.Module | Adapter) -> Adapter:
    """Return the adapter for ``model`` (an adapter is returned as is)."""
    if isinstance(model, Adapter):
        return model
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise TypeError("this model was compiled with torch.compile, and compiled code ignores "
                        "hooks added afterwards: give ttreg the original module (install test-time "
                        "registers first, then compile)")
    _register_optional(model)
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise TypeError(f"ttreg does not support {type(model).__module__}.{type(model).__name__}; "
                    f"supported: {SUPPORTED}")


__all__ = ["Adapter", "TimmViTAdapter", "ADAPTERS", "SUPPORTED", "wrap"]
