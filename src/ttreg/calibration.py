"""Automatic calibration: threshold, top_layer and top_k chosen from the images, not by hand.

The authors picked the three hyperparameters per model; their answer to reviewers was a recipe,
made a function here (the rules and the measurements behind them: docs/method.md):

* threshold ``"auto"``: mean + 3 std of each image's patch norms (floored at 2x the median);
* ``top_layer="auto"``: the emergence layer -- the detection layer's outlier tokens followed
  back through the blocks; the last block that makes them grow materially
  (:func:`ttreg.outliers.emergence_layer`);
* ``top_k="auto"``: the smallest k, found on held-out images (first probe at the largest drop in
  the ranked scores), whose test-time registers bring every held-out image with outliers to
  within ``slack`` (10%) of the max/median patch norm that *zeroing* all ``max_k`` candidates
  achieves. The reference is measured, not
  inflated by the outliers it must catch; when even zeroing the candidates leaves outliers, the
  search widens to every layer up to the detection layer, and when that fails too the report
  says why (and a warning does).

One search pass ranks the neurons (of every layer up to the detection layer, so widening costs
no second search); the sweep then costs one forward over the held-out images per step.
The whole calibration runs with the model in eval mode; its mode is restored afterwards.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .adapters import wrap
from .data import ImageSet, check_images_given, shard_batches
from .distributed import shard, shared_image_set
from .neurons import DEFAULT_SPARSITY, SearchConfig, check_top_k, eval_mode, neurons_from_stats, run_search
from .outliers import norm_ratio, outlier_mask
from .registers import test_time_registers, zero_neurons
from .sizes import Size, as_sizes, at_size, label
from .register_neurons import RegisterNeurons, as_index
from .stats import MergeableStats, state
from .text import count
from .tracing import record, run_until


@dataclass(frozen=True)
class SweepConfig:
    """The options of the held-out top-k sweep, each checked once (a one-line ``ValueError``
    before any work). Build it with :meth:`of`."""

    heldout: float          # share of the images held out of the search, in [0, 1)
    tolerance: float        # share of held-out images allowed to stay uncleared, in [0, 1]
    slack: float            # cleared: within 1 + slack of zeroing the candidates
    max_k: int | None       # the most neurons the sweep considers (None: 1% of the searched)
    top_k: int | str        # a number of neurons, or "auto" (the sweep chooses)

    @classmethod
    def of(cls, *, heldout, tolerance, slack, max_k, top_k) -> "SweepConfig":
        if isinstance(heldout, bool) or not isinstance(heldout, (int, float)) or not 0 <= heldout < 1:
            raise ValueError(f"heldout must be a share in [0, 1), got {heldout!r}")
        if not (isinstance(tolerance, (int, float)) and 0 <= tolerance <= 1):
            raise ValueError(f"tolerance must be a share in [0, 1], got {tolerance!r}")
        if max_k is not None and as_index(max_k, "max_k") < 1:
            raise ValueError(f"max_k must be at least 1, got {max_k!r}")
        if top_k != "auto":
            top_k = check_top_k(top_k)
        return cls(heldout, tolerance, slack, max_k, top_k)


@dataclass(repr=False)
class Calibration:
    """The neurons found and what calibration measured on the way."""

    neurons: RegisterNeurons
    report: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        r, rn = self.report, self.neurons
        body = ", ".join(f"{l}: {ns}" for l, ns in rn.by_layer().items())
        text = f"Calibration({count(len(rn), 'neuron')} {{{body}}}"
        if "heldout_before" in r and "heldout_after" in r:
            which = "in-sample" if r.get("heldout_in_sample") else "held-out"
            text += (f"; {which} max/median patch norm {r['heldout_before']['mean_norm_ratio']:.2f} -> "
                     f"{r['heldout_after']['mean_norm_ratio']:.2f}")
        if r.get("top_k_rule"):
            text += f"; top k {r.get('top_k')} ({r['top_k_rule']})"
        return text + "; .summary() and .report for the rest)"

    def summary(self) -> str:
        r = self.report
        rn = self.neurons
        if r.get("given_neurons"):
            b, a = r["heldout_before"], r["heldout_after"]
            return (f"measured {count(len(rn), 'given neuron')} on {count(r['num_heldout_images'], 'image')}\n"
                    f"max/median patch norm at layer {r['detection_layer']}: "
                    f"{b['mean_norm_ratio']:.2f} -> {a['mean_norm_ratio']:.2f}; images with outliers: "
                    f"{b['fraction_with_outliers']:.0%} -> {a['fraction_with_outliers']:.0%}"
                    + self._per_size())
        skipped = f", {r['num_skipped']} skipped" if r.get("num_skipped") else ""
        if r.get("heldout_in_sample"):
            lines = [f"images: {r['num_search_images']} searched and the same measured (none held "
                     f"out: {r['in_sample_reason']}, so the numbers below are in-sample){skipped}"]
        else:
            lines = [f"images: {r['num_search_images']} searched, {r['num_heldout_images']} held out{skipped}"]
        lines.append(f"outliers at layer {r['detection_layer']}: "
                     f"{rn.num_images_with_outliers}/{rn.num_images} search images; "
                     f"emergence layer: {r['emergence_layer']}")
        if not len(rn):
            lines.append(rn.note)
            return "\n".join(lines)
        per = ", ".join(f"layer {l}: {len(ns)}" for l, ns in rn.by_layer().items())
        lines.append(f"register neurons: {len(rn)} ({per}); searched layers <= {r['top_layer']}")
        if r.get("top_k_rule"):
            lines.append(f"top k = {r['top_k']} ({r['top_k_rule']}): {r['top_k_reason']}")
        b, a = r["heldout_before"], r["heldout_after"]
        which = "in-sample (not held out)" if r.get("heldout_in_sample") else "held-out"
        lines.append(f"{which} max/median patch norm at layer {r['detection_layer']}: "
                     f"{b['mean_norm_ratio']:.2f} -> {a['mean_norm_ratio']:.2f}; images with "
                     f"outliers: {b['fraction_with_outliers']:.0%} -> {a['fraction_with_outliers']:.0%}"
                     + self._per_size())
        return "\n".join(lines)

    def _per_size(self) -> str:
        """One line per input size when there are several or one is not cleared: before -> after,
        cleared or not."""
        per = self.report.get("per_size") or {}
        if len(per) < 2 and all(r["cleared"] for r in per.values()):
            return ""
        return "".join(f"\n  at {size} px: {r['heldout_before']['mean_norm_ratio']:.2f} -> "
                       f"{r['heldout_after']['mean_norm_ratio']:.2f}, images with outliers "
                       f"{r['heldout_before']['fraction_with_outliers']:.0%} -> "
                       f"{r['heldout_after']['fraction_with_outliers']:.0%}"
                       f" ({'cleared' if r['cleared'] else 'NOT cleared'})" for size, r in per.items())


def _measure_given(ad, src: ImageSet, neurons: RegisterNeurons, cfg: SearchConfig, transform,
                   strict: bool, skipped: list, labels: list[str], tolerance: float,
                   progress: bool = False) -> Calibration:
    """Measure a given set on all the images at each size: outliers before and after test-time
    registers; the sizes join those the set records as measured."""
    neurons.check_model(ad)
    det, threshold = cfg.detection_layer, cfg.threshold
    held = _Heldout(ad, src, cfg, transform, strict, labels, progress=progress)
    plain, edited = held.measure(), held.measure(neurons)
    before, after = plain.summary, edited.summary
    n = held.n
    report = {"detection_layer": det, "threshold": threshold, "emergence_layer": None,
              "top_layer": neurons.hyperparameters.get("top_layer"), "top_k": len(neurons),
              "num_search_images": 0, "num_heldout_images": n, "num_skipped": len(skipped),
              "skipped": skipped, "sweep": [], "given_neurons": True,
              "heldout_before": before, "heldout_after": after,
              "sizes": labels,
              "per_size": _per_size(held, plain, edited, tolerance)}
    out = RegisterNeurons.from_dict(neurons.to_dict())
    out.attention_bias = neurons.attention_bias
    out.with_measured_sizes(_as_recorded(labels))
    out.statistics.update({"measured_on_images": n, "measured_detection_layer": det,
                           "measured_before": before, "measured_after": after,
                           "measured_per_size": report["per_size"]})
    out.note = (f"{count(len(out), 'given register neuron')} measured on {count(n, 'image')}: max/median patch norm "
                f"at layer {det} {before['mean_norm_ratio']:.2f} -> {after['mean_norm_ratio']:.2f}")
    return Calibration(out, report)


def _split(src: ImageSet, heldout: float) -> tuple[Any, Any]:
    """A fixed pseudo-random share ``heldout`` of the images is held out (deterministic; not
    every k-th image, which would pick one kind from a set that cycles through kinds).
    ``src``: an :class:`~ttreg.data.ImageSet` (or anything with ``len`` that indexes by a list
    of indices, such as a tensor batch)."""
    n = len(src)
    if n < 2 or heldout <= 0:
        return src, src
    n_held = min(n - 1, max(1, round(n * heldout)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    held = sorted(order[:n_held].tolist())
    keep = sorted(order[n_held:].tolist())
    return src[keep], src[held]


@dataclass
class _Pass:
    """What one pass over the held-out images (at every size) left. Per image of this rank's
    share and size, sizes one after the other: the max/median patch norm at the detection layer
    (``ratio``) and whether it has outlier tokens by the outlier rule applied to its own patch
    norms (``outliers``); per size, over all ranks: the image count and the sums behind
    :attr:`summary` and :meth:`at`."""

    ratio: torch.Tensor       # (sizes * n_local,)
    outliers: torch.Tensor    # (sizes * n_local,) bool
    sums: "HeldoutSums"       # per size, over all ranks

    @property
    def summary(self) -> dict[str, float]:
        """Over all sizes (each image counts once per size)."""
        return _summary(self.sums.table().sum(dim=0))

    def at(self, i: int) -> dict[str, float]:
        """At the ``i``-th size."""
        return _summary(self.sums.table()[i])


@dataclass
class HeldoutSums(MergeableStats):
    """Mergeable sums of a pass over held-out images, per size (``(sizes,)`` float64 each)."""

    images: torch.Tensor = state("sum")
    with_outliers: torch.Tensor = state("sum")   # images with outlier tokens
    ratio_sum: torch.Tensor = state("sum")       # of the max/median patch norms
    max_norm_sum: torch.Tensor = state("sum")    # of the max patch norms

    @classmethod
    def zeros(cls, sizes: int) -> "HeldoutSums":
        return cls(*(torch.zeros(sizes, dtype=torch.float64) for _ in range(4)))

    def add(self, i: int, ratio: torch.Tensor, outliers: torch.Tensor, top: torch.Tensor) -> None:
        """Add a batch's per-image numbers (:func:`_image_numbers`) at the ``i``-th size."""
        self.images[i] += float(len(ratio))
        self.with_outliers[i] += outliers.sum().double().cpu()
        self.ratio_sum[i] += ratio.double().sum().cpu()
        self.max_norm_sum[i] += top.double().sum().cpu()

    def table(self) -> torch.Tensor:
        """``(sizes, 4)``: images, with outliers, sum of ratios, of max norms."""
        return torch.stack([self.images, self.with_outliers, self.ratio_sum, self.max_norm_sum], dim=1)


