"""Direct contributions of each token to a CLIP image embedding, and the zero-shot segmentation
heat map built from them (Gandelsman et al., "Interpreting CLIP's image representation via
text-based decomposition": yossigandelsman/clip_text_span, ``compute_segmentations.py`` with
``prs_hook.py``).

The class token's output is a sum over the residual stream. Its attention part, in layer ``l``,
head ``h``, from source token ``n``, is ``a[h, 0, n] * v[h, n] @ W_o[:, h]^T`` (plus an equal
share ``b_o / (n_tokens * n_heads)`` of the output bias, times the block's layer scale). The
final norm is made linear with the class token's own statistics: every one of the ``N = (2L + 1)
* n_tokens * n_heads`` attention terms gets ``gamma * (c - mu / N) / sigma + beta / N`` (the
reference's split of the mean and the bias), then the projection. Summed over layers and heads,
each patch gets one embedding; its heat for a class is its score for that class minus its mean
score over all classes. Negatives are clipped after upsampling (in :mod:`.zeroshot`).

Recomputed from each attention module's input with hooks, vectorised over batch, tokens and
heads; the model runs once. Supported: open_clip's own ``VisionTransformer`` towers with
``nn.MultiheadAttention`` and class-token pooling, and open_clip towers around a timm
``VisionTransformer`` (class-token pooling, a bias-free linear head). Differences from the
reference: the map is not divided by the image embedding's norm (a positive per-image factor
that the min-max normalisation removes); a block's layer scale is applied (the reference's
models have none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters import wrap
from ..hooks import HookSet
from .backbone import open_clip_visual


@dataclass
class _Layer:
    """What the direct effect of one attention layer needs."""

    attn: nn.Module                    # the module whose input is captured
    in_weight: torch.Tensor            # (3D, D) q, k, v stacked
    in_bias: torch.Tensor | None
    out_weight: torch.Tensor           # (D, D)
    out_bias: torch.Tensor | None
    heads: int
    scale: float
    layer_scale: Callable              # the block's ls on the attention branch (identity if none)
    q_norm: Callable | None = None
    k_norm: Callable | None = None


@dataclass
class _Tower:
    layers: list[_Layer]
    norm: nn.LayerNorm                 # the final norm, made linear per image
    proj: torch.Tensor                 # (D, E)
    batch_first: bool
    run: Callable


def _unsupported(what: str) -> ValueError:
    return ValueError(f"the direct-contribution heat map does not support {what}; "
                      "use --heatmap cosine")


def _native_tower(model, visual) -> _Tower:
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise _unsupported("towers without class-token pooling")
    if not isinstance(visual.ln_post, nn.LayerNorm):
        raise _unsupported(f"a final {type(visual.ln_post).__name__}")
    layers = []
    for blk in visual.transformer.resblocks:
        a = blk.attn
        if not isinstance(a, nn.MultiheadAttention) or a.in_proj_weight is None:
            raise _unsupported(f"open_clip blocks with {type(a).__name__}")
        layers.append(_Layer(a, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias,
                             a.num_heads, a.head_dim ** -0.5, blk.ls_1))
    proj = visual.proj if visual.proj is not None else torch.eye(visual.ln_post.normalized_shape[0])
    run = model.encode_image if visual is not model else visual
    return _Tower(layers, visual.ln_post, proj, bool(getattr(visual.transformer, "batch_first", True)), run)


def _timm_tower(model, visual) -> _Tower:
    from timm.layers import Attention
    trunk = visual.trunk
    if trunk.global_pool != "token" or not isinstance(trunk.fc_norm, nn.Identity):
        raise _unsupported("timm trunks without class-token pooling")
    if not isinstance(trunk.norm, nn.LayerNorm):
        raise _unsupported(f"a final {type(trunk.norm).__name__}")
    linears = [m for m in visual.head.modules() if isinstance(m, nn.Linear)]
    others = [m for m in visual.head.modules()
              if not isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Sequential))]
    if len(linears) != 1 or others or linears[0].bias is not None:
        raise _unsupported("a projection head other than one bias-free linear layer")
    layers = []
    for blk in trunk.blocks:
        a = blk.attn
        if type(a) is not Attention or not isinstance(a.norm, nn.Identity) or a.gate is not None:
            raise _unsupported(f"timm blocks with {type(a).__name__}")
        layers.append(_Layer(a, a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias, a.num_heads,
                             a.scale, blk.ls1, a.q_norm, a.k_norm))
    return _Tower(layers, trunk.norm, linears[0].weight.T, True, model.encode_image
                  if visual is not model else visual)


def clip_tower(model) -> _Tower:
    """What the computation needs from ``model``; a one-line ``ValueError`` if unsupported
    (cheap: call it before a long run)."""
    visual = open_clip_visual(model)
    if visual is None:
        raise _unsupported(f"{type(model).__name__} (open_clip CLIP models only)")
    return _timm_tower(model, visual) if hasattr(visual, "trunk") else _native_tower(model, visual)


def _cls_attention_output(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the class token's attention output from each source token, with the
    bias share and the layer scale: ``(B, T, D)`` (``x``: the attention input, batch-first)."""
    B, T, D = x.shape
    H = layer.heads
    dh = layer.in_weight.shape[0] // 3 // H
    q, k, v = F.linear(x, layer.in_weight, layer.in_bias).split(H * dh, dim=-1)
    q = q[:, :1].reshape(B, 1, H, dh).transpose(1, 2)                  # (B, H, 1, dh)
    k = k.reshape(B, T, H, dh).transpose(1, 2)                          # (B, H, T, dh)
    v = v.reshape(B, T, H, dh)                                          # (B, T, H, dh)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    a = ((q * layer.scale) @ k.transpose(-1, -2)).softmax(dim=-1)[:, :, 0]   # (B, H, T)
    weighted = (a.transpose(1, 2)[..., None] * v).reshape(B, T, H * dh)  # heads side by side
    out = F.linear(weighted, layer.out_weight)                           # = sum over heads
    if layer.out_bias is not None:
        out = out + layer.out_bias / T                                   # H shares of b / (T H)
    return layer.layer_scale(out)


