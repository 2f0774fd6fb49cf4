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

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .adapters import wrap
from .data import ImageSource, check_images_given, iter_batches, resolve_images
from .neurons import (_resolve_layer, eval_mode, layers_to_search, neurons_from_stats, search_options,
                      search_stats)
from .outliers import check_threshold, norm_ratio, outlier_mask
from .registers import test_time_registers, zero_neurons
from .spec import RegisterNeurons, as_index
from .trace import record


@dataclass
class Calibration:
    """The neurons found and what calibration measured on the way."""

    neurons: RegisterNeurons
    report: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        r = self.report
        rn = self.neurons
        if r.get("given_neurons"):
            b, a = r["heldout_before"], r["heldout_after"]
            return (f"measured {len(rn)} given neurons on {r['num_heldout_images']} images\n"
                    f"max/median patch norm at layer {r['detection_layer']}: "
                    f"{b['mean_norm_ratio']:.2f} -> {a['mean_norm_ratio']:.2f}; images with outliers: "
                    f"{b['fraction_with_outliers']:.0%} -> {a['fraction_with_outliers']:.0%}")
        lines = [f"images: {r['num_search_images']} searched, {r['num_heldout_images']} held out"
                 + (f", {r['num_skipped']} skipped" if r.get("num_skipped") else "")]
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
        lines.append(f"held-out max/median patch norm at layer {r['detection_layer']}: "
                     f"{b['mean_norm_ratio']:.2f} -> {a['mean_norm_ratio']:.2f}; images with "
                     f"outliers: {b['fraction_with_outliers']:.0%} -> {a['fraction_with_outliers']:.0%}")
        return "\n".join(lines)


def _measure_given(model, images, neurons: RegisterNeurons, threshold, detection_layer: int,
                   batch_size: int, transform, strict: bool) -> Calibration:
    ad = wrap(model)
    neurons.check_model(ad)
    det = _resolve_layer(detection_layer, ad.num_layers, "detection_layer")
    skipped = []
    if not torch.is_tensor(images):
        images = images if isinstance(images, ImageSource) else resolve_images(images, strict=strict)
        skipped = [s.__dict__ for s in images.skipped]
    batches = list(iter_batches(images, ad, batch_size, transform))
    base = _detection_norms(ad, batches, det)
    before = _outcome(base, 0, ad.num_prefix_tokens, threshold)[0]
    after = heldout_outcome(ad, batches, det, threshold, neurons)
    n = int(base.shape[0])
    report = {"detection_layer": det, "threshold": threshold, "emergence_layer": None,
              "top_layer": neurons.hyperparameters.get("top_layer"), "top_k": len(neurons),
              "num_search_images": 0, "num_heldout_images": n, "num_skipped": len(skipped),
              "skipped": skipped, "sweep": [], "given_neurons": True,
              "heldout_before": before, "heldout_after": after}
    out = RegisterNeurons.from_dict(neurons.to_dict())
    out.statistics.update({"measured_on_images": n, "measured_detection_layer": det,
                           "measured_before": before, "measured_after": after})
    out.note = (f"{len(out)} given register neurons measured on {n} images: max/median patch norm "
                f"at layer {det} {before['mean_norm_ratio']:.2f} -> {after['mean_norm_ratio']:.2f}")
    return Calibration(out, report)


