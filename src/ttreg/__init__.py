"""ttreg: test-time registers for Vision Transformers.

Find the register neurons that create high-norm outlier tokens, and at inference move their
activations into an extra appended token ("Vision Transformers Don't Need Trained Registers",
Jiang et al., NeurIPS 2025).
"""
from .adapters import Adapter, wrap
from .data import ImageError
from .neurons import SearchStats, find_register_neurons
from .registers import add_test_time_registers, test_time_registers
from .spec import ModelMismatchError, RegisterNeurons
from .trace import Trace, trace

__version__ = "0.1.0"

__all__ = [
    "Adapter", "ImageError", "ModelMismatchError", "RegisterNeurons", "SearchStats", "Trace",
    "add_test_time_registers", "find_register_neurons", "test_time_registers", "trace", "wrap",
]
