"""Register-neuron search (the paper's Algorithm 1), streamed over batches.

For every image with outlier tokens at the detection layer, each neuron ``(l, j)`` is scored by
the mean ``|activation|`` over that image's outlier tokens; scores are averaged over those
images; the register neurons are the ``top_k`` best among layers ``<= top_layer``.

Search presets: ``"paper"`` (patch tokens are the outlier candidates, no filter) and
``"official"``, which ranks exactly like the authors' ``shared/algorithms.py`` with the options
their notebook uses: CLS is an outlier candidate and the *sparsity filter* is on (a neuron
counts for an image only if its signed activation is below 0.5 on at least half of the tokens).

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
from .data import ImageError, check_batch_size, check_images_given, shard_batches
from .distributed import shard_for_rank
from .outliers import (AUTO_MIN_RATIO, check_threshold, JUMP_SHARE, emergence_layer, layers_with_outliers,
                       majority_layer, norm_ratio, outlier_mask)
from .registers import active_registers
from .sizes import as_sizes, at_size, label
from .register_neurons import RegisterNeurons, as_bytes, as_index
from .stats import MergeableStats, state
from .text import count
from .hooks import HookSet
from .tracing import record, run_until


#: search presets: which tokens are outlier candidates, and whether the sparsity filter is on
SEARCH_PRESETS = {"paper": {"include_prefix": False, "sparsity": False},
                  "official": {"include_prefix": True, "sparsity": True}}
#: the authors' sparsity filter: a neuron counts for an image only if its activation is below
#: SPARSE_ACTIVATION on at least SPARSE_FRACTION of the image's tokens
SPARSE_ACTIVATION = 0.5
#: the ``sparsity`` default of every way of choosing neurons (:func:`find_register_neurons`,
#: :func:`ttreg.calibrate`, ``--neurons auto``): on, so dense neurons that are large on every
#: token never rank; ``sparsity=None`` takes the preset's (``"paper"``: off, as the paper's text)
DEFAULT_SPARSITY = True
SPARSE_FRACTION = 0.5


@dataclass
class SearchStats(MergeableStats):
    """Mergeable sums from a pass over images: each field declares how shards combine
    (:func:`ttreg.stats.state`), so ``merge`` and ``all_reduce`` give the single-pass numbers."""

    #: (Ls, H) float64: sum over images of the mean |activation| on their outlier tokens
    scores: torch.Tensor = state("sum")
    images: int = state("sum", 0)
    images_with_outliers: int = state("sum", 0)
    layer_hits: torch.Tensor = state("sum", None)  # (L,) images with outliers at each layer
    ratio_sum: torch.Tensor = state("sum", None)   # (L,) sum over images of max/median patch norm
    max_norm_sum: torch.Tensor = state("sum", None)     # (L,) sum over images of the max patch norm
    median_norm_sum: torch.Tensor = state("sum", None)  # (L,) sum over images of the median patch norm
    #: (L,) sum over images with outliers of log(mean norm of the detection layer's outlier
    #: tokens at layer l / median patch norm at layer l): the outliers followed back in depth
    outlier_log_ratio_sum: torch.Tensor = state("sum", None)
    #: how the pass ran (not statistics): the largest one-pass activation memory of a batch
    #: (:func:`one_pass_bytes`) and the budget it was held against (merged by maximum)
    activation_bytes: int = state("max", 0)
    memory_budget: int = state("max", 0)

    @classmethod
    def zeros(cls, num_layers: int, search_layers: int, width: int) -> "SearchStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)
        return cls(z(search_layers, width), 0, 0, z(num_layers), z(num_layers), z(num_layers),
                   z(num_layers), z(num_layers))

    @property
    def search_memory(self) -> dict:
        """How the search ran: ``mode`` (``"one-pass"`` when the largest batch's hidden states
        fit ``memory_budget``, else ``"two-pass"``), ``activation_bytes`` and the budget."""
        mode = "one-pass" if self.activation_bytes <= self.memory_budget else "two-pass"
        return {"mode": mode, "activation_bytes": self.activation_bytes,
                "memory_budget": self.memory_budget}

    def outlier_log_ratio(self) -> torch.Tensor | None:
        """``(L,)`` mean over images with outliers of the log size of the detection layer's
        outlier tokens, relative to the median patch norm, after each block (None: no outliers)."""
        if not self.images_with_outliers:
            return None
        return self.outlier_log_ratio_sum / self.images_with_outliers

    def per_layer(self) -> dict[str, list[float]]:
        n = max(self.images, 1)
        out = {
            "fraction_with_outliers": (self.layer_hits / n).tolist(),
            "mean_norm_ratio": (self.ratio_sum / n).tolist(),
            "mean_max_patch_norm": (self.max_norm_sum / n).tolist(),
            "mean_median_patch_norm": (self.median_norm_sum / n).tolist(),
        }
        lr = self.outlier_log_ratio()
        if lr is not None:
            out["outlier_norm_ratio"] = lr.exp().tolist()
            out["outlier_log_growth"] = (lr - torch.cat([lr.new_zeros(1), lr[:-1]])).tolist()
        return out


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


def resolve_layer(layer: int, num_layers: int, what: str) -> int:
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"{what}={layer} is out of range for a model with {num_layers} blocks")
    return layer % num_layers


def sparse_neurons(act: torch.Tensor) -> torch.Tensor:
    """The authors' sparsity filter for signed activations ``(B, T, H)``: ``(B, H)`` bool, True
    where the neuron is below 0.5 on at least half of the image's tokens."""
    below = (act < SPARSE_ACTIVATION).sum(dim=1)
    return below >= SPARSE_FRACTION * act.shape[1]


