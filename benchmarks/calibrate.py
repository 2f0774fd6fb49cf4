"""Calibration cost: time relative to a plain forward over the same images, and peak memory.

Model: a random ViT-S/14 at 224 px with the demo's content-dependent plant
(:data:`ttreg.testing.DEMO_PLANTS`: outliers on the brightest patches, a cascade over blocks 0-9,
dense distractors), so the search finds something and the top-k sweep runs. Images: generated
PNGs in a temporary folder, read through the same loader in every arm.

Prints
  * search (Algorithm 1, fixed top_k) time / plain forward time   (target <= 1.10)
  * full calibration (search + top_k bisection) time / plain forward time   (target <= 3)
  * peak resident memory of a search over 100 vs. 400 images, each in a fresh process (target: flat)

    python benchmarks/calibrate.py [--images 64] [--batch 16]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_model():
    import timm
    from ttreg.testing import plant_demo
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224,
                              num_classes=0).eval()
    return plant_demo(model)


def make_images(folder: Path, n: int) -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:04d}.png")
    return folder


def plain_pass(model, folder, batch):
    import ttreg
    from ttreg.data import iter_batches, resolve_images
    ad = ttreg.wrap(model)
    with torch.inference_mode():
        for x in iter_batches(resolve_images(folder), ad, batch):
            ad.run(x)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def memory_child(folder: str, batch: int) -> None:
    import ttreg
    model = make_model()
    ttreg.find_register_neurons(model, folder, top_k=10, batch_size=batch)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.batch)

    import ttreg
    tmp = Path(tempfile.mkdtemp(prefix="ttreg-bench-"))
    folder = make_images(tmp / "timing", args.images)
    model = make_model()
    plain_pass(model, folder, args.batch)  # warm up
    search, full = [], []
    for _ in range(args.repeats):
        p1 = timed(lambda: plain_pass(model, folder, args.batch))
        s = timed(lambda: ttreg.find_register_neurons(model, folder, top_k=10, batch_size=args.batch))
        c = timed(lambda: ttreg.calibrate(model, folder, batch_size=args.batch))
        p2 = timed(lambda: plain_pass(model, folder, args.batch))
        plain = (p1 + p2) / 2
        search.append(s / plain)
        full.append(c / plain)
    cal = ttreg.calibrate(model, folder, batch_size=args.batch)
    print(f"ViT-S/14 224 px, {args.images} images, batch {args.batch}, {torch.get_num_threads()} threads; "
          f"calibration found {sorted(cal.neurons.neurons)} with top_k={cal.report['top_k']} "
          f"after {len(cal.report['sweep'])} sweep steps")
    print(f"search (fixed top_k) / plain forward: median {np.median(search):.3f} "
          f"(min {min(search):.3f}, max {max(search):.3f})")
    print(f"calibration with top_k sweep / plain forward: median {np.median(full):.3f} "
          f"(min {min(full):.3f}, max {max(full):.3f})")

    peaks = {}
    for n in (100, 400):
        sub = make_images(tmp / f"mem{n}", n)
        r = subprocess.run([sys.executable, __file__, "--memory-child", str(sub), "--batch", str(args.batch)],
                           capture_output=True, text=True, check=True)
        peaks[n] = json.loads(r.stdout.strip().splitlines()[-1])["maxrss_mb"]
    print(f"peak memory of a search: 100 images {peaks[100]:.0f} MB, 400 images {peaks[400]:.0f} MB "
          f"(ratio {peaks[400] / peaks[100]:.3f})")


if __name__ == "__main__":
    main()
