"""Small ViTs with *planted* register neurons, for tests, demos and benchmarks.

A planted neuron follows the authors' Proposition 1: it reads a trigger direction that only one
token carries and writes a large vector along a direction that no other weight of the network
reads. So it fires on one token, gives that token a high norm, and changes nothing else the
network computes from it -- exactly the outlier mechanism test-time registers move away.

Channels at the end of the embedding are reserved: one *trigger* channel per planted token
position (set in the position embedding, read by the plant's up-projection) and one *write*
channel per plant (written by the plant's down-projection, read by nothing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Plant:
    layer: int
    neuron: int
    position: int = 0          # patch index the neuron fires on
    write: float = 10.0        # norm written, in multiples of the median patch norm after its block


def _as_plant(p) -> Plant:
    if isinstance(p, Plant):
        return p
    return Plant(*p)


@torch.no_grad()
def _median_patch_norm(model, x: torch.Tensor) -> torch.Tensor:
    """Median patch-token norm after each block: ``(L,)``."""
    from .trace import trace
    tr = trace(model, x)
    return tr.norms[:, :, tr.patch_slice].median(dim=-1).values.median(dim=0).values


@torch.no_grad()
def plant_register_neurons(model: nn.Module, plants: Sequence, *, trigger: float = 0.5,
                           fire: float = 6.0, seed: int = 0) -> list[Plant]:
    """Plant register neurons into a timm ``VisionTransformer`` in place; return the plants.

    ``plants``: :class:`Plant` or ``(layer, neuron[, position[, write]])`` tuples. ``trigger``:
    size of the trigger, in multiples of the median token norm (small, so the trigger token is
    not itself an outlier). ``fire``: the plant's pre-activation on its token. Works on random
    and on pretrained weights (the reserved channels of a pretrained model are repurposed: the
    result is a synthetic artifact, not the original model).
    """
    plants = [_as_plant(p) for p in plants]
    blocks = model.blocks
    D = model.embed_dim
    npre = model.num_prefix_tokens
    positions = sorted({p.position for p in plants})
    trig_ch = {pos: D - 1 - i for i, pos in enumerate(positions)}
    write_ch = {p: D - 1 - len(positions) - i for i, p in enumerate(plants)}
    reserved = list(trig_ch.values()) + list(write_ch.values())
    if len(reserved) >= D // 2:
        raise ValueError(f"too many plants for embed_dim {D}")
    H, W = model.patch_embed.grid_size
    if any(p.position >= H * W for p in plants):
        raise ValueError(f"plant position out of range: the grid has {H * W} patches")
    size = model.patch_embed.img_size
    x = torch.nn.functional.interpolate(mixed_images(5, 64, seed), size=tuple(size), mode="bilinear")

    # Nothing but the plants writes the reserved channels; nothing reads the write channels.
    pe = model.patch_embed.proj
    pe.weight[reserved] = 0
    if pe.bias is not None:
        pe.bias[reserved] = 0
    model.pos_embed[..., reserved] = 0
    for tok in (model.cls_token, getattr(model, "reg_token", None)):
        if tok is not None:
            tok[..., reserved] = 0
    wcols = list(write_ch.values())
    for blk in blocks:
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight[reserved] = 0
            if lin.bias is not None:
                lin.bias[reserved] = 0
        for lin in (blk.attn.qkv, blk.mlp.fc1):
            lin.weight[:, wcols] = 0
        for ls in (getattr(blk, "ls1", None), getattr(blk, "ls2", None)):
            if ls is not None and hasattr(ls, "gamma"):
                ls.gamma[reserved] = 1.0
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        head.weight[:, wcols] = 0

    # Trigger: a small bump in the position embedding of each planted position. The blocks'
    # LayerNorms pass the reserved channels through plainly (weight 1, bias 0).
    for blk in blocks:
        for norm in (blk.norm1, blk.norm2):
            if getattr(norm, "weight", None) is not None:
                norm.weight[reserved] = 1.0
            if getattr(norm, "bias", None) is not None:
                norm.bias[reserved] = 0.0
    med = _median_patch_norm(model, x)
    off = 0 if getattr(model, "no_embed_class", False) else npre
    for pos, ch in trig_ch.items():
        model.pos_embed[0, off + pos, ch] = trigger * float(med[0])

    # Each plant, in layer order, calibrated on the model as planted so far: read the trigger
    # channel as the block's LayerNorm outputs it, fire at ``fire``, write along its channel.
    for p in sorted(plants, key=lambda p: p.layer):
        blk = blocks[p.layer]
        fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
        n = p.neuron
        mid = fc2.in_features
        if fc1.out_features == 2 * mid:  # gated MLP (GluMlp): the other half multiplies by 1
            gate_last = getattr(blk.mlp, "gate_last", True)
            n, other = (n, n + mid) if not gate_last else (n + mid, n)
            fc1.weight[other] = 0
            fc1.bias[other] = 1.0
        ch, tok = trig_ch[p.position], npre + p.position
        seen = _ln_output(model, blk.norm2, x)[:, tok, ch]
        fc1.weight[n] = 0
        fc1.weight[n, ch] = (fire + 2.0) / float(seen.median())
        if fc1.bias is not None:
            fc1.bias[n] = -2.0
        act = _mlp_hidden(model, fc2, x)[:, tok, p.neuron]
        med = _median_patch_norm(model, x)
        fc2.weight[:, p.neuron] = 0
        fc2.weight[write_ch[p], p.neuron] = p.write * float(med[p.layer]) / float(act.median())
    return plants


@torch.no_grad()
def _ln_output(model, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from .hooks import HookSet
    got = {}
    with HookSet() as hooks:
        hooks.forward(norm, lambda m, a, out: got.__setitem__("y", out))
        model.forward_features(x)
    return got["y"]


@torch.no_grad()
def _mlp_hidden(model, fc2: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from .hooks import HookSet
    got = {}
    with HookSet() as hooks:
        hooks.pre(fc2, lambda m, a: got.__setitem__("h", a[0]))
        model.forward_features(x)
    return got["h"]


def planted_vit(plants: Sequence = ((1, 7, 12, 0.4), (3, 21, 12, 12.0)), *, depth: int = 6,
                embed_dim: int = 96, num_heads: int = 4, img_size: int = 64, patch_size: int = 8,
                seed: int = 0, **kwargs) -> nn.Module:
    """A small random timm ViT with planted register neurons (eval mode).

    The default plants two neurons on the same token, (1, 7) writing a small vector and (3, 21)
    a large one, so outliers emerge at block 3 and both neurons sit at or below the emergence
    layer. Extra keyword arguments go to ``timm``'s ``VisionTransformer`` (e.g. ``reg_tokens=4``,
    ``init_values=1e-5`` for LayerScale, ``pre_norm=True`` for a CLIP-style tower).
    """
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                              depth=depth, num_heads=num_heads, num_classes=kwargs.pop("num_classes", 10),
                              **kwargs)
    model.eval()
    plant_register_neurons(model, plants, seed=seed)
    return model


def mixed_images(n: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A normalised batch of varied images: noise, gradients, stripes, blobs and flat colours."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            img = torch.randn(3, size, size, generator=g)
        elif kind == 1:
            img = torch.stack([xx, yy, xx * yy]) * 2
        elif kind == 2:
            f = 2 + 4 * torch.rand(1, generator=g)
            img = torch.sin(f * 3.14 * xx).expand(3, -1, -1) * 1.5
        elif kind == 3:
            c = torch.rand(2, generator=g) - 0.5
            img = torch.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) * 8).expand(3, -1, -1) * 3 - 1
        else:
            img = (torch.rand(3, 1, 1, generator=g) * 4 - 2).expand(3, size, size)
        out.append(img.clone())
    return torch.stack(out).float()
