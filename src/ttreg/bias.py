"""Fitting the attention-bias form: per layer and head, the mean key and value of the test-time
register over a set of images (the authors' rebuttal; :class:`ttreg.AttentionBias`).

The images run with test-time registers (the token form, ``num_registers`` tokens, the given
neurons); in every block the attention call is intercepted (:mod:`ttreg.attention`) and the
registers' key and value -- the last ``num_registers`` keys and values the kernel receives -- are
summed. Only sums and counts are kept (:class:`BiasStats`), so memory is flat in the number of
images, and shards merge exactly: under ``torch.distributed`` each rank takes every
world-size-th image and the sums are all-reduced, like the neuron search.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import attention
from .adapters import wrap
from .data import check_batch_size, shard_batches
from .distributed import all_reduce_, shard_for_rank
from .hooks import HookSet
from .neurons import eval_mode
from .registers import active_registers, test_time_registers
from .sizes import as_sizes, at_size
from .register_neurons import AttentionBias, RegisterNeurons, as_register_neurons
from .stats import MergeableStats, state


@dataclass(frozen=True)
class FitConfig:
    """The options of an attention-bias fit (the token form it measures), each checked once
    (a one-line ``ValueError`` before any work). Build it with :meth:`of`."""

    num_registers: int
    preset: str
    batch_size: int
    sizes: tuple[tuple[int, int], ...] | None   # None: the size the images come at

    @classmethod
    def of(cls, *, num_registers, preset, batch_size, sizes) -> "FitConfig":
        if isinstance(num_registers, bool) or not isinstance(num_registers, int) or num_registers < 1:
            raise ValueError(f"num_registers must be a whole number >= 1, got {num_registers!r}")
        return cls(num_registers, preset, check_batch_size(batch_size),
                   None if sizes is None else tuple(as_sizes(sizes)))

    @property
    def run_sizes(self) -> list:
        """The sizes each image runs at, in order; ``[None]``: the size it comes at."""
        return [None] if self.sizes is None else list(self.sizes)


@dataclass
class BiasStats(MergeableStats):
    """Mergeable sums of the registers' keys and values, per layer and head (each field
    declares how shards combine, :func:`ttreg.stats.state`)."""

    key_sum: torch.Tensor = state("sum")     # (L, heads, d) float64
    value_sum: torch.Tensor = state("sum")   # (L, heads, dv) float64
    count: torch.Tensor = state("sum")       # (L,) float64: register tokens summed per layer
    images: int = state("sum", 0)

    @classmethod
    def zeros(cls, layers: int, heads: int, dim: int, value_dim: int) -> "BiasStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)
        return cls(z(layers, heads, dim), z(layers, heads, value_dim), z(layers), 0)

    def add(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add the registers' ``key``/``value`` ``(B, heads, R, d)`` seen in ``layer``."""
        self.key_sum[layer] += key.detach().double().sum(dim=(0, 2)).cpu()
        self.value_sum[layer] += value.detach().double().sum(dim=(0, 2)).cpu()
        self.count[layer] += key.shape[0] * key.shape[2]

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.count.clamp_min(1)[:, None, None]
        return (self.key_sum / n).float(), (self.value_sum / n).float()


_NOT_REACHED = ("block {layer}'s attention ({cls}) never reached scaled_dot_product_attention or "
                "nn.MultiheadAttention, so its keys cannot be read: use the fused path (timm: "
                "fused_attn=True; transformers: attn_implementation='sdpa')")


def _agreed_shapes(shapes: tuple[int, int, int] | None, images: int) -> tuple[int, int, int]:
    """The attention shapes, agreed over ``torch.distributed`` ranks (a rank without images
    learns them from the others); ``images``: how many this rank ran."""
    t = torch.tensor([*(shapes or (0, 0, 0)), images], dtype=torch.float64)
    all_reduce_([t], op="max")
    if not t[3]:
        raise ValueError("no images to fit the attention bias on; give at least one image")
    if not t[:3].all():
        raise ValueError("the model's attention never reached scaled_dot_product_attention or "
                         "nn.MultiheadAttention (an explicit softmax path), so its keys cannot be read: "
                         "use the fused path (timm: fused_attn=True; transformers: "
                         "attn_implementation='sdpa') or the token form")
    return tuple(int(v) for v in t[:3])


