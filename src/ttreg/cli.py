"""The ``ttreg`` command line: ``demo``, ``calibrate``, ``inspect``, ``export`` and ``eval``.

Exit status (README's "Command line" section repeats this list):

* 0 -- done.
* 1 -- an unexpected failure inside a model or a library (a traceback is printed).
* 2 -- a user error, printed as one line on stderr that says what to do: a bad argument, an
  unreadable input, an output path ttreg will not write, a missing optional package, a neuron
  set for another model or an attention bias whose heads do not fit it (before any work). Paths and images are checked before the model loads.
* 3 -- ``calibrate --top-k auto`` found no set of neurons that clears the held-out images, even
  after widening the search; the neuron file (the best available set) and the report are
  written, the reason printed.
* 130 -- interrupted (Ctrl-C), also during start-up; one line says whether anything was written.

Output files are written all or nothing (:mod:`ttreg.files`): an interrupted or failed run
leaves no half-written file, and a device, FIFO, socket or symbolic link given as an output is
refused, never replaced.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli_common import (EXIT_NOT_CLEARED, EXIT_OK, TOP_K_DEFAULT, OneLineParser, UserError, device_arg,
                      int_at_least, int_or_auto, load_neurons, memory_size, model_help, number_in, progress_ok,
                      read_neurons, resolve_model, run, sizes_arg, threshold_arg)

EXAMPLES = """examples:
  ttreg demo
  ttreg calibrate --model timm:vit_large_patch14_dinov2.lvd142m --images imgs/ --out dinov2_l.json
  ttreg inspect --model builtin:dinov2_vits14 --neurons auto photo.jpg --out figs/
  ttreg inspect --model timm:vit_large_patch14_dinov2.lvd142m --neurons dinov2_vitl14 photo.jpg --out figs/
  ttreg inspect --model hf:llava-hf/llava-1.5-7b-hf --prompt "What is in the image?" photo.jpg --out figs/
  ttreg export --model timm:vit_large_patch14_dinov2.lvd142m --neurons dinov2_l.json --out model.onnx

