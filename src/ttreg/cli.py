"""The ``ttreg`` command line: ``demo``, ``calibrate``, ``inspect`` and ``eval``.

Every error a user can cause ends as one line on stderr and exit status 2 (1 for a failure
inside the model, 130 for Ctrl-C); output files are written atomically, so an interrupted run
leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  ttreg demo
  ttreg calibrate --model timm:vit_large_patch14_dinov2.lvd142m --images imgs/ --out dinov2_l.json
  ttreg inspect --model builtin:dinov2_vits14 --neurons auto photo.jpg --out figs/
  ttreg inspect --model timm:vit_large_patch14_dinov2.lvd142m --neurons dinov2_vitl14 photo.jpg --out figs/
"""

MODEL_HELP = ("model spec: timm:NAME, hf:ORG/NAME, open_clip:ARCH/PRETRAINED, builtin:dinov2_vits14 "
              "(offline), a local path, or 'planted' (a tiny synthetic ViT with planted register neurons)")


class UserError(ValueError):
    """A problem with the command's inputs; printed as one line."""


# --- shared helpers ------------------------------------------------------------------------------

def load_model(spec: str, device: str = "cpu"):
    """(model, transform) for a spec; 'planted' and 'builtin:...+planted' are synthetic."""
    import torch
    from . import testing
    from .data import make_transform
    from .adapters import wrap
    if spec == "planted":
        model = testing.planted_vit()
        ad = wrap(model)
        transform = make_transform(ad.image_size(), *ad.mean_std())
    else:
        base, _, variant = spec.partition("+")
        try:
            from .models import load_model as _load
        except ImportError as e:  # pragma: no cover - optional pieces missing
            raise UserError(f"cannot load models: {e}") from None
        model, transform = _load(base)
        if variant == "planted":
            from .demo import plant_demo
            plant_demo(model)
        elif variant:
            raise UserError(f"unknown model variant '+{variant}' (only '+planted')")
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()) \
            and device != "mps":
        raise UserError(f"device {device!r} is not available here; use --device cpu")
    return model.to(device).eval(), transform


def load_neurons(arg: str | None, model):
    from .spec import RegisterNeurons
    from .published import is_published
    if arg is None or arg == "auto":
        return None
    if is_published(arg):
        rn = RegisterNeurons.from_name(arg)
        rn.check_model(model)
        return rn
    p = Path(arg)
    if not p.exists():
        raise UserError(f"no neuron file {arg!r} (give a JSON from 'ttreg calibrate', a published "
                        f"name such as dinov2_vitl14, or 'auto')")
    rn = RegisterNeurons.load(p)
    rn.check_model(model)
    return rn


def _progress_ok() -> bool:
    return sys.stderr.isatty()


# --- calibrate -----------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .spec import write_json_atomic
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as neurons.json")
    model, transform = load_model(args.model, args.device)
    given = load_neurons(args.neurons, model) if args.neurons else None
    t0 = time.time()
    print(f"calibrating {args.model} on {args.images} ...", flush=True)
    cal = calibrate(model, args.images, threshold=_num_or_auto(args.threshold),
                    detection_layer=args.detection_layer, top_layer=_int_or_auto(args.top_layer),
                    top_k=_int_or_auto(args.top_k), max_k=args.max_k, heldout=args.heldout,
                    batch_size=args.batch_size, transform=transform, strict=args.strict,
                    progress=not args.quiet and _progress_ok(), neurons=given)
    rn = cal.neurons
    rn.provenance.update({"model_spec": args.model, "images": str(args.images)})
    rn.save(out)
    if args.report:
        write_json_atomic(args.report, cal.report)
    for s in cal.report.get("skipped", []):
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    print(cal.summary())
    print(f"wrote {out} ({len(rn)} neurons) in {time.time() - t0:.1f} s")
    return 0


def _num_or_auto(v: str):
    if v == "auto":
        return v
    try:
        return float(v)
    except ValueError:
        raise UserError(f"--threshold must be a number or 'auto', got {v!r}") from None


def _int_or_auto(v):
    if v is None or v == "auto":
        return "auto"
    try:
        return int(v)
    except ValueError:
        raise UserError(f"expected a whole number or 'auto', got {v!r}") from None


