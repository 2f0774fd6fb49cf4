"""Calibration at scale: time relative to a plain forward, peak memory against the image count,
and the search's activation memory.

Models (random weights; ``s`` and ``l`` with the demo's content-dependent plant,
:data:`ttreg.testing.DEMO_PLANTS`: outliers on the brightest patches, a cascade over blocks 0-9,
dense distractors, so the search finds something and the top-k sweep runs):
``s`` ViT-S/14, ``l`` ViT-L/14, ``g`` ViT-g/14 (SwiGLU MLP, no plant: the search runs in full,
calibration stops after it with "no outliers"). All at 224 px. Images: generated PNGs in a
temporary folder, read through the same loader in every arm.

Prints, per model and in one run:
  * search (Algorithm 1, fixed top_k) time / plain forward time over the same images  (target <= 1.10)
  * calibration (search + held-out top_k sweep) time / plain forward time               (target <= 3)
  * peak resident memory of a whole calibration over 100, 400 and 1600 images, each in a fresh
    process, and the largest over the smallest                                       (target <= 1.10)
  * the search's activation memory at one batch: peak memory of a search over one batch minus
    that of a plain forward of the same batch, one pass and two passes, with ttreg's estimate
    of the one-pass figure                                          (target, ViT-L batch 16: <= 1 GB)

    python benchmarks/calibrate.py [--models s,l] [--images 64] [--batch 16]
        [--memory-models s] [--memory-counts 100,400,1600] [--activation-models l,g]
        [--activation-batch 16] [--device cpu]

On CUDA, memory is the device's peak allocation (``torch.cuda.max_memory_allocated``) and the
timings also give images per second.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCH = {"s": "vit_small_patch14_dinov2", "l": "vit_large_patch14_dinov2",
        "g": "vit_giant_patch14_dinov2"}
NAMES = {"s": "ViT-S/14", "l": "ViT-L/14", "g": "ViT-g/14"}


def make_model(key: str, weights: str | None = None):
    """A random-weight model at 224 px (planted for s and l); from ``weights`` if given."""
    import timm
    from ttreg.testing import plant_demo
    torch.manual_seed(0)
    with torch.device("meta"):
        model = timm.create_model(ARCH[key], pretrained=False, img_size=224, num_classes=0)
    model = model.to_empty(device="cpu").eval()
    if weights:
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model
    with torch.no_grad():   # timm's own init of the large models is slow; fill them quickly
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 1e-5 if "gamma" in name else 0.0)  # DINOv2's init_values
            else:
                p.normal_(0, 0.02)
    return plant_demo(model) if key in ("s", "l") else model


def make_images(folder: Path, n: int) -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if not (folder / f"{i:04d}.png").exists():
            Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_pass(model, folder, batch, device):
    import ttreg
    from ttreg.data import iter_batches, resolve_images
    ad = ttreg.wrap(model)
    with torch.inference_mode():
        for x in iter_batches(resolve_images(folder), ad, batch):
            ad.run(x)
    sync(device)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- children: one measurement in a fresh process ------------------------------------------------

def child_calibrate(args) -> None:
    """Peak memory of one whole calibration over ``args.folder``."""
    import ttreg
    model = make_model(args.model, args.weights).to(args.device)
    cal = ttreg.calibrate(model, args.folder, batch_size=args.batch)
    print(json.dumps({"peak_mb": peak_mb(args.device), "top_k": cal.report["top_k"],
                      "sweep": len(cal.report["sweep"])}))


def child_activations(args) -> None:
    """Peak memory of a plain forward of one batch, then of a search over the same batch."""
    import ttreg
    from ttreg.neurons import one_pass_bytes, search_stats
    model = make_model(args.model, args.weights).to(args.device)
    ad = ttreg.wrap(model)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    with torch.no_grad():
        ad.run(x)
    plain = peak_mb(args.device)
    budget = 1 << 62 if args.mode == "one-pass" else 0
    t0 = time.perf_counter()
    stats = search_stats(model, x, batch_size=args.batch, memory_budget=budget)
    sync(args.device)
    took = time.perf_counter() - t0
    need = one_pass_bytes(ad, args.batch, 1 + 256, ad.num_layers)
    print(json.dumps({"plain_mb": plain, "search_mb": peak_mb(args.device), "estimate_mb": need / 2 ** 20,
                      "mode": stats.search_memory["mode"], "seconds": took}))


def run_child(*argv: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- the benchmark ------------------------------------------------------------------------------

def timing(key, model, folder, n, args) -> None:
    import ttreg
    plain_pass(model, folder, args.batch, args.device)  # warm up
    search, full, plains = [], [], []
    for _ in range(args.repeats):
        p1 = timed(lambda: plain_pass(model, folder, args.batch, args.device))
        s = timed(lambda: ttreg.find_register_neurons(model, folder, top_k=10, batch_size=args.batch))
        c = timed(lambda: ttreg.calibrate(model, folder, batch_size=args.batch))
        p2 = timed(lambda: plain_pass(model, folder, args.batch, args.device))
        plain = (p1 + p2) / 2
        plains.append(plain)
        search.append(s / plain)
        full.append(c / plain)
    cal = ttreg.calibrate(model, folder, batch_size=args.batch)
    print(f"{NAMES[key]}: {n} images, batch {args.batch}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats; plain forward {n / np.median(plains):.1f} images/s; calibration "
          f"found {len(cal.neurons)} neurons (top_k={cal.report['top_k']}, {cal.report['top_k_rule']}) "
          f"after {len(cal.report['sweep'])} sweep steps; search {cal.report['search_memory']['mode']}")
    print(f"  search (fixed top_k) / plain forward: median {np.median(search):.3f} "
          f"(min {min(search):.3f}, max {max(search):.3f})   target <= 1.10")
    print(f"  calibration / plain forward:          median {np.median(full):.3f} "
          f"(min {min(full):.3f}, max {max(full):.3f})   target <= 3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="s", help="models to time: s, l, g (comma-separated)")
    ap.add_argument("--images", type=int, default=64, help="images for the timing runs")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-models", default="s", help="models whose calibration memory is measured")
    ap.add_argument("--memory-counts", default="100,400,1600")
    ap.add_argument("--activation-models", default="l", help="models whose search activations are measured")
    ap.add_argument("--activation-batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", choices=["calibrate", "activations"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "calibrate":
        return child_calibrate(args)
    if args.child == "activations":
        return child_activations(args)

    tmp = Path(tempfile.mkdtemp(prefix="ttreg-bench-"))
    keys = lambda s: [k for k in s.split(",") if k]  # noqa: E731
    weights = {}

    def model_for(key):
        model = make_model(key)
        if key not in weights:
            weights[key] = str(tmp / f"{key}.pt")
            torch.save(model.state_dict(), weights[key])
        return model.to(args.device)

    for key in keys(args.models):
        folder = make_images(tmp / f"timing{args.images}", args.images)
        timing(key, model_for(key), folder, args.images, args)

    for key in keys(args.memory_models):
        if key not in weights:
            model_for(key)
        counts = [int(c) for c in args.memory_counts.split(",")]
        peaks = {}
        for n in counts:
            sub = make_images(tmp / f"mem{n}", n)
            peaks[n] = run_child("--child", "calibrate", "--model", key, "--weights", weights[key],
                                 "--folder", str(sub), "--batch", str(args.batch), "--device", args.device)
        what = ", ".join(f"{n} images {p['peak_mb']:.0f} MB" for n, p in peaks.items())
        print(f"{NAMES[key]}: peak memory of a whole calibration (fresh process each, batch "
              f"{args.batch}): {what}; largest / smallest {peaks[counts[-1]]['peak_mb'] / peaks[counts[0]]['peak_mb']:.3f}"
              f"   target <= 1.10")

    for key in keys(args.activation_models):
        if key not in weights:
            model_for(key)
        rows = {}
        for mode in ("one-pass", "two-pass"):
            rows[mode] = run_child("--child", "activations", "--model", key, "--weights", weights[key],
                                   "--mode", mode, "--batch", str(args.activation_batch), "--device", args.device)
        one, two = rows["one-pass"], rows["two-pass"]
        print(f"{NAMES[key]}: search activation memory at batch {args.activation_batch} (peak of a "
              f"search over one batch minus a plain forward's): one pass "
              f"{one['search_mb'] - one['plain_mb']:.0f} MB (estimate {one['estimate_mb']:.0f} MB, "
              f"{one['seconds']:.1f} s), two passes {two['search_mb'] - two['plain_mb']:.0f} MB "
              f"({two['seconds']:.1f} s); the default budget (1 GiB) picks "
              f"{'one pass' if one['estimate_mb'] <= 1024 else 'two passes'}   target <= 1 GB")


if __name__ == "__main__":
    main()
