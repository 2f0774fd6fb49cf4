"""Small timm ViTs with *planted* register neurons, for tests, demos and benchmarks: the plants
are written straight into a timm ``VisionTransformer``'s weights (for any family through the
adapter, :func:`ttreg.testing.plant_register_neurons`).

Two kinds of plant, both public:

* :func:`plant_timm_register_neurons` / :func:`planted_vit`: the authors' Proposition 1 in its
  simplest form. A neuron reads a trigger direction that only one token carries (set in the
  position embedding) and writes a large vector along a direction that no other weight reads.
  So it fires on the same patch of every image, gives that token a high norm, and changes
  nothing else the network computes from it.
* :func:`plant_content_outliers` / :func:`content_planted_vit`: outliers that behave like real
  ones (:class:`ContentPlants`). Image content decides where they sit (the brightest patches,
  1-5 per image, elsewhere in every image); a trigger neuron, several weaker neurons over
  consecutive layers and an amplifier (a cascade) build them; early layers already show mildly
  large tokens; dense distractor neurons are large on every token; later attention heads use
  the outlier token as a sink. Plant in timm, convert (:mod:`ttreg.testing.convert`) for other libraries.

Channels at the end of the embedding are reserved: written and read only by the plant.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .images import mixed_images


@dataclass(frozen=True)
class TimmPlant:
    """A register neuron for :func:`plant_timm_register_neurons`: block ``layer``, MLP neuron
    ``neuron``, firing on patch ``position`` of every image."""
    layer: int
    neuron: int
    position: int = 0          # patch index the neuron fires on
    write: float = 10.0        # norm written, in multiples of the median patch norm after its block


def _reserve_channels(model: nn.Module, reserved: list[int], read: list[int]) -> None:
    """Make embedding channels ``reserved`` the plant's own: nothing else writes them, no weight
    reads channels ``read``, LayerNorms pass them through plainly (weight 1, bias 0) and
    LayerScale leaves them unscaled."""
    pe = model.patch_embed.proj
    pe.weight[reserved] = 0
    if pe.bias is not None:
        pe.bias[reserved] = 0
    model.pos_embed[..., reserved] = 0
    for tok in (model.cls_token, getattr(model, "reg_token", None)):
        if tok is not None:
            tok[..., reserved] = 0
    for blk in model.blocks:
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight[reserved] = 0
            if lin.bias is not None:
                lin.bias[reserved] = 0
        for lin in (blk.attn.qkv, blk.mlp.fc1):
            lin.weight[:, read] = 0
        for ls in (getattr(blk, "ls1", None), getattr(blk, "ls2", None)):
            if ls is not None and hasattr(ls, "gamma"):
                ls.gamma[reserved] = 1.0
        for norm in (blk.norm1, blk.norm2):
            if getattr(norm, "weight", None) is not None:
                norm.weight[reserved] = 1.0
            if getattr(norm, "bias", None) is not None:
                norm.bias[reserved] = 0.0
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        head.weight[:, read] = 0


def _as_plant(p) -> TimmPlant:
    if isinstance(p, TimmPlant):
        return p
    return TimmPlant(*p)


@torch.no_grad()
def _median_patch_norm(model, x: torch.Tensor) -> torch.Tensor:
    """Median patch-token norm after each block: ``(L,)``."""
    from ..tracing import trace
    tr = trace(model, x)
    return tr.norms[:, :, tr.patch_slice].median(dim=-1).values.median(dim=0).values


@torch.no_grad()
def plant_timm_register_neurons(model: nn.Module, plants: Sequence, *, trigger: float = 0.5,
                                fire: float = 6.0, seed: int = 0) -> list[TimmPlant]:
    """Plant register neurons into a timm ``VisionTransformer`` in place; return the plants.

    ``plants``: :class:`TimmPlant` or ``(layer, neuron[, position[, write]])`` tuples. ``trigger``:
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
    _reserve_channels(model, reserved, read=list(write_ch.values()))

    # Trigger: a small bump in the position embedding of each planted position.
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
    from ..hooks import HookSet
    got = {}
    with HookSet() as hooks:
        hooks.forward(norm, lambda m, a, out: got.__setitem__("y", out))
        model.forward_features(x)
    return got["y"]