@torch.no_grad()
def direct_token_embeddings(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (B, T, E), image embedding (B, E))``: each token's direct contribution through
    every attention layer to the image embedding, summed over layers and heads, through the final
    norm (linearised as in the reference) and the projection; ``T`` counts every token the
    attention saw (class token, patches, test-time registers). One forward pass."""
    tower = clip_tower(model)
    L = len(tower.layers)
    inputs: dict[int, torch.Tensor] = {}
    box: dict[str, torch.Tensor] = {}
    with HookSet() as hooks:
        for i, layer in enumerate(tower.layers):
            def grab(mod, args, kwargs, i=i):
                h = args[0] if args else kwargs.get("query", kwargs.get("x"))
                inputs[i] = h if tower.batch_first else h.transpose(0, 1)
            hooks.pre(layer.attn, grab, with_kwargs=True)
        hooks.pre(tower.norm, lambda mod, args: box.__setitem__("pre_norm", args[0]))
        image = tower.run(x)
    if isinstance(image, tuple):
        image = image[0]
    S = sum(_cls_attention_output(layer, inputs[i].float()) for i, layer in enumerate(tower.layers))
    cls = box["pre_norm"].float()
    if cls.dim() == 3:                       # the final norm runs batch-first on all tokens
        cls = cls[:, 0]
    mu = cls.mean(-1, keepdim=True)                                      # (B, 1)
    sigma = torch.sqrt((cls ** 2).mean(-1, keepdim=True) - mu ** 2 + tower.norm.eps)
    T, H = S.shape[1], tower.layers[0].heads
    share = L * H / ((2 * L + 1) * T * H)                                # L*H terms of 1/N each
    gamma = tower.norm.weight.float() if tower.norm.weight is not None else 1.0
    beta = tower.norm.bias.float() if tower.norm.bias is not None else 0.0
    post = gamma * (S - share * mu[:, :, None]) / sigma[:, :, None] + share * beta
    return post @ tower.proj.float(), image.float()


@torch.no_grad()
def direct_heatmaps(model, x: torch.Tensor, classifier: torch.Tensor,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(heat (B, rows, cols), class (B,))``: each patch's score for the class (``labels``, or
    the zero-shot prediction where a label is -1 or missing) minus its mean score over all
    classes of ``classifier`` ``(C, E)``. Not yet clipped or normalised."""
    ad = wrap(model)
    tokens, image = direct_token_embeddings(model, x)
    W = classifier.to(tokens.device).float()
    pred = (image @ W.T).argmax(-1)
    chosen = pred if labels is None else torch.where(labels.to(pred.device) >= 0,
                                                     labels.to(pred.device), pred)
    npre = ad.num_prefix_tokens
    rows, cols = ad.grid_size(x)
    scores = tokens[:, npre:npre + rows * cols] @ W.T                    # (B, P, C)
    heat = scores.gather(-1, chosen[:, None, None].expand(-1, scores.shape[1], 1))[..., 0] \
        - scores.mean(-1)
    return heat.reshape(len(x), rows, cols), chosen
