"""Outlier-token and attention statistics over images, plain vs test-time registers vs a
random-neuron control.

Per arm: the fraction of images with outlier tokens at the detection layer, the mean
max/median patch-norm ratio per layer, and, at the last layer, the entropy of the first (CLS)
token's attention over the patches (renormalised over the patches) and the share of that
attention on the 5 most-attended patches, plus the attention the CLS token pays to the
test-time registers: per image the maximum over heads and registers, as the authors'
``register_neurons.ipynb`` measures it (next to the maximum over heads and patches it compares
with), and the mean over heads of the summed register attention. Means and medians over images.

The rebuttal's statistics: per image the median and standard deviation of the patch norms at the
detection layer (beside their max), the outlier tokens' norms pooled over all images (count, max,
median, std), and the CLS token's head-mean attention to the registers against its median to the
other tokens (CLS itself and the registers left out; the rebuttal: 0.1657 against 0.0006). For
the attention-bias form the fitted key stands in for the register. With
``count_cls`` the CLS token (every prefix token) is an outlier candidate, as in the authors' code.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..adapters import wrap
from ..data import iter_batches
from ..outliers import check_threshold, norm_ratio, outlier_mask
from ..tracing import trace
from .arms import control_rows, make_arms, summarize_random
from .metrics import attention_entropy, topk_mass
from .report import format_table

METRICS = ("fraction_with_outliers", "norm_ratio", "max_patch_norm", "cls_entropy", "cls_to_registers",
           "cls_to_registers_mean_heads", "cls_to_patches_max", "patch_norm_median", "patch_norm_std",
           "cls_to_others_median")


def _batch_stats(tr, det: int, threshold, top: int, count_cls: bool = False) -> dict[str, torch.Tensor]:
    """Per-image numbers ``(B, ...)`` from one traced batch (``outlier_norms``: the norms of
    every outlier token of the batch, flat)."""
    npre, R = tr.num_prefix_tokens, tr.num_registers
    norms = tr.norms                                            # (B, L, T)
    B, L, T = norms.shape
    out = outlier_mask(norms[:, det], npre, R, threshold, include_prefix=count_cls)
    ratio = norm_ratio(norms.reshape(B * L, T), npre, R).reshape(B, L)
    patch = norms[:, :, tr.patch_slice]
    attn = tr.attention[L - 1][:, :, 0, :].float()              # (B, heads, T): CLS row
    to_patches = attn[..., tr.patch_slice]
    extra = R + attn.shape[-1] - T                              # registers, or the bias form's keys
    regs = attn[..., T - R:] if extra else attn.new_zeros(*attn.shape[:2], 1)
    others = attn.mean(1)[:, 1:T - R]                           # head mean, CLS and registers left out
    det_patch = patch[:, det].float()
    return {"outliers": out.any(dim=1).float(), "ratio": ratio,
            "max_norm": patch[:, det].amax(-1),
            "median_norm": det_patch.median(-1).values, "std_norm": det_patch.std(-1),
            "outlier_norms": norms[:, det].float()[out],
            "to_others_median": others.median(-1).values,
            "entropy": attention_entropy(to_patches).mean(1),
            "topk": topk_mass(to_patches, top).mean(1),
            "to_regs": regs.amax(dim=(1, 2)),                   # max over heads and registers
            "to_regs_mean_heads": regs.sum(-1).mean(1),
            "to_patches_max": to_patches.amax(dim=(1, 2))}


def _summary(values: torch.Tensor) -> dict[str, float | int | None]:
    """Count, max, median and (sample) standard deviation of pooled values (None where empty)."""
    n = int(values.numel())
    return {"tokens": n, "max": float(values.max()) if n else None,
            "median": float(values.median()) if n else None,
            "std": float(values.std()) if n > 1 else None}


def evaluate_outliers(model, images, neurons, *, threshold: float | str = "auto",
                      detection_layer: int = -1, control_seeds: Sequence[int] = (0, 1, 2),
                      num_registers: int = 1, preset: str = "paper", bias=None, batch_size: int = 16,
                      transform: Callable | None = None, top: int = 5, count_cls: bool = False,
                      progress: bool = False, print_table: bool = True) -> dict[str, Any]:
    """Outlier and attention statistics for each arm (see the module docstring).

    ``images``: anything :func:`ttreg.data.iter_batches` takes (folder, paths, tensor batch).
    Returns ``{"arms": {name: metrics}, "random": mean ± CI over the random arms, ...}``.
    """
    threshold = check_threshold(threshold)
    ad = wrap(model)
    L = ad.num_layers
    det = detection_layer % L
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=num_registers,
                     preset=preset, bias=bias)
    acc: dict[str, dict[str, list]] = {a.name: {} for a in arms}
    batches = iter_batches(images, ad, batch_size, transform)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="outliers", unit="batch")
    for x in batches:
        for arm in arms:
            with arm.context(model):
                tr = trace(model, x, norms=True, attention=[L - 1])
            for k, v in _batch_stats(tr, det, threshold, top, count_cls).items():
                acc[arm.name].setdefault(k, []).append(v)
    per_arm: dict[str, dict[str, Any]] = {}
    for arm in arms:
        s = {k: torch.cat(v).double() for k, v in acc[arm.name].items()}
        per_arm[arm.name] = {
            "images": int(len(s["outliers"])),
            "fraction_with_outliers": float(s["outliers"].mean()),
            "norm_ratio": float(s["ratio"][:, det].mean()),
            "norm_ratio_per_layer": s["ratio"].mean(0).tolist(),
            "max_patch_norm": float(s["max_norm"].mean()),
            "cls_entropy": float(s["entropy"].mean()),
            f"top{top}_mass": float(s["topk"].mean()),
            "cls_to_registers": float(s["to_regs"].mean()),
            "cls_to_registers_median": float(s["to_regs"].median()),
            "cls_to_registers_mean_heads": float(s["to_regs_mean_heads"].mean()),
            "cls_to_patches_max": float(s["to_patches_max"].mean()),
            "cls_to_patches_max_median": float(s["to_patches_max"].median()),
            "patch_norm_median": float(s["median_norm"].mean()),
            "patch_norm_std": float(s["std_norm"].mean()),
            "outlier_norm": _summary(s["outlier_norms"]),
            "cls_to_others_median": float(s["to_others_median"].mean()),
            "setup": arm.describe(),
        }
    result = {
        "experiment": "outliers",
        "config": {"threshold": threshold, "detection_layer": det, "num_registers": num_registers,
                   "count_cls": count_cls,
                   "preset": preset, "control_seeds": list(control_seeds), "top": top},
        "neurons": arms[1].describe()["neurons"] if len(arms) > 1 else [],
        "arms": per_arm,
        "random": summarize_random(per_arm, [*METRICS, f"top{top}_mass"]),
    }
    if print_table:
        print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    top = result["config"]["top"]
    cols = [("arm", "arm"), ("preset", "preset"), ("images", "images"), ("fraction_with_outliers", "outlier imgs"),
            ("norm_ratio", f"max/median @{result['config']['detection_layer']}"),
            ("max_patch_norm", "max norm"), ("cls_entropy", "CLS entropy"),
            (f"top{top}_mass", f"top-{top} mass"), ("cls_to_registers", "CLS->reg max"),
            ("cls_to_registers_mean_heads", "CLS->reg mean"), ("cls_to_others_median", "CLS->other median"),
            ("cls_to_patches_max", "CLS->patch max"), ("patch_norm_median", "median norm"),
            ("patch_norm_std", "norm std")]
    return format_table(control_rows(result), cols, title="Outlier tokens and last-layer CLS attention "
                        "(CLS->reg/patch max: over heads and tokens, mean over images)")
