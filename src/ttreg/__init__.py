"""ttreg: test-time registers for Vision Transformers.

Find the register neurons that create high-norm outlier tokens, and at inference move their
activations into an extra appended token ("Vision Transformers Don't Need Trained Registers",
Jiang et al., NeurIPS 2025).

The names below load on first use, so ``import ttreg`` (and the command line's start-up, where
Ctrl-C must end cleanly) does not import torch until something needs it.
"""
from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "Adapter": "adapters", "wrap": "adapters",
    "Calibration": "calibration", "calibrate": "calibration",
    "ImageError": "data",
    "ModelLoadError": "models",
    "SearchStats": "neurons", "find_register_neurons": "neurons",
    "add_test_time_registers": "registers", "test_time_registers": "registers",
    "zero_neurons": "registers", "remove_test_time_registers": "registers",
    "UnmeasuredSizeWarning": "registers",
    "fit_attention_bias": "bias", "AttentionBias": "register_neurons",
    "ModelMismatchError": "register_neurons", "RegisterNeurons": "register_neurons",
    "Trace": "tracing", "trace": "tracing",
    "attribution": "attribution", "Attribution": "attribution",
}


def export_onnx(model, neurons, out, **kwargs):
    """Write an ONNX graph of ``model`` with test-time registers (see :func:`ttreg.export.export_onnx`)."""
    from .export import export_onnx as _export
    return _export(model, neurons, out, **kwargs)


def load_model(spec: str, device: str = "cpu", *, library: str | None = None):
    """``(model, transform)``: the model in eval mode on ``device``, and what turns a PIL image
    into the normalised ``(C, H, W)`` tensor it expects (its repr says how it resizes and
    normalises), each loaded the way its library loads it.

    ``spec``: ``timm:NAME`` (pretrained, from the Hub), ``timm:NAME@/path/weights.safetensors``,
    ``hf:ORG/NAME`` or ``hf:/local/folder`` (transformers), ``open_clip:ARCH/PRETRAINED``,
    ``builtin:dinov2_vits14`` (the offline DINOv2 ViT-S/14, timm) or ``builtin:dinov2_vits14-hf``
    (the same in transformers), or a local path (see :mod:`ttreg.models`). The command line's
    synthetic models load here too: ``"planted"`` (:func:`ttreg.testing.planted_vit`),
    ``"planted-clip"`` (a tiny open_clip CLIP around it; its tokenizer:
    ``ttreg.eval.synthetic.planted_clip()``) and ``"builtin:dinov2_vits14+planted"`` (the built-in
    model with :func:`ttreg.testing.plant_demo`'s planted neurons).
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...
    ``library``: ``"timm"`` or ``"hf"`` for the built-in model (the same as the ``-hf`` suffix).
    Errors are one line (:class:`ttreg.ModelLoadError`)."""
    from .cli_common import SYNTHETIC, resolve_model
    if spec in SYNTHETIC:
        if library is not None:
            raise ValueError(f"library= does not apply to the synthetic model {spec!r}")
        model, transform, _ = resolve_model(spec, device)
        return model, transform
    from .models import load_model as _load
    return _load(spec, device, library=library)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(f".{mod}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


#: public submodules ``dir(ttreg)`` lists beside the API (the README names them)
_SUBMODULES = ("testing", "plant", "models", "eval")


def __dir__() -> list[str]:
    """The API (:data:`__all__`), the version and the public submodules -- not what the package
    imports for itself (``sys``, ``importlib``, ...)."""
    return sorted({*__all__, "__version__", *_SUBMODULES})


__all__ = sorted([*_EXPORTS, "load_model", "export_onnx"])