@torch.no_grad()
def _mlp_hidden(model, fc2: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from ..hooks import HookSet
    got = {}
    with HookSet() as hooks:
        hooks.pre(fc2, lambda m, a: got.__setitem__("h", a[0]))
        model.forward_features(x)
    return got["h"]


def _random_vit(depth: int, embed_dim: int, num_heads: int, img_size: int, patch_size: int,
                seed: int, **kwargs) -> nn.Module:
    """A random timm ``VisionTransformer`` (seeded), in eval mode."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                              depth=depth, num_heads=num_heads, num_classes=kwargs.pop("num_classes", 10),
                              **kwargs)
    return model.eval()


def planted_vit(plants: Sequence = ((1, 7, 12, 0.4), (3, 21, 12, 12.0)), *, depth: int = 6,
                embed_dim: int = 96, num_heads: int = 4, img_size: int = 64, patch_size: int = 8,
                seed: int = 0, **kwargs) -> nn.Module:
    """A small random timm ViT with planted register neurons (eval mode).

    The default plants two neurons on the same token, (1, 7) writing a small vector and (3, 21)
    a large one, so outliers emerge at block 3 and both neurons sit at or below the emergence
    layer. Extra keyword arguments go to ``timm``'s ``VisionTransformer`` (e.g. ``reg_tokens=4``,
    ``init_values=1e-5`` for LayerScale, ``pre_norm=True`` for a CLIP-style tower).
    """
    model = _random_vit(depth, embed_dim, num_heads, img_size, patch_size, seed, **kwargs)
    plant_timm_register_neurons(model, plants, seed=seed)
    return model


# --- content-dependent plants: outliers that behave like real ones ---------------------------------

@dataclass(frozen=True)
class ContentPlants:
    """Where :func:`plant_content_outliers` puts each part of a realistic outlier mechanism.

    Neurons are ``(layer, neuron)`` pairs. The outliers sit on the *brightest* patches of each
    image: image content, not the position embedding, decides where (1-5 patches per image, in
    different places in different images; a fixed per-position offset only breaks exact ties,
    so a flat image gets one outlier):

    * ``trigger`` (block 0): fires on the patches whose brightness is within ``margin`` of the
      image's brightest patch (one attention head of block 0 finds that maximum) and writes a
      *mildly* large vector, ``trigger_write`` x the median patch norm: early layers show
      mildly large tokens that are not yet outliers;
    * ``shared``: weaker neurons in consecutive layers that read the trigger's vector and each
      add ``shared_write`` x the median norm along one common direction (one job, several
      neurons);
    * ``amplifier``: a cascade -- it reads the shared direction and writes a large vector
      (``amplifier_write`` x the median): the outliers emerge abruptly at its block;
    * ``distractors``: dense neurons, ``distractor_act`` on every token (larger than the
      trigger's activation, so only the authors' sparsity filter keeps them out of a search);
    * ``mild``: a block-0 neuron that makes the darkest patches (normalised brightness below -1)
      mildly large; they never become outliers;
    * ``sink_layers``: blocks where one attention head concentrates on the outlier token (an
      attention sink; the value it reads there is a no-op). None: every block after the last
      register neuron.

    :attr:`register_neurons` (trigger, shared, amplifier) are what test-time registers must move.
    """

    trigger: tuple[int, int] = (0, 11)
    shared: tuple[tuple[int, int], ...] = ((2, 5), (3, 9), (4, 13))
    amplifier: tuple[int, int] | None = (5, 17)
    distractors: tuple[tuple[int, int], ...] = ((1, 3), (4, 30))
    mild: tuple[int, int] | None = (0, 40)
    sink_layers: tuple[int, ...] | None = None
    trigger_write: float = 3.0
    shared_write: float = 3.0
    amplifier_write: float = 40.0
    mild_write: float = 2.5
    distractor_act: float = 4.5
    fire: float = 6.0
    trigger_fire: float = 3.0
    margin: float = 0.04

    @property
    def register_neurons(self) -> list[tuple[int, int]]:
        return [self.trigger, *self.shared] + ([self.amplifier] if self.amplifier else [])

    @property
    def last_register_layer(self) -> int:
        return max(l for l, _ in self.register_neurons)


#: reserved channels of a content plant, counted from the end of the embedding
_CHANNELS = ("mass+", "mass-", "score+", "score-", "max+", "max-", "marker", "mild", "shared",
             "amp", "dense", "ttr+", "ttr-")


def _token_std(x: torch.Tensor, eps: float) -> float:
    """Median over tokens of the spread a LayerNorm divides by."""
    return float((x.float().var(-1, unbiased=False) + eps).sqrt().median())


def _attn_out(blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A timm block's residual stream after its attention: the input of ``norm2``."""
    return h + blk.ls1(blk.attn(blk.norm1(h)))