def _split(src: ImageSource | torch.Tensor, heldout: float) -> tuple[Any, Any]:
    """A fixed pseudo-random share ``heldout`` of the images is held out (deterministic; not
    every k-th image, which would pick one kind from a set that cycles through kinds)."""
    n = len(src.items) if isinstance(src, ImageSource) else src.shape[0]
    if n < 2 or heldout <= 0:
        return src, src
    n_held = min(n - 1, max(1, round(n * heldout)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    held = sorted(order[:n_held].tolist())
    keep = sorted(order[n_held:].tolist())
    if isinstance(src, ImageSource):
        return src.subset(keep), src.subset(held)
    return src[keep], src[held]


@torch.no_grad()
def _detection_norms(ad, batches: list[torch.Tensor], det: int) -> torch.Tensor:
    """Token norms at the detection layer, ``(N, T)``, for pre-made batches."""
    out = []
    with record(ad, [det]) as rec:
        for x in batches:
            ad.run(x)
            out.append(rec.norms[det].cpu())
    return torch.cat(out)


def _edited_norms(ad, batches: list[torch.Tensor], det: int, neurons: RegisterNeurons | None,
                  mode: str = "registers", preset: str = "paper") -> tuple[torch.Tensor, int]:
    """Detection-layer norms with ``neurons`` moved into one test-time register
    (``mode="registers"``) or zeroed (``"zero"``); plain when there are none. Also the number
    of register tokens at the end of the sequence."""
    if neurons is None or not len(neurons):
        return _detection_norms(ad, batches, det), 0
    if mode == "zero":
        with zero_neurons(ad, neurons, check=False):
            return _detection_norms(ad, batches, det), 0
    with test_time_registers(ad, neurons, num_registers=1, preset=preset, check=False):
        return _detection_norms(ad, batches, det), 1


def _outcome(norms: torch.Tensor, R: int, npre: int, threshold) -> tuple[dict, torch.Tensor]:
    """Summary numbers of detection-layer norms ``(N, T)`` and the per-image max/median ratio.
    An image has outliers by the outlier rule applied to its own patch norms (edited or not; a
    threshold taken from the plain image would be inflated by the outliers it should catch)."""
    T = norms.shape[1]
    patch = norms[:, npre:T - R]
    ratio = norm_ratio(norms, npre, R)
    left = outlier_mask(norms[:, :T - R], npre, 0, threshold).any(dim=1)
    return ({"fraction_with_outliers": float(left.float().mean()),
             "mean_norm_ratio": float(ratio.mean()),
             "mean_max_patch_norm": float(patch.amax(dim=1).mean())}, ratio)


def heldout_outcome(ad, batches: list[torch.Tensor], det: int, threshold,
                    neurons: RegisterNeurons | None, preset: str = "paper") -> dict[str, float]:
    """Share of images with outlier tokens and the mean max/median patch norm at the detection
    layer, with test-time registers for ``neurons`` (plain when None)."""
    norms, R = _edited_norms(ad, batches, det, neurons, preset=preset)
    return _outcome(norms, R, ad.num_prefix_tokens, threshold)[0]


class _Sweep:
    """The top-k sweep on held-out images: outcomes per k (cached, each one forward pass) and
    the clearing test against a reference max/median ratio per image."""

    def __init__(self, ad, batches, det, threshold, has_outliers, ranked: RegisterNeurons, *,
                 preset: str, slack: float, tolerance: float, log: list) -> None:
        self.ad, self.batches, self.det, self.has = ad, batches, det, has_outliers
        self.threshold = threshold
        self.ranked, self.preset, self.slack, self.tolerance, self.log = ranked, preset, slack, tolerance, log
        self.ratios: dict[int, torch.Tensor] = {}
        self.summary: dict[int, dict] = {}

    def run(self, k: int) -> torch.Tensor:
        if k not in self.ratios:
            norms, R = _edited_norms(self.ad, self.batches, self.det, self.ranked.top(k),
                                     preset=self.preset)
            self.summary[k], self.ratios[k] = _outcome(norms, R, self.ad.num_prefix_tokens,
                                                       self.threshold)
            self.log.append({"k": k, "top_layer": self.ranked.hyperparameters["top_layer"],
                             **self.summary[k]})
        return self.ratios[k]

    def failing(self, k: int, reference: torch.Tensor) -> float:
        """Share of held-out images with outliers whose ratio stays above (1 + slack) x reference."""
        bad = self.has & (self.run(k) > (1 + self.slack) * reference)
        return float(bad.float().mean())

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


def _choose_k(sweep: _Sweep, npre: int) -> tuple[int | None, dict]:
    """Clearing test for one ranking: the reference is zeroing all its candidates."""
    ad, ranked = sweep.ad, sweep.ranked
    n, top = len(ranked), ranked.hyperparameters["top_layer"]
    zeroed, _ = _edited_norms(ad, sweep.batches, sweep.det, ranked, mode="zero")
    summary, ref = _outcome(zeroed, 0, npre, sweep.threshold)
    left = sweep.has & outlier_mask(zeroed, npre, 0, sweep.threshold).any(dim=1)
    info = {"top_layer": top, "candidates": n, "zeroed_mean_norm_ratio": summary["mean_norm_ratio"],
            "zeroed_fraction_with_outliers": float(left.float().mean())}
    if float(left.float().mean()) > sweep.tolerance:
        info["why"] = (f"zeroing the {n} best neurons of layers <= {top} still leaves outliers on "
                       f"{float(left.float().mean()):.0%} of the held-out images")
        return None, info
    k = sweep.smallest(ref)
    if k is None:
        r = float(sweep.run(n).mean())
        info["why"] = (f"test-time registers with all {n} candidates of layers <= {top} leave a "
                       f"max/median patch norm of {r:.2f}, zeroing them {summary['mean_norm_ratio']:.2f}")
    return k, info


def calibrate(model, images, *, threshold: float | str = "auto", detection_layer: int = -1,
              top_layer: int | str = "auto", top_k: int | str = "auto", max_k: int | None = None,
              heldout: float = 0.2, tolerance: float = 0.0, slack: float = 0.1,
              batch_size: int = 16, transform: Callable | None = None, strict: bool = False,
              progress: bool = False, neurons: RegisterNeurons | None = None, preset: str = "paper",
              include_prefix: bool | None = None, sparsity: bool | None = True) -> Calibration:
    """Find register neurons with every hyperparameter chosen automatically (or as given).

    ``heldout``: share of the images kept out of the search and used to pick ``top_k``.
    ``max_k``: the most neurons the sweep considers (default: 1% of the searched neurons, at
    least 16). ``slack``: an image is cleared when its max/median patch norm with test-time
    registers is at most ``1 + slack`` times what zeroing all ``max_k`` candidates gives.
    ``tolerance``: share of held-out images allowed to stay uncleared.

    ``preset``: ``"paper"`` or ``"official"`` -- the search preset (see
    :func:`ttreg.find_register_neurons`) and the edit used in the sweep. ``sparsity`` (default
    on here: dense neurons that are large on every token never count) and ``include_prefix``
    override the preset's search options.

    With ``neurons`` (e.g. a published set) nothing is searched: the set is measured on all the
    images (outliers before and after test-time registers) and returned with those statistics.
    The model runs in eval mode throughout; its mode is restored afterwards, also on errors.
    Bad arguments (threshold -1 or nan, heldout 1.5, no images, ...) are a one-line
    ``ValueError`` before any work. When ``top_k="auto"`` clears nothing, the best available set
    is returned with ``report["top_k_cleared"]`` False (``top_k_reason`` says why) and a warning.
    """
    threshold = check_threshold(threshold)
    if isinstance(heldout, bool) or not isinstance(heldout, (int, float)) or not 0 <= heldout < 1:
        raise ValueError(f"heldout must be a share in [0, 1), got {heldout!r}")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance <= 1):
        raise ValueError(f"tolerance must be a share in [0, 1], got {tolerance!r}")
    if max_k is not None and as_index(max_k, "max_k") < 1:
        raise ValueError(f"max_k must be at least 1, got {max_k!r}")
    if top_k != "auto":
        top_k = as_index(top_k, "top_k")
    if as_index(batch_size, "batch_size") < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    check_images_given(images)
    ad = wrap(model)
    with eval_mode(ad.model):
        if neurons is not None:
            return _measure_given(ad, images, neurons, threshold, detection_layer, batch_size,
                                  transform, strict)
        return _calibrate(ad, images, threshold=threshold, detection_layer=detection_layer,
                          top_layer=top_layer, top_k=top_k, max_k=max_k, heldout=heldout,
                          tolerance=tolerance, slack=slack, batch_size=batch_size,
                          transform=transform, strict=strict, progress=progress, preset=preset,
                          opts=search_options(preset, include_prefix, sparsity))


def _calibrate(ad, images, *, threshold, detection_layer, top_layer, top_k, max_k, heldout,
               tolerance, slack, batch_size, transform, strict, progress, preset, opts) -> Calibration:
    L = ad.num_layers
    det = _resolve_layer(detection_layer, L, "detection_layer")
    search_layers = layers_to_search(top_layer, det, L)
    skipped = []
    if not torch.is_tensor(images):
        src = images if isinstance(images, ImageSource) else resolve_images(images, strict=strict)
        skipped = [s.__dict__ for s in src.skipped]
    else:
        src = images
    search_src, held_src = _split(src, heldout)
    n_search = len(search_src.items) if isinstance(search_src, ImageSource) else search_src.shape[0]
    n_held = len(held_src.items) if isinstance(held_src, ImageSource) else held_src.shape[0]
    if max_k is None:
        max_k = max(16, (L * ad.mlp_width(0)) // 100)
    k_search = max_k if top_k == "auto" else int(top_k)
    stats = search_stats(ad, search_src, threshold=threshold, detection_layer=det,
                         search_layers=search_layers, batch_size=batch_size, transform=transform,
                         progress=progress, strict=strict, **opts)
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
        "skipped": skipped, "sweep": [],
        "per_layer": {k: v for k, v in st.items() if k not in ("emergence_layer", "emergence_rule",
                                                                "majority_layer")},
    }
    held_batches = list(iter_batches(held_src, ad, batch_size, transform))
    npre = ad.num_prefix_tokens
    base = _detection_norms(ad, held_batches, det)
    before, _ = _outcome(base, 0, npre, threshold)
    has = outlier_mask(base, npre, 0, threshold).any(dim=1)
    report["heldout_before"] = before
    if not len(ranked):
        report.update(heldout_after=before, top_k=0, top_k_rule="no outliers")
        return Calibration(ranked, report)

    if top_k == "auto":
        k, ranked, rule, reason, attempts, warn = _auto_k(
            ad, held_batches, det, has, ranked, rank, top_layer, threshold, preset=preset,
            slack=slack, tolerance=tolerance, log=report["sweep"])
        seen = [r for r in report["sweep"] if r["k"] == k
                and r["top_layer"] == ranked.hyperparameters["top_layer"]]
        report["attempts"] = attempts
        report["top_layer"] = ranked.hyperparameters["top_layer"]
        report["sweep"].sort(key=lambda r: (r["top_layer"], r["k"]))
    else:
        k, rule, reason, warn, seen = int(top_k), "given", "top_k given", None, []
    neurons = ranked.top(k)
    neurons.hyperparameters.update({"top_k": k, "top_k_requested": top_k, "heldout": heldout,
                                    "max_k": max_k, "tolerance": tolerance, "slack": slack})
    neurons.provenance["method"] = "ttreg.calibrate"
    if seen:
        after = {key: seen[0][key] for key in before}
    else:
        after = heldout_outcome(ad, held_batches, det, threshold, neurons, preset=preset) if k else before
    report.update(top_k=k, top_k_rule=rule, top_k_reason=reason, heldout_after=after,
                  top_k_cleared=None if top_k != "auto" else warn is None)
    neurons.statistics.update(heldout_before=before, heldout_after=after, top_k_rule=rule,
                              top_k_reason=reason)
    neurons.note = (f"{k} register neurons; held-out max/median patch norm "
                    f"{before['mean_norm_ratio']:.2f} -> {after['mean_norm_ratio']:.2f}"
                    + ("" if warn is None else f"; {warn}"))
    if warn:
        warnings.warn(warn, stacklevel=3)
    return Calibration(neurons, report)


def _auto_k(ad, batches, det, has, ranked, rank, top_layer, threshold, *, preset, slack,
            tolerance, log):
    """top_k="auto": the clearing test on the emergence ranking, widened to every layer up to
    the detection layer if it fails there (only when top_layer is automatic)."""
    npre = ad.num_prefix_tokens
    attempts = []
    tops = [ranked]
    if top_layer == "auto" and ranked.hyperparameters["top_layer"] < det:
        tops.append(None)                  # widened lazily: ranked over layers <= det
    for i, cand in enumerate(tops):
        if cand is None:
            cand = rank(det)
            cand.hyperparameters["top_layer_requested"] = "auto"
        sweep = _Sweep(ad, batches, det, threshold, has, cand, preset=preset, slack=slack,
                       tolerance=tolerance, log=log)
        k, info = _choose_k(sweep, npre)
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
            return k, cand, rule, reason, attempts, None
    # Nothing clears: the smallest k that does (nearly) as well as all candidates, if they help.
    why = "; ".join(a["why"] for a in attempts)
    best = _Sweep(ad, batches, det, threshold, has, cand, preset=preset, slack=slack,
                  tolerance=1.0, log=log)
    n = len(cand)
    full = best.run(n)
    plain_ratio = norm_ratio(_detection_norms(ad, batches, det), npre)
    if float(full.mean()) > 0.9 * float(plain_ratio.mean()):
        return (0, cand, "none", f"{why}; the candidates do not reduce the outliers: no neurons",
                attempts, f"no register neurons clear the outliers: {why}")
    best.tolerance = tolerance
    k = best.smallest(full) or n
    return (k, cand, "best available",
            f"{why}; smallest k within {slack:.0%} of all {n} candidates' test-time registers",
            attempts, f"outliers remain after calibration: {why}; raise max_k or check the detection layer")