#: the default memory budget of a search (bytes): what the one-pass search may keep of the MLP
#: hidden states of one batch; a search that would keep more runs in two passes instead
MEMORY_BUDGET = 1 << 30


def one_pass_bytes(adapter: Adapter, batch: int, tokens: int, search_layers: int) -> int:
    """What the one-pass search keeps for a batch: the MLP hidden states of every searched layer,
    ``(batch, tokens, width)`` in float32, until the detection layer has run."""
    return sum(batch * tokens * adapter.mlp_width(l) * 4 for l in range(search_layers))


def _layer_scores(weights: torch.Tensor, h: torch.Tensor, sparsity: bool) -> torch.Tensor:
    """One layer's share of the scores, ``(H,)`` float64: per image, the mean ``|activation|``
    over its outlier tokens (``weights`` ``(B, T)``: 1/count on them), summed over the batch;
    with ``sparsity`` only where the neuron is sparse on the image. ``h``: the MLP hidden state
    ``(B, T, H)``, as the down-projection receives it. The one function both search paths use,
    so they give the same numbers."""
    act = h.float()
    if sparsity:
        per_image = torch.einsum("bt,bth->bh", weights, act.abs()) * sparse_neurons(act)
        return per_image.sum(dim=0).double().cpu()
    return torch.einsum("bt,bth->h", weights, act.abs()).double().cpu()


