"""Outlier-token rules: which tokens of an image have an abnormally high norm, and where they start.

All functions take token norms of one layer, ``(B, T)``, with the token layout
``[prefix][patches][registers]``, and are vectorised over the batch.
"""
from __future__ import annotations

import math

import torch

#: an ``auto`` outlier must also exceed this multiple of the image's median patch norm
AUTO_MIN_RATIO = 2.0


def patch_slice(num_tokens: int, num_prefix: int, num_registers: int = 0) -> slice:
    return slice(num_prefix, num_tokens - num_registers)


def check_threshold(threshold: float | str) -> float | str:
    """``threshold`` as ``"auto"`` or a finite norm > 0; anything else (-1, 0, nan, "high") is a
    one-line ``ValueError`` raised before any work."""
    if isinstance(threshold, str):
        if threshold == "auto":
            return threshold
        raise ValueError(f"threshold must be a positive number or 'auto', got {threshold!r}")
    if isinstance(threshold, bool):
        raise ValueError(f"threshold must be a positive number or 'auto', got {threshold!r}")
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a positive number or 'auto', got {threshold!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"threshold must be a positive token norm (> 0, finite) or 'auto', "
                         f"got {threshold!r}")
    return value


def thresholds(patch_norms: torch.Tensor, threshold: float | str = "auto",
               min_ratio: float = AUTO_MIN_RATIO) -> torch.Tensor:
    """Per-image norm threshold ``(B,)`` from patch norms ``(B, P)``.

    ``threshold`` is a number (same for every image) or ``"auto"``: the paper's heuristic,
    mean + 3 std of that image's patch norms, floored at ``min_ratio`` x the median so that the
    normal tail of a model *without* outliers is not called an outlier.
    """
    pn = patch_norms.float()
    if check_threshold(threshold) == "auto":
        stat = pn.mean(dim=1) + 3 * pn.std(dim=1)
        return torch.maximum(stat, min_ratio * pn.median(dim=1).values)
    return torch.full((pn.shape[0],), float(threshold), dtype=pn.dtype, device=pn.device)


def outlier_mask(norms: torch.Tensor, num_prefix: int, num_registers: int = 0,
                 threshold: float | str = "auto", include_prefix: bool = False,
                 min_ratio: float = AUTO_MIN_RATIO) -> torch.Tensor:
    """``(B, T)`` bool: tokens whose norm exceeds the image's threshold.

    Test-time registers are never outliers; prefix tokens (CLS, trained registers) are candidates
    only with ``include_prefix`` (the authors' code includes CLS; a CLS token is often large by
    design, so by default only patch tokens count).
    """
    T = norms.shape[1]
    ps = patch_slice(T, num_prefix, num_registers)
    thr = thresholds(norms[:, ps], threshold, min_ratio)
    mask = norms.float() > thr[:, None]
    if num_registers:
        mask[:, T - num_registers:] = False
    if not include_prefix:
        mask[:, :num_prefix] = False
    return mask


def norm_ratio(norms: torch.Tensor, num_prefix: int, num_registers: int = 0) -> torch.Tensor:
    """Max over median patch norm of token norms ``(..., T)`` (tokens last, ``num_prefix`` first
    and ``num_registers`` last left out): ``(B,)`` from ``(B, T)``, ``(B, L)`` from ``(B, L, T)``.
    About 1-2 without outliers. The one definition of the ratio (the tests' helper too)."""
    pn = norms[..., patch_slice(norms.shape[-1], num_prefix, num_registers)].float()
    return pn.amax(dim=-1) / pn.median(dim=-1).values.clamp_min(1e-12)


def layers_with_outliers(norms: torch.Tensor, num_prefix: int, num_registers: int = 0,
                         threshold: float | str = "auto", **kw) -> torch.Tensor:
    """``(B, L)`` bool from per-layer norms ``(B, L, T)``: does image b have outliers at layer l."""
    B, L, T = norms.shape
    flat = norms.reshape(B * L, T)
    return outlier_mask(flat, num_prefix, num_registers, threshold, **kw).any(dim=1).reshape(B, L)


def majority_layer(fraction_with_outliers, majority: float = 0.5) -> int | None:
    """First layer at which more than ``majority`` of the images have outliers, or None.

    Reported as evidence only: mildly large tokens in early layers pass the ``auto`` threshold
    too, so this is no emergence rule (see :func:`emergence_layer`)."""
    frac = torch.as_tensor(fraction_with_outliers, dtype=torch.float64)
    hits = torch.nonzero(frac > majority).flatten()
    return int(hits[0]) if len(hits) else None


#: a block counts as making the outliers when it grows them by at least this share of their
#: peak log norm ratio
JUMP_SHARE = 0.1


def emergence_layer(outlier_log_ratio, jump_share: float = JUMP_SHARE) -> int | None:
    """The block at which outliers emerge, from the detection layer's outlier tokens followed
    back through the blocks.

    ``outlier_log_ratio``: ``(L,)`` for blocks ``0..detection layer``, the mean over images of
    log(norm of the image's outlier tokens / its median patch norm) after each block. A block
    *grows* the outliers by ``g_l = r_l - r_{l-1}`` (``r_{-1} = 0``: the embedding, ratio 1).
    The emergence layer is the **last** block with ``g_l >= jump_share * max(r)``: every block
    that makes the outliers materially larger lies at or before it, so ``top_layer`` set to it
    searches all of them, while mildly large tokens in early blocks and the slow drift of
    later blocks do not count. None when the outliers never grow.
    """
    r = torch.as_tensor(outlier_log_ratio, dtype=torch.float64).flatten()
    if not len(r) or float(r.max()) <= 0:
        return None
    growth = r - torch.cat([r.new_zeros(1), r[:-1]])
    hits = torch.nonzero(growth >= jump_share * r.max()).flatten()
    return int(hits[-1]) if len(hits) else None
