"""CLIP zero-shot classification and zero-shot segmentation, plain vs test-time registers.

Classification (OpenAI's CLIP protocol, as open_clip's ``zero_shot_classifier``): class
embeddings are the mean over prompt templates of the normalised text embeddings
(renormalised); an image goes to the class of highest cosine similarity. Class names and the 80
prompt templates of OpenAI's CLIP ship in ``ttreg/resources/``. Arms: plain, registers, the
register neurons zeroed and random neurons zeroed (the paper's controls).

Segmentation (ImageNet-segmentation: one binary foreground mask per image). Heat maps:

* ``direct`` (default for CLIP): Gandelsman et al.'s (clip_text_span, ``compute_segmentations.py``),
  each patch's direct contribution to the image embedding summed over layers and heads, its
  score for the class minus its mean score over all classes (:mod:`.direct`); upsampled, then
  negatives clipped to 0;
* ``cosine``: the cosine similarity of each projected patch token with the class's text
  embedding;
* ``attention`` (models without a text tower, e.g. DINOv2): the last layer's CLS attention to
  the patches, mean over heads.

The class is the image's label when the data set gives one, else the arm's zero-shot prediction
(the reference always uses the prediction). Geometry: image and mask are both resized to the
model's input size (image bicubic, mask nearest), as Chefer et al.'s loader does; the reference
CLIP pipeline centre-crops the image but resizes the mask, which misaligns them on non-square
images, so it is not followed there. Heat maps are upsampled bilinearly to that size and scored
exactly as Chefer et al. (:func:`ttreg.eval.metrics.binary_heatmap_scores`: min-max
normalisation, threshold at the mean, pixel accuracy and mIoU from dataset totals, mAP = mean of
per-image APs pooled over both channels).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..adapters import wrap
from ..tracing import trace
from .arms import control_rows, make_arms, summarize_draws, summarize_random
from .backbone import clip_embeddings, preprocessing
from .datasets import load_mask, load_rgb, paired_files, resize, resize_center_crop, resize_target, to_tensor
from .direct import clip_tower, direct_heatmaps
from .metrics import binary_heatmap_scores, summarize_heatmaps, topk_accuracy
from .report import format_table

HEATMAPS = ("direct", "cosine", "attention")

DATA_DIR = Path(__file__).resolve().parent.parent / "resources"


def _read_lines(path: Path) -> list[str]:
    return [l.rstrip("\n") for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


def load_classnames(path=None) -> list[str]:
    """Class names, one a line; default: the 1000 ImageNet names of OpenAI's CLIP."""
    return _read_lines(Path(path) if path else DATA_DIR / "imagenet_classes.txt")


def load_templates(path=None) -> list[str]:
    """Prompt templates with ``{}`` for the class name, one a line; default: CLIP's 80."""
    tpl = _read_lines(Path(path) if path else DATA_DIR / "clip_templates.txt")
    bad = [t for t in tpl if "{}" not in t]
    if bad:
        raise ValueError(f"templates need a '{{}}' for the class name: {bad[0]!r}")
    return tpl


def folder_classnames(classes: Sequence[str]) -> list[str]:
    """Readable names for ImageFolder classes: ImageNet's names for its 1000 WordNet-id
    folders (sorted order), else the folder names with ``_`` as spaces."""
    if len(classes) == 1000 and all(c.startswith("n") and c[1:].isdigit() for c in classes):
        return load_classnames()
    return [c.replace("_", " ") for c in classes]


@torch.no_grad()
def text_classifier(model, tokenizer: Callable, classnames: Sequence[str],
                    templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """``(C, E)`` unit class embeddings: mean of the normalised prompt embeddings, renormalised."""
    device = next(model.parameters()).device
    prompts = [t.format(c) for c in classnames for t in templates]
    embs = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i:i + batch_size]).to(device)
        embs.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    e = torch.cat(embs).reshape(len(classnames), len(templates), -1).mean(1)
    return F.normalize(e, dim=-1)