def _check_content_model(model: nn.Module, p: ContentPlants) -> None:
    blk0 = model.blocks[0]
    if p.trigger[0] != 0 or (p.mild and p.mild[0] != 0):
        raise ValueError("the trigger and mild neurons of a content plant live in block 0")
    if not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity):
        raise ValueError("content plants need a ViT without a pre-norm (pre_norm=False); "
                         "for CLIP-style towers use plant_timm_register_neurons")
    if blk0.attn.qkv.bias is None or model.patch_embed.proj.bias is None:
        raise ValueError("content plants need biases in the patch embedding and the attention qkv")
    if blk0.attn.num_heads < 2:
        raise ValueError("content plants need at least two attention heads")
    for blk in model.blocks:
        if blk.mlp.fc1.out_features != blk.mlp.fc2.in_features or \
                not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity):
            raise ValueError("content plants need a plain MLP (fc1, activation, fc2)")
    L = len(model.blocks)
    if max(l for l, _ in [*p.register_neurons, *p.distractors]) >= L:
        raise ValueError(f"a planted neuron lies beyond the model's {L} blocks")
    if 2 * len(_CHANNELS) >= model.embed_dim:
        raise ValueError(f"embed_dim {model.embed_dim} is too small for a content plant")


@torch.no_grad()
def plant_content_outliers(model: nn.Module, plants: ContentPlants | None = None, *,
                           images: torch.Tensor | None = None, seed: int = 0) -> ContentPlants:
    """Plant a realistic, content-dependent outlier mechanism (:class:`ContentPlants`) into a timm
    ``VisionTransformer`` in place; return the layout.

    Calibrated on ``images`` (default: :func:`mixed_images` at the model's size), so the writes
    have the sizes asked for in multiples of the median patch norm. Works on random and on
    pretrained weights; two heads of block 0 and the reserved channels are repurposed, so the
    result is a synthetic artifact. Needs a ViT without a pre-norm (for CLIP-style towers use
    :func:`plant_timm_register_neurons`), with biases in the patch embedding and qkv, at least two
    heads and a plain MLP.
    """
    p = plants or ContentPlants()
    _check_content_model(model, p)
    blocks = model.blocks
    L, D = len(blocks), model.embed_dim
    npre = model.num_prefix_tokens
    ch = {n: D - 1 - i for i, n in enumerate(_CHANNELS)}
    reserved = list(ch.values())
    normal = torch.ones(D, dtype=torch.bool)
    normal[reserved] = False
    size = tuple(model.patch_embed.img_size)
    x = images if images is not None else mixed_images(10, 64, seed)
    if tuple(x.shape[-2:]) != size:
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear")

    def embed() -> torch.Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    b0 = blocks[0]
    h0 = embed()
    # how block 0's LayerNorms scale tokens before planting (kept, see the massive pair below)
    sig1_old = _token_std(h0[:, npre:], b0.norm1.eps)
    sig2_old = _token_std(_attn_out(b0, h0)[:, npre:], b0.norm2.eps)
    nu = float(h0[:, npre:].norm(dim=-1).median())

    # Reserved channels: written and read only by the plant.
    _reserve_channels(model, reserved, read=reserved)
    pe = model.patch_embed.proj
    prefix = [t for t in (model.cls_token, getattr(model, "reg_token", None)) if t is not None]

    # Block 0 compares raw brightness across tokens, but a LayerNorm divides every token by its
    # own spread. A constant +-B pair (a "massive activation": added by the patch embedding,
    # removed by block 0's MLP bias) makes that spread the same for every token; block 0's
    # LayerNorm weights on the other channels are rescaled so they see what they saw before.
    B = 100.0 * nu
    pe.bias[ch["mass+"]], pe.bias[ch["mass-"]] = B, -B
    for tok in prefix:
        tok[..., ch["mass+"]], tok[..., ch["mass-"]] = B, -B
    b0.mlp.fc2.bias[ch["mass+"]], b0.mlp.fc2.bias[ch["mass-"]] = -B, B

    # Brightness score: the patch embedding writes c * (mean normalised pixel) as a +- pair (so
    # LayerNorm's mean cancels), plus a fixed per-position offset that breaks exact ties only:
    # small and uniform, plus a step for the top position so that a flat image picks one.
    c = 0.05 * nu
    C, ph, pw = pe.weight.shape[1:]
    pe.weight[ch["score+"]] = c / (C * ph * pw)
    pe.weight[ch["score-"]] = -c / (C * ph * pw)
    n_patch = model.patch_embed.num_patches
    u = torch.randperm(n_patch, generator=torch.Generator().manual_seed(seed)).float() / n_patch
    spread = 3 * max(1.0, n_patch / 64)        # wider on larger grids: fewer ties within the margin
    tie = p.margin * c * (spread * u + 1.5 * (u == u.max()).float())
    off = 0 if getattr(model, "no_embed_class", False) else npre
    model.pos_embed[0, off:off + n_patch, ch["score+"]] = tie
    model.pos_embed[0, off:off + n_patch, ch["score-"]] = -tie
    for tok in prefix:  # prefix tokens are never the brightest
        tok[..., ch["score+"]], tok[..., ch["score-"]] = -10 * c, 10 * c
    h0 = embed()
    sig1 = _token_std(h0[:, npre:], b0.norm1.eps)
    b0.norm1.weight[normal] *= sig1 / sig1_old

    # Two heads of block 0 are the plant's. ``m`` below is the LayerNorm's reading of the massive
    # pair, (n[mass+] - n[mass-]) / 2: B / spread = ``mbar`` on every token that has the pair,
    # 0 on a token that does not -- a test-time register appended after the embedding.
    attn = b0.attn
    H = attn.num_heads
    dh = D // H
    mbar = B / sig1
    rows = []
    for h in (H - 1, H - 2):
        hr = list(range(h * dh, (h + 1) * dh))
        for part in range(3):
            attn.qkv.weight[[part * D + r for r in hr]] = 0
            attn.qkv.bias[[part * D + r for r in hr]] = 0
        attn.proj.weight[:, hr] = 0
        rows.append(hr)
    W, bias = attn.qkv.weight, attn.qkv.bias

    def read_m(row: int, per_m: float) -> None:  # row += per_m * m
        W[row, ch["mass+"]], W[row, ch["mass-"]] = per_m / 2, -per_m / 2

    # Max head: a constant query; the key reads the score (and sends a token without the pair
    # far down), so the softmax picks the image's brightest patch; the value is the score,
    # written (in raw units) to every token.
    r0 = rows[0][0]
    sharp = 20.0 / (p.margin * c)                     # logit per raw score unit
    bias[r0] = 1.0
    W[D + r0, ch["score+"]] = sharp * sig1 * dh ** 0.5 / 2
    W[D + r0, ch["score-"]] = -sharp * sig1 * dh ** 0.5 / 2
    read_m(D + r0, 1e4 * dh ** 0.5 / mbar)
    bias[D + r0] = -1e4 * dh ** 0.5
    W[2 * D + r0, ch["score+"]] = 0.5
    W[2 * D + r0, ch["score-"]] = -0.5
    attn.proj.weight[ch["max+"], r0] = sig1
    attn.proj.weight[ch["max-"], r0] = -sig1
    # Register head: a token with the pair attends to tokens with it (value 0); a token without
    # it attends to itself and receives the pair, a score far below every patch and a flag
    # ("ttr", a +- pair too) that keeps block 0's neurons off it. So a test-time register
    # leaves block 0 like any other token.
    q0, q1 = rows[1][0], rows[1][1]
    read_m(q0, 1.0 / mbar)                            # query: (m / mbar, 1)
    bias[q1] = 1.0
    read_m(D + q0, 80.0 * dh ** 0.5 / mbar)           # key: (80 m / mbar, 40 (1 - m / mbar))
    read_m(D + q1, -40.0 * dh ** 0.5 / mbar)
    bias[D + q1] = 40.0 * dh ** 0.5
    read_m(2 * D + q0, -1.0 / mbar)                   # value: 1 - m / mbar
    bias[2 * D + q0] = 1.0
    for name, v in (("mass+", B), ("mass-", -B), ("score+", -10 * c), ("score-", 10 * c),
                    ("ttr+", c), ("ttr-", -c)):
        attn.proj.weight[ch[name], q0] = v
    z0 = _attn_out(b0, h0)
    sig2 = _token_std(z0[:, npre:], b0.norm2.eps)
    b0.norm2.weight[normal] *= sig2 / sig2_old

    # The trigger: (score - maximum) / spread, firing within ``margin`` of the maximum; the mild
    # neuron: brightness below -1.
    fc1, fc2, act_fn = b0.mlp.fc1, b0.mlp.fc2, b0.mlp.act
    a = (p.trigger_fire + 2.0) * sig2 / (p.margin * c)
    nT = p.trigger[1]
    fc1.weight[nT] = 0
    fc1.weight[nT, ch["score+"]], fc1.weight[nT, ch["score-"]] = a / 2, -a / 2
    fc1.weight[nT, ch["max+"]], fc1.weight[nT, ch["max-"]] = -a / 2, a / 2
    fc1.bias[nT] = p.trigger_fire
    if p.mild:
        am = 4.0 * sig2 / c
        fc1.weight[p.mild[1]] = 0
        fc1.weight[p.mild[1], ch["score+"]], fc1.weight[p.mild[1], ch["score-"]] = -am / 2, am / 2
        fc1.bias[p.mild[1]] = -4.0
    for n in [nT] + ([p.mild[1]] if p.mild else []):
        fc1.weight[n, ch["ttr+"]], fc1.weight[n, ch["ttr-"]] = -500.0 * sig2 / c, 500.0 * sig2 / c
        fc2.weight[:, n] = 0
    hid = act_fn(fc1(b0.norm2(z0)))
    trig = hid[:, npre:, nT]
    win = trig.argmax(dim=1) + npre                 # each calibration image's brightest patch
    rows_b = torch.arange(x.shape[0])

    def median_norm(h: torch.Tensor) -> float:
        return float(h[:, npre:].norm(dim=-1).median())

    h = b0(h0)
    med0 = median_norm(h)
    fc2.weight[ch["marker"], nT] = p.trigger_write * med0 / float(trig.amax(1).median())
    if p.mild:
        top = hid[:, npre:, p.mild[1]].amax(1)
        if bool((top > 0.5).any()):
            fc2.weight[ch["mild"], p.mild[1]] = p.mild_write * med0 / float(top[top > 0.5].median())
    h = b0(h0)

    # Later blocks, in order, each calibrated on the model as planted so far.
    plan: dict[int, list[tuple[int, str]]] = {}
    for l, n in p.shared:
        plan.setdefault(l, []).append((n, "shared"))
    for l, n in p.distractors:
        plan.setdefault(l, []).append((n, "dense"))
    if p.amplifier:
        plan.setdefault(p.amplifier[0], []).append((p.amplifier[1], "amp"))
    sinks = range(p.last_register_layer + 1, L) if p.sink_layers is None else p.sink_layers
    for l in range(1, L):
        blk = blocks[l]
        if l in sinks:
            # Attention sink: one head's key reads the outlier direction (query constant), so
            # every query attends to the outlier token; its value does not read that direction.
            at = blk.attn
            dhl = D // at.num_heads
            at.qkv.weight[0], at.qkv.weight[D] = 0, 0
            at.qkv.bias[0], at.qkv.bias[D] = 1.0, 0.0
            seen = blk.norm1(h)[rows_b, win, ch["amp"]]
            at.qkv.weight[D, ch["amp"]] = 12.0 * dhl ** 0.5 / float(seen.median())
        if l in plan:
            fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
            z = blk.norm2(_attn_out(blk, h))
            for n, kind in plan[l]:
                fc1.weight[n] = 0
                fc2.weight[:, n] = 0
            med = median_norm(blk(h))
            for n, kind in plan[l]:
                if kind == "dense":  # large on every token; writes a small vector nothing reads
                    fc1.bias[n] = p.distractor_act
                    fc2.weight[ch["dense"], n] = 0.3 * med / float(act_fn(fc1.bias[n]))
                    continue
                read = "marker" if kind == "shared" else "shared"
                seen = z[rows_b, win, ch[read]]
                fc1.weight[n, ch[read]] = (p.fire + 2.0) / float(seen.median())
                fc1.bias[n] = -2.0
                act = act_fn(fc1.weight[n, ch[read]] * seen + fc1.bias[n])
                size = p.shared_write if kind == "shared" else p.amplifier_write
                fc2.weight[ch[kind], n] = size * med / float(act.median())
        h = blk(h)
    return p