# --- inspect -------------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from .calibrate import calibrate
    from .data import resolve_images
    from .report import inspect_images

    model, transform = load_model(args.model, args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    src = resolve_images(list(args.images), strict=args.strict)
    for s in src.skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    neurons = load_neurons(args.neurons, model)
    if neurons is None:
        neurons = calibrate(model, src, heldout=0, transform=transform, batch_size=args.batch_size).neurons
    results, written = inspect_images(model, transform, src, neurons, out, layer=args.layer,
                                      num_registers=args.num_registers, preset=args.preset,
                                      num_neurons=args.num_neurons, model_name=args.model)
    det = results["detection_layer"]
    print(f"{len(src.items)} images, {len(neurons)} register neurons"
          + (f" ({neurons.note})" if neurons.note else ""))
    for r in results["images"]:
        print(f"  {r['image']}: max/median patch norm at layer {det}: "
              f"{r['plain']['norm_ratio'][det]:.2f} -> {r['registers']['norm_ratio'][det]:.2f}")
    print(f"wrote {len(written)} figures and inspect.json to {out}")
    return 0


# --- demo ----------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(Path(args.out), batch_size=args.batch_size)
    return 0


# --- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ttreg", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Test-time registers for Vision Transformers: find the register neurons that "
                    "make high-norm outlier tokens and move them into an extra token.",
        epilog=EXAMPLES)
    from . import __version__
    ap.add_argument("--version", action="version", version=f"ttreg {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="offline demo on the built-in DINOv2-S/14 and scikit-image photos",
                       description="Offline demo: calibrate the built-in real DINOv2 ViT-S/14 on the "
                                   "photos bundled with scikit-image (it has no outliers: an honest "
                                   "negative result), then run the whole pipeline on a synthetic "
                                   "variant with planted register neurons and write a report.")
    d.add_argument("--out", default="ttreg-demo", help="report folder (default: ttreg-demo)")
    d.add_argument("--batch-size", type=int, default=8)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("calibrate", help="find register neurons and write them as JSON",
                       description="Find a model's register neurons from images, choosing threshold, "
                                   "top layer and top k automatically unless given, and write the "
                                   "neuron set as JSON.")
    c.add_argument("--model", required=True, help=MODEL_HELP)
    c.add_argument("--images", required=True,
                   help="a folder (searched recursively), a .txt list of paths, an image file, or "
                        "'skimage' for the photos bundled with scikit-image")
    c.add_argument("--out", required=True, help="neuron file to write (JSON)")
    c.add_argument("--report", help="also write what calibration measured (JSON)")
    c.add_argument("--threshold", default="auto",
                   help="outlier norm threshold, or 'auto' (mean + 3 std of patch norms, at least 2x median)")
    c.add_argument("--detection-layer", type=int, default=-1,
                   help="block whose output is checked for outliers (default -1, the last)")
    c.add_argument("--top-layer", default="auto",
                   help="last block searched, or 'auto' (the block where the outliers emerge)")
    c.add_argument("--top-k", default="auto",
                   help="number of neurons, or 'auto' (smallest k that clears held-out images)")
    c.add_argument("--max-k", type=int, default=None, help="largest k the automatic sweep tries")
    c.add_argument("--heldout", type=float, default=0.2, help="share of images held out for the sweep")
    c.add_argument("--neurons", help="measure a given set instead of searching: a neuron JSON or a "
                                     "published name (dinov2_vitl14); written to --out with the numbers")
    _common(c)
    c.set_defaults(func=cmd_calibrate)

    i = sub.add_parser("inspect", help="figures: norm maps, attention, neuron maps, before/after",
                       description="Make figures for images: per-layer norm curves, the norm map at "
                                   "the detection layer, last-layer CLS attention (mean and per head) "
                                   "and register-neuron activation maps, each plain and with "
                                   "test-time registers, plus inspect.json with the numbers.")
    i.add_argument("images", nargs="+", help="image files (or folders)")
    i.add_argument("--model", required=True, help=MODEL_HELP)
    i.add_argument("--neurons", default="auto",
                   help="neuron JSON file, a published name (dinov2_vitl14), or 'auto' to calibrate on the images")
    i.add_argument("--out", required=True, help="folder for the PNGs and inspect.json")
    i.add_argument("--layer", type=int, default=-1, help="detection layer for the norm map (default -1)")
    i.add_argument("--num-registers", type=int, default=1)
    i.add_argument("--preset", choices=["paper", "official"], default="paper")
    i.add_argument("--num-neurons", type=int, default=6, help="neuron maps to draw (default 6)")
    _common(i)
    i.set_defaults(func=cmd_inspect)

    try:
        from .eval.cli import add_eval_parsers
    except ImportError:
        add_eval_parsers = None
    if add_eval_parsers is not None:
        e = sub.add_parser("eval", help="the paper's evaluations, plain vs. test-time registers",
                           description="Run one of the paper's experiments with and without "
                                       "test-time registers (see docs/evaluations.md).")
        add_eval_parsers(e.add_subparsers(dest="eval_cmd", required=True, metavar="EXPERIMENT"))
    return ap


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    import warnings
    args = build_parser().parse_args(argv)
    # the CLI prints the same facts itself
    warnings.filterwarnings("ignore", message="no outlier tokens", category=UserWarning)
    if getattr(args, "batch_size", 1) is not None and getattr(args, "batch_size", 1) < 1:
        print("ttreg: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ttreg: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError) as e:
        print(f"ttreg: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # ImageError, ModelMismatchError, ModelLoadError, bad values
        print(f"ttreg: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TypeError as e:
        if "does not support" in str(e):
            print(f"ttreg: error: {_one_line(e)}", file=sys.stderr)
            return 2
        raise


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