@dataclass
class HeldoutCounts(MergeableStats):
    """Per size, how many held-out images meet a test (``(sizes,)`` float64)."""

    count: torch.Tensor = state("sum")


def _summary(sums: torch.Tensor) -> dict[str, float]:
    n = max(float(sums[0]), 1.0)
    return {"fraction_with_outliers": float(sums[1]) / n, "mean_norm_ratio": float(sums[2]) / n,
            "mean_max_patch_norm": float(sums[3]) / n}


def _image_numbers(norms: torch.Tensor, R: int, npre: int, threshold):
    """Per image of a batch of detection-layer norms ``(B, T)`` (the last ``R`` tokens test-time
    registers): max/median patch norm, outliers by the rule on its own patch norms (a threshold
    taken from the plain image would be inflated by the outliers it should catch), max patch
    norm."""
    T = norms.shape[1]
    ratio = norm_ratio(norms, npre, R)
    outliers = outlier_mask(norms[:, :T - R], npre, 0, threshold).any(dim=1)
    return ratio, outliers, norms[:, npre:T - R].float().amax(dim=1)


class _Heldout:
    """The held-out images: this rank's share, re-read on every pass at every size -- never all
    decoded at once, so memory does not grow with their number. Each pass runs up to the
    detection layer only and leaves per-image numbers (:class:`_Pass`); counts and sums are
    all-reduced."""

    def __init__(self, ad, images: ImageSet, cfg: SearchConfig, transform, strict: bool,
                 labels: list[str], progress: bool = False):
        self.ad, self.det, self.threshold, self.progress = ad, cfg.detection_layer, cfg.threshold, progress
        self.batch_size, self.transform, self.strict = cfg.batch_size, transform, strict
        self.n = len(images)
        self.images = shard(images)
        self.sizes: list[Size | None] = cfg.run_sizes
        self.labels = labels

    @torch.no_grad()
    def measure(self, neurons: RegisterNeurons | None = None, mode: str = "registers",
                preset: str = "paper") -> _Pass:
        """Detection-layer numbers with ``neurons`` moved into one test-time register
        (``mode="registers"``) or zeroed (``"zero"``); plain when None or empty."""
        ad, det = self.ad, self.det
        R = 0
        if neurons is None or not len(neurons):
            edit, what = contextlib.nullcontext(), "plain model"
        elif mode == "zero":
            edit, what = zero_neurons(ad, neurons, check=False), f"{count(len(neurons), 'neuron')} zeroed"
        else:
            edit, R = test_time_registers(ad, neurons, num_registers=1, preset=preset, check=False), 1
            what = f"registers with {count(len(neurons), 'neuron')}"
        ratios, outliers = [], []
        sums = HeldoutSums.zeros(len(self.sizes))
        with edit, record(ad, [det]) as rec:
            for i, size in enumerate(self.sizes):
                desc = f"held-out check, {what}" + (f" at {self.labels[i]} px" if len(self.sizes) > 1 else "")
                with at_size(ad, size, probe=False):
                    for x in shard_batches(self.images, ad, self.batch_size, self.transform,
                                           self.strict, self.progress, desc, size=size):
                        run_until(ad, x, det)
                        ratio, out, top = _image_numbers(rec.norms[det], R, ad.num_prefix_tokens,
                                                         self.threshold)
                        ratios.append(ratio.cpu())
                        outliers.append(out.cpu())
                        sums.add(i, ratio, out, top)
        sums.all_reduce()
        cat = lambda xs, dtype: torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)  # noqa: E731
        return _Pass(cat(ratios, torch.float32), cat(outliers, torch.bool), sums)

    def shares(self, local: torch.Tensor) -> list[float]:
        """Per size, the share of all held-out images (every rank's) for which ``local`` (one
        entry per image of this rank and size, as in :class:`_Pass`) is True."""
        counts = HeldoutCounts(local.reshape(len(self.sizes), -1).sum(dim=1).double()).all_reduce()
        return [float(c) / max(self.n, 1) for c in counts.count]

    def share(self, local: torch.Tensor) -> float:
        """The largest share over the sizes of held-out images for which ``local`` is True: a
        test that must hold at every size fails by its worst size."""
        return max(self.shares(local))


