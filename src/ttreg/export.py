"""ONNX export of a model with test-time registers (token or bias form).

The graph is the model's feature call (what :meth:`Adapter.run` runs: ``forward_features`` for
timm, the vision encoder for transformers, ``encode_image`` for open_clip) with the registers
installed while it is traced, so the edit -- the appended token and the neuron moves, or the
extra key/value per head and the zeroed neurons -- becomes ordinary ops in the graph, and the
graph's outputs keep the model's shapes.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript tracer. The dynamo-based
exporter needs the ``onnxscript`` package, which ttreg does not depend on; the tracer runs the
model's Python (hooks, the attention interception of :mod:`ttreg.attention`) as in eager mode and
records every op, with the batch axis (and, where the family resizes its position embedding with
exportable ops, height and width) left dynamic. The file is written atomically, and by default
checked with onnxruntime against eager PyTorch on other batch sizes (and sizes) before it is put
in place. The check is relative to the features' scale: per output, the largest
``|onnxruntime - PyTorch|`` over the largest ``|PyTorch|`` value (the demo's DINOv2-S/14 plant:
1.2e-4 absolutely on values up to 43, 2.8e-6 relatively; the default accepts 1e-4).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .adapters import Adapter, wrap
from .neurons import eval_mode
from .registers import test_time_registers
from .files import atomic_write, check_output_file

#: the largest relative error the check accepts: per output, max |onnxruntime - PyTorch| over
#: max |PyTorch| (the features' scale)
TOLERANCE = 1e-4


class ExportCheckError(RuntimeError):
    """The exported graph failed the onnxruntime check (nothing was written)."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and checked."""

    path: Path
    form: str
    inputs: list[str]
    outputs: list[str]
    dynamic_size: bool
    #: per check: {"batch", "size", "max_abs_diff", "scale" (max |PyTorch| of the output with the
    #: largest relative error), "relative_diff" (its max |diff| / scale)}
    checks: list[dict[str, Any]] = field(default_factory=list)
    tolerance: float = 0.0          # the relative error the check accepted

    @property
    def max_abs_diff(self) -> float | None:
        return max((c["max_abs_diff"] for c in self.checks), default=None)

    @property
    def relative_diff(self) -> float | None:
        """The largest relative error of the checks (max |diff| / max |feature|, per output)."""
        return max((c["relative_diff"] for c in self.checks), default=None)

    def summary(self) -> str:
        dims = "batch, height and width" if self.dynamic_size else "batch"
        text = f"wrote {self.path} ({self.form} form; dynamic {dims}; outputs {', '.join(self.outputs)})"
        if self.checks:
            runs = ", ".join(f"batch {c['batch']} at {c['size'][0]}x{c['size'][1]}" for c in self.checks)
            scale = max(c["scale"] for c in self.checks)
            text += (f"\nonnxruntime vs PyTorch: relative error {self.relative_diff:.2g} (max |diff| "
                     f"{self.max_abs_diff:.2g} on features up to {scale:.3g}; tolerance "
                     f"{self.tolerance:g}) on {runs}")
        return text


def named_outputs(out: Any) -> dict[str, torch.Tensor]:
    """The tensors of a feature call's output by name: a tensor is ``features``; a model output
    (dict) gives its tensor fields (``last_hidden_state``, ``pooler_output``, ...; recorded
    hidden states and attention maps are left out); a tuple gives ``output_0``, ``output_1``..."""
    if torch.is_tensor(out):
        return {"features": out}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if torch.is_tensor(v)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if torch.is_tensor(v)}
    raise TypeError(f"cannot export a model whose output is a {type(out).__name__}")


