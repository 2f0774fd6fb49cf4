"""Register-neuron search (the paper's Algorithm 1), streamed over batches.

For every image with outlier tokens at the detection layer, each neuron ``(l, j)`` is scored by
the mean ``|activation|`` over that image's outlier tokens; scores are averaged over those
images; the register neurons are the ``top_k`` best among layers ``<= top_layer``.

The statistics are sums and counts (:class:`SearchStats`), so memory does not grow with the
number of images, and shards computed in separate processes merge exactly (``merge``, or
``all_reduce`` under ``torch.distributed``).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .adapters import Adapter, wrap
from .data import (ImageError, ImageSource, batches_with_progress, check_images_given, iter_batches,
                   resolve_images)
from .outliers import (AUTO_MIN_RATIO, check_threshold, emergence_layer, layers_with_outliers,
                       norm_ratio, outlier_mask)
from .registers import active_registers
from .spec import RegisterNeurons, as_index
from .trace import record


@dataclass
class SearchStats:
    """Mergeable sums from a pass over images."""

    scores: torch.Tensor            # (Ls, H) float64: sum over images of mean |act| on outliers
    images: int = 0
    images_with_outliers: int = 0
    layer_hits: torch.Tensor = None  # (L,) images with outliers at each layer
    ratio_sum: torch.Tensor = None   # (L,) sum over images of max/median patch norm
    max_norm_sum: torch.Tensor = None     # (L,) sum over images of the max patch norm
    median_norm_sum: torch.Tensor = None  # (L,) sum over images of the median patch norm

    @classmethod
    def zeros(cls, num_layers: int, search_layers: int, width: int) -> "SearchStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)
        return cls(z(search_layers, width), 0, 0, z(num_layers), z(num_layers), z(num_layers), z(num_layers))

    def merge(self, other: "SearchStats") -> "SearchStats":
        return SearchStats(self.scores + other.scores, self.images + other.images,
                           self.images_with_outliers + other.images_with_outliers,
                           self.layer_hits + other.layer_hits, self.ratio_sum + other.ratio_sum,
                           self.max_norm_sum + other.max_norm_sum,
                           self.median_norm_sum + other.median_norm_sum)

    def all_reduce(self) -> "SearchStats":
        """Sum the statistics over all ranks of the default ``torch.distributed`` group."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return self
        counts = torch.tensor([self.images, self.images_with_outliers], dtype=torch.float64)
        for t in (self.scores, self.layer_hits, self.ratio_sum, self.max_norm_sum,
                  self.median_norm_sum, counts):
            dist.all_reduce(t)
        self.images, self.images_with_outliers = int(counts[0]), int(counts[1])
        return self

    def per_layer(self) -> dict[str, list[float]]:
        n = max(self.images, 1)
        return {
            "fraction_with_outliers": (self.layer_hits / n).tolist(),
            "mean_norm_ratio": (self.ratio_sum / n).tolist(),
            "mean_max_patch_norm": (self.max_norm_sum / n).tolist(),
            "mean_median_patch_norm": (self.median_norm_sum / n).tolist(),
        }


def shard_for_rank(images, strict: bool = False):
    """Under ``torch.distributed``, this rank's share of the images (every world-size-th one);
    the statistics are summed over ranks afterwards. Unchanged in a single process."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return images
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.is_tensor(images):
        return images[rank::world]
    src = images if isinstance(images, ImageSource) else resolve_images(images, strict=strict)
    return src.subset(range(rank, len(src), world))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block; each module's own mode is restored
    afterwards, also on an exception."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _resolve_layer(layer: int, num_layers: int, what: str) -> int:
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"{what}={layer} is out of range for a model with {num_layers} blocks")
    return layer % num_layers


def accumulate(adapter: Adapter, x: torch.Tensor, stats: SearchStats, detection_layer: int,
               threshold: float | str, include_prefix: bool = False,
               min_ratio: float = AUTO_MIN_RATIO) -> None:
    """One batch of Algorithm 1: add this batch's sums to ``stats`` (no per-image loop)."""
    L, Ls = adapter.num_layers, stats.scores.shape[0]
    npre = adapter.num_prefix_tokens
    with torch.no_grad(), record(adapter, range(L), {l: None for l in range(Ls)},
                                 abs_activations=True) as rec:
        adapter.run(x)
        norms = torch.stack([rec.norms[l] for l in range(L)], dim=1)           # (B, L, T)
        mask = outlier_mask(norms[:, detection_layer], npre, 0, threshold, include_prefix, min_ratio)
        weights = mask.float() / mask.sum(dim=1, keepdim=True).clamp_min(1)   # (B, T)
        for l in range(Ls):
            stats.scores[l] += torch.einsum("bt,bth->h", weights, rec.activations[l]).double().cpu()
    hits = layers_with_outliers(norms, npre, 0, threshold, include_prefix=include_prefix,
                                min_ratio=min_ratio)
    patch = norms[:, :, npre:]
    stats.images += norms.shape[0]
    stats.images_with_outliers += int(mask.any(dim=1).sum())
    stats.layer_hits += hits.sum(dim=0).double().cpu()
    B = norms.shape[0]
    stats.ratio_sum += norm_ratio(norms.reshape(B * L, -1), npre).reshape(B, L).sum(0).double().cpu()
    stats.max_norm_sum += patch.amax(dim=2).sum(0).double().cpu()
    stats.median_norm_sum += patch.median(dim=2).values.sum(0).double().cpu()