def _as_recorded(labels: list[str]) -> list[Size]:
    """Size labels (``"224x224"``) as the neuron file records them."""
    return [as_sizes(name)[0] for name in labels]


def _per_size(held: _Heldout, plain: _Pass, edited: _Pass, tolerance: float) -> dict[str, dict]:
    """Per size: held-out numbers before and after, and whether it is cleared (images that
    still have outlier tokens with test-time registers: at most ``tolerance`` of them)."""
    left = held.shares(edited.outliers)
    return {name: {"heldout_before": plain.at(i), "heldout_after": edited.at(i),
                   "cleared": left[i] <= tolerance} for i, name in enumerate(held.labels)}


class _Sweep:
    """The top-k sweep on held-out images: outcomes per k (cached, each one pass over them) and
    the clearing test against a reference max/median ratio per image."""

    def __init__(self, held: _Heldout, has_outliers: torch.Tensor, ranked: RegisterNeurons, *,
                 preset: str, slack: float, tolerance: float, log: list) -> None:
        self.held, self.has = held, has_outliers
        self.ranked, self.preset, self.slack, self.tolerance, self.log = ranked, preset, slack, tolerance, log
        self.passes: dict[int, _Pass] = {}

    def run(self, k: int) -> _Pass:
        if k not in self.passes:
            self.passes[k] = self.held.measure(self.ranked.top(k), preset=self.preset)
            self.log.append({"k": k, "top_layer": self.ranked.hyperparameters["top_layer"],
                             **self.passes[k].summary})
        return self.passes[k]

    def failing(self, k: int, reference: torch.Tensor) -> float:
        """Share of held-out images with outliers whose ratio stays above (1 + slack) x reference."""
        return self.held.share(self.has & (self.run(k).ratio > (1 + self.slack) * reference))

    def smallest(self, reference: torch.Tensor) -> int | None:
        """Smallest k in 1..N that passes against ``reference``, or None.

        The first probe is the largest drop in the ranked scores (:func:`score_gap`): if k
        passes there and k - 1 fails, two passes decide. Otherwise the search gallops up from
        a failing k (doubling the step) or down from a passing one, then bisects: the same
        answer as a bisection over 1..N, usually in fewer forward passes."""
        n = len(self.ranked)
        ok = lambda k: self.failing(k, reference) <= self.tolerance
        k = score_gap(self.ranked.scores or [])
        if ok(k):
            if k == 1 or not ok(k - 1):
                return k
            lo, hi = 0, k - 1             # k = 0 leaves the outliers: known to fail
        else:
            lo, step = k, k
            while True:
                hi = min(n, lo + step)
                if ok(hi):
                    break
                if hi == n:
                    return None
                lo, step = hi, 2 * step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi


