"""Plant register neurons into any adapter-wrapped model (timm, Hugging Face, open_clip, a ViT
described with ``ttreg.wrap(model, blocks=..., ...)``), so every family can be tested on a known
answer.

A planted neuron follows the authors' Proposition 1, built only from the adapter's roles (the
blocks, the MLP down-projection and the linear layers that feed it):

1. **It writes a direction nothing reads.** One residual channel per plant is reserved: every
   linear layer of the model that reads the residual stream (input width = the model's width)
   gets a zero weight on it, so no later layer, attention or head reads what is written there.
2. **It fires on chosen tokens only.** Which tokens is given per image -- by *position* (the same
   patch in every image) or by *content* (e.g. the patch carrying a marker,
   :func:`ttreg.testing.marked_images`). The neuron's input weights (and bias, where the layer has one) become
   a linear detector of those tokens, fitted on the MLP inputs the block actually sees (so it
   works with any norm, position scheme or gating: plain, GLU/SwiGLU, fused or separate). An MLP
   without biases gets a template match instead (largest on the chosen tokens, smaller but not
   zero on tokens that resemble them).
   A detector that cannot separate the chosen tokens from all others raises a one-line error.
3. **It writes a large vector there.** The down-projection's column for the neuron writes
   ``write`` times the median patch norm after its block along the reserved channel, so the
   chosen token becomes a high-norm outlier.

Plants are calibrated in layer order on the model as planted so far. The result is a synthetic
model: the reserved channels of a pretrained model are repurposed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..adapters import Adapter, wrap
from ..hooks import HookSet


@dataclass(frozen=True)
class Plant:
    """A register neuron to plant: block ``layer``, MLP neuron ``neuron``; ``write`` is the norm
    it writes, in multiples of the median patch-token norm after its block."""

    layer: int
    neuron: int
    write: float = 10.0


def _as_plant(p) -> Plant:
    return p if isinstance(p, Plant) else Plant(*p)


def _residual_readers(ad: Adapter) -> list[tuple[nn.Module, str]]:
    """``(module, weight name)`` of every layer that reads the residual stream: linear layers
    with input width = the model's width (not the MLP down-projections) and fused attention
    input projections (``in_proj_weight``), inside the part of the model the adapter covers."""
    D = ad.embed_dim
    downs = {id(ad.down_proj(l)) for l in range(ad.num_layers)}
    out = []
    for mod in ad.fingerprint_module().modules():
        if isinstance(mod, nn.Linear) and mod.in_features == D and id(mod) not in downs:
            out.append((mod, "weight"))
        w = getattr(mod, "in_proj_weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == D:
            out.append((mod, "in_proj_weight"))
    return out


def _up_projections(ad: Adapter, layer: int) -> list[nn.Linear]:
    """The linear layers of block ``layer`` that feed its MLP hidden state: outside the attention,
    ``Linear(width -> W)`` or ``Linear(width -> 2W)`` (fused gate and value), W the MLP width."""
    block, attn, down = ad.blocks[layer], ad.attention(layer), ad.down_proj(layer)
    D, W = ad.embed_dim, down.in_features
    inside = {id(m) for m in attn.modules()}
    ups = [m for m in block.modules() if isinstance(m, nn.Linear) and id(m) not in inside
           and m is not down and m.in_features == D and m.out_features in (W, 2 * W)]
    if not ups:
        raise TypeError(f"block {layer} ({type(block).__name__}): no linear layer feeds the MLP "
                        f"down-projection ({W} -> {D}); cannot plant there")
    return ups


@torch.no_grad()
def _record(ad: Adapter, x: torch.Tensor, pre: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Inputs of the given modules on one run of ``x``, batch-first, as float."""
    got: dict[str, torch.Tensor] = {}
    with HookSet() as hooks:
        for key, mod in pre.items():
            def grab(m, args, key=key):
                t = ad.block_io.batch_first(args[0])
                got[key] = t.detach().float()
            hooks.pre(mod, grab)
        ad.run(x)
    return got


def _median_patch_norm(ad: Adapter, x: torch.Tensor, layer: int) -> float:
    from ..tracing import trace
    tr = trace(ad, x)
    return float(tr.norms[:, layer, tr.patch_slice].median())


