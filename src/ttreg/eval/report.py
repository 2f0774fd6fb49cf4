"""Results out: mean with a 95% confidence interval, plain-text tables, JSON files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# two-sided 95% Student-t quantiles for 1..30 degrees of freedom (scipy-free)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom."""
    if dof < 1:
        return float("nan")
    return _T975[dof - 1] if dof <= len(_T975) else 1.96 + 2.4 / dof


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "ci95", "std", "n", "values"}``: the half-width ``ci95`` is t * std / sqrt(n)
    (0 for a single value)."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "std": float("nan"), "n": 0, "values": []}
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    ci = t975(n - 1) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": float(v.mean()), "ci95": ci, "std": std, "n": n, "values": v.tolist()}


def bootstrap_ci(values: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, Any]:
    """``{"mean", "ci95": [lo, hi], "n", "resamples"}``: the mean of ``values`` (one per item:
    an image, an image-object pair) with a percentile bootstrap interval over the items,
    reproducible from ``seed``. ``values`` may be ``(n, k)``: k paired statistics resampled
    together (the mean and interval then per column)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "ci95": [float("nan")] * 2, "n": 0, "resamples": resamples}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return {"mean": v.mean(axis=0).tolist(), "ci95": [np.asarray(lo).tolist(), np.asarray(hi).tolist()],
            "n": n, "resamples": resamples}


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: numbers rounded, ``mean_ci`` dicts as ``m ± ci``, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, dict) and "mean" in value and isinstance(value.get("ci95"), list):
        lo, hi = value["ci95"]
        return f"{value['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    if isinstance(value, dict) and "mean" in value:
        if value.get("n", 1) > 1:
            return f"{value['mean']:.{digits}f} ± {value['ci95']:.{digits}f}"
        return f"{value['mean']:.{digits}f}"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
                 title: str | None = None, digits: int = 3) -> str:
    """A plain-text table. ``columns``: ``(key, header)`` pairs; rows are dicts."""
    cells = [[h for _, h in columns]] + [[fmt(r.get(k), digits) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths)))
    out = [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    if title:
        out.insert(0, title)
    return "\n".join(out)


def draws(result: dict) -> str:
    """``"3 draws"`` / ``"1 draw"``: how many random-neuron controls a result holds."""
    n = len(result["config"]["control_seeds"])
    return f"{n} draw" + ("" if n == 1 else "s")


def jsonable(obj: Any) -> Any:
    """Tensors, numpy values, paths and tuples made JSON-friendly (recursively)."""
    try:
        import torch
        if torch.is_tensor(obj):
            return jsonable(obj.detach().cpu().tolist())
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN or infinity
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, result: dict) -> Path:
    """Write ``result`` as indented JSON, atomically (parents created)."""
    from ..files import write_json as _write
    return _write(path, jsonable(result))