def score_gap(scores: list[float]) -> int:
    """The k after which the ranked scores drop the most (in log scale); 1 for fewer than two."""
    if len(scores) < 2:
        return 1
    logs = torch.tensor(scores, dtype=torch.float64).clamp_min(1e-12).log()
    return int((logs[:-1] - logs[1:]).argmax()) + 1


def _choose_k(sweep: _Sweep) -> tuple[int | None, dict]:
    """Clearing test for one ranking: the reference is zeroing all its candidates."""
    held, ranked = sweep.held, sweep.ranked
    n, top = len(ranked), ranked.hyperparameters["top_layer"]
    zeroed = held.measure(ranked, mode="zero")
    summary, ref = zeroed.summary, zeroed.ratio
    left = held.share(sweep.has & zeroed.outliers)
    info = {"top_layer": top, "candidates": n, "zeroed_mean_norm_ratio": summary["mean_norm_ratio"],
            "zeroed_fraction_with_outliers": left}
    if left > sweep.tolerance:
        info["why"] = (f"zeroing the {n} best neurons of layers <= {top} still leaves outliers on "
                       f"{left:.0%} of the held-out images")
        return None, info
    k = sweep.smallest(ref)
    if k is None:
        r = sweep.run(n).summary["mean_norm_ratio"]
        info["why"] = (f"test-time registers with all {n} candidates of layers <= {top} leave a "
                       f"max/median patch norm of {r:.2f}, zeroing them {summary['mean_norm_ratio']:.2f}")
    return k, info