@torch.no_grad()
def classify(model, x: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Zero-shot logits ``(B, C)`` (cosine similarities x 100)."""
    img = model.encode_image(x)
    return 100 * F.normalize(img.float(), dim=-1) @ classifier.T.to(img.device)


def _batches(items: Sequence, batch_size: int, progress: bool = False, desc: str = ""):
    """Consecutive chunks of ``items``, with a progress bar if asked."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        return tqdm(chunks, desc=desc, unit="batch")
    return chunks


def evaluate_zeroshot(model, tokenizer: Callable, items: Sequence[tuple], classnames: Sequence[str],
                      neurons, *, templates: Sequence[str] | None = None,
                      control_seeds: Sequence[int] = (), num_registers: int = 1,
                      preset: str = "paper", bias=None, batch_size: int = 32, transform: Callable | None = None,
                      progress: bool = False, print_table: bool = True) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy for each arm; ``items``: ``[(image path, class index)]``.

    Arms: plain, registers, ``zeroed`` (register neurons set to 0, no register) and
    ``random-zeroed-<s>`` for ``s`` in ``control_seeds`` (random neurons of the same layers,
    same counts, zeroed)."""
    templates = list(templates) if templates is not None else load_templates()
    size, mean, std = preprocessing(model)
    tf = transform or (lambda im: to_tensor(resize_center_crop(im, size), mean, std))
    p = wrap(model).parameter()
    W = text_classifier(model, tokenizer, classnames, templates)
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=num_registers,
                     preset=preset, random=False, zeroed=True, bias=bias)
    logits: dict[str, list] = {a.name: [] for a in arms}
    chunks = _batches(items, batch_size, progress, "zero-shot")
    for chunk in chunks:
        x = torch.stack([tf(load_rgb(q)) for q, _ in chunk]).to(p.device, p.dtype)
        for arm in arms:
            with arm.context(model):
                logits[arm.name].append(classify(model, x, W).cpu())
    labels = torch.tensor([int(t) for _, t in items])
    per_arm = {a.name: {**topk_accuracy(torch.cat(logits[a.name]), labels), "images": len(items),
                        "setup": a.describe()} for a in arms}
    result = {"experiment": "zeroshot", "task": "classification",
              "config": {"classes": len(classnames), "templates": len(templates),
                         "num_registers": num_registers, "preset": preset,
                         "control_seeds": list(control_seeds)},
              "neurons": arms[1].describe()["neurons"], "arms": per_arm,
              "random_zeroed": summarize_draws(per_arm, ["top1", "top5"], "random-zeroed")}
    if print_table:
        print(table(result))
    return result


# --- segmentation -------------------------------------------------------------------------------
def patch_similarity(patches: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of patch embeddings ``(B, P, E)`` with one text embedding per image
    ``(B, E)``, as maps ``(B, rows, cols)``."""
    sim = (F.normalize(patches.float(), dim=-1) * F.normalize(text.float(), dim=-1)[:, None]).sum(-1)
    return sim.reshape(len(patches), *grid)


@torch.no_grad()
def text_heatmaps(model, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Heat maps ``(B, rows, cols)``: each projected patch token of ``x`` against ``text``."""
    patches = clip_embeddings(model, x)[1]
    return patch_similarity(patches, text.to(patches.device), tuple(wrap(model).grid_size(x)))


@torch.no_grad()
def attention_heatmaps(model, x: torch.Tensor) -> torch.Tensor:
    """Last-layer attention of the first (CLS) token to the patches, mean over heads."""
    tr = trace(model, x, norms=False, attention=[-1])
    return tr.cls_attention(wrap(model).num_layers - 1).mean(1).float()


def segmentation_items(root) -> list[tuple[Path, Path, Any]]:
    """``[(image, mask, label or None)]`` from ``root/images`` + ``root/masks`` (non-zero =
    foreground) and an optional ``root/labels.json`` (``{stem: class index or name}``) or
    ``root/labels.txt`` (``stem label`` per line)."""
    root = Path(root)
    pairs = paired_files(root / "images", root / "masks")
    labels: dict[str, Any] = {}
    if (root / "labels.json").is_file():
        labels = json.loads((root / "labels.json").read_text())
    elif (root / "labels.txt").is_file():
        for line in (root / "labels.txt").read_text().splitlines():
            if line.strip():
                stem, lab = line.split(None, 1)
                labels[stem] = lab.strip()
    return [(i, m, labels.get(i.stem)) for i, m in pairs]


def _label_index(label, classnames: Sequence[str]) -> int | None:
    if label is None:
        return None
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
        return int(label)
    try:
        return list(classnames).index(str(label))
    except ValueError:
        raise ValueError(f"label {label!r} is not among the class names") from None


@torch.no_grad()
def _segment_chunk(model, ad, chunk, arms, scores, heatmap, W, classnames, size, mean, std,
                   geometry: str = "aligned") -> None:
    """Heat maps of one batch of ``(image, mask, label)`` under every arm, scored into ``scores``
    (``geometry``: see :data:`GEOMETRIES`)."""
    p = ad.parameter()
    fit = resize if geometry == "aligned" else resize_center_crop
    x = torch.stack([to_tensor(fit(load_rgb(i), size), mean, std) for i, _, _ in chunk])
    x = x.to(p.device, p.dtype)
    masks = [resize_target(load_mask(m), size) > 0 for _, m, _ in chunk]
    given = [_label_index(l, classnames or []) if heatmap != "attention" else None for _, _, l in chunk]
    labels = torch.tensor([-1 if g is None else g for g in given])
    for arm in arms:
        with arm.context(model):
            if heatmap == "direct":
                heat = direct_heatmaps(model, x, W, labels)[0]
            elif heatmap == "cosine":
                img, patches = clip_embeddings(model, x)
                pred = (F.normalize(img.float(), dim=-1) @ W.T.to(img.device)).argmax(-1).cpu()
                idx = torch.where(labels >= 0, labels, pred)
                heat = patch_similarity(patches, W[idx.to(W.device)].to(patches.device),
                                        tuple(ad.grid_size(x)))
            else:
                heat = attention_heatmaps(model, x)
        up = F.interpolate(heat[:, None].float().cpu(), size=size, mode="bilinear", align_corners=False)[:, 0]
        if heatmap == "direct":
            up = up.clamp_min(0)                # Gandelsman et al.: clip after upsampling
        scores[arm.name] += [binary_heatmap_scores(h, m) for h, m in zip(up, masks)]


#: how image and mask reach the model's size: ``aligned`` squashes both (pixels stay aligned);
#: ``reference`` is clip_text_span's: the image resized (shorter side) and centre-cropped, the mask
#: squashed, so on non-square images the two cover different parts of the scene
GEOMETRIES = {"aligned": "image and mask resized to the model's input size",
              "reference": "clip_text_span's: image resized and centre-cropped, mask resized "
                           "(not aligned on non-square images)"}


def evaluate_zeroshot_segmentation(model, items: Sequence[tuple], neurons, *,
                                   heatmap: str = "direct", tokenizer: Callable | None = None,
                                   classnames: Sequence[str] | None = None,
                                   templates: Sequence[str] | None = None,
                                   control_seeds: Sequence[int] = (), num_registers: int = 1,
                                   preset: str = "paper", bias=None, batch_size: int = 16,
                                   geometry: str = "aligned", progress: bool = False,
                                   print_table: bool = True) -> dict[str, Any]:
    """Zero-shot segmentation scores for each arm (``geometry``: :data:`GEOMETRIES`). ``items``: ``[(image, mask, label)]`` with
    ``label`` a class index, a class name or None (then the arm's own zero-shot prediction).
    ``heatmap``: ``direct``, ``cosine`` (both need a CLIP model and its tokenizer) or
    ``attention`` (see the module docstring)."""
    if heatmap not in HEATMAPS:
        raise ValueError(f"heatmap must be one of {', '.join(HEATMAPS)}, got {heatmap!r}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    size, mean, std = preprocessing(model)
    ad = wrap(model)
    W = None
    if heatmap != "attention":
        if tokenizer is None:
            raise ValueError(f"heatmap={heatmap!r} needs a CLIP model and its tokenizer")
        if heatmap == "direct":
            clip_tower(model)                                    # unsupported towers fail here
        classnames = list(classnames) if classnames is not None else load_classnames()
        W = text_classifier(model, tokenizer, classnames,
                            list(templates) if templates is not None else load_templates())
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=num_registers,
                     preset=preset, bias=bias)
    scores: dict[str, list] = {a.name: [] for a in arms}
    chunks = _batches(items, batch_size, progress, "zero-shot segmentation")
    for chunk in chunks:
        _segment_chunk(model, ad, chunk, arms, scores, heatmap, W, classnames, size, mean, std, geometry)
    per_arm = {a.name: {**summarize_heatmaps(scores[a.name]), "images": len(items),
                        "setup": a.describe()} for a in arms}
    result = {"experiment": "zeroshot", "task": "segmentation",
              "protocol": {"metrics": "hila-chefer/Transformer-Explainability utils/metrices.py "
                                      "(batch_pix_accuracy, batch_intersection_union, get_ap_scores)",
                           "heatmap": {"direct": "yossigandelsman/clip_text_span compute_segmentations.py",
                                       "cosine": "ttreg (projected patch tokens vs text)",
                                       "attention": "last-layer CLS attention, mean over heads"}[heatmap],
                           "geometry": GEOMETRIES[geometry]},
              "config": {"heatmap": heatmap, "geometry": geometry, "input_size": list(size),
                         "num_registers": num_registers,
                         "preset": preset, "control_seeds": list(control_seeds)},
              "neurons": next((a.describe()["neurons"] for a in arms if a.kind == "registers"), []),
              "arms": per_arm, "random": summarize_random(per_arm, ["miou", "pixel_accuracy", "map"])}
    if print_table:
        print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    if result["task"] == "classification":
        cols, title = [("top1", "top-1 %"), ("top5", "top-5 %")], "CLIP zero-shot classification"
    else:
        cols = [("miou", "mIoU %"), ("pixel_accuracy", "pixel acc %"), ("map", "mAP %")]
        title = f"Zero-shot segmentation ({result['config']['heatmap']} heat maps)"
    rows = control_rows(result)
    for r in rows:
        for k, _ in cols:
            v = r.get(k)
            r[k] = {**v, "mean": 100 * v["mean"], "ci95": 100 * v["ci95"]} if isinstance(v, dict) \
                else (None if v is None else 100 * v)
    return format_table(rows, [("arm", "arm"), ("preset", "preset"), ("images", "images"), *cols],
                        title=title, digits=1)
