"""ttreg: test-time registers for Vision Transformers.

Find the register neurons that create high-norm outlier tokens, and at inference move their
activations into an extra appended token ("Vision Transformers Don't Need Trained Registers",
Jiang et al., NeurIPS 2025).
"""
from .adapters import Adapter, wrap
from .bias import fit_attention_bias
from .calibrate import Calibration, calibrate
from .data import ImageError
from .models import ModelLoadError
from .neurons import SearchStats, find_register_neurons
from .registers import (add_test_time_registers, remove_test_time_registers, test_time_registers,
                        zero_neurons)
from .spec import AttentionBias, ModelMismatchError, RegisterNeurons
from .trace import Trace, trace

__version__ = "0.1.0"


def export_onnx(model, neurons, out, **kwargs):
    """Write an ONNX graph of ``model`` with test-time registers (see :func:`ttreg.export.export_onnx`)."""
    from .export import export_onnx as _export
    return _export(model, neurons, out, **kwargs)


def load_model(spec: str, *args, **kwargs):
    """``(model, transform)`` for ``timm:NAME``, ``hf:ORG/NAME``, ``open_clip:ARCH/PRETRAINED``,
    ``builtin:dinov2_vits14`` or a local path (see :mod:`ttreg.models`)."""
    from .models import load_model as _load
    return _load(spec, *args, **kwargs)


__all__ = [
    "Adapter", "AttentionBias", "Calibration", "ImageError", "ModelLoadError", "ModelMismatchError", "RegisterNeurons", "SearchStats", "Trace",
    "add_test_time_registers", "calibrate", "export_onnx", "find_register_neurons", "fit_attention_bias", "load_model", "test_time_registers", "remove_test_time_registers", "trace", "wrap", "zero_neurons",
]
