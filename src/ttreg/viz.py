"""Figures: what a person looks at to see outlier tokens and what test-time registers do to them.

Plain functions that take :class:`~ttreg.tracing.Trace` objects (plain and with registers) and
write PNGs with matplotlib's Agg backend, atomically (:mod:`ttreg.files`; with ``outputs``,
staged with the rest of a run's files). Nothing here runs a model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .files import Outputs, atomic_write
from .outliers import norm_ratio

MATPLOTLIB_MISSING = "figures need matplotlib: pip install matplotlib"


def require_matplotlib() -> None:
    """Raise a one-line ``ImportError`` naming the pip command when matplotlib is missing."""
    _plt()


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(MATPLOTLIB_MISSING) from None
    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110, outputs: Outputs | None = None) -> Path:
    """Save as PNG atomically (or stage it in ``outputs``); the figure is closed either way."""
    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    try:
        return outputs.stage(path, write) if outputs is not None else atomic_write(path, write)
    finally:
        _plt().close(fig)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(3, H, W)`` normalised tensor -> ``(H, W, 3)`` float image in [0, 1]."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x.detach().float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def _upsample(m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return torch.nn.functional.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].numpy()


def _overlay(ax, image: np.ndarray, heat: torch.Tensor, title: str, cmap="inferno",
             vmin=None, vmax=None):
    ax.imshow(image)
    im = ax.imshow(_upsample(heat, image.shape[:2]), cmap=cmap, alpha=0.6,
                   vmin=None if vmin is None else float(vmin), vmax=None if vmax is None else float(vmax))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return im


#: the marker of the patch with the largest norm, as the figure's note explains it
MAX_MARK = {"s": 40, "facecolors": "none", "edgecolors": "cyan", "linewidths": 1.2}


def _heat(ax, heat: torch.Tensor, title: str, cmap="inferno", vmax=None, mark_max=False, vmin=0.0):
    im = ax.imshow(heat.numpy(), cmap=cmap, vmin=float(vmin),
                   vmax=float(vmax) if vmax is not None else None)
    if mark_max:
        r, c = divmod(int(heat.argmax()), heat.shape[1])
        ax.scatter([c], [r], **MAX_MARK)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return im


def _colorbar(fig, im, ax, label: str = "", extend: str = "neither"):
    """A colour bar beside ``ax`` (every map has one)."""
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, extend=extend)
    if label:
        bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def norm_scale(plain_map: torch.Tensor, reg_map: torch.Tensor) -> tuple[float, float]:
    """The shared colour scale of a plain and a cleaned norm map: from the smaller minimum to the
    larger of the cleaned map's maximum and the plain map's 95th percentile, so outlier tokens
    (above it, shown at the top colour, their value in the title) do not flatten the rest."""
    lo = min(float(plain_map.min()), float(reg_map.min()))
    hi = max(float(reg_map.max()), float(torch.quantile(plain_map.flatten().float(), 0.95)))
    return lo, max(hi, lo + 1e-6)


def overview(image: np.ndarray, plain, reg, i: int, layer: int, name: str, path,
             outputs: Outputs | None = None, attribution=None) -> Path:
    """One image: input, norm maps and last-layer CLS attention, plain vs. registers, and the
    per-layer max/median norm curves. ``attribution`` (a VLM's
    :class:`ttreg.attribution_report.AttributionPanel`): a row of the language model's
    text-to-image attribution maps, plain vs. registers, under the norm maps, the prompt and
    the answer in the figure's title."""
    plt = _plt()
    rows = 3 if attribution is not None else 2
    fig = plt.figure(figsize=(15, 7.2 + 3.8 * (rows - 2)))
    gs = fig.add_gridspec(rows, 7, height_ratios=[1, 1, 0.9] if rows == 3 else [1, 0.9],
                          width_ratios=[1, 1, 1, 0.07, 0.3, 1, 1], hspace=0.35, wspace=0.18)
    L = plain.norms.shape[1]
    layer = layer % L
    nm_p, nm_r = plain.norm_map(layer)[i], reg.norm_map(layer)[i]
    vmin, vmax = norm_scale(nm_p, nm_r)
    ax = fig.add_subplot(gs[0, 0]); ax.imshow(image); ax.axis("off")
    h, w = image.shape[:2]
    ax.set_title(f"{name}\nmodel input: the resized centre crop\nthe model saw ({h}x{w} px)", fontsize=9)
    rp = float(nm_p.max() / nm_p.median())
    rr = float(nm_r.max() / nm_r.median())
    im = _heat(fig.add_subplot(gs[0, 1]), nm_p, f"patch norms, layer {layer}: plain\n"
               f"max/median {rp:.1f}, max {float(nm_p.max()):.3g}", vmin=vmin, vmax=vmax, mark_max=True)
    ax_r = fig.add_subplot(gs[0, 2])
    _heat(ax_r, nm_r, f"patch norms, layer {layer}: test-time\nregister, max/median {rr:.1f}, "
          f"max {float(nm_r.max()):.3g}", vmin=vmin, vmax=vmax, mark_max=True)
    over = float(nm_p.max()) > vmax
    bar = fig.colorbar(im, cax=fig.add_subplot(gs[0, 3]), extend="max" if over else "neither")
    bar.set_label(f"token norm (shared scale{';' + chr(10) + 'higher norms at the top colour' if over else ''})",
                  fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax_r.text(-0.09, -0.06, "cyan circle: the patch with the largest norm", transform=ax_r.transAxes,
              ha="center", va="top", fontsize=8)
    last = L - 1
    if last in plain.attention and last in reg.attention and plain.num_prefix_tokens > 0:
        a_p = plain.cls_attention(last)[i].mean(0)
        a_r = reg.cls_attention(last)[i].mean(0)
        lo = min(float(a_p.min()), float(a_r.min()))
        hi = max(float(a_p.max()), float(a_r.max()))
        _overlay(fig.add_subplot(gs[0, 5]), image, a_p,
                 f"CLS attention, layer {last}\nplain (mean of heads)", vmin=lo, vmax=hi)
        ax_a = fig.add_subplot(gs[0, 6])
        im_a = _overlay(ax_a, image, a_r, f"CLS attention, layer {last}\ntest-time register", vmin=lo, vmax=hi)
        _colorbar(fig, im_a, ax_a, "attention weight (both panels)")
    if attribution is not None:
        _attribution_row(fig, gs, attribution)
    ax = fig.add_subplot(gs[rows - 1, :])
    x = np.arange(L)
    ps, rs = plain.patch_slice, reg.patch_slice
    ax.semilogy(x, plain.norms[i, :, ps].amax(-1), "o-", color="C3", label="max patch norm, plain")
    ax.semilogy(x, reg.norms[i, :, rs].amax(-1), "o-", color="C0", label="max patch norm, test-time register")
    ax.semilogy(x, plain.norms[i, :, ps].median(-1).values, "--", color="C3", alpha=0.6, label="median patch norm, plain")
    ax.semilogy(x, reg.norms[i, :, rs].median(-1).values, "--", color="C0", alpha=0.6, label="median patch norm, test-time register")
    if reg.num_registers:
        ax.semilogy(x, reg.norms[i, :, -reg.num_registers:].amax(-1), "s:", color="C2", label="register token norm")
    ax.set_xlabel("block"); ax.set_ylabel("token norm (log)"); ax.set_xticks(x)
    ax.grid(alpha=0.3); ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.set_title("token norms after each block", fontsize=9)
    return save_figure(fig, path, outputs=outputs)


def _attribution_row(fig, gs, a) -> None:
    """Row 1 of :func:`overview`: the image the VLM got, its attribution maps plain and with the
    register (one colour scale, its bar), and the numbers."""
    ax = fig.add_subplot(gs[1, 0])
    ax.imshow(a.image)
    ax.axis("off")
    h, w = a.image.shape[:2]
    ax.set_title(f"the image the VLM got ({h}x{w} px;\nits processor resizes it)", fontsize=9)
    hi = max(float(a.plain.max()), float(a.registers.max()), 1e-12)
    im = _overlay(fig.add_subplot(gs[1, 1]), a.image, a.plain,
                  f"text-to-image attribution: plain\n{100 * a.share_plain:.1f}% on the outlier patches",
                  vmin=0, vmax=hi)
    _overlay(fig.add_subplot(gs[1, 2]), a.image, a.registers,
             f"attribution: test-time register\n{100 * a.share_registers:.1f}% on the same patches",
             vmin=0, vmax=hi)
    bar = fig.colorbar(im, cax=fig.add_subplot(gs[1, 3]))
    bar.set_label("attention from the answer (shared scale)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax = fig.add_subplot(gs[1, 5:])
    ax.axis("off")
    lines = [f"prompt: \u201c{a.prompt}\u201d", f"answer attributed: \u201c{a.answer}\u201d",
             f"maps: {a.what}, mean over the answer tokens", "",
             "share of the answer's attention on the image tokens:",
             f"    plain {100 * a.image_mass_plain:.1f}%,  test-time register {100 * a.image_mass_registers:.1f}%",
             f"share of that on the {a.outlier_tokens} image token(s) carrying",
             "the plain tower's outlier patches (last block):",
             f"    plain {100 * a.share_plain:.1f}%  \u2192  test-time register {100 * a.share_registers:.1f}%",
             f"    (a uniform map: {100 * a.uniform_share:.1f}%)"]
    ax.text(0.0, 0.95, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=9,
            family="monospace", wrap=True)
    fig.suptitle(f"\u201c{a.prompt}\u201d \u2192 \u201c{a.answer}\u201d", fontsize=11, y=0.935)


def heads(image: np.ndarray, plain, reg, i: int, name: str, path, outputs: Outputs | None = None) -> Path:
    """CLS attention of the last block, one panel per head: plain (top) and with registers."""
    plt = _plt()
    last = plain.norms.shape[1] - 1 if plain.norms is not None else max(plain.attention)
    a_p, a_r = plain.cls_attention(last)[i], reg.cls_attention(last)[i]
    H = a_p.shape[0]
    fig, axes = plt.subplots(2, H, figsize=(1.9 * H, 4.2), squeeze=False)
    for h in range(H):
        vmax = max(float(a_p[h].max()), float(a_r[h].max()))
        _heat(axes[0, h], a_p[h], f"head {h}", cmap="viridis", vmax=vmax)
        im = _heat(axes[1, h], a_r[h], "", cmap="viridis", vmax=vmax)
        _colorbar(fig, im, list(axes[:, h]), "attention" if h == H - 1 else "")
    axes[0, 0].text(-0.15, 0.5, "plain", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.15, 0.5, "register", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle(f"{name}: CLS attention per head, block {last}", fontsize=10)
    return save_figure(fig, path, outputs=outputs)


def neuron_maps(image: np.ndarray, plain, reg, i: int, name: str, path, max_neurons: int = 6,
                outputs: Outputs | None = None) -> Path:
    """Activation maps of the top register neurons on the patches, plain vs. with registers."""
    plt = _plt()
    n = min(max_neurons, len(plain.neurons))
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n, 4.8), squeeze=False)
    for k in range(n):
        l, j = plain.neurons[k]
        m_p, m_r = plain.activation_map(k)[i], reg.activation_map(k)[i]
        vmax = max(float(m_p.abs().max()), 1e-6)
        _heat(axes[0, k], m_p.abs(), f"neuron ({l}, {j})\nplain, max {float(m_p.max()):.1f}", vmax=vmax)
        reg_val = float(reg.activations[i, k, -reg.num_registers:].max()) if reg.num_registers else 0.0
        im = _heat(axes[1, k], m_r.abs(), f"with register\npatches 0, register {reg_val:.1f}", vmax=vmax)
        _colorbar(fig, im, list(axes[:, k]), "|activation|" if k == n - 1 else "")
    fig.suptitle(f"{name}: register-neuron activations on the patches", fontsize=10)
    return save_figure(fig, path, outputs=outputs)
