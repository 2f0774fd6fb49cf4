"""``ttreg eval ...``: one sub-command per experiment (outliers, lost, probe, zeroshot,
typographic, attribution). ``add_eval_parsers`` plugs them into the main ``ttreg`` parser; ``python -m
ttreg.eval.cli <experiment> ...`` runs them alone. Each prints a table and, with ``--out``,
writes the JSON result."""
from __future__ import annotations

import argparse
import math
import sys
import time

from ..cli_common import (TOP_K_DEFAULT, OneLineParser, device_arg, int_at_least, int_or_auto, load_neurons, model_help,
                   number_in, positive_number, read_neurons, resolve_model, run, threshold_arg)


#: an argparse type: any finite number
finite_number = number_in(-math.inf, math.inf, lo_open=True, hi_open=True)


def _size(text: str) -> tuple[int, int]:
    """An argparse type: one size in pixels (``512`` or ``416x544``, height x width)."""
    from ..sizes import as_size
    try:
        return as_size(text, "--crop-size")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register_counts(text: str) -> int | list[int]:
    """An argparse type: one count of test-time registers (``1``), or several for the ablation
    (``0,1,2,3``: one row per count; 0 is the plain model)."""
    parts = [t.strip() for t in text.split(",")]
    try:
        counts = [int(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers such as 1 or 0,1,2,3, got {text!r}") from None
    if any(c < 0 for c in counts) or (len(counts) == 1 and counts[0] < 1):
        raise argparse.ArgumentTypeError(f"counts must be >= 0 (one count: >= 1), got {text}")
    counts = list(dict.fromkeys(counts))
    return counts[0] if len(parts) == 1 else counts


# --- the model's neurons, and checks before the model loads ------------------------------------------
def resolve_neurons(args, model, images, transform):
    """``--neurons``: ``auto`` (calibrate on the first ``--search-images`` of ``images``, with
    the held-out check), a published name, or a JSON file."""
    from ..text import count
    from .arms import resolve_neurons as _resolve
    if args.neurons == "auto":
        imgs = list(images)[: args.search_images]
        rn = _resolve(model, "auto", imgs, threshold=args.threshold,
                      detection_layer=args.detection_layer, top_layer=args.top_layer,
                      top_k=args.top_k, batch_size=args.batch_size, transform=transform,
                      progress=not args.quiet and sys.stderr.isatty())
        _say(args, f"register neurons (calibrated on {count(len(imgs), 'image')}): "
                   f"{[list(p) for p in rn.neurons]} -- {rn.note}")
        return rn
    return load_neurons(args.given_neurons, model)


def resolve_bias(args, model, images, transform, neurons):
    """``--bias-arm``: the attention-bias form of ``neurons`` for a ``bias`` arm -- the one saved
    with the neuron file, else fitted on the first ``--search-images`` of ``images`` (the images
    an ``auto`` search uses); None without the option or without neurons."""
    if not getattr(args, "bias_arm", False) or not len(neurons):
        return None
    saved = getattr(neurons, "attention_bias", None)
    if saved is not None:
        _say(args, "bias arm: the attention bias saved with the neuron file")
        return saved
    from ..bias import fit_attention_bias
    imgs = list(images)[: args.search_images]
    R = args.num_registers if isinstance(args.num_registers, int) else 1
    _say(args, f"bias arm: fitting the attention bias on {len(imgs)} images ({R} register(s))")
    return fit_attention_bias(model, neurons, imgs, num_registers=R, preset=args.preset,
                              batch_size=args.batch_size, transform=transform)


def _check_paths(args) -> None:
    """``--out`` is usable and ``--neurons`` readable (checked before any data or model is
    loaded; the set read is kept in ``args.given_neurons``)."""
    from ..files import check_output_file
    if args.out:
        check_output_file(args.out, "--out")
    args.given_neurons = read_neurons(args.neurons)


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def _controls(args) -> list[int]:
    return list(range(args.controls))


def _finish(args, result: dict, t0: float) -> int:
    from .report import write_json
    result["model"] = args.model
    result["seconds"] = round(time.time() - t0, 2)
    if args.out:
        write_json(args.out, result)
        _say(args, f"wrote {args.out} in {result['seconds']:.1f} s")
    return 0


def _limit(items: list, args) -> list:
    return items[: args.limit] if args.limit else items


# --- the commands ---------------------------------------------------------------------------------------
def cmd_outliers(args) -> int:
    from ..data import resolve_images
    from .outliers import evaluate_outliers
    t0 = time.time()
    _check_paths(args)
    src = resolve_images(args.images)
    images = _limit(list(src.items), args)
    model, transform, _ = resolve_model(args.model, args.device)
    neurons = resolve_neurons(args, model, images, transform)
    bias = resolve_bias(args, model, images, transform, neurons)
    result = evaluate_outliers(model, images, neurons, bias=bias, threshold=args.threshold,
                               detection_layer=args.detection_layer, control_seeds=_controls(args),
                               num_registers=args.num_registers, preset=args.preset,
                               batch_size=args.batch_size, transform=transform, count_cls=args.count_cls,
                               progress=not args.quiet and sys.stderr.isatty())
    return _finish(args, result, t0)


def cmd_lost(args) -> int:
    from .datasets import coco20k_filenames, coco20k_ids, coco_boxes, voc_boxes
    from ..adapters import wrap
    from .lost import AUTHORS_SWEEP, check_native, evaluate_lost, sweep_configs
    t0 = time.time()
    _check_paths(args)
    if bool(args.voc) == bool(args.coco):
        raise ValueError("give one of --voc ROOT or --coco FILE.json")
    if args.coco20k and not args.coco:
        raise ValueError("--coco20k selects images of a COCO JSON: give --coco instances_train2014.json")
    if args.voc:
        samples = voc_boxes(args.voc, args.split, args.no_hards)
    else:
        ids = None
        if args.coco20k:
            ids = coco20k_ids(coco20k_filenames(None if args.coco20k == "download" else args.coco20k))
        samples = coco_boxes(args.coco, args.coco_images, remove_empty=args.no_hards, image_ids=ids)
    samples = _limit(samples, args)
    model, transform, _ = resolve_model(args.model, args.device)
    if not args.resize:
        check_native(model)                       # before the neuron search
    sweep_configs(wrap(model).num_layers, args.features or ("key",), args.layers or (-1,),
                  gram_bias=args.gram_bias or (0.0,))   # a bad block or bias: before any work
    neurons = resolve_neurons(args, model, [s.path for s in samples], transform)
    bias = resolve_bias(args, model, [s.path for s in samples], transform, neurons)
    sweep = dict(AUTHORS_SWEEP) if args.authors_sweep else {}
    for key in ("features", "layers", "gram_bias"):
        if getattr(args, key) is not None:
            sweep[key] = getattr(args, key)
    if args.normalize:
        sweep["normalize"] = True
    result = evaluate_lost(model, samples, neurons, k_patches=args.k_patches, resize=args.resize,
                           **sweep, bias=bias, control_seeds=_controls(args),
                           num_registers=args.num_registers,
                           preset=args.preset, batch_size=args.batch_size, keep_boxes=args.keep_boxes,
                           progress=not args.quiet and sys.stderr.isatty())
    result["dataset"] = str(args.voc or args.coco)
    if args.coco20k:
        result["dataset"] += " (COCO20k images)"
    return _finish(args, result, t0)


def cmd_probe(args) -> int:
    from .datasets import dense_splits, image_folder_splits
    from .probe import evaluate_probe
    t0 = time.time()
    if args.protocol == "dvt" and (args.task == "classification" or args.quick or args.token):
        raise ValueError("--protocol dvt is for --task segmentation and depth (without --quick or --token)")
    if args.crop_size is not None and args.protocol != "dvt":
        raise ValueError("--crop-size is for --protocol dvt")
    _check_paths(args)
    num_classes = args.num_classes
    if args.task == "classification":
        train, val, classes = image_folder_splits(args.data)
        num_classes = len(classes)
    else:
        train, val = dense_splits(args.data, "masks" if args.task == "segmentation" else "depth")
    train = _limit(train, args)
    model, transform, _ = resolve_model(args.model, args.device)
    neurons = resolve_neurons(args, model, [p for p, _ in train], transform)
    bias = resolve_bias(args, model, [p for p, _ in train], transform, neurons)
    result = evaluate_probe(model, args.task, train, val, neurons=neurons, bias=bias, num_classes=num_classes,
                            seeds=list(range(args.seeds)), val_fraction=args.val_fraction,
                            cache_dir=args.cache, control_seeds=_controls(args),
                            num_registers=args.num_registers, preset=args.preset,
                            batch_size=args.batch_size, transform=transform,
                            ignore_index=args.ignore_index, reduce_zero_label=args.reduce_zero_label,
                            depth_png_scale=args.depth_scale, min_depth=args.min_depth,
                            max_depth=args.max_depth, quick=args.quick, select_on=args.select_on,
                            holdout=args.holdout, **({"learning_rates": args.learning_rates}
                                                     if args.learning_rates else {}),
                            iterations=args.iterations, probe_batch_size=args.probe_batch_size,
                            steps=args.steps, token=args.token, geometry=args.geometry,
                            protocol=args.protocol, crop_size=args.crop_size, train_views=args.train_views,
                            progress=not args.quiet and sys.stderr.isatty())
    result["dataset"] = str(args.data)
    return _finish(args, result, t0)


def _classes(args, folder_classes):
    from .zeroshot import folder_classnames, load_classnames
    return load_classnames(args.classnames) if args.classnames else folder_classnames(folder_classes)


def _class_items(args):
    from .datasets import image_folder_splits
    train, val, classes = image_folder_splits(args.data)
    return _limit(val if val is not None else train, args), classes


def cmd_zeroshot(args) -> int:
    from .zeroshot import (evaluate_zeroshot, evaluate_zeroshot_segmentation, load_classnames,
                           load_templates, segmentation_items)
    t0 = time.time()
    _check_paths(args)
    templates = load_templates(args.templates)
    if args.task == "classification":
        items, classes = _class_items(args)
        classnames = _classes(args, classes)
        model, transform, tokenizer = resolve_model(args.model, args.device)
        if tokenizer is None:
            raise ValueError("zero-shot classification needs a CLIP model (open_clip:ARCH/PRETRAINED)")
        neurons = resolve_neurons(args, model, [p for p, _ in items], transform)
        bias = resolve_bias(args, model, [p for p, _ in items], transform, neurons)
        result = evaluate_zeroshot(model, tokenizer, items, classnames, neurons, bias=bias, templates=templates,
                                   control_seeds=_controls(args), num_registers=args.num_registers,
                                   preset=args.preset, batch_size=args.batch_size, transform=transform,
                                   progress=not args.quiet and sys.stderr.isatty())
    else:
        items = _limit(segmentation_items(args.data), args)
        model, transform, tokenizer = resolve_model(args.model, args.device)
        heatmap = args.heatmap or ("direct" if tokenizer is not None else "attention")
        if heatmap != "attention" and tokenizer is None:
            raise ValueError(f"--heatmap {heatmap} needs a CLIP model (open_clip:ARCH/PRETRAINED); "
                             "use --heatmap attention")
        classnames = load_classnames(args.classnames) if heatmap != "attention" else None
        neurons = resolve_neurons(args, model, [i for i, _, _ in items], transform)
        bias = resolve_bias(args, model, [i for i, _, _ in items], transform, neurons)
        result = evaluate_zeroshot_segmentation(
            model, items, neurons, bias=bias, heatmap=heatmap, tokenizer=tokenizer, classnames=classnames,
            templates=templates, control_seeds=_controls(args), num_registers=args.num_registers,
            preset=args.preset, batch_size=args.batch_size, geometry=args.geometry,
            progress=not args.quiet and sys.stderr.isatty())
    result["dataset"] = str(args.data)
    return _finish(args, result, t0)


def cmd_typographic(args) -> int:
    from .typographic import evaluate_typographic
    from .zeroshot import load_templates
    t0 = time.time()
    _check_paths(args)
    items, classes = _class_items(args)
    classnames = _classes(args, classes)
    templates = load_templates(args.templates)
    model, transform, tokenizer = resolve_model(args.model, args.device)
    if tokenizer is None:
        raise ValueError("the typographic attack needs a CLIP model (open_clip:ARCH/PRETRAINED)")
    neurons = resolve_neurons(args, model, [p for p, _ in items], transform)
    result = evaluate_typographic(model, tokenizer, items, classnames, neurons,
                                  templates=templates,
                                  control_seeds=_controls(args), preset=args.preset,
                                  position=args.position, font_size=args.font_size, seed=args.seed,
                                  batch_size=args.batch_size,
                                  progress=not args.quiet and sys.stderr.isatty())
    result["dataset"] = str(args.data)
    return _finish(args, result, t0)


def box_samples(data: str, split: str | None = "trainval"):
    """Images with named boxes from ``data``: a VOC folder (``Annotations/``), a COCO-style JSON,
    or a folder holding one COCO-style JSON (images beside it or in ``images/``)."""
    from pathlib import Path
    from .datasets import coco_boxes, voc_boxes
    root = Path(data)
    if (root / "Annotations").is_dir():
        return voc_boxes(root, split)
    if root.is_file() and root.suffix.lower() == ".json":
        return coco_boxes(root)
    found = sorted(root.glob("*.json")) if root.is_dir() else []
    if len(found) == 1:
        return coco_boxes(found[0])
    raise ValueError(f"--data {data}: give a VOC folder (with Annotations/), a COCO-style JSON, or "
                     "a folder holding one COCO-style JSON")


def cmd_attribution(args) -> int:
    from ..models import load_processor
    from .attribution import evaluate_attribution
    t0 = time.time()
    _check_paths(args)
    samples = _limit(box_samples(args.data, args.split), args)
    model, transform, _ = resolve_model(args.model, args.device)
    processor = load_processor(args.model)
    neurons = resolve_neurons(args, model, [s.path for s in samples], transform)
    bias = None
    if args.bias_images and len(neurons):
        from ..bias import fit_attention_bias
        if neurons.attention_bias is None:
            _say(args, f"fitting the attention bias on {min(args.bias_images, len(samples))} images ...")
            bias = fit_attention_bias(model, neurons, [s.path for s in samples][: args.bias_images],
                                      transform=transform, batch_size=args.batch_size)
    result = evaluate_attribution(model, processor, samples, neurons, template=args.template,
                                  answer_template=None if args.answer == "generate" else args.answer,
                                  layers=args.layers, num_registers=args.num_registers,
                                  preset=args.preset, bias=bias, control_seeds=_controls(args),
                                  batch_size=args.batch_size,
                                  resamples=args.bootstrap, seed=args.seed,
                                  progress=not args.quiet and sys.stderr.isatty())
    result["dataset"] = str(args.data)
    return _finish(args, result, t0)


# --- the parsers ---------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, controls: int, bias: bool = True) -> None:
    g = p.add_argument_group("model and register neurons")
    g.add_argument("--model", required=True, help=model_help())
    g.add_argument("--neurons", default="auto",
                   help="register neurons: a JSON from 'ttreg calibrate', a published name, or "
                        "'auto' (default: calibrate on the first --search-images evaluation images, "
                        "as 'ttreg calibrate' does, with its held-out check)")
    g.add_argument("--top-k", type=int_or_auto(1), default=TOP_K_DEFAULT,
                   help="neurons to keep with --neurons auto, or 'auto' (default, as for 'ttreg "
                        "calibrate': the smallest k that clears the held-out images)")
    g.add_argument("--threshold", type=threshold_arg, default="auto",
                   help="outlier norm threshold (> 0) or 'auto' (mean + 3 std)")
    g.add_argument("--detection-layer", type=int, default=-1, help="block checked for outliers (-1)")
    g.add_argument("--top-layer", type=int_or_auto(), default="auto", help="last layer searched, or 'auto'")
    g.add_argument("--search-images", type=int_at_least(1), default=64,
                   help="evaluation images --neurons auto calibrates on (64; 20%% of them held out)")
    g.add_argument("--num-registers", type=register_counts, default=1,
                   help="test-time registers (1); several, e.g. 0,1,2,3,4,5, for the ablation: one row "
                        "per count (0: the plain model; no random controls then)")
    g.add_argument("--preset", default="paper", choices=("paper", "official"),
                   help="the paper's edit or the authors' released code's (paper)")
    g.add_argument("--controls", type=int_at_least(0), default=controls,
                   help=f"random-neuron control draws ({controls})")
    if bias:
        g.add_argument("--bias-arm", action="store_true",
                       help="add the attention-bias form as an arm: the bias saved with --neurons, else "
                            "fitted on the --search-images")
    o = p.add_argument_group("run")
    o.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N images")
    o.add_argument("--batch-size", type=int_at_least(1), default=16, help="images per forward pass (16)")
    o.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1, mps, ... (default cpu)")
    o.add_argument("--out", default=None, help="write the JSON result here")
    o.add_argument("--quiet", action="store_true", help="no progress or notes on stderr")


def add_eval_parsers(subparsers) -> None:
    """Add ``outliers``, ``lost``, ``probe``, ``zeroshot``, ``typographic`` and ``attribution`` to ``subparsers``;
    each sets ``func`` (call ``args.func(args)``)."""
    p = subparsers.add_parser("outliers", help="outlier tokens and attention: plain vs registers vs control",
                              description="Fraction of images with outlier tokens, max/median patch "
                                          "norm per layer, CLS attention entropy and top-5 mass, and "
                                          "the rebuttal's statistics: patch-norm median and std, "
                                          "outlier-token norms, CLS attention to the registers "
                                          "against its median to the other tokens.")
    p.add_argument("--images", required=True, help="a folder, a list file, or 'skimage'")
    p.add_argument("--count-cls", action="store_true",
                   help="count the CLS token (every prefix token) as an outlier candidate, as the "
                        "authors' code does (default: patches only)")
    _common(p, controls=3)
    p.set_defaults(func=cmd_outliers)

    p = subparsers.add_parser("lost", help="LOST object discovery, CorLoc (VOC07/VOC12/COCO20k)",
                              description="LOST (valeoai/LOST) on the last layer's patch keys, each "
                                          "image at full resolution zero-padded to a multiple of the "
                                          "patch size; CorLoc at IoU 0.5. --authors-sweep (or "
                                          "--features/--layers/--normalize/--gram-bias) runs the "
                                          "test-time-register authors' sweep and reports every "
                                          "configuration and each arm's best.")
    p.add_argument("--voc", help="a Pascal VOC folder (JPEGImages/, Annotations/)")
    p.add_argument("--split", default="trainval", help="ImageSets/Main/<split>.txt if present (trainval)")
    p.add_argument("--no-hards", action="store_true",
                   help="VOC: drop difficult and truncated objects and images left without any; "
                        "COCO: drop images without non-crowd boxes (LOST's --no_hard)")
    p.add_argument("--coco", help="a COCO-style JSON (instances_train2014.json for COCO20k)")
    p.add_argument("--coco-images", help="folder of the COCO images (default: images/ beside the JSON)")
    p.add_argument("--coco20k", nargs="?", const="download", default=None, metavar="LIST",
                   help="keep LOST's COCO20k images only: its coco_20k_filenames.txt, downloaded once "
                        "from the LOST repository and checked (or give a local copy)")
    p.add_argument("--k-patches", type=int_at_least(1), default=100, help="LOST's k (100)")
    p.add_argument("--resize", action="store_true",
                   help="squash images to the model's input size and scale boxes back, for models "
                        "that take one size only (a deviation from LOST's protocol)")
    p.add_argument("--keep-boxes", action="store_true", help="store the predicted boxes in the JSON")
    w = p.add_argument_group("sweep (the test-time-register authors' protocol; default: LOST's own, "
                             "last-layer keys, no normalisation, no bias)")
    w.add_argument("--features", nargs="+", choices=("key", "query", "value"), default=None,
                   help="features of each --layers block (key)")
    w.add_argument("--layers", nargs="+", type=int, default=None, metavar="L",
                   help="blocks to read them from, negative from the end, e.g. -4 -3 -2 -1 (-1)")
    w.add_argument("--normalize", action="store_true", help="L2-normalise each patch's features")
    w.add_argument("--gram-bias", nargs="+", type=finite_number, default=None, metavar="B",
                   help="values added to the Gram matrix, e.g. -1 -0.5 0 (0)")
    w.add_argument("--authors-sweep", action="store_true",
                   help="key, query and value of the last four blocks, L2-normalised, Gram bias -1 to 0 "
                        "in steps of 0.1 (options given with it replace its parts); every configuration's "
                        "CorLoc is reported and each arm's best, chosen on the evaluated images as the "
                        "authors did")
    _common(p, controls=1)
    p.set_defaults(func=cmd_lost)

    p = subparsers.add_parser("probe", help="linear probes: classification, segmentation, depth",
                              description="Linear probes on frozen features, DINOv2's protocol "
                                          "(dinov2/eval/linear.py; BNHead for dense tasks), the "
                                          "Denoising-ViT dense protocol the paper used (--protocol "
                                          "dvt) or --quick; mean ± 95% CI over seeds.")
    p.add_argument("--task", required=True, choices=("classification", "segmentation", "depth"),
                   help="what the probe predicts")
    p.add_argument("--data", required=True,
                   help="classification: ROOT/<class>/<img> or ROOT/{train,val}/<class>/<img>; "
                        "segmentation: ROOT/images + ROOT/masks (or ROOT/{train,val}/..., or ADE20k's "
                        "images/ + annotations/); depth: ROOT/images + ROOT/depth")
    p.add_argument("--token", default=None,
                   choices=("cls", "center", "outlier", "register", "trained-register"),
                   help="classification: probe one token of the last block (the paper's Table 1): the "
                        "class token, the central patch, the largest-norm patch, the test-time register "
                        "(registers arms only) or the first trained register (default: DINOv2's inputs)")
    p.add_argument("--geometry", default="model", choices=("model", "dinov2"),
                   help="classification: resize and centre-crop to the model's input size (model; "
                        "default) or DINOv2's Resize(256) + CenterCrop(224), the model run at 224 px, "
                        "the heads trained on RandomResizedCrop(224) + flip views (linear.py's train "
                        "transform)")
    p.add_argument("--train-views", type=int_at_least(1), default=None, metavar="N",
                   help="--geometry dinov2: augmented views cached per training image, pass k over "
                        "the data reading view k mod N (default: one per pass, at most 10)")
    p.add_argument("--protocol", default="dinov2", choices=("dinov2", "dvt"),
                   help="dinov2: DINOv2's linear.py / BNHead on cached features with its SGD grid "
                        "(default); dvt (segmentation, depth): the Denoising-ViT configs the paper's "
                        "ADE20k and NYUd numbers come from -- augmented crops through the frozen "
                        "backbone, AdamW, sliding-window (ADE20k) or flip-averaged (NYUd) testing, "
                        "Eigen crop, metrics at label resolution")
    p.add_argument("--crop-size", type=_size, default=None, metavar="PX",
                   help="--protocol dvt: training crop, e.g. 512 or 416x544 (default: the config's, "
                        "512 ADE20k / 416x544 NYUd; scales and sliding windows follow in proportion)")
    p.add_argument("--seeds", type=int_at_least(1), default=3, help="probe seeds (3)")
    p.add_argument("--val-fraction", type=number_in(0, 1, lo_open=True, hi_open=True), default=0.25,
                   help="held-out share without a val split, in (0, 1) (0.25)")
    p.add_argument("--cache", default=None, help="feature cache folder (default: no cache)")
    p.add_argument("--num-classes", type=int_at_least(1), default=None,
                   help="segmentation classes (default: from masks)")
    p.add_argument("--ignore-index", type=int, default=255, help="mask label to ignore (255)")
    p.add_argument("--reduce-zero-label", action="store_true", help="label 0 is ignore (ADE20k)")
    p.add_argument("--depth-scale", type=positive_number, default=1000.0,
                   help="16-bit depth PNG units per metre (1000)")
    p.add_argument("--min-depth", type=positive_number, default=1e-3, help="depth range start (0.001 m)")
    p.add_argument("--max-depth", type=positive_number, default=10.0, help="depth range end (10 m, NYUd)")
    d = p.add_argument_group("DINOv2 protocol (default)")
    d.add_argument("--select-on", default="eval", choices=("eval", "holdout"),
                   help="choose the head on the evaluation split (DINOv2's linear.py; default) or on "
                        "a --holdout share of the training split")
    d.add_argument("--holdout", type=number_in(0, 1, lo_open=True, hi_open=True), default=0.1,
                   help="training share for --select-on holdout, in (0, 1) (0.1)")
    d.add_argument("--learning-rates", type=positive_number, nargs="+", default=None, metavar="LR",
                   help="grid before scaling by batch/256 (default: DINOv2's 13 values, 1e-5 to 0.1)")
    d.add_argument("--iterations", type=int_at_least(1), default=None,
                   help="steps per head (dinov2: 12500 classification, 2000 dense; dvt: 40000 "
                        "ADE20k, 38400 NYUd, warm-ups shortened in proportion)")
    d.add_argument("--probe-batch-size", type=int_at_least(1), default=None,
                   help="probe batch (128 / 16 dense; dvt 16)")
    q = p.add_argument_group("quick probe")
    q.add_argument("--quick", action="store_true",
                   help="ttreg's fast probe: one linear layer on standardised features, AdamW")
    q.add_argument("--steps", type=int_at_least(1), default=300, help="AdamW steps per --quick probe (300)")
    _common(p, controls=0)
    p.set_defaults(func=cmd_probe)

    p = subparsers.add_parser("zeroshot", help="CLIP zero-shot classification or segmentation",
                              description="Zero-shot classification (ImageFolder; arms plain, "
                                          "registers, zeroed, random-zeroed) or segmentation "
                                          "(images/ + masks/ [+ labels.json]; Chefer et al.'s "
                                          "metrics).")
    p.add_argument("--task", default="classification", choices=("classification", "segmentation"),
                   help="classification (default) or segmentation")
    p.add_argument("--data", required=True, help="classification: ImageFolder root (val/ used if "
                                                 "present); segmentation: ROOT/images + ROOT/masks")
    p.add_argument("--classnames", default=None, help="class names file, one a line (default: "
                                                      "folder names, or ImageNet's for WordNet-id folders)")
    p.add_argument("--templates", default=None, help="prompt templates file (default: CLIP's 80)")
    p.add_argument("--heatmap", default=None, choices=("direct", "cosine", "attention"),
                   help="segmentation heat maps: direct (Gandelsman et al.'s direct contributions; "
                        "default for CLIP), cosine (patch tokens vs text), attention (last-layer CLS "
                        "attention; default otherwise)")
    p.add_argument("--geometry", default="aligned", choices=("aligned", "reference"),
                   help="segmentation: squash image and mask to the model's size (aligned; default) or "
                        "clip_text_span's: image resized and centre-cropped, mask squashed (reference)")
    _common(p, controls=3)
    p.set_defaults(func=cmd_zeroshot)

    p = subparsers.add_parser("typographic", help="typographic attacks on CLIP",
                              description="Write a wrong class name on each image; attack success for "
                                          "plain, register neurons shifted onto the text, random "
                                          "neurons, register neurons zeroed, the register neurons' "
                                          "values on the text replaced by random draws (--controls "
                                          "seeds; the rebuttal's 'random register neuron value'), "
                                          "and pixel ablation.")
    p.add_argument("--data", required=True, help="ImageFolder root (val/ used if present)")
    p.add_argument("--classnames", default=None, help="class names file, one a line (default: folder names)")
    p.add_argument("--templates", default=None, help="prompt templates file (default: CLIP's 80)")
    p.add_argument("--position", default="random", choices=("random", "center"),
                   help="where the text goes (random)")
    p.add_argument("--font-size", type=int_at_least(1), default=None,
                   help="text size in pixels (default: from the image size)")
    p.add_argument("--seed", type=int, default=0, help="seed for the written class and its position")
    _common(p, controls=3, bias=False)
    p.set_defaults(func=cmd_typographic)

    from .attribution import DEFAULT_ANSWER, DEFAULT_TEMPLATE
    p = subparsers.add_parser("attribution", help="VLM text-to-image attribution: pointing game, energy in box",
                              description="Attribution maps of a vision-language model's language "
                                          "model (hf:... LLaVA, LLaVA-OneVision, Idefics3, SmolVLM, "
                                          "PaliGemma, Gemma 3, InternVL) "
                                          "for a prompt naming each object of each image, scored "
                                          "against its boxes (pointing game, energy in box) for "
                                          "the arms plain, registers, zeroed, bias and, with "
                                          "--controls N, N random-neuron draws; 95% "
                                          "bootstrap intervals over the image-object pairs.")
    p.add_argument("--data", required=True, help="a VOC folder (Annotations/, JPEGImages/), a COCO-style "
                                                 "JSON, or a folder holding one (images in images/)")
    p.add_argument("--split", default="trainval", help="VOC: ImageSets/Main/<split>.txt if present (trainval)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help=f"prompt naming the object with {{name}} (default: '{DEFAULT_TEMPLATE}')")
    p.add_argument("--answer", default=DEFAULT_ANSWER,
                   help=f"answer attributed, with {{name}} (default: '{DEFAULT_ANSWER}'), or "
                        "'generate' for each arm's own greedy answer")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                   help="language-model layers averaged (default: all; negatives from the end)")
    p.add_argument("--bias-images", type=int_at_least(0), default=64,
                   help="images to fit the attention bias on for the bias arm when the neuron set "
                        "has none (64; 0: no bias arm)")
    p.add_argument("--bootstrap", type=int_at_least(1), default=1000, help="bootstrap resamples (1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    _common(p, controls=0, bias=False)     # the bias arm: --bias-images
    p.set_defaults(func=cmd_attribution)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ttreg eval", description=__doc__.split("\n")[0])
    add_eval_parsers(parser.add_subparsers(dest="eval_cmd", required=True, metavar="EXPERIMENT"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """``ttreg eval`` alone; exit status as for ``ttreg`` (see :mod:`ttreg.cli`)."""
    return run(lambda: build_parser().parse_args(argv), "ttreg eval")


if __name__ == "__main__":
    sys.exit(main())
