"""Forward time with one test-time register divided by the plain forward.

ViT-B/14 at 224 px (257 tokens), batch 8, random weights, one register neuron set of 10 neurons
in two layers. Runs are interleaved (plain, registers, plain, ...) so drift hits both arms
alike; prints the median ratio and its spread. The extra token alone costs about 258/257.

    python benchmarks/overhead.py [--repeats 15] [--batch 8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ttreg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", default="vit_base_patch14_dinov2")
    args = ap.parse_args()

    import timm
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=224, num_classes=0).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    neurons = {9: [11, 200, 301, 402, 503], 10: [7, 77, 777, 1777, 2777]}
    handle = None

    def run(with_registers: bool) -> float:
        nonlocal handle
        if with_registers:
            handle = ttreg.add_test_time_registers(model, neurons, num_registers=1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.forward_features(x)
        dt = time.perf_counter() - t0
        if handle is not None:
            handle.remove()
            handle = None
        return dt

    run(False), run(True)  # warm up
    ratios, plain_times = [], []
    for _ in range(args.repeats):
        a = run(False)
        b = run(True)
        c = run(False)
        ratios.append(b / ((a + c) / 2))
        plain_times.append((a + c) / 2)
    ratios.sort()
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    print(f"model {args.model}, batch {args.batch}, 224 px, {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"plain forward: median {statistics.median(plain_times) * 1000:.0f} ms")
    print(f"with 1 test-time register / plain: median {statistics.median(ratios):.4f} "
          f"(IQR {q1:.4f}-{q3:.4f}, min {ratios[0]:.4f}, max {ratios[-1]:.4f}); "
          f"extra token alone: {258 / 257:.4f}")


if __name__ == "__main__":
    main()