exit status: 0 done, 1 unexpected failure, 2 user error (one line), 3 calibrate found no set
of neurons that clears the held-out images (the best available set is written), 130 interrupted
"""

# --- calibrate -----------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    """Under ``torchrun`` every rank reads its share of the images, the statistics are summed
    over the ranks, and rank 0 alone prints and writes the files."""
    from .distributed import launched
    with launched():
        return _calibrate_command(args)


def _calibrate_command(args) -> int:
    from .calibration import calibrate
    from .text import count
    from .distributed import is_main, local_device, resolve
    from .files import Outputs, check_output_file, same_file
    main = is_main()
    say = print if main else (lambda *a, **k: None)
    out = check_output_file(args.out, "--out")
    if args.report:
        check_output_file(args.report, "--report")
        if same_file(args.out, args.report):
            raise UserError(f"--out and --report both name {args.out}; give two different files")
    given = read_neurons(args.neurons)
    images = resolve(args.images, strict=args.strict)
    for s in images.skipped:
        say(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    model, transform, _ = resolve_model(args.model, local_device(args.device))
    given = load_neurons(given, model)
    t0 = time.time()
    say(f"calibrating {args.model} on {count(len(images), 'image')} from {args.images} ...", flush=True)
    cal = calibrate(model, images, threshold=args.threshold, detection_layer=args.detection_layer,
                    top_layer=args.top_layer, top_k=args.top_k, max_k=args.max_k,
                    heldout=args.heldout, batch_size=args.batch_size,
                    transform=None if args.sizes else transform, sizes=args.sizes,
                    strict=args.strict, progress=main and not args.quiet and progress_ok(),
                    neurons=given, memory_budget=args.memory_budget,
                    attention_bias=args.attention_bias)
    rn = cal.neurons
    rn.provenance.update({"model_spec": args.model, "images": str(args.images)})
    if main:
        with Outputs() as o:
            rn.save(out, outputs=o)
            if args.report:
                from .files import write_json
                write_json(args.report, cal.report, outputs=o)
    say(cal.summary())
    say(f"wrote {out} ({count(len(rn), 'neuron')}"
        + (", with its attention bias" if rn.attention_bias is not None else "")
        + f") in {time.time() - t0:.1f} s")
    if cal.report.get("top_k_cleared") is False:
        if main:
            print(f"ttreg: automatic top-k failed: {cal.report['top_k_reason']}; {out} holds the "
                  f"{len(rn)} best neurons (exit status {EXIT_NOT_CLEARED})", file=sys.stderr)
        return EXIT_NOT_CLEARED
    return EXIT_OK


# --- inspect -------------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from .calibration import calibrate
    from .text import count
    from .data import resolve_images
    from .files import check_output_folder
    from .inspection import inspect_images
    from .viz import require_matplotlib
    out = check_output_folder(args.out, "--out")
    page = _html_page(args, out)
    require_matplotlib()
    given = read_neurons(args.neurons)
    src = resolve_images(list(args.images), strict=args.strict)
    for s in src.skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    if args.answer and not args.prompt:
        raise UserError("--answer is attributed to the image for a --prompt: give --prompt too")
    model, transform, _ = resolve_model(args.model, args.device)
    from .adapters import wrap
    from .neurons import resolve_layer
    resolve_layer(args.layer, wrap(model).num_layers, "--layer")
    processor = None
    if args.prompt:
        from .attribution import require_vlm
        from .models import load_processor
        require_vlm(model)
        processor = load_processor(args.model)
    neurons = load_neurons(given, model)
    progress = not args.quiet and progress_ok()
    if neurons is None:     # --neurons auto: calibrate on the inspected images, as calibrate does
        print(f"calibrating on the {count(len(src.items), 'inspected image')} "
              f"(--neurons auto) ...", flush=True)
        cal = calibrate(model, src, transform=transform, batch_size=args.batch_size,
                        strict=args.strict, progress=progress)
        print(cal.summary())
        neurons = cal.neurons
    from .files import Outputs
    with Outputs() as o:
        attributed = None
        if args.prompt:
            from .attribution_report import inspect_attribution
            attributed = inspect_attribution(model, processor, src, neurons, args.prompt, args.answer,
                                             num_registers=args.num_registers, preset=args.preset,
                                             batch_size=args.batch_size)
        results, written = inspect_images(model, transform, src, neurons, out, layer=args.layer,
                                          num_registers=args.num_registers, preset=args.preset,
                                          num_neurons=args.num_neurons, model_name=args.model,
                                          batch_size=args.batch_size, outputs=o, progress=progress,
                                          page=page, attribution=attributed)
    det = results["detection_layer"]
    print(f"{count(len(src.items), 'image')}, {count(len(neurons), 'register neuron')}"
          + (f" ({neurons.note})" if neurons.note else ""))
    for r in results["images"]:
        print(f"  {r['image']}: max/median patch norm at layer {det}: "
              f"{r['plain']['norm_ratio'][det]:.2f} -> {r['registers']['norm_ratio'][det]:.2f}")
    for r in results["images"]:
        at = r.get("attribution")
        if at:
            print(f"  {r['image']}: \"{at['plain']['answer']}\": attribution mass on the outlier "
                  f"patches {100 * at['plain']['outlier_share']:.1f}% -> "
                  f"{100 * at['registers']['outlier_share']:.1f}% with registers")
    print(f"wrote {count(len(written) - 1 - (page is not None), 'figure')} and inspect.json to {out}")
    if page is not None:
        print(page.summary())
    return EXIT_OK


def _html_page(args, out: Path):
    """``--html [FILE]``: the page to write (default inspect.html in --out), its path checked."""
    if args.html is None:
        return None
    from .cli_common import SYNTHETIC
    from .files import check_output_file
    from .html_report import Page
    path = check_output_file(Path(args.html) if args.html else out / "inspect.html", "--html")
    if path.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--html {path}: give a file name ending in .html (or put --html, with "
                        "no file, after the images)")
    caption = f"synthetic model: {SYNTHETIC[args.model]}" if args.model in SYNTHETIC else ""
    return Page(path, neuron_source=args.neurons, caption=caption)


# --- export --------------------------------------------------------------------------------------

def cmd_export(args) -> int:
    from .bias import fit_attention_bias
    from .export import ExportCheckError, export_onnx
    from .files import check_output_file
    check_output_file(args.out, "--out")      # the path as given: "m.onnx/" is a folder
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: give a file name ending in .onnx")
    given = read_neurons(args.neurons)
    if given is None:
        raise UserError("--neurons: give a neuron file, a published name or hf:ORG/NAME ('auto' is "
                        "for inspect)")
    if args.form == "bias" and given.attention_bias is None and not args.images:
        raise UserError("this neuron set has no attention bias; pass --images to fit one "
                        "(or use --form token)")
    model, transform, _ = resolve_model(args.model, args.device)
    neurons = load_neurons(given, model)
    bias = None
    if args.form == "bias" and neurons.attention_bias is None:
        print(f"fitting the attention bias on {args.images} ...", flush=True)
        bias = fit_attention_bias(model, neurons, args.images, transform=transform,
                                  batch_size=args.batch_size, strict=args.strict,
                                  progress=not args.quiet and progress_ok())
    try:
        report = export_onnx(model, neurons, out, form=args.form, bias=bias,
                             num_registers=args.num_registers, opset=args.opset,
                             tolerance=args.tolerance)
    except ExportCheckError as e:      # a check the user can loosen: one line, exit status 2
        raise UserError(str(e)) from None
    print(report.summary())
    return 0


# --- demo ----------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(Path(args.out), batch_size=args.batch_size)
    return EXIT_OK


# --- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(
        prog="ttreg", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Test-time registers for Vision Transformers: find the register neurons that "
                    "make high-norm outlier tokens and move them into an extra token.",
        epilog=EXAMPLES)
    from . import __version__
    ap.add_argument("--version", action="version", version=f"ttreg {__version__}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    mhelp = model_help()

    d = sub.add_parser("demo", help="offline demo on the built-in DINOv2-S/14 and scikit-image photos",
                       description="Offline demo: calibrate the built-in real DINOv2 ViT-S/14 on the "
                                   "photos bundled with scikit-image (it has no outliers: an honest "
                                   "negative result), then run the whole pipeline on a synthetic "
                                   "variant with planted register neurons and write a report.")
    d.add_argument("--out", default="ttreg-demo", help="report folder (default: ttreg-demo)")
    d.add_argument("--batch-size", type=int_at_least(1), default=8,
                   help="images per forward pass (default 8)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("calibrate", help="find register neurons and write them as JSON",
                       description="Find a model's register neurons from images, choosing threshold, "
                                   "top layer and top k automatically unless given, and write the "
                                   "neuron set as JSON. Exit status 3 when --top-k auto finds no set "
                                   "of neurons that clears the held-out images. Under torchrun "
                                   "(torchrun --nproc_per_node N -m ttreg calibrate ...) each process "
                                   "reads its share of the images and the first writes the files; "
                                   "the result equals one process's.")
    c.add_argument("--model", required=True, help=mhelp)
    c.add_argument("--images", required=True,
                   help="a folder (searched recursively), a .txt list of paths, an image file, or "
                        "'skimage' for the photos bundled with scikit-image")
    c.add_argument("--out", required=True, help="neuron file to write (JSON)")
    c.add_argument("--report", help="also write what calibration measured (JSON; not the --out file)")
    c.add_argument("--threshold", type=threshold_arg, default="auto",
                   help="outlier norm threshold (> 0), or 'auto' (mean + 3 std of patch norms, at least 2x median)")
    c.add_argument("--detection-layer", type=int, default=-1,
                   help="block whose output is checked for outliers (default -1, the last)")
    c.add_argument("--top-layer", type=int_or_auto(), default="auto",
                   help="last block searched, or 'auto' (the block where the outliers emerge)")
    c.add_argument("--top-k", type=int_or_auto(1), default=TOP_K_DEFAULT,
                   help="number of neurons, or 'auto' (the smallest k whose registers clean the held-out "
                        "images as well as zeroing all candidates)")
    c.add_argument("--max-k", type=int_at_least(1), default=None,
                   help="largest k the automatic sweep tries (default: 1%% of the neurons, at least 16)")
    c.add_argument("--heldout", type=number_in(0, 1, hi_open=True), default=0.2,
                   help="share of images held out for the sweep, in [0, 1) (default 0.2)")
    c.add_argument("--neurons", help="measure a given set instead of searching: a neuron JSON, a "
                                     "published name (dinov2_vitl14) or hf:ORG/NAME; written to --out "
                                     "with the numbers")
    c.add_argument("--memory-budget", type=memory_size, default="1GiB",
                   help="what the search may keep of a batch's MLP activations, e.g. 512MiB or 4GB "
                        "(default 1GiB); beyond it the search runs in two passes (same result, "
                        "about twice the time)")
    c.add_argument("--sizes", type=sizes_arg,
                   help="calibrate across input sizes, e.g. 224,518 (or 224x448; each image resized "
                        "and centre-cropped to each): the search sums over them and top-k must "
                        "clear every size; with --neurons, measure the set at these sizes. "
                        "Default: the model's own size and preprocessing")
    c.add_argument("--attention-bias", action="store_true",
                   help="also fit the attention-bias form (no extra token) and write it beside "
                        "--out as NAME.bias.safetensors")
    _common(c)
    c.set_defaults(func=cmd_calibrate)

    i = sub.add_parser("inspect", help="figures: norm maps, attention, neuron maps, before/after",
                       description="Make figures for images: per-layer norm curves, the norm map at "
                                   "the detection layer, last-layer CLS attention (mean and per head) "
                                   "and register-neuron activation maps, each plain and with "
                                   "test-time registers, plus inspect.json with the numbers. With "
                                   "--prompt (vision-language models): the overview figure gains the "
                                   "language model's text-to-image attribution maps under the "
                                   "tower's norm maps.")
    i.add_argument("images", nargs="+", help="image files, folders (searched recursively) or .txt lists of paths")
    i.add_argument("--model", required=True, help=mhelp)
    i.add_argument("--neurons", default="auto",
                   help="neuron JSON file, a published name (dinov2_vitl14), hf:ORG/NAME, or 'auto' "
                        "(the default): calibrate on the inspected images, as 'ttreg calibrate' "
                        "does (20%% of them held out for its check; with one image the check is "
                        "in-sample)")
    i.add_argument("--out", required=True, help="folder for the PNGs and inspect.json")
    i.add_argument("--layer", type=int, default=-1, help="detection layer for the norm map (default -1)")
    i.add_argument("--num-registers", type=int_at_least(1), default=1,
                   help="test-time registers appended (default 1)")
    i.add_argument("--preset", choices=["paper", "official"], default="paper",
                   help="the paper's edit or the authors' released code's (default paper)")
    i.add_argument("--num-neurons", type=int_at_least(0), default=6, help="neuron maps to draw (default 6)")
    i.add_argument("--html", nargs="?", const="", default=None, metavar="FILE",
                   help="also write one self-contained interactive HTML page (registers on/off, "
                        "every block's norm map and attention, the neuron maps); default FILE: "
                        "inspect.html in --out. It traces the attention of every block: lower "
                        "--batch-size if memory is short")
    i.add_argument("--prompt", default=None,
                   help="vision-language models (hf:...): also draw the language model's attribution "
                        "of the answer to this prompt on each image, plain vs test-time registers")
    i.add_argument("--answer", default=None,
                   help="with --prompt: the answer to attribute (default: the model's greedy answer)")
    _common(i)
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("export", help="write the model with test-time registers as an ONNX graph",
                       description="Export the model's feature call with test-time registers (token "
                                   "form, or the attention-bias form with no extra token) as an ONNX "
                                   "graph with a dynamic batch axis (and dynamic height/width where "
                                   "the model allows), checked against PyTorch with onnxruntime.")
    x.add_argument("--model", required=True, help=mhelp)
    x.add_argument("--neurons", required=True,
                   help="neuron JSON file, a published name (dinov2_vitl14) or hf:ORG/NAME")
    x.add_argument("--out", required=True, help="ONNX file to write (written atomically)")
    x.add_argument("--form", choices=["token", "bias"], default="token",
                   help="token: appended register token (default); bias: a fitted key/value per "
                        "head in every attention, no token")
    x.add_argument("--images", help="for --form bias when the neuron set has no attention bias: "
                                    "images to fit it on (as for calibrate)")
    x.add_argument("--num-registers", type=int_at_least(1), default=None,
                   help="token form: registers (default 1)")
    x.add_argument("--opset", type=int_at_least(9), default=17, help="ONNX opset (default 17)")
    x.add_argument("--tolerance", type=number_in(0, 1, lo_open=True, hi_open=True), default=1e-4,
                   help="largest relative error the onnxruntime check accepts: per output, max "
                        "|onnxruntime - PyTorch| over max |PyTorch value| (default 1e-4)")
    _common(x)
    x.set_defaults(func=cmd_export)

    from .eval.cli import add_eval_parsers
    e = sub.add_parser("eval", help="the paper's evaluations, plain vs. test-time registers",
                       description="Run one of the paper's experiments with and without "
                                   "test-time registers (see docs/evaluations.md).")
    add_eval_parsers(e.add_subparsers(dest="eval_cmd", required=True, metavar="EXPERIMENT"))
    return ap


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int_at_least(1), default=16,
                   help="images per forward pass (default 16)")
    p.add_argument("--device", type=device_arg, default="cpu",
                   help="cpu, cuda, cuda:1, mps, ... (default cpu)")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    """Run ``ttreg`` with ``argv``; return the exit status (see the module docstring)."""
    return run(lambda: build_parser().parse_args(argv), "ttreg")



if __name__ == "__main__":
    sys.exit(main())
