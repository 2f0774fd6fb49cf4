"""Forward time of the two production forms divided by the plain model's, eager and compiled.

ViT-B/14 (DINOv2 layout, random weights) at 224 px, batch 8 by default; 10 register neurons in two
layers. Arms: plain, token form (one appended register), bias form (one fitted key/value per
head, no token), each eager and -- with ``--compile`` -- ``torch.compile``d (inductor), each on its
own copy of the model with the registers installed before compiling. Every repeat runs all arms
once, in a rotating order, so drift and other people's load hit every arm alike; each ratio is
taken within one repeat against that repeat's plain run (eager arms against eager plain, compiled
against compiled plain). Prints the median ratio with its interquartile range, min and max, the
ratio of the arms' fastest runs (the least disturbed by other load), the graph breaks
``torch._dynamo.explain`` finds, and the machine's load average before and after.

    python benchmarks/production.py [--repeats 15] [--batch 8] [--compile] [--device cpu] [--dtype float32]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import ttreg


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def spread(ratios: list[float]) -> str:
    r = sorted(ratios)
    q1, q3 = r[len(r) // 4], r[(3 * len(r)) // 4]
    return f"median {statistics.median(r):.4f} (IQR {q1:.4f}-{q3:.4f}, min {r[0]:.4f}, max {r[-1]:.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", default="vit_base_patch14_dinov2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd arms (inductor)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()

    import timm
    load_before = os.getloadavg()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, img_size=args.size, num_classes=0).eval()
    base = base.to(args.device, dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device, dtype=dtype)
    L = len(base.blocks)
    neurons = ttreg.RegisterNeurons.from_dict(
        {L - 3: [11, 200, 301, 402, 503], L - 2: [7, 77, 777, 1777, 2777]}, model=base)
    neurons.attention_bias = ttreg.fit_attention_bias(base, neurons, x[:2])

    models = {"plain": base, "token": copy.deepcopy(base), "bias": copy.deepcopy(base)}
    ttreg.add_test_time_registers(models["token"], neurons)
    ttreg.add_test_time_registers(models["bias"], neurons, form="bias")
    arms = {name: m.forward_features for name, m in models.items()}
    breaks = {}
    if args.compile:
        from torch import _dynamo
        for name, m in models.items():
            with torch.inference_mode():
                breaks[name] = _dynamo.explain(m.forward_features)(x).graph_break_count
            _dynamo.reset()
        t0 = time.perf_counter()
        for name, m in models.items():
            arms[f"compiled {name}"] = torch.compile(m.forward_features)
            with torch.inference_mode():
                arms[f"compiled {name}"](x)
        print(f"compiled the three arms in {time.perf_counter() - t0:.0f} s")

    def timed(fn) -> float:
        _sync(args.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn(x)
        _sync(args.device)
        return time.perf_counter() - t0

    names = list(arms)
    for name in names:      # warm up
        timed(arms[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(arms[name]))
    load_after = os.getloadavg()

    print(f"model {args.model}, {args.size} px, batch {args.batch}, {args.dtype} on {args.device}, "
          f"{args.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    for prefix in ("", "compiled ") if args.compile else ("",):
        plain = times[f"{prefix}plain"]
        print(f"{prefix or 'eager '}plain forward: median {statistics.median(plain) * 1000:.1f} ms")
        for form in ("token", "bias"):
            arm = times[f"{prefix}{form}"]
            ratios = [t / p for t, p in zip(arm, plain)]
            print(f"  {prefix}{form} form / {prefix}plain: {spread(ratios)}; "
                  f"fastest run / fastest run: {min(arm) / min(plain):.4f}")
    if breaks:
        print("graph breaks (torch._dynamo.explain): "
              + ", ".join(f"{n} {b}" for n, b in breaks.items()))
    print(f"token-count cost alone: {(args.size // 14) ** 2 + 2}/{(args.size // 14) ** 2 + 1} = "
          f"{((args.size // 14) ** 2 + 2) / ((args.size // 14) ** 2 + 1):.4f}")
    print("load average (1 min) before/after: " f"{load_before[0]:.2f} / {load_after[0]:.2f} "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