def accumulate(adapter: Adapter, x: torch.Tensor, stats: SearchStats, detection_layer: int,
               threshold: float | str, include_prefix: bool = False,
               min_ratio: float = AUTO_MIN_RATIO, sparsity: bool = False,
               memory_budget: int | str | None = None) -> str:
    """One batch of Algorithm 1: add this batch's sums to ``stats`` (no per-image loop); return
    how it ran, ``"one-pass"`` or ``"two-pass"``.

    ``sparsity``: a neuron's score for an image counts only if the neuron is sparse on that
    image (:func:`sparse_neurons`), as in the authors' code with its filter on.

    Which tokens are outliers is known only once the detection layer has run. The one-pass path
    keeps the MLP hidden states of every searched layer until then (:func:`one_pass_bytes`);
    when that exceeds ``memory_budget`` (default :data:`MEMORY_BUDGET`) the batch runs twice:
    first the token norms (stopping after the last block, before any head), then the scores,
    summed inside the down-projection hooks with the now known outlier weights, one layer at a
    time (stopping after the last searched layer). Both paths compute the scores with the same
    function on the same tensors, so they give the same numbers.
    """
    L, Ls = adapter.num_layers, stats.scores.shape[0]
    npre = adapter.num_prefix_tokens
    rows, cols = adapter.grid_size(x)
    need = one_pass_bytes(adapter, x.shape[0], npre + rows * cols, Ls)
    budget = as_bytes(MEMORY_BUDGET if memory_budget is None else memory_budget)
    two_pass = need > budget
    stats.activation_bytes = max(stats.activation_bytes, need)
    stats.memory_budget = budget

    def outlier_weights(norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = outlier_mask(norms[:, detection_layer], npre, 0, threshold, include_prefix, min_ratio)
        return mask, mask.float() / mask.sum(dim=1, keepdim=True).clamp_min(1)    # (B, T)

    with torch.no_grad():
        if two_pass:
            with record(adapter, range(L)) as rec:
                run_until(adapter, x, L - 1)
                norms = torch.stack([rec.norms[l] for l in range(L)], dim=1)  # (B, L, T)
            mask, weights = outlier_weights(norms)
            io = adapter.block_io
            with HookSet() as hooks:
                for l in range(Ls):
                    def add(mod, args, l=l):
                        h = io.batch_first(args[0])
                        stats.scores[l] += _layer_scores(weights, h.detach(), sparsity)
                    hooks.pre(adapter.down_proj(l), add)
                run_until(adapter, x, Ls - 1)
        else:
            with record(adapter, range(L), {l: None for l in range(Ls)}) as rec:
                run_until(adapter, x, L - 1)
                norms = torch.stack([rec.norms[l] for l in range(L)], dim=1)
                mask, weights = outlier_weights(norms)
                for l in range(Ls):
                    stats.scores[l] += _layer_scores(weights, rec.activations.pop(l), sparsity)
    hits = layers_with_outliers(norms, npre, 0, threshold, include_prefix=include_prefix,
                                min_ratio=min_ratio)
    patch = norms[:, :, npre:]
    stats.images += norms.shape[0]
    has = mask.any(dim=1)
    stats.images_with_outliers += int(has.sum())
    stats.layer_hits += hits.sum(dim=0).double().cpu()
    stats.ratio_sum += norm_ratio(norms, npre).sum(0).double().cpu()
    stats.max_norm_sum += patch.amax(dim=2).sum(0).double().cpu()
    median = patch.median(dim=2).values                                       # (B, L)
    stats.median_norm_sum += median.sum(0).double().cpu()
    tracked = torch.einsum("bt,blt->bl", weights, norms.float())              # outliers, back in depth
    log_ratio = (tracked.clamp_min(1e-12) / median.float().clamp_min(1e-12)).log()
    stats.outlier_log_ratio_sum += log_ratio[has].sum(0).double().cpu()
    return "two-pass" if two_pass else "one-pass"


def layers_to_search(top_layer: int | str, det: int, num_layers: int) -> int:
    """How many layers (from 0) a search records: up to ``top_layer``, or with ``"auto"`` up to
    the detection layer (the emergence layer is known only afterwards)."""
    if top_layer == "auto":
        return det + 1
    if isinstance(top_layer, str):
        raise ValueError(f"top_layer must be a layer index or 'auto', got {top_layer!r}")
    return resolve_layer(int(top_layer), num_layers, "top_layer") + 1


def check_top_k(top_k) -> int:
    """``top_k`` as a whole number >= 1 (a set of 0 neurons is not a search result), else a
    one-line ``ValueError``."""
    k = as_index(top_k, "top_k")
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k} (calibrate's top_k='auto' chooses it)")
    return k


def search_options(preset: str, include_prefix: bool | None, sparsity: bool | None) -> dict:
    """The search options of ``preset``, with any option given explicitly taking precedence."""
    if preset not in SEARCH_PRESETS:
        raise ValueError(f"unknown search preset {preset!r}; choose one of {', '.join(SEARCH_PRESETS)}")
    opts = dict(SEARCH_PRESETS[preset])
    if include_prefix is not None:
        opts["include_prefix"] = bool(include_prefix)
    if sparsity is not None:
        opts["sparsity"] = bool(sparsity)
    return opts


@dataclass(frozen=True)
class SearchConfig:
    """The options of one search, each checked once (a one-line ``ValueError`` before any
    work) and with the model's layer indices resolved: what :func:`search_stats`,
    :func:`find_register_neurons` and :func:`ttreg.calibrate` share. Build it with :meth:`of`."""

    threshold: float | str         # a norm > 0, or "auto"
    detection_layer: int           # resolved: 0 .. num_layers - 1
    top_layer: int | str           # as requested (an index or "auto"), recorded with the result
    search_layers: int             # the layers 0 .. search_layers - 1 are searched
    batch_size: int
    preset: str
    include_prefix: bool
    sparsity: bool
    memory_budget: int             # bytes
    sizes: tuple[tuple[int, int], ...] | None   # None: the size the images come at

    @classmethod
    def of(cls, num_layers: int, *, threshold, detection_layer, top_layer, batch_size, preset,
           include_prefix, sparsity, memory_budget, sizes,
           search_layers: int | None = None) -> "SearchConfig":
        """Check and resolve the options for a model of ``num_layers`` blocks; ``preset``
        gives ``include_prefix`` and ``sparsity`` where they are None (:func:`search_options`).
        ``search_layers`` given: searched as such, instead of up to ``top_layer``."""
        threshold = check_threshold(threshold)
        batch_size = check_batch_size(batch_size)
        budget = as_bytes(MEMORY_BUDGET if memory_budget is None else memory_budget)
        det = resolve_layer(detection_layer, num_layers, "detection_layer")
        opts = search_options(preset, include_prefix, sparsity)
        if search_layers is None:
            search_layers = layers_to_search(top_layer, det, num_layers)
        return cls(threshold, det, top_layer, search_layers, batch_size, preset,
                   opts["include_prefix"], opts["sparsity"], budget,
                   None if sizes is None else tuple(as_sizes(sizes)))

    @property
    def options(self) -> dict:
        """``include_prefix`` and ``sparsity``, as :func:`search_options` gives them."""
        return {"include_prefix": self.include_prefix, "sparsity": self.sparsity}

    @property
    def run_sizes(self) -> list:
        """The sizes each image runs at, in order; ``[None]``: the size it comes at."""
        return [None] if self.sizes is None else list(self.sizes)

    def check_sizes(self, adapter: Adapter) -> None:
        """A size the model cannot take: a one-line ``ValueError`` before any work."""
        for size in self.sizes or ():
            with at_size(adapter, size):
                pass


def run_search(adapter: Adapter, images, config: SearchConfig, *, transform: Callable | None = None,
               progress: bool = False, strict: bool = False) -> SearchStats:
    """The pass of Algorithm 1 with checked options (see :func:`search_stats`): ``images`` are
    made an image set and this rank's share taken; the statistics are merged over the sizes,
    then over the ranks."""
    ad, cfg = adapter, config
    if active_registers(ad):
        raise RuntimeError("remove test-time registers before searching for register neurons")
    check_images_given(images)
    cfg.check_sizes(ad)
    images = shard_for_rank(images, strict)
    L = ad.num_layers
    stats = None
    with eval_mode(ad.model):
        for size in cfg.run_sizes:
            part = SearchStats.zeros(L, cfg.search_layers, ad.mlp_width(0))
            part.memory_budget = cfg.memory_budget
            desc = "searching register neurons" + (f" at {label(size)} px" if size else "")
            with at_size(ad, size, probe=False):
                for x in shard_batches(images, ad, cfg.batch_size, transform, strict, progress, desc,
                                       size=size):
                    accumulate(ad, x, part, cfg.detection_layer, cfg.threshold, cfg.include_prefix,
                               sparsity=cfg.sparsity, memory_budget=cfg.memory_budget)
            stats = part if stats is None else stats.merge(part)
    return stats.all_reduce()


def search_stats(model, images, *, threshold: float | str = "auto", detection_layer: int = -1,
                 search_layers: int | None = None, batch_size: int = 16,
                 transform: Callable | None = None, include_prefix: bool = False,
                 sparsity: bool = False, progress: bool = False, strict: bool = False,
                 memory_budget: int | str | None = None, sizes=None) -> SearchStats:
    """The pass of Algorithm 1: :class:`SearchStats` over ``images`` for the neurons of layers
    ``< search_layers`` (default: up to the detection layer), summed over ``torch.distributed``
    ranks when there are several (each rank reads every world-size-th image). The model runs in
    eval mode; its mode is restored. ``memory_budget``: see :func:`accumulate`.

    ``sizes`` (e.g. ``[224, 518]``, see :func:`ttreg.sizes.as_sizes`): run every image at each
    size (:func:`ttreg.sizes.at_size`) and merge the statistics of the sizes in that order --
    sums and counts, so exactly what searching each size alone and merging gives; an image
    counts once per size."""
    ad = wrap(model)
    cfg = SearchConfig.of(ad.num_layers, threshold=threshold, detection_layer=detection_layer,
                          top_layer="auto", search_layers=search_layers or None,
                          batch_size=batch_size, preset="paper", include_prefix=include_prefix,
                          sparsity=sparsity, memory_budget=memory_budget, sizes=sizes)
    return run_search(ad, images, cfg, transform=transform, progress=progress, strict=strict)


def find_register_neurons(model, images, *, threshold: float | str = "auto",
                          detection_layer: int = -1, top_layer: int | str = "auto",
                          top_k: int = 10, batch_size: int = 16, transform: Callable | None = None,
                          preset: str = "paper", include_prefix: bool | None = None,
                          sparsity: bool | None = DEFAULT_SPARSITY, progress: bool = False,
                          strict: bool = False, memory_budget: int | str | None = None) -> RegisterNeurons:
    """Find the register neurons of ``model`` from ``images`` (Algorithm 1).

    ``images``: a folder, a list of paths or PIL images, ``"skimage"``, or a tensor batch.
    ``threshold``: a norm or ``"auto"`` (mean + 3 std of each image's patch norms, at least
    twice the median). ``detection_layer``: the block whose output is checked for outliers
    (negative indexes count from the end). ``top_layer``: last layer searched, or ``"auto"``,
    the emergence layer (the last block that makes the detection layer's outlier tokens grow,
    see docs/method.md). ``top_k``: how many neurons (at least 1), a fixed number: this is the
    paper's Algorithm 1 for a k you know (to reproduce the paper, or a published set's k).
    :func:`ttreg.calibrate` is the call to use otherwise: the same search with the same
    defaults, and the smallest k that clears held-out images.

    ``preset``: ``"paper"`` (patch tokens are the outlier candidates) or ``"official"`` (ranks
    like the authors' ``algorithms.py`` as their notebook runs it: CLS is a candidate too).
    ``include_prefix`` (prefix tokens such as CLS are outlier candidates) overrides the preset.
    ``sparsity`` (default on, as in :func:`ttreg.calibrate`: a neuron counts for an image only
    if its activation is below 0.5 on at least half of the tokens, so dense neurons that are
    large on every token never rank); ``sparsity=None`` takes the preset's (``"paper"``: off, as
    the paper's text; ``"official"``: on).

    ``memory_budget`` (bytes, or a size such as ``"4GB"``; default 1 GiB): what the search may
    keep of a batch's MLP hidden states. A batch whose searched layers would need more runs in
    two passes instead of one (about twice the compute, the same scores; see :func:`accumulate`);
    the choice is recorded in ``statistics["search_memory"]``.

    Under ``torch.distributed`` each rank reads every world-size-th image and the statistics
    are summed over the ranks: every rank returns the single-process result.

    A model with no outlier tokens gets an empty set whose ``note`` says so (and a warning).
    """
    ad = wrap(model)
    cfg = SearchConfig.of(ad.num_layers, threshold=threshold, detection_layer=detection_layer,
                          top_layer=top_layer, batch_size=batch_size, preset=preset,
                          include_prefix=include_prefix, sparsity=sparsity,
                          memory_budget=memory_budget, sizes=None)
    top_k = check_top_k(top_k)
    stats = run_search(ad, images, cfg, transform=transform, progress=progress, strict=strict)
    return neurons_from_stats(ad, stats, det=cfg.detection_layer, threshold=threshold,
                              top_layer=top_layer, top_k=top_k, preset=preset, **cfg.options)


def emergence_evidence(stats: SearchStats, det: int) -> dict:
    """The emergence layer and the per-layer numbers that decided it (see docs/method.md)."""
    lr = stats.outlier_log_ratio()
    per = stats.per_layer()
    ev = {"rule": f"last block up to the detection layer {det} that grows the detection layer's "
                  f"outlier tokens by at least {JUMP_SHARE:.0%} of their peak log norm ratio",
          "layer": None if lr is None else emergence_layer(lr[: det + 1]),
          "majority_layer": majority_layer(per["fraction_with_outliers"])}
    if lr is not None:
        ev["outlier_norm_ratio"] = per["outlier_norm_ratio"]
        ev["outlier_log_growth"] = per["outlier_log_growth"]
    return ev


def rank(stats: SearchStats, top: int, k: int) -> tuple[list[tuple[int, int]], list[float]]:
    """The ``k`` best ``(layer, neuron)`` of layers ``<= top`` by mean score, best first; ties
    in index order (a stable sort, as a re-statement of the authors' ranking would give)."""
    mean = (stats.scores[: top + 1] / max(stats.images_with_outliers, 1)).float()
    vals, flat = torch.sort(mean.flatten(), descending=True, stable=True)
    vals, flat = vals[:k], flat[:k]
    W = mean.shape[1]
    return [(int(i) // W, int(i) % W) for i in flat], vals.tolist()


def neurons_from_stats(adapter: Adapter, stats: SearchStats, *, det: int, threshold,
                       top_layer, top_k: int, include_prefix: bool = False,
                       sparsity: bool = False, preset: str = "paper") -> RegisterNeurons:
    """Rank neurons from accumulated statistics (the last step of Algorithm 1)."""
    L = adapter.num_layers
    if stats.images == 0:
        raise ImageError("no images were searched (the inputs were empty); give at least one image")
    per_layer = stats.per_layer()
    evidence = emergence_evidence(stats, det)
    emerge = evidence["layer"]
    if top_layer == "auto":
        top = min(emerge, det) if emerge is not None else det
    else:
        top = int(top_layer) % L
    top = min(top, stats.scores.shape[0] - 1)
    hyper = {"threshold": threshold, "detection_layer": det, "top_layer": top,
             "top_layer_requested": top_layer, "top_k": top_k, "preset": preset,
             "include_prefix": include_prefix, "sparsity": sparsity,
             "auto_min_ratio": AUTO_MIN_RATIO if threshold == "auto" else None}
    statistics = {"emergence_layer": emerge, "emergence_rule": evidence["rule"],
                  "majority_layer": evidence["majority_layer"], **per_layer,
                  "search_memory": stats.search_memory}
    fp = RegisterNeurons.fingerprint_of(adapter)
    prov = {"method": "ttreg.find_register_neurons", "model": adapter.describe()}
    if stats.images_with_outliers == 0:
        ratio = per_layer["mean_norm_ratio"][det]
        note = (f"no outlier tokens at layer {det} over {count(stats.images, 'image')} "
                f"(mean max/median patch-norm ratio {ratio:.2f}); this model does not need registers")
        warnings.warn(note, stacklevel=3)
        return RegisterNeurons([], [], hyper, stats.images, 0, fp, prov, statistics, note)
    pairs, vals = rank(stats, top, top_k)
    note = (f"{count(len(pairs), 'register neuron')} from {stats.images_with_outliers}/"
            f"{count(stats.images, 'image')} with outliers at layer {det}; outliers emerge at layer {emerge}")
    return RegisterNeurons(pairs, vals, hyper, stats.images, stats.images_with_outliers,
                           fp, prov, statistics, note)