def _fit_detector(feats: torch.Tensor, positive: torch.Tensor, frozen: list[int], bias: bool,
                  steps: int = 300) -> tuple[torch.Tensor, float]:
    """A linear detector ``(w, b)`` (``w`` zero on ``frozen`` channels; ``b`` 0 unless ``bias``)
    with ``feats @ w + b = 1`` on the positive tokens (so the neuron fires about equally on each)
    and ``<= -1`` on all others, as nearly as least squares with a squared hinge allows; if that
    does not separate them, with ``>= 1`` on the positive tokens (squared hinges on both sides)."""
    X = feats.double()
    X[:, frozen] = 0
    if bias:
        X = torch.cat([X, X.new_ones(len(X), 1)], dim=1)
    for equal in (True, False):
        w = _fit(X, positive, steps, equal)
        s = X @ w
        if s[positive].min() > 0 > s[~positive].max():
            return (w[:-1], float(w[-1])) if bias else (w, 0.0)
    if not bias:
        # Without a bias a hyperplane through the origin rarely separates one token kind from all
        # others; match the chosen tokens' mean instead (1 there, less on every other token).
        mean = X[positive].mean(0)
        return mean / mean.dot(mean), 0.0
    return w[:-1], float(w[-1])


def _fit(X: torch.Tensor, positive: torch.Tensor, steps: int, equal: bool) -> torch.Tensor:
    y = positive.double() * 2 - 1
    weight = torch.where(positive, 0.5 / positive.sum(), 0.5 / (~positive).sum()).double()
    w = X[positive].mean(0) - X[~positive].mean(0)
    w = w / w.norm().clamp_min(1e-12) / X.norm(dim=1).median().clamp_min(1e-12)
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        miss = 1 - y * (X @ w)
        miss = torch.where(positive, miss, miss.clamp_min(0)) if equal else miss.clamp_min(0)
        val = (weight * miss ** 2).sum() + 1e-6 * (w ** 2).sum()
        val.backward()
        return val
    with torch.enable_grad():
        opt.step(loss)
    return w.detach()