def content_planted_vit(plants: ContentPlants | None = None, *, depth: int = 7, embed_dim: int = 96,
                        num_heads: int = 4, img_size: int = 64, patch_size: int = 8, seed: int = 0,
                        **kwargs) -> nn.Module:
    """A small random timm ViT with a content-dependent outlier mechanism planted by
    :func:`plant_content_outliers` (eval mode). With the default :class:`ContentPlants` the
    outliers emerge at block 5 of 7. Extra keyword arguments go to timm's ``VisionTransformer``
    (e.g. ``init_values=1e-5`` for a DINOv2-style model, ``reg_tokens=4``)."""
    model = _random_vit(depth, embed_dim, num_heads, img_size, patch_size, seed, **kwargs)
    plant_content_outliers(model, plants, seed=seed)
    return model


#: what ``builtin:dinov2_vits14+planted`` plants into the 12 blocks of DINOv2 ViT-S/14: a trigger
#: in block 0 on the brightest patches, weaker neurons in blocks 6-8, an amplifier in block 9
#: (outliers emerge there), dense distractors, mildly large dark patches, sinks in blocks 10-11.
DEMO_PLANTS = ContentPlants(trigger=(0, 100), shared=((6, 200), (7, 300), (8, 400)),
                            amplifier=(9, 1000), distractors=((4, 500), (8, 600)), mild=(0, 700),
                            shared_write=6.0)