class FeatureCall(nn.Module):
    """The adapter's feature call as a module returning a tuple of tensors (what the exporter
    traces)."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.model = adapter.model
        self._adapter = adapter

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(named_outputs(self._adapter.run(pixel_values)).values())


def export_onnx(model, neurons, out, *, form: str = "token", bias=None,
                num_registers: int | None = None, preset: str = "paper", batch_size: int = 2,
                image_size: tuple[int, int] | None = None, dynamic_size: bool | None = None,
                opset: int = 17, check: bool = True, verify: bool = True,
                tolerance: float = TOLERANCE) -> ExportReport:
    """Write ``model`` with test-time registers as an ONNX graph at ``out``.

    ``neurons``, ``form`` (``"token"`` or ``"bias"``), ``bias``, ``num_registers``, ``preset`` and
    ``check``: as :func:`ttreg.test_time_registers` (an empty set with ``form="token"`` and
    ``num_registers=0`` exports the plain model). The graph takes ``pixel_values``
    ``(batch, 3, H, W)`` and returns the feature call's tensors (see :func:`named_outputs`).
    ``image_size``: the traced size (default: the model's). ``dynamic_size``: keep height and
    width dynamic (default: where the family supports it, :meth:`Adapter.dynamic_size`).
    ``verify``: run the graph in onnxruntime on two other batch sizes (and another size when
    dynamic) and refuse to write it if any output differs from eager PyTorch by more than
    ``tolerance`` relative to that output's scale (max |diff| / max |PyTorch value|; default
    1e-4; skipped when onnxruntime is not installed). The model runs in eval mode while it is
    traced; every module's own mode is restored afterwards. Returns an :class:`ExportReport`.
    """
    ad = wrap(model)
    check_output_file(out, "--out")          # the path as given: "m.onnx/" is a folder
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: give a file name ending in .onnx")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a relative error in (0, 1), such as 1e-4; got {tolerance!r}")
    if dynamic_size is None:
        dynamic_size = ad.dynamic_size()
    elif dynamic_size and not ad.dynamic_size():
        raise ValueError(f"{ad.describe()} cannot keep height and width dynamic in an ONNX graph; "
                         "export it at one size (image_size=...)")
    size = tuple(image_size or ad.image_size())
    p = ad.parameter()
    x = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    with eval_mode(ad.model):
        # traced with autograd on: nn.MultiheadAttention then skips its native fast path, an op
        # ONNX has no counterpart for
        with test_time_registers(ad, neurons, num_registers=num_registers, preset=preset,
                                 check=check, form=form, bias=bias) as handle:
            call = FeatureCall(ad)
            with torch.no_grad():
                names = list(named_outputs(ad.run(x)).keys())
            axes = {"pixel_values": {0: "batch", **({2: "height", 3: "width"} if dynamic_size else {})}}
            for name in names:
                axes[name] = {0: "batch"}
            report = ExportReport(out, handle.form, ["pixel_values"], names, dynamic_size,
                                  tolerance=float(tolerance))

            def write(tmp: Path) -> None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # tracer and deprecation notes, not for users
                    torch.onnx.export(call, (x,), str(tmp), dynamo=False, opset_version=opset,
                                      input_names=["pixel_values"], output_names=names,
                                      dynamic_axes=axes, do_constant_folding=True)
                if verify:   # checked before it is put in place
                    report.checks = _verify(tmp, ad, names, batch_size, size, dynamic_size, tolerance)
            atomic_write(out, write)
    return report


def _verify(path: Path, ad: Adapter, names: list[str], batch_size: int, size: tuple[int, int],
            dynamic_size: bool, tolerance: float) -> list[dict[str, Any]]:
    """Compare onnxruntime with eager PyTorch (registers installed by the caller) on other batch
    sizes and, for a dynamic graph, another size; raise if an output's max |diff| over its max
    |PyTorch value| is above ``tolerance``."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ph, pw = ad.patch_size
    cases = [(1, size), (batch_size + 1, size)]
    if dynamic_size:
        cases.append((2, (size[0] + 2 * ph, size[1] + pw)))
    p = ad.parameter()
    checks = []
    for b, (h, w) in cases:
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = named_outputs(ad.run(x.to(p.device, p.dtype)))
        got = session.run(names, {"pixel_values": x.to(p.dtype).numpy()})
        per = []                                 # (relative, absolute, scale) per output
        for n, g in zip(names, got):
            want = ref[n].float().cpu()
            diff = float((torch.from_numpy(g).float() - want).abs().max())
            scale = float(want.abs().max())
            per.append((diff / scale if scale > 0 else diff, diff, scale))
        rel, _, scale = max(per)
        diff = max(d for _, d, _ in per)
        checks.append({"batch": b, "size": [h, w], "max_abs_diff": diff, "scale": scale,
                       "relative_diff": rel})
        if not rel <= tolerance:
            raise ExportCheckError(f"the exported graph differs from PyTorch by {rel:.3g} of the features' "
                               f"scale (max |diff| {diff:.3g}, features up to {scale:.3g}; tolerance "
                               f"{tolerance:g}) on a batch of {b} at {h}x{w}; nothing was written "
                               f"(a larger --tolerance accepts it)")
    return checks


__all__ = ["ExportCheckError", "ExportReport", "FeatureCall", "export_onnx", "named_outputs"]