@torch.no_grad()
def plant_register_neurons(model, plants: Sequence, images: torch.Tensor | None = None, where=None, *,
                           fire: float = 10.0) -> list[Plant]:
    """Plant register neurons into ``model`` in place; return the plants.

    ``plants``: :class:`Plant` or ``(layer, neuron[, write])`` tuples. ``images``: a calibration
    batch ``(B, C, H, W)`` as the model takes it. ``where``: the tokens each neuron fires on -- a
    patch index (position: the same patch in every image) or a ``(B, num_patches)`` bool mask
    (content, e.g. from :func:`ttreg.testing.marked_images`). ``fire``: the neuron's smallest pre-activation
    on those tokens. Raises ``ValueError`` (one line) when the chosen tokens cannot be told apart
    from the others at a plant's layer.
    """
    if images is None or where is None:
        raise TypeError("plant_register_neurons(model, plants, images, where) needs calibration images "
                        "and the tokens to fire on; to plant into a timm ViT by position without images, "
                        "use ttreg.testing.plant_timm_register_neurons(model, plants)")
    ad = wrap(model)
    plants = sorted((_as_plant(p) for p in plants), key=lambda p: p.layer)
    D, npre, L = ad.embed_dim, ad.num_prefix_tokens, ad.num_layers
    for p in plants:
        if not 0 <= p.layer < L or not 0 <= p.neuron < ad.mlp_width(p.layer):
            raise ValueError(f"plant ({p.layer}, {p.neuron}) is outside the model "
                             f"({L} blocks, {ad.mlp_width(0)} MLP neurons)")
    if len(plants) >= D // 4:
        raise ValueError(f"too many plants for width {D}")
    channels = [D - 1 - i for i in range(len(plants))]
    x = images.to(ad.parameter().device, ad.parameter().dtype)
    B = x.shape[0]
    rows, cols = ad.grid_size(x)
    if isinstance(where, int):
        if not 0 <= where < rows * cols:
            raise ValueError(f"where={where}: the grid has {rows * cols} patches")
        mask = torch.zeros(B, rows * cols, dtype=torch.bool)
        mask[:, where] = True
    else:
        mask = torch.as_tensor(where, dtype=torch.bool).cpu()
        if tuple(mask.shape) != (B, rows * cols):
            raise ValueError(f"where: expected a ({B}, {rows * cols}) bool mask of patches, "
                             f"got {tuple(mask.shape)}")
    positive = torch.cat([torch.zeros(B, npre, dtype=torch.bool), mask], dim=1)

    for mod, name in _residual_readers(ad):          # nothing reads the reserved channels
        getattr(mod, name)[:, channels] = 0

    for p, ch in zip(plants, channels):
        ups, down = _up_projections(ad, p.layer), ad.down_proj(p.layer)
        W = down.in_features
        feats = _record(ad, x, {"in": ups[0]})["in"]                     # (B, T, D)
        pos = positive.to(feats.device) if feats.shape[1] == positive.shape[1] else None
        if pos is None:
            raise ValueError(f"block {p.layer} sees {feats.shape[1]} tokens, expected "
                             f"{positive.shape[1]} ({npre} prefix + {rows * cols} patches)")
        has_bias = all(up.bias is not None for up in ups)
        w, b = _fit_detector(feats.reshape(-1, D), pos.reshape(-1), channels, bias=has_bias)
        s = (feats.double() @ w + b).reshape(B, -1)
        lo, hi = float(s[pos].min()), float(s[~pos].max())
        if not (lo > 0 > hi or lo > hi and not has_bias):
            raise ValueError(f"plant ({p.layer}, {p.neuron}): the chosen tokens cannot be told apart "
                             f"from the others at block {p.layer} (detector margin {lo:.3g} vs "
                             f"{hi:.3g}); choose them by content (marked_images) or another layer")
        k = fire / lo
        for up in ups:
            for row in ([p.neuron] if up.out_features == W else [p.neuron, p.neuron + W]):
                up.weight[row] = (k * w).to(up.weight.dtype)
                if up.bias is not None:
                    up.bias[row] = k * b
        h = _record(ad, x, {"h": down})["h"][..., p.neuron]                # (B, T)
        norm = _hidden_norm(ad, p.layer)
        if norm is not None:          # an MLP scale norm makes the neuron dense: re-centre it
            norm.bias[p.neuron] -= h[~pos].median().to(norm.bias.dtype)
            h = _record(ad, x, {"h": down})["h"][..., p.neuron]
        act = float(h[pos].median())
        if not act > 0:
            raise ValueError(f"plant ({p.layer}, {p.neuron}): the neuron does not fire positively "
                             f"on the chosen tokens (median {act:.3g})")
        # write along the reserved channel; the block's gain on it (LayerScale, ...) is measured
        down.weight[:, p.neuron] = 0
        before = _block_channel(ad, x, p.layer, ch)
        down.weight[ch, p.neuron] = 1.0
        gain = float((_block_channel(ad, x, p.layer, ch) - before)[pos].median())
        med = _median_patch_norm(ad, x, p.layer)
        down.weight[ch, p.neuron] = p.write * med / gain
    return plants


def _hidden_norm(ad: Adapter, layer: int) -> nn.Module | None:
    """A norm over the MLP hidden state (EVA-CLIP's SwiGLU scale norm) with a bias, if any."""
    W = ad.down_proj(layer).in_features
    attn = {id(m) for m in ad.attention(layer).modules()}
    for mod in ad.blocks[layer].modules():
        b = getattr(mod, "bias", None)
        if (id(mod) not in attn and "norm" in type(mod).__name__.lower() and isinstance(b, torch.Tensor)
                and b.dim() == 1 and b.shape[0] == W):
            return mod
    return None


def _block_channel(ad: Adapter, x: torch.Tensor, layer: int, ch: int) -> torch.Tensor:
    """Channel ``ch`` of block ``layer``'s output ``(B, T)``."""
    got = {}
    with HookSet() as hooks:
        def grab(m, args, out):
            y = ad.block_output(out)
            got["y"] = ad.block_io.batch_first(y)[..., ch].detach().float()
        hooks.forward(ad.blocks[layer], grab)
        ad.run(x)
    return got["y"]