def calibrate(model, images, *, threshold: float | str = "auto", detection_layer: int = -1,
              top_layer: int | str = "auto", top_k: int | str = "auto", max_k: int | None = None,
              heldout: float = 0.2, tolerance: float = 0.0, slack: float = 0.1,
              batch_size: int = 16, transform: Callable | None = None, strict: bool = False,
              progress: bool = False, neurons: RegisterNeurons | None = None, preset: str = "paper",
              include_prefix: bool | None = None, sparsity: bool | None = DEFAULT_SPARSITY,
              memory_budget: int | str | None = None, attention_bias: bool = False,
              sizes=None) -> Calibration:
    """Find register neurons with every hyperparameter chosen automatically (or as given).

    ``heldout``: share of the images kept out of the search and used to pick ``top_k``.
    ``max_k``: the most neurons the sweep considers (default: 1% of the searched neurons, at
    least 16). ``slack``: an image is cleared when its max/median patch norm with test-time
    registers is at most ``1 + slack`` times what zeroing all ``max_k`` candidates gives.
    ``tolerance``: share of held-out images allowed to stay uncleared.

    ``preset``: ``"paper"`` or ``"official"`` -- the search preset (see
    :func:`ttreg.find_register_neurons`) and the edit used in the sweep. ``sparsity`` (default
    on here: dense neurons that are large on every token never count) and ``include_prefix``
    override the preset's search options. ``memory_budget``: what the search may keep of a
    batch's MLP hidden states (bytes or ``"4GB"``; default 1 GiB) before it runs in two passes
    (see :func:`ttreg.find_register_neurons`; ``report["search_memory"]`` says which ran).

    ``sizes`` (e.g. ``[224, 518]``, ``"224,518"`` or ``[(224, 448)]``): calibrate across input
    sizes. Every image runs at each size (files: the default resize and centre crop at that
    size, or the ``transform`` then a resize; tensors: resized), the model at each size the way
    its library supports (timm: ``dynamic_img_size`` for the duration; Hugging Face:
    ``interpolate_pos_encoding``; a model that cannot is a one-line ``ValueError`` before any
    work). The search statistics are summed over the sizes (exact: sums and counts), the top_k
    sweep must clear the held-out images at every size, and ``report["per_size"]`` gives
    before/after and whether each size is cleared. The neuron set records the sizes
    (``neurons.sizes``; without ``sizes``, the one size the images reach the model at).

    ``attention_bias``: also fit the attention-bias form of the neurons found
    (:func:`ttreg.fit_attention_bias`, on all the images, at every size): ``neurons.attention_bias``,
    saved beside the neuron file.

    With ``neurons`` (e.g. a published set) nothing is searched: the set is measured on all the
    images (outliers before and after test-time registers), at each of ``sizes``, and returned
    with those statistics and the sizes added to those it was measured at.
    The model runs in eval mode throughout; its mode is restored afterwards, also on errors.
    Memory does not grow with the number of images: every pass streams them in batches
    (the held-out images are read again on each step of the sweep) and keeps sums and counts,
    plus a few numbers per held-out image.

    Under ``torch.distributed`` (``torchrun``) every rank reads its share of the images (every
    world-size-th one, also for checking that files decode) and all sums and counts are
    all-reduced, so every rank returns the single-process result; write files on rank 0.

    Bad arguments (threshold -1 or nan, heldout 1.5, no images, ...) are a one-line
    ``ValueError`` before any work. When ``top_k="auto"`` clears nothing, the best available set
    is returned with ``report["top_k_cleared"]`` False (``top_k_reason`` says why) and a warning.
    """
    ad = wrap(model)
    cfg = SearchConfig.of(ad.num_layers, threshold=threshold, detection_layer=detection_layer,
                          top_layer=top_layer, batch_size=batch_size, preset=preset,
                          include_prefix=include_prefix, sparsity=sparsity,
                          memory_budget=memory_budget, sizes=sizes)
    sweep = SweepConfig.of(heldout=heldout, tolerance=tolerance, slack=slack, max_k=max_k,
                           top_k=top_k)
    check_images_given(images)
    cfg.check_sizes(ad)
    src = shared_image_set(images, strict)
    skipped = [s.__dict__ for s in src.skipped]
    labels = [label(s or src.input_size(ad, transform)) for s in cfg.run_sizes]
    with eval_mode(ad.model):
        if neurons is not None:
            cal = _measure_given(ad, src, neurons, cfg, transform, strict, skipped, labels,
                                 sweep.tolerance, progress)
        else:
            cal = _calibrate(ad, src, skipped, cfg, sweep, transform=transform, strict=strict,
                             progress=progress, labels=labels)
        if attention_bias and len(cal.neurons) and cal.neurons.attention_bias is None:
            from .bias import fit_attention_bias
            cal.neurons.attention_bias = fit_attention_bias(
                ad, cal.neurons, src, preset=preset, batch_size=cfg.batch_size, transform=transform,
                strict=strict, progress=progress, check=False,
                sizes=None if cfg.sizes is None else list(cfg.sizes))
        if cal.neurons.attention_bias is not None:
            cal.report["attention_bias"] = cal.neurons.attention_bias.summary()
    return cal