def fit_attention_bias(model, neurons, images, *, num_registers: int = 1, preset: str = "paper",
                       batch_size: int = 16, transform: Callable | None = None,
                       progress: bool = False, strict: bool = False,
                       check: bool = True, sizes=None) -> AttentionBias:
    """Fit the attention-bias form of ``neurons`` on ``images``: per layer and head, the mean key
    and value of the test-time register(s) over the images.

    ``images``: anything :func:`ttreg.find_register_neurons` takes. ``num_registers``: the token
    form whose registers are measured (the bias then stands for that many tokens: its weight).
    Returns an :class:`~ttreg.AttentionBias`; attach it (``neurons.attention_bias = bias``) to save
    it beside the neuron file, and install it with
    ``ttreg.test_time_registers(model, neurons, form="bias")``. ``sizes`` (e.g. ``[224, 518]``):
    the mean over every image at each size (see :func:`ttreg.calibrate`).
    """
    ad = wrap(model)
    rn: RegisterNeurons = as_register_neurons(neurons, ad)
    cfg = FitConfig.of(num_registers=num_registers, preset=preset, batch_size=batch_size, sizes=sizes)
    if active_registers(ad):
        raise RuntimeError("remove test-time registers before fitting the attention bias")
    if check:
        rn.check_model(ad)
    for size in cfg.run_sizes:                   # a size the model cannot take: before any work
        with at_size(ad, size):
            pass
    images = shard_for_rank(images, strict)
    L, R = ad.num_layers, cfg.num_registers
    stats: BiasStats | None = None
    images_seen = 0

    def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        nonlocal stats
        if stats is None:   # the shapes are known from the first call
            stats = BiasStats.zeros(L, k.shape[1], k.shape[-1], v.shape[-1])
        stats.add(layer, k, v)
    with eval_mode(ad.model):     # each module's own train/eval mode comes back afterwards
        for size in cfg.run_sizes:
            with at_size(ad, size, probe=False):
                for x in shard_batches(images, ad, cfg.batch_size, transform, strict, progress,
                                       "fitting the attention bias", size=size):
                    with torch.no_grad(), HookSet() as hooks, \
                            test_time_registers(ad, rn, num_registers=R, preset=cfg.preset, check=False):
                        for layer in range(L):
                            attention.tap(hooks, ad.attention(layer),
                                          kv=(R, lambda k, v, layer=layer: sink(layer, k, v)))
                        ad.run(x)
                    images_seen += x.shape[0]
    shapes = None if stats is None else (stats.key_sum.shape[1], stats.key_sum.shape[2],
                                         stats.value_sum.shape[2])
    agreed = _agreed_shapes(shapes, images_seen)
    if stats is None:   # a rank without images (or a model whose attention was never reached)
        stats = BiasStats.zeros(L, *agreed)
    stats.images = images_seen
    stats.all_reduce()
    missing = [l for l in range(L) if stats.count[l] == 0]
    if missing:
        raise RuntimeError(_NOT_REACHED.format(layer=missing[0], cls=type(ad.attention(missing[0])).__name__))
    key, value = stats.mean()
    return AttentionBias(key, value, torch.full((L,), float(R), dtype=torch.float32), neurons=rn.neurons,
                         num_images=stats.images, num_registers=R,
                         fingerprint=RegisterNeurons.fingerprint_of(ad),
                         provenance={"method": "ttreg.fit_attention_bias", "model": ad.describe(),
                                     "preset": cfg.preset})


__all__ = ["BiasStats", "FitConfig", "fit_attention_bias"]
