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
}


def export_onnx(model, neurons, out, **kwargs):
    """Write an ONNX graph of ``model`` with test-time registers (see :func:`ttreg.export.export_onnx`)."""
    from .export import export_onnx as _export
    return _export(model, neurons, out, **kwargs)


def load_model(spec: str, *args, **kwargs):
    """``(model, transform)`` for ``timm:NAME``, ``hf:ORG/NAME``, ``open_clip:ARCH/PRETRAINED``,
    ``builtin:dinov2_vits14`` or a local path (see :mod:`ttreg.models`)."""
    from .models import load_model as _load
    return _load(spec, *args, **kwargs)


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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted([*_EXPORTS, "load_model", "export_onnx"])