def plant_demo(model):
    """Plant :data:`DEMO_PLANTS` into a timm DINOv2 ViT-S/14 (the built-in model) in place."""
    plant_content_outliers(model, DEMO_PLANTS)
    return model


#: the neurons :func:`size_planted_vit` plants: two that fire at every size (patch 12), one that
#: fires only on inputs with many patches (patch 40 of the 8x8 grid)
SIZE_PLANTS = ((1, 7, 12, 0.4), (3, 21, 12, 12.0), (2, 30, 40, 12.0))


@torch.no_grad()
def size_planted_vit(small: int = 64, large: int = 128, *, seed: int = 0) -> nn.Module:
    """A small random timm ViT (64 px, patch 8) whose register neurons depend on the input size:
    (1, 7) and (3, 21) fire at every size, (2, 30) only when the image has many patches -- at
    ``large`` px (256 patches) but not at ``small`` px (64).

    The count is read the way a real model could, through an attention sink: one head of block 0
    gives the CLS token a fixed logit and every patch about zero, and reads a channel only CLS
    has, so its output is CLS's value times 128 / (128 + patches); (2, 30) fires on its trigger
    only when that output is small. The
    model runs at other sizes as timm runs it (``dynamic_img_size``, see
    :func:`ttreg.sizes.dynamic_size`)."""
    from ..sizes import dynamic_size
    model = _random_vit(6, 96, 4, 64, 8, seed)
    D, blk0 = model.embed_dim, model.blocks[0]
    c_cls, c_cnt = D - 7, D - 8                      # below the plants' trigger and write channels
    _reserve_channels(model, [c_cls, c_cnt], read=[])
    for blk in model.blocks:                         # nothing else reads the two channels
        blk.attn.qkv.weight[:, [c_cls, c_cnt]] = 0
        blk.mlp.fc1.weight[:, [c_cls, c_cnt]] = 0
    model.cls_token[0, 0, c_cls] = 50.0
    head_dim = D // blk0.attn.num_heads
    qkv = blk0.attn.qkv
    q, k, v = (slice(i * D, i * D + head_dim) for i in range(3))      # head 0's rows
    for rows in (q, k, v):
        qkv.weight[rows] = 0
        qkv.bias[rows] = 0
    qkv.weight[D, c_cls] = 1.0                       # head 0's key and value read CLS's channel
    qkv.weight[2 * D, c_cls] = 1.0
    x = mixed_images(5, 64, seed)
    s_cls = float(_ln_output(model, blk0.norm1, x)[:, 0, c_cls].median())
    # one query for every token: CLS's logit ln(128), the patches' about 0, so head 0 gives CLS
    # the weight 128 / (128 + patches) and its output falls with the number of patches
    qkv.bias[0] = math.log(128.0) / (s_cls * head_dim ** -0.5)
    blk0.attn.proj.weight[:, 0] = 0
    blk0.attn.proj.weight[c_cnt, 0] = 1.0            # ... written to the count channel
    plants = [_as_plant(p) for p in SIZE_PLANTS]
    plant_timm_register_neurons(model, plants, seed=seed)

    blk = model.blocks[2]
    fc1 = blk.mlp.fc1
    npre, trig = model.num_prefix_tokens, D - 2      # patch 40's trigger channel (second position)

    def seen(px: int) -> tuple[float, float]:
        """The trigger and the count as block 2's MLP reads them on its token, at ``px``."""
        x = torch.nn.functional.interpolate(mixed_images(5, 64, seed), size=(px, px), mode="bilinear")
        with dynamic_size(model):
            h = _ln_output(model, blk.norm2, x)
        tok = npre + int(h[:, npre:, trig].mean(0).argmax())
        return float(h[:, tok, trig].median()), float(h[:, tok, c_cnt].median())

    (t_s, a_s), (t_l, a_l) = seen(small), seen(large)
    # pre-activation -2 + alpha * trigger - beta * count: -4 at the small size, +6 at the large
    m = torch.tensor([[t_s, -a_s], [t_l, -a_l]], dtype=torch.float64)
    alpha, beta = torch.linalg.solve(m, torch.tensor([-2.0, 8.0], dtype=torch.float64)).tolist()
    n = plants[2].neuron
    fc1.weight[n, c_cnt] = -beta
    fc1.weight[n, trig] = alpha
    return model


__all__ = ["ContentPlants", "DEMO_PLANTS", "SIZE_PLANTS", "TimmPlant", "content_planted_vit",
           "plant_content_outliers", "plant_demo", "plant_timm_register_neurons", "planted_vit",
           "size_planted_vit"]