def _calibrate(ad, src: ImageSet, skipped, cfg: SearchConfig, sweep: SweepConfig, *, transform,
               strict, progress, labels: list[str]) -> Calibration:
    L = ad.num_layers
    det, threshold, preset, opts = cfg.detection_layer, cfg.threshold, cfg.preset, cfg.options
    top_layer, top_k, max_k = cfg.top_layer, sweep.top_k, sweep.max_k
    heldout, tolerance, slack = sweep.heldout, sweep.tolerance, sweep.slack
    search_src, held_src = _split(src, heldout)
    n_search, n_held = len(search_src), len(held_src)
    in_sample = None
    if search_src is held_src:                   # nothing held out: the check is in-sample
        in_sample = (f"heldout={heldout:g}" if heldout <= 0 else
                     f"{count(n_search, 'image')} cannot be split")
        warnings.warn(f"calibration on {count(n_search, 'image')} with {in_sample}: top k is "
                      f"chosen and measured on the images it was searched on, so the held-out "
                      f"numbers are in-sample; give at least 2 images (5 or more for a 20% "
                      f"held-out share)", stacklevel=3)
    if max_k is None:
        max_k = max(16, (L * ad.mlp_width(0)) // 100)
    k_search = max_k if top_k == "auto" else int(top_k)
    stats = run_search(ad, search_src, cfg, transform=transform, progress=progress, strict=strict)
    rank = lambda top: neurons_from_stats(ad, stats, det=det, threshold=threshold, top_layer=top,
                                          top_k=k_search, preset=preset, **opts)
    ranked = rank(top_layer)
    st = ranked.statistics
    report: dict[str, Any] = {
        "detection_layer": det, "threshold": threshold, "preset": preset, **opts,
        "emergence_layer": st.get("emergence_layer"),
        "emergence": {"rule": st.get("emergence_rule"), "layer": st.get("emergence_layer"),
                      "majority_layer": st.get("majority_layer"),
                      "outlier_norm_ratio": st.get("outlier_norm_ratio"),
                      "outlier_log_growth": st.get("outlier_log_growth")},
        "top_layer": ranked.hyperparameters.get("top_layer"),
        "num_search_images": n_search, "num_heldout_images": n_held, "num_skipped": len(skipped),
        "heldout_in_sample": in_sample is not None, "in_sample_reason": in_sample,
        "skipped": skipped, "sweep": [], "search_memory": stats.search_memory,
        "per_layer": {k: v for k, v in st.items() if k not in ("emergence_layer", "emergence_rule",
                                                                "majority_layer", "search_memory")},
    }
    held = _Heldout(ad, held_src, cfg, transform, strict, labels, progress=progress)
    plain = held.measure()
    before = plain.summary
    report["heldout_before"] = before
    report["sizes"] = labels
    recorded = _as_recorded(labels)
    if not len(ranked):
        report.update(heldout_after=before, top_k=0, top_k_rule="no outliers",
                      per_size=_per_size(held, plain, plain, tolerance))
        ranked.sizes = {"calibrated": recorded, "measured": recorded}
        return Calibration(ranked, report)

    if top_k == "auto":
        k, ranked, rule, reason, attempts, warn, after = _auto_k(
            held, plain, ranked, rank, top_layer, det, preset=preset, slack=slack,
            tolerance=tolerance, log=report["sweep"])
        report["attempts"] = attempts
        report["top_layer"] = ranked.hyperparameters["top_layer"]
        report["sweep"].sort(key=lambda r: (r["top_layer"], r["k"]))
    else:
        k, rule, reason, warn, after = int(top_k), "given", "top_k given", None, None
    neurons = ranked.top(k)
    neurons.hyperparameters.update({"top_k": k, "top_k_requested": top_k, "heldout": heldout,
                                    "max_k": max_k, "tolerance": tolerance, "slack": slack})
    neurons.provenance["method"] = "ttreg.calibrate"
    if after is None:
        after = held.measure(neurons, preset=preset) if k else plain
    per_size = _per_size(held, plain, after, tolerance)
    after = after.summary
    report.update(top_k=k, top_k_rule=rule, top_k_reason=reason, heldout_after=after,
                  top_k_cleared=None if top_k != "auto" else warn is None, per_size=per_size)
    neurons.statistics.update(heldout_before=before, heldout_after=after, top_k_rule=rule,
                              top_k_reason=reason)
    if len(per_size) > 1:
        neurons.statistics["per_size"] = per_size
    neurons.sizes = {"calibrated": recorded, "measured": recorded}
    neurons.statistics["heldout_in_sample"] = in_sample is not None
    neurons.note = (f"{count(k, 'register neuron')}; "
                    f"{'in-sample' if in_sample else 'held-out'} max/median patch norm "
                    f"{before['mean_norm_ratio']:.2f} -> {after['mean_norm_ratio']:.2f}"
                    + ("" if warn is None else f"; {warn}"))
    if warn:
        warnings.warn(warn, stacklevel=3)
    return Calibration(neurons, report)


def _auto_k(held: _Heldout, plain: _Pass, ranked, rank, top_layer, det, *, preset, slack,
            tolerance, log):
    """top_k="auto": the clearing test on the emergence ranking, widened to every layer up to
    the detection layer if it fails there (only when top_layer is automatic). Returns the k,
    the ranking it is from, the rule, the reason, the attempts, a warning (None when cleared)
    and the held-out pass of that k (None when no pass measured it)."""
    has = plain.outliers
    attempts = []
    tops = [ranked]
    if top_layer == "auto" and ranked.hyperparameters["top_layer"] < det:
        tops.append(None)                  # widened lazily: ranked over layers <= det
    for i, cand in enumerate(tops):
        if cand is None:
            cand = rank(det)
            cand.hyperparameters["top_layer_requested"] = "auto"
        sweep = _Sweep(held, has, cand, preset=preset, slack=slack, tolerance=tolerance, log=log)
        k, info = _choose_k(sweep)
        attempts.append(info)
        if k is not None:
            top = cand.hyperparameters["top_layer"]
            if i == 0:
                rule = "cleared"
                reason = (f"smallest k whose test-time registers bring every held-out image with "
                          f"outliers to within {slack:.0%} of zeroing the {len(cand)} best "
                          f"neurons of layers <= {top}")
            else:
                rule = "cleared after widening"
                reason = (f"{attempts[0]['why']}; widened the search to layers <= {top}: smallest k "
                          f"within {slack:.0%} of zeroing the {len(cand)} best neurons there")
            return k, cand, rule, reason, attempts, None, sweep.run(k)
    # Nothing clears: the smallest k that does (nearly) as well as all candidates, if they help.
    why = "; ".join(a["why"] for a in attempts)
    best = _Sweep(held, has, cand, preset=preset, slack=slack, tolerance=1.0, log=log)
    n = len(cand)
    full = best.run(n)
    if full.summary["mean_norm_ratio"] > 0.9 * plain.summary["mean_norm_ratio"]:
        return (0, cand, "none", f"{why}; the candidates do not reduce the outliers: no neurons",
                attempts, f"no register neurons clear the outliers: {why}", None)
    best.tolerance = tolerance
    k = best.smallest(full.ratio) or n
    return (k, cand, "best available",
            f"{why}; smallest k within {slack:.0%} of all {n} candidates' test-time registers",
            attempts, f"outliers remain after calibration: {why}; raise max_k or check the detection layer",
            best.run(k))