def find_register_neurons(model, images, *, threshold: float | str = "auto",
                          detection_layer: int = -1, top_layer: int | str = "auto",
                          top_k: int = 10, batch_size: int = 16, transform: Callable | None = None,
                          include_prefix: bool = False, progress: bool = False,
                          strict: bool = False) -> RegisterNeurons:
    """Find the register neurons of ``model`` from ``images`` (Algorithm 1).

    ``images``: a folder, a list of paths or PIL images, ``"skimage"``, or a tensor batch.
    ``threshold``: a norm or ``"auto"`` (mean + 3 std of each image's patch norms, at least
    twice the median). ``detection_layer``: the block whose output is checked for outliers
    (negative indexes count from the end). ``top_layer``: last layer searched, or ``"auto"``,
    the emergence layer (first block with outliers on most images). ``top_k``: how many neurons.

    A model with no outlier tokens gets an empty set whose ``note`` says so (and a warning).
    """
    ad = wrap(model)
    if active_registers(ad):
        raise RuntimeError("remove test-time registers before searching for register neurons")
    threshold = check_threshold(threshold)
    check_images_given(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    L = ad.num_layers
    det = _resolve_layer(detection_layer, L, "detection_layer")
    if top_layer != "auto":
        if isinstance(top_layer, str):
            raise ValueError(f"top_layer must be a layer index or 'auto', got {top_layer!r}")
        top = _resolve_layer(int(top_layer), L, "top_layer")
        search_layers = top + 1
    else:
        search_layers = det + 1
    top_k = as_index(top_k, "top_k")
    width = ad.mlp_width(0)
    stats = SearchStats.zeros(L, search_layers, width)
    images = shard_for_rank(images, strict)
    batches = batches_with_progress(iter_batches(images, ad, batch_size, transform, strict=strict),
                                    images, batch_size, "searching register neurons", progress)
    with eval_mode(ad.model):
        for x in batches:
            accumulate(ad, x, stats, det, threshold, include_prefix)
    stats.all_reduce()
    return neurons_from_stats(ad, stats, det=det, threshold=threshold, top_layer=top_layer,
                              top_k=top_k, include_prefix=include_prefix)


def neurons_from_stats(adapter: Adapter, stats: SearchStats, *, det: int, threshold,
                       top_layer, top_k: int, include_prefix: bool = False) -> RegisterNeurons:
    """Rank neurons from accumulated statistics (the last step of Algorithm 1)."""
    L = adapter.num_layers
    if stats.images == 0:
        raise ImageError("no images were searched (the inputs were empty); give at least one image")
    per_layer = stats.per_layer()
    emerge = emergence_layer(per_layer["fraction_with_outliers"])
    if top_layer == "auto":
        top = min(emerge, det) if emerge is not None else det
    else:
        top = int(top_layer) % L
    hyper = {"threshold": threshold, "detection_layer": det, "top_layer": top,
             "top_layer_requested": top_layer, "top_k": top_k, "include_prefix": include_prefix,
             "auto_min_ratio": AUTO_MIN_RATIO if threshold == "auto" else None}
    statistics = {"emergence_layer": emerge, **per_layer}
    fp = RegisterNeurons.fingerprint_of(adapter)
    prov = {"method": "ttreg.find_register_neurons", "model": adapter.describe()}
    if stats.images_with_outliers == 0:
        ratio = per_layer["mean_norm_ratio"][det]
        note = (f"no outlier tokens at layer {det} over {stats.images} images "
                f"(mean max/median patch-norm ratio {ratio:.2f}); this model does not need registers")
        warnings.warn(note, stacklevel=3)
        return RegisterNeurons([], [], hyper, stats.images, 0, fp, prov, statistics, note)
    mean = (stats.scores[: top + 1] / stats.images_with_outliers).float()
    k = min(top_k, mean.numel())
    vals, flat = mean.flatten().topk(k)
    pairs = [(int(i) // mean.shape[1], int(i) % mean.shape[1]) for i in flat]
    note = (f"{len(pairs)} register neurons from {stats.images_with_outliers}/{stats.images} "
            f"images with outliers at layer {det}; outliers emerge at layer {emerge}")
    return RegisterNeurons(pairs, vals.tolist(), hyper, stats.images, stats.images_with_outliers,
                           fp, prov, statistics, note)
