"""Automatic calibration: threshold, top_layer and top_k chosen from the images, not by hand.

The authors picked the three hyperparameters per model; their answer to reviewers was a recipe,
made a function here:

* threshold ``"auto"``: mean + 3 std of each image's patch norms (floored at 2x the median);
* ``top_layer="auto"``: the emergence layer, the first block whose output has outlier tokens on
  most images;
* ``top_k="auto"``: the smallest k, found by bisection, for which test-time registers with the
  k best neurons bring the detection layer's max patch norm under each held-out image's
  threshold (the threshold measured without registers).

One search pass ranks the neurons; the sweep then costs one forward over the held-out images
per bisection step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .adapters import wrap
from .data import ImageSource, check_images_given, iter_batches, resolve_images
from .neurons import _resolve_layer, eval_mode, find_register_neurons
from .outliers import AUTO_MIN_RATIO, check_threshold, norm_ratio, thresholds
from .registers import test_time_registers
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
        lines.append(f"register neurons: {len(rn)} ({per})")
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
    thr = thresholds(base[:, ad.num_prefix_tokens:], threshold, AUTO_MIN_RATIO)
    before = heldout_outcome(ad, batches, det, thr, None)
    after = heldout_outcome(ad, batches, det, thr, neurons)
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
    """Every ``round(1/heldout)``-th image is held out (deterministic, spread over the set)."""
    n = len(src.items) if isinstance(src, ImageSource) else src.shape[0]
    if n < 2 or heldout <= 0:
        return src, src
    step = max(2, round(1 / heldout))
    held = list(range(step - 1, n, step)) or [n - 1]
    keep = [i for i in range(n) if i not in set(held)]
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


def heldout_outcome(ad, batches: list[torch.Tensor], det: int, thr: torch.Tensor,
                    neurons: RegisterNeurons | None) -> dict[str, float]:
    """Fraction of held-out images whose max patch norm is >= their threshold, and the mean
    max/median ratio, with test-time registers for ``neurons`` (plain when None)."""
    npre = ad.num_prefix_tokens
    if neurons is None or not len(neurons):
        norms, R = _detection_norms(ad, batches, det), 0
    else:
        with test_time_registers(ad, neurons, num_registers=1, check=False):
            norms, R = _detection_norms(ad, batches, det), 1
    patch = norms[:, npre:norms.shape[1] - R]
    bad = patch.amax(dim=1) >= thr
    return {"fraction_with_outliers": float(bad.float().mean()),
            "mean_norm_ratio": float(norm_ratio(norms, npre, R).mean()),
            "mean_max_patch_norm": float(patch.amax(dim=1).mean())}


def calibrate(model, images, *, threshold: float | str = "auto", detection_layer: int = -1,
              top_layer: int | str = "auto", top_k: int | str = "auto", max_k: int | None = None,
              heldout: float = 0.2, tolerance: float = 0.0, batch_size: int = 16,
              transform: Callable | None = None, strict: bool = False,
              progress: bool = False, neurons: RegisterNeurons | None = None) -> Calibration:
    """Find register neurons with every hyperparameter chosen automatically (or as given).

    ``heldout``: share of the images kept out of the search and used to pick ``top_k``.
    ``max_k``: the largest k the sweep considers (default: 1% of the searched neurons, at least
    16). ``tolerance``: share of held-out images allowed to keep outliers.

    With ``neurons`` (e.g. a published set) nothing is searched: the set is measured on all the
    images (outliers before and after test-time registers) and returned with those statistics.

    The whole calibration runs with the model in eval mode (no dropout); the model's mode is
    restored afterwards. Bad arguments (threshold -1 or nan, heldout 1.5, no images, ...) are a
    one-line ``ValueError`` before any work. When ``top_k="auto"`` finds no k up to ``max_k``
    that clears the held-out images, the best set is still returned and
    ``report["top_k_cleared"]`` is False (``top_k_reason`` says why).
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
        return _calibrate(ad, images, threshold, detection_layer, top_layer, top_k, max_k, heldout,
                          tolerance, batch_size, transform, strict, progress)


def _calibrate(ad, images, threshold, detection_layer, top_layer, top_k, max_k, heldout,
               tolerance, batch_size, transform, strict, progress) -> Calibration:
    L = ad.num_layers
    det = _resolve_layer(detection_layer, L, "detection_layer")
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
    ranked = find_register_neurons(ad, search_src, threshold=threshold, detection_layer=det,
                                   top_layer=top_layer, top_k=k_search, batch_size=batch_size,
                                   transform=transform, progress=progress)
    report: dict[str, Any] = {
        "detection_layer": det, "threshold": threshold,
        "emergence_layer": ranked.statistics.get("emergence_layer"),
        "top_layer": ranked.hyperparameters.get("top_layer"),
        "num_search_images": n_search, "num_heldout_images": n_held, "num_skipped": len(skipped),
        "skipped": skipped, "sweep": [], "per_layer": {k: v for k, v in ranked.statistics.items()
                                                        if k != "emergence_layer"},
    }
    held_batches = list(iter_batches(held_src, ad, batch_size, transform))
    base = _detection_norms(ad, held_batches, det)
    pn = base[:, ad.num_prefix_tokens:]
    thr = thresholds(pn, threshold, AUTO_MIN_RATIO)
    before = heldout_outcome(ad, held_batches, det, thr, None)
    report["heldout_before"] = before
    if not len(ranked):
        report["heldout_after"] = before
        report["top_k"] = 0
        return Calibration(ranked, report)

    if top_k == "auto":
        cache: dict[int, dict] = {}

        def outcome(k: int) -> dict:
            if k not in cache:
                cache[k] = heldout_outcome(ad, held_batches, det, thr, ranked.top(k))
                report["sweep"].append({"k": k, **cache[k]})
            return cache[k]

        ok = lambda k: outcome(k)["fraction_with_outliers"] <= tolerance
        hi = len(ranked)
        if ok(hi):
            lo = 0  # k = 0 leaves the outliers in place: known bad
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if ok(mid) else (mid, hi)
            k = hi
            report["top_k_cleared"] = True
            report["top_k_reason"] = f"smallest k that clears the held-out images (bisection over 1..{len(ranked)})"
        else:
            k = hi
            report["top_k_cleared"] = False
            report["top_k_reason"] = (f"no k up to {hi} clears the held-out images "
                                      f"({outcome(hi)['fraction_with_outliers']:.0%} keep outliers); "
                                      f"raise max_k")
        report["sweep"].sort(key=lambda r: r["k"])
    else:
        k = int(top_k)
    neurons = ranked.top(k)
    neurons.hyperparameters.update({"top_k": k, "top_k_requested": top_k, "heldout": heldout,
                                    "max_k": max_k, "tolerance": tolerance})
    neurons.provenance["method"] = "ttreg.calibrate"
    after = heldout_outcome(ad, held_batches, det, thr, neurons)
    report.update(top_k=k, heldout_after=after)
    neurons.statistics["heldout_before"] = before
    neurons.statistics["heldout_after"] = after
    neurons.note = (f"{k} register neurons; held-out max/median patch norm "
                    f"{before['mean_norm_ratio']:.2f} -> {after['mean_norm_ratio']:.2f}")
    return Calibration(neurons, report)
